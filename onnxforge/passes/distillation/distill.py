"""The `distill` pass: win back what the lossy passes before it cost, by training the compressed model's weights
towards the original's outputs (knowledge distillation) with PyTorch; the graph keeps its nodes."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from onnxforge.calibration.observe import run_model
from onnxforge.comparison import compare_outputs
from onnxforge.errors import PassUsageError
from onnxforge.ir import Model
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass
from onnxforge.pipeline.verifier import as_declared, caster


@register_pass("distill")
class Distill(Pass):
    """Train the weights of the model the lossy passes before it made towards the original's outputs on --data.

    The teacher is the model before the pipeline's first lossy pass, run on the run's backend; the student is the
    current model, run by PyTorch (onnxforge.distill.torch_graph), on the calibration part of the samples and,
    with augment=true, perturbed and mixed copies of them that the teacher labels; end to end, or with mode=blocks
    one block at a time (each towards the teacher's value where it ends) before the outputs. Only initializers change:
    every node, name and opset stays. The weights that did best on the held-out samples are kept, and kept only
    if they beat the model before the pass there. Lossy passes before it are judged against the error budget
    after it (docs/budget.md).
    """

    lossless = False
    recovers = True

    @dataclass
    class Options:
        steps: int = 500  # optimizer steps
        time: float = 0.0  # and at most this many seconds of training (0: no limit)
        batch: int = 8  # samples a step
        lr: float = 1e-4  # Adam's step relative to each weight tensor's root mean square, decayed to a tenth
        loss: Literal["auto", "mse", "cosine", "kl"] = "auto"  # auto: KL for distributions, else relative MSE
        match: Literal["layers", "outputs"] = "layers"  # also match the layer outputs both models compute
        mode: Literal["end-to-end", "blocks"] = "end-to-end"  # blocks: one block at a time, then the outputs
        temperature: float = 2.0  # of the softmax, for loss=kl
        augment: bool = True  # train on perturbed and mixed copies of the samples too
        seed: int = 0
        device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when PyTorch sees one

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        o = self.options
        if o.steps < 1 or o.batch < 1 or not o.lr > 0 or o.time < 0:
            raise PassUsageError("distill: steps= and batch= are 1 or more, lr= above 0, time= 0 or more seconds")
        teacher = ctx.teacher
        if teacher is None:
            return PassResult(False, notes=["no lossy pass ran before distill: there is nothing to win back"])
        calibration = ctx.calibration
        if not calibration.samples:
            raise PassUsageError("distill trains on sample inputs: give them with --data (data= in the Python API)")
        if importlib.util.find_spec("torch") is None:
            raise PassUsageError("distill trains with PyTorch: install it (pip install 'onnxforge[torch]')")
        from onnxforge.distill.correspondence import blocks, corresponding_tensors, with_outputs
        from onnxforge.distill.torch_graph import TorchGraph
        from onnxforge.distill.training import Schedule, device, distill, output_error

        train, held_out = calibration.split()
        parts = blocks(teacher, model, TorchGraph(model).initializer_parameters()) if o.mode == "blocks" else []
        matched = corresponding_tensors(teacher, model) if o.match == "layers" and not parts else []
        teacher_run = calibration.runner(with_outputs(teacher, [*matched, *(part.end for part in parts)]))
        schedule = Schedule(
            steps=o.steps, seconds=o.time, batch=o.batch, lr=o.lr, loss=o.loss, temperature=o.temperature,
            augment=o.augment, seed=o.seed, device=device(o.device),
        )  # fmt: skip
        as_teacher_takes = caster(teacher)
        outcome = distill(
            model,
            lambda sample: teacher_run(as_teacher_takes(sample)),
            caster(model),
            train,
            held_out,
            schedule,
            ctx.progress,
            matched,
            parts,
        )
        how = (
            f"{outcome.steps} steps of {o.batch} in {outcome.seconds:.1f} s on {schedule.device}, on {len(train)} "
            f"samples{' and perturbed copies' if o.augment else ''}, "
            f"{f'{len(parts)} blocks one at a time, then ' if parts else ''}matching the outputs"
            f"{f' and {len(matched)} layer outputs' if matched else ''}; judged on {len(held_out)} held-out samples"
        )
        stats = {"steps": outcome.steps, "distill_seconds": round(outcome.seconds, 2)}
        if outcome.model is None:
            return PassResult(False, stats=stats, notes=[f"{how}: no step did better than the model before"])
        reference = run_model(teacher, as_declared(teacher, held_out), calibration)
        before = run_model(model, as_declared(model, held_out), calibration)
        after = run_model(outcome.model, as_declared(outcome.model, held_out), calibration)
        errors = [
            sum(output_error(out, ref, o.loss, o.temperature) for out, ref in zip(outputs, reference)) / len(reference)
            for outputs in (before, after)
        ]
        cosines = [compare_outputs(reference, outputs).min_cosine for outputs in (before, after)]
        stats.update(held_out_error_before=round(errors[0], 6), held_out_error_after=round(errors[1], 6))
        figures = f"held-out error {errors[0]:.4g} -> {errors[1]:.4g}"
        if None not in cosines:
            figures += f", worst cosine {cosines[0]:.4f} -> {cosines[1]:.4f}"
        if errors[1] >= errors[0]:
            return PassResult(False, stats=stats, notes=[f"{how}: {figures}: the model before is kept"])
        model.graph = outcome.model.graph
        return PassResult(True, stats=stats, notes=[f"{how}: {figures}"])
