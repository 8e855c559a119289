"""Knowledge distillation: train a student (an onnxforge model run as a TorchGraph) to give a teacher's outputs on
sample inputs and perturbed copies of them, keeping the weights that did best on held-out samples."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from onnxforge.distill.augment import Augmenter
from onnxforge.distill.correspondence import Block
from onnxforge.distill.torch_graph import TorchGraph, write_back
from onnxforge.errors import PassUsageError
from onnxforge.ir import Model

Sample = Mapping[str, np.ndarray]
Outputs = Mapping[str, np.ndarray]
Loss = Literal["auto", "mse", "cosine", "kl"]
# The learning rate rises from a hundredth over these first steps: Adam's first steps on a
# trained model, at full rate, move every weight by about the rate whatever its gradient, which undoes much at once.
WARM_UP_STEPS = 100
WARM_UP_SHARE = 0.1  # or over this share of a round of training (its steps or its time), if that ends sooner
# A block whose end is within this relative squared error of the teacher's has nothing to win back.
EXACT = 1e-12
# Integer codes step by this many times the learning rate, in quantization steps: a code changes when it has moved
# half a step, which, at a weight's rate relative to its size, takes a 4-bit code thousands of steps.
CODE_STEPS_PER_LR = 100.0


@dataclass(frozen=True)
class Schedule:
    """How long and how to train: at most `steps` optimizer steps and `seconds` (0: no time limit), `batch`
    samples a step, Adam with each weight tensor's rate `lr` times its root mean square (warmed up, then decayed
    along a cosine to a tenth over the steps or the seconds, whichever runs out first: _rate_factor), gradients
    clipped to norm 1; the held-out samples judge the weights `checks` times (spread over the steps, and over the
    seconds when limited) and at the end."""

    steps: int = 500
    seconds: float = 0.0
    batch: int = 8
    lr: float = 1e-4  # the step, relative to each weight tensor's root mean square
    loss: Loss = "auto"
    temperature: float = 2.0
    augment: bool = True
    seed: int = 0
    device: str = "cpu"
    checks: int = 10  # times the held-out samples judge the weights during training
    matched_weight: float = 0.5  # of the intermediate tensors' error against the outputs' (when any are matched)


@dataclass
class Distilled:
    """What training gave: the student with its best weights written back (None when training never improved on
    the held-out samples), the steps taken, the time, and the held-out error before and after."""

    model: Model | None
    steps: int
    seconds: float
    error_before: float
    error_after: float
    losses: list[float] = field(default_factory=list)  # the training loss at each check


@dataclass(frozen=True)
class Stage:
    """One round of training: the initializers it trains (None: every one) towards the teacher's values of `end`
    (a tensor both models compute, by relative squared error) or, when `end` is None, of the outputs (and of the
    `matched` tensors)."""

    trained: frozenset[str] | None = None
    end: str | None = None


def distill(
    student: Model,
    teacher: Callable[[Sample], Outputs],
    feeds: Callable[[Sample], Sample],
    train: Sequence[Sample],
    held_out: Sequence[Sample],
    schedule: Schedule,
    progress: Callable[[str], None] = lambda line: None,
    matched: Sequence[str] = (),
    blocks: Sequence[Block] = (),
) -> Distilled:
    """Train `student`'s weights towards `teacher` (a function giving the teacher's outputs on a sample) on
    `train` and, with `schedule.augment`, perturbed and mixed copies of it; `feeds(sample)` is the sample as the
    student takes it. The error is the mean over samples and float outputs of `schedule.loss` ("auto": the KL
    divergence where the teacher's output is a (log-)probability distribution over its last axis, else the squared
    error relative to the output's energy); `held_out` judges it before training and at each check. `progress`
    gets a line at each step (`distill step 40/300 loss 0.0123`) and at each check.

    End to end (no `blocks`), every weight trains at once and the best weights are kept. `matched` names
    intermediate tensors both models compute (the teacher's function gives them too): training also lowers their
    relative squared error, weighted by `schedule.matched_weight`; the held-out error is the outputs' alone.

    Block-wise, each block in turn trains its own initializers towards the teacher's value of the tensor it ends
    at (the teacher's function gives those tensors too), weighted by how much the outputs move with each element,
    on the student's own values before it (BRECQ's order: a block makes up for the error of those before it), and
    keeps the weights that did best at the outputs on the held-out samples; a block already as the teacher's is
    skipped. Then every weight trains towards the outputs, as end to end. The steps and seconds are shared evenly
    among these stages.
    """
    torch.manual_seed(schedule.seed)
    module = TorchGraph(student).to(schedule.device)
    extra = [*matched, *(block.end for block in blocks)]
    held_out_targets = [teacher(sample) for sample in held_out]
    error_before = _held_out_error(module, feeds, held_out, held_out_targets, Stage(), schedule, extra)
    progress(f"before training: held-out error {error_before:.4g}")
    if not any(p.requires_grad for p in module.parameters()):
        return Distilled(None, 0, 0.0, error_before, error_before)
    stages = [*(Stage(block.initializers, block.end) for block in blocks), Stage()]
    run = _Run(module, teacher, feeds, train, held_out, held_out_targets, schedule, progress, extra, error_before)
    for index, stage in enumerate(stages):
        steps = max(schedule.steps // len(stages), 1)
        # With a time limit, each stage has its share of what is left (a stage past the limit stops at once).
        seconds = max(schedule.seconds - run.seconds(), 1e-9) / (len(stages) - index) if schedule.seconds else 0.0
        label = "" if len(stages) == 1 else f"block {index + 1}/{len(blocks)}: " if stage.end else "all weights: "
        # Judging takes time too: the stages share the checks, two at least each.
        checks = max(schedule.checks // len(stages), 2) if len(stages) > 1 else schedule.checks
        run.train(stage, matched if stage.end is None else (), steps, seconds, checks, label)
    if run.error >= error_before:
        return Distilled(None, run.steps, run.seconds(), error_before, error_before, run.losses)
    return Distilled(
        write_back(student, module.to("cpu")), run.steps, run.seconds(), error_before, run.error, run.losses
    )


class _Run:
    """Training state shared by the stages: the module, the teacher's targets of the training samples, the
    augmenter, the held-out error of the module's current weights (at the outputs), the steps taken, the losses
    and the clock."""

    def __init__(self, module, teacher, feeds, train, held_out, held_out_targets, schedule, progress, extra, error):
        self.module, self.teacher, self.feeds = module, teacher, feeds
        self.train_samples, self.held_out, self.held_out_targets = train, held_out, held_out_targets
        self.schedule, self.progress, self.extra = schedule, progress, extra
        self.augmenter = Augmenter(train, schedule.seed)
        self.rng = np.random.default_rng(schedule.seed)
        self.cached = {id(sample): teacher(sample) for sample in train}
        self.start = time.perf_counter()
        self.steps, self.losses, self.error = 0, [], error

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def train(self, stage: Stage, matched: Sequence[str], steps: int, seconds: float, checks: int, label: str) -> None:
        """Train the stage's initializers for at most `steps` and `seconds` (0: no limit), judging them `checks`
        times on the held-out samples; keep its best weights."""
        module, schedule = self.module, self.schedule
        if stage.trained is not None:
            module.train_only(stage.trained)
        parameters = [p for p in module.parameters() if p.requires_grad]
        also = [*matched, stage.end] if stage.end else list(matched)
        if stage.end is not None and self._judge(stage) <= EXACT:
            self.progress(f"{label}already as the teacher's: skipped")
            module.train_only(module.initializer_parameters())
            return
        best_error = self.error  # a block's weights are kept for the outputs' sake
        best_state = {name: value.detach().clone() for name, value in module.state_dict().items()}
        codes = {id(module.initializer_parameters()[name]) for name in module.code_layouts()}
        optimizer = _optimizer(parameters, schedule.lr, codes)
        checks = max(checks, 1)
        check_every = max(steps // checks, 1)
        start, running, step = time.perf_counter(), [], 0
        next_check = start + seconds / checks  # with a time limit, the checks are spread over it too
        while step < steps and not (seconds and time.perf_counter() - start >= seconds):
            optimizer.zero_grad()
            total = 0.0
            for _ in range(schedule.batch):
                sample, target = self._draw()
                loss = self._loss(module(self.feeds(sample), also=also), target, stage, matched) / schedule.batch
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            progress = max(step / steps, (time.perf_counter() - start) / seconds if seconds else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _rate_factor(step, progress)
            optimizer.step()
            step += 1
            running.append(total)
            self.progress(f"{label}distill step {step}/{steps} loss {total:.4g}")
            now = time.perf_counter()
            due = seconds > 0 and now >= next_check
            if step % check_every == 0 or step == steps or due or (seconds and now - start >= seconds):
                next_check = now + seconds / checks
                error = self._judge(Stage())
                self.losses.append(float(np.mean(running)))
                running = []
                self.progress(f"{label}step {step}/{steps}: loss {self.losses[-1]:.4g}, held-out error {error:.4g}")
                if error < best_error:
                    best_error = error
                    best_state = {name: value.detach().clone() for name, value in module.state_dict().items()}
        self.steps += step
        module.load_state_dict(best_state)
        self.error = best_error
        module.train_only(module.initializer_parameters())

    def _draw(self) -> tuple[Sample, Outputs]:
        if self.schedule.augment and self.rng.random() < 0.75:
            sample = self.augmenter.draw()
            return sample, self.teacher(sample)
        sample = self.train_samples[self.rng.integers(len(self.train_samples))]
        return sample, self.cached[id(sample)]

    def _loss(self, outputs, target: Outputs, stage: Stage, matched: Sequence[str]) -> torch.Tensor:
        if stage.end is not None:
            return _sensitivity_weighted_error(outputs, stage.end, target[stage.end])
        return _training_loss(outputs, _outputs_only(target, self.extra), target, self.schedule, matched)

    def _judge(self, stage: Stage) -> float:
        return _held_out_error(
            self.module, self.feeds, self.held_out, self.held_out_targets, stage, self.schedule, self.extra
        )


def _sensitivity_weighted_error(outputs: Mapping[str, torch.Tensor], end: str, expected: np.ndarray) -> torch.Tensor:
    """The squared error of the tensor `end` against the teacher's, each element weighted by how much the outputs
    move with it (the square of the gradient of the outputs' dot product with a random direction, an estimate of
    the diagonal of J^T J, as BRECQ weights by the Fisher information), relative to the weighted energy of the
    teacher's: errors where nothing reads them (padded positions a pooling masks) count for nothing."""
    value = outputs[end]
    reads = [y for name, y in outputs.items() if name != end and y.is_floating_point() and y.requires_grad]
    want = torch.from_numpy(np.asarray(expected, np.float32)).to(value.device)
    if not reads:
        return ((value - want) ** 2).sum() / ((want**2).sum() + 1e-12)
    projection = sum((y * torch.randn_like(y)).sum() for y in reads)
    (gradient,) = torch.autograd.grad(projection, value, retain_graph=True, allow_unused=True)
    weight = torch.ones_like(value) if gradient is None else gradient.detach() ** 2
    return (weight * (value - want) ** 2).sum() / ((weight * want**2).sum() + 1e-12)


def _optimizer(parameters: list[torch.nn.Parameter], lr: float, codes: Collection[int] = ()) -> torch.optim.Adam:
    """Adam whose base step (each group's "base_lr", which _rate_factor scales) for each weight tensor is `lr` of
    its root mean square (a signal-processing constant of small values, as a mel filter bank, moves as little,
    relatively, as a layer's weights) and for integer codes (the parameters whose ids are in `codes`)
    CODE_STEPS_PER_LR * `lr` quantization steps."""
    rates = [lr * (CODE_STEPS_PER_LR if id(p) in codes else _root_mean_square(p)) for p in parameters]
    return torch.optim.Adam([{"params": [p], "lr": rate, "base_lr": rate} for p, rate in zip(parameters, rates)])


def _rate_factor(step: int, progress: float) -> float:
    """The factor of the base learning rate at `step`, `progress` (0 to 1) through a round of training, by steps
    or by time, whichever is further: a linear warm-up from a hundredth over WARM_UP_STEPS or the first
    WARM_UP_SHARE of the round, whichever ends first, under a cosine from 1 down to a tenth."""
    warm = min(max(step / WARM_UP_STEPS, progress / WARM_UP_SHARE), 1.0)
    return (0.01 + 0.99 * warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _root_mean_square(parameter: torch.nn.Parameter) -> float:
    return max(float(parameter.detach().pow(2).mean().sqrt()), 1e-6)


def device(choice: str) -> str:
    """The torch device for `choice`: auto is the GPU when PyTorch sees one; PassUsageError for cuda without one."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise PassUsageError("distill:device=cuda: PyTorch sees no GPU here")
    return choice


def output_error(outputs: Outputs, target: Outputs, loss: Loss = "auto", temperature: float = 2.0) -> float:
    """The distillation error of one sample's outputs against the teacher's (numpy): what training lowers."""
    with torch.no_grad():
        tensors = {name: torch.from_numpy(np.asarray(value)) for name, value in outputs.items()}
        return float(_loss(tensors, target, Schedule(loss=loss, temperature=temperature)))


def _training_loss(
    outputs: Mapping[str, torch.Tensor], expected: Outputs, target: Outputs, schedule: Schedule,
    matched: Sequence[str],
) -> torch.Tensor:  # fmt: skip
    loss = _loss(outputs, expected, schedule)
    if not matched:
        return loss
    inner = _loss(outputs, {name: target[name] for name in matched}, Schedule(loss="mse"))
    return loss + schedule.matched_weight * inner


def _outputs_only(target: Outputs, extra: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: value for name, value in target.items() if name not in extra}


def _loss(outputs: Mapping[str, torch.Tensor], target: Outputs, schedule: Schedule) -> torch.Tensor:
    terms = []
    for name, expected in target.items():
        expected = np.asarray(expected)
        if expected.dtype.kind != "f" or name not in outputs:
            continue
        got = outputs[name].float()
        want = torch.from_numpy(expected.astype(np.float32)).to(got.device)
        finite = torch.isfinite(want)
        if not bool(finite.all()):
            got, want = got[finite], want[finite]
        terms.append(_term(got, want, schedule))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def _term(got: torch.Tensor, want: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    if schedule.loss == "auto" and got.ndim >= 1 and got.shape[-1] > 1:
        log_teacher = _as_log_probabilities(want)
        if log_teacher is not None:  # a distribution over the last axis: match it as one
            log_student = got if bool((want <= 0).all()) else torch.log(got.clamp_min(1e-12))
            rows = log_teacher.reshape(-1, log_teacher.shape[-1])
            return (rows.exp() * (rows - log_student.reshape(rows.shape))).sum(-1).mean()
    if schedule.loss == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(got.reshape(1, -1), want.reshape(1, -1), eps=1e-12)[0]
    if schedule.loss == "kl" and got.ndim >= 1 and got.shape[-1] > 1:
        t = schedule.temperature
        log_student = torch.log_softmax(got / t, dim=-1)
        teacher = torch.softmax(want / t, dim=-1)
        return torch.nn.functional.kl_div(log_student, teacher, reduction="batchmean") * t * t
    return ((got - want) ** 2).sum() / ((want**2).sum() + 1e-12)


def _as_log_probabilities(values: torch.Tensor) -> torch.Tensor | None:
    """`values` as log-probabilities over the last axis when they are log-probabilities (all at most 0, each row's
    exponentials summing to 1) or probabilities (in [0, 1], each row summing to 1); else None."""
    if bool((values <= 1e-6).all()) and bool((torch.logsumexp(values, -1).abs() < 1e-3).all()):
        return values
    if bool(((values >= 0) & (values <= 1)).all()) and bool(((values.sum(-1) - 1).abs() < 1e-3).all()):
        return torch.log(values.clamp_min(1e-12))
    return None


def _held_out_error(
    module: TorchGraph,
    feeds: Callable[[Sample], Sample],
    held_out: Sequence[Sample],
    targets: Sequence[Outputs],
    stage: Stage,
    schedule: Schedule,
    extra: Sequence[str],
) -> float:
    """The mean error over the held-out samples of the stage's end (relative squared error), or of the outputs."""
    errors = []
    with torch.no_grad():
        for sample, target in zip(held_out, targets):
            if stage.end is None:
                errors.append(float(_loss(module(feeds(sample)), _outputs_only(target, extra), schedule)))
            else:
                got = module(feeds(sample), also=[stage.end])
                errors.append(float(_loss(got, {stage.end: target[stage.end]}, Schedule(loss="mse"))))
    return float(np.mean(errors)) if errors else math.inf
