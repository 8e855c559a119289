"""Knowledge distillation: train a student (an onnxforge model run as a TorchGraph) to give a teacher's outputs on
sample inputs and perturbed copies of them, keeping the weights that did best on held-out samples."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from onnxforge.distill.augment import Augmenter
from onnxforge.distill.torch_graph import TorchGraph, write_back
from onnxforge.errors import PassUsageError
from onnxforge.ir import Model

Sample = Mapping[str, np.ndarray]
Outputs = Mapping[str, np.ndarray]
Loss = Literal["auto", "mse", "cosine", "kl"]
# The learning rate rises from a hundredth over these first steps (a tenth of them, if fewer): Adam's first steps on a
# trained model, at full rate, move every weight by about the rate whatever its gradient, which undoes much at once.
WARM_UP_STEPS = 100


@dataclass(frozen=True)
class Schedule:
    """How long and how to train: at most `steps` optimizer steps and `seconds` (0: no time limit), `batch`
    samples a step, Adam with each weight tensor's rate `lr` times its root mean square (after a linear warm-up of
    WARM_UP_STEPS, cosine decay to a tenth over `steps`),
    gradients clipped to norm 1; the held-out
    samples judge the weights `checks` times (spread over the steps, and over the seconds when limited) and at the
    end."""

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


def distill(
    student: Model,
    teacher: Callable[[Sample], Outputs],
    feeds: Callable[[Sample], Sample],
    train: Sequence[Sample],
    held_out: Sequence[Sample],
    schedule: Schedule,
    progress: Callable[[str], None] = lambda line: None,
    matched: Sequence[str] = (),
) -> Distilled:
    """Train `student`'s weights towards `teacher` (a function giving the teacher's outputs on a sample) on
    `train` and, with `schedule.augment`, perturbed and mixed copies of it; `feeds(sample)` is the sample as the
    student takes it. The error is the mean over samples and float outputs of `schedule.loss` ("auto": the KL
    divergence where the teacher's output is a (log-)probability distribution over its last axis, else the squared
    error relative to the output's energy); `held_out` judges it before training and at each check, and
    the best weights are kept. `progress` gets a line at each check.

    `matched` names intermediate tensors both models compute (the teacher's function gives them too): training
    also lowers their relative squared error, weighted by `schedule.matched_weight`; the held-out error is the
    outputs' alone.
    """
    torch.manual_seed(schedule.seed)
    module = TorchGraph(student).to(schedule.device)
    parameters = [p for p in module.parameters() if p.requires_grad]
    held_out_targets = [_outputs_only(teacher(sample), matched) for sample in held_out]
    error_before = _held_out_error(module, feeds, held_out, held_out_targets, schedule)
    best_error, best_state = error_before, None
    progress(f"before training: held-out error {error_before:.4g}")
    if not parameters:
        return Distilled(None, 0, 0.0, error_before, error_before)
    # Each weight tensor steps by `lr` of its own size (its root mean square): a signal-processing constant of
    # small values (a mel filter bank) moves as little, relatively, as a layer's weights.
    groups = [{"params": [p], "lr": schedule.lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-6)} for p in parameters]
    optimizer = torch.optim.Adam(groups)
    warm_up = min(WARM_UP_STEPS, max(schedule.steps // 10, 1))
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warm_up),
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(step, schedule.steps - warm_up)),
        ],
        milestones=[warm_up],
    )
    augmenter = Augmenter(train, schedule.seed)
    rng = np.random.default_rng(schedule.seed)
    cached = {id(sample): teacher(sample) for sample in train}
    checks = max(schedule.checks, 1)
    check_every = max(schedule.steps // checks, 1)
    start, losses, step, running = time.perf_counter(), [], 0, []
    next_check = start + schedule.seconds / checks  # with a time limit, the checks are spread over it too
    while step < schedule.steps and not _out_of_time(start, schedule):
        optimizer.zero_grad()
        total = 0.0
        for _ in range(schedule.batch):
            if schedule.augment and rng.random() < 0.75:
                sample = augmenter.draw()
                target = teacher(sample)
            else:
                sample = train[rng.integers(len(train))]
                target = cached[id(sample)]
            loss = _training_loss(module(feeds(sample), also=matched), target, schedule, matched) / schedule.batch
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        running.append(total)
        now = time.perf_counter()
        due = schedule.seconds > 0 and now >= next_check
        if step % check_every == 0 or step == schedule.steps or due or _out_of_time(start, schedule):
            next_check = now + schedule.seconds / checks
            error = _held_out_error(module, feeds, held_out, held_out_targets, schedule)
            losses.append(float(np.mean(running)))
            running = []
            progress(f"step {step}/{schedule.steps}: loss {losses[-1]:.4g}, held-out error {error:.4g}")
            if error < best_error:
                best_error = error
                best_state = {name: value.detach().clone() for name, value in module.state_dict().items()}
    seconds = time.perf_counter() - start
    if best_state is None:
        return Distilled(None, step, seconds, error_before, error_before, losses)
    module.load_state_dict(best_state)
    return Distilled(write_back(student, module.to("cpu")), step, seconds, error_before, best_error, losses)


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
    outputs: Mapping[str, torch.Tensor], target: Outputs, schedule: Schedule, matched: Sequence[str]
) -> torch.Tensor:
    loss = _loss(outputs, _outputs_only(target, matched), schedule)
    if not matched:
        return loss
    inner = _loss(outputs, {name: target[name] for name in matched}, Schedule(loss="mse"))
    return loss + schedule.matched_weight * inner


def _outputs_only(target: Outputs, matched: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: value for name, value in target.items() if name not in matched}


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


def _cosine(step: int, steps: int) -> float:
    """The factor of the learning rate `step` steps after the warm-up: from 1 down to a tenth along a cosine."""
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))


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
    schedule: Schedule,
) -> float:
    with torch.no_grad():
        errors = [float(_loss(module(feeds(sample)), target, schedule)) for sample, target in zip(held_out, targets)]
    return float(np.mean(errors)) if errors else math.inf


def _out_of_time(start: float, schedule: Schedule) -> bool:
    return schedule.seconds > 0 and time.perf_counter() - start >= schedule.seconds
