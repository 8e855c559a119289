"""The report of one optimization run: passes, sizes, latency and error, as JSON and as a terminal summary."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxforge.comparison import Comparison
from onnxforge.ir import ModelStats
from onnxforge.ir.output_set import OutputSet
from onnxforge.measure import LatencyStats
from onnxforge.pipeline.budget import DEFAULT_BUDGET, Budget
from onnxforge.pipeline.manager import PassRecord


@dataclass
class OptimizationReport:
    """Everything a run did and measured; `to_dict` is the `--report` JSON."""

    source: str
    before: ModelStats
    after: ModelStats
    passes: list[PassRecord]
    verification: dict[str, Any]
    error: Comparison | None = None
    data_error: Comparison | None = None  # on the --data samples that calibration held out
    data_error_samples: dict[str, int] = field(default_factory=dict)  # {"held_out": n, "of": all --data samples}
    latency_before: LatencyStats | None = None
    latency_after: LatencyStats | None = None
    latency_setup: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    artifact: list[str] = field(default_factory=list)  # files of the compiled model (--artifact)
    decisions: dict[str, Any] = field(default_factory=dict)  # measured decisions, replayable (--decisions)
    inputs_made_constant: list[str] = field(default_factory=list)  # inputs whose default value became a constant
    # {"backend": name, "shapes": {input: dims}}: inputs --shape fixed for a backend that compiles static shapes only
    inputs_fixed: dict[str, Any] = field(default_factory=dict)
    # The error budget where a lossy pass ran under one: bounds, default (bool), measured_on, spent (the final
    # model's losses against the original), fraction_spent
    budget: dict[str, Any] = field(default_factory=dict)
    budget_given: bool = True  # False with --budget none

    @property
    def speedup(self) -> float | None:
        """Median latency before / after, when both were measured."""
        if self.latency_before and self.latency_after and self.latency_after.median_ms > 0:
            return self.latency_before.median_ms / self.latency_after.median_ms
        return None

    def _data_error_samples(self) -> str:
        """Which --data samples the error was measured on, for the summary line."""
        held_out, total = self.data_error_samples["held_out"], self.data_error_samples["of"]
        if held_out == total:
            return f"{total} --data samples, fewer than 4: none held out from calibration"
        return f"{held_out} of {total} --data samples, held out from calibration"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "artifact": self.artifact,
            "environment": environment(),
            "size": {
                "before": self.before.to_dict(),
                "after": self.after.to_dict(),
                "bytes_ratio": _ratio(self.after.bytes, self.before.bytes),
            },
            "passes": [record.to_dict() for record in self.passes],
            "verification": self.verification,
            "inputs_made_constant": self.inputs_made_constant,
            "inputs_fixed": self.inputs_fixed or None,
            "decisions": self.decisions,
            "budget": self.budget or None,
            "warnings": self.warnings(),
            "error_vs_original": self.error.to_dict() if self.error else None,
            "error_vs_original_on_data": self.data_error.to_dict() if self.data_error else None,
            "error_vs_original_on_data_samples": self.data_error_samples or None,
            "latency": None
            if self.latency_before is None
            else {
                "setup": self.latency_setup,
                "before": self.latency_before.to_dict(),
                "after": self.latency_after.to_dict() if self.latency_after else None,
                "speedup": self.speedup,
            },
        }

    def save_json(self, path: str | os.PathLike, outputs: OutputSet | None = None) -> None:
        """Write the report atomically (with `outputs`, as one of its files)."""
        write_json(path, self.to_dict(), outputs)

    def explanation(self) -> str:
        """Each pass's notes on what it decided and why (what `optimize --explain` prints)."""
        lines = []
        for record in self.passes:
            if record.notes:
                lines.append(f"{record.name} ({record.status}):")
                lines.extend(f"  {note}" for note in dict.fromkeys(record.notes))  # rounds repeat notes
        return "\n".join(lines) if lines else "no pass left notes"

    def summary(self) -> str:
        """A few lines a person reads on the terminal after a run."""
        lines = []
        if self.inputs_made_constant:
            lines.append(
                f"  note: input(s) {', '.join(self.inputs_made_constant)} had a default value (an initializer of "
                "the same name) and are now constants: the optimized model no longer takes them"
            )
        if self.inputs_fixed:
            fixed = " ".join(f"{name}={'x'.join(map(str, dims))}" for name, dims in self.inputs_fixed["shapes"].items())
            lines.append(
                f"  note: inputs fixed to {fixed} for {self.inputs_fixed['backend']}, which compiles for static "
                "shapes only; the optimized model keeps them"
            )
        width = max([24, *(len(record.name) for record in self.passes)])
        for record in self.passes:
            counters = ", ".join(
                f"{k}={v}"
                for k, v in record.stats.items()
                if isinstance(v, (int, float, str)) and v not in (0, "", None)
            )
            line = f"  {record.name:<{width}} {record.status:<12} {record.seconds * 1000:8.1f} ms"
            line += f"  nodes {record.before.nodes} -> {record.after.nodes}"
            if counters:
                line += f"  ({counters})"
            if record.error:
                line += f"\n    reason: {record.error}"
            if record.budget:
                line += f"\n    {record.budget}"
            lines.append(line)
        lines.append(
            f"  model: nodes {self.before.nodes} -> {self.after.nodes}, "
            f"params {self.before.params} -> {self.after.params}, "
            f"weights {_megabytes(self.before.bytes)} -> {_megabytes(self.after.bytes)}"
        )
        if self.error is not None and self.data_error is None:
            lines.append(
                f"  error vs original (random inputs): max rel {self.error.max_rel:.3g}"
                + (f", min cosine {self.error.min_cosine:.6f}" if self.error.min_cosine is not None else "")
            )
        inputs = self.verification.get("inputs") or {}
        if inputs.get("found_by", "").startswith("searched"):
            shapes = ", ".join(
                f"{name}={'x'.join(map(str, dims)) or 'scalar'}" for name, dims in inputs["shapes"].items()
            )
            lines.append(f"  random inputs {shapes}: dynamic dims {inputs['found_by']}")
        if self.data_error is not None:
            lines.append(
                f"  error vs original ({self._data_error_samples()}): max rel {self.data_error.max_rel:.3g}"
                + (f", min cosine {self.data_error.min_cosine:.6f}" if self.data_error.min_cosine is not None else "")
            )
        if self.budget:
            default = " (the default; --budget none drops it)" if self.budget["default"] else ""
            labels = labels_read_on(self.budget)
            lines.append(
                f"  budget {self.budget['bounds']}{default} on {self.budget['measured_on']}: "
                f"{self.budget['fraction_spent']:.0%} spent" + (f"; {labels}" if labels else "")
            )
        if self.latency_before is not None and self.latency_after is not None:
            lines.append(
                f"  latency median {self.latency_before.median_ms:.3f} ms -> {self.latency_after.median_ms:.3f} ms"
                f" ({self.speedup:.2f}x; {self.latency_setup.get('description', '')})"
            )
        return "\n".join(lines)


    def warnings(self) -> list[str]:
        """What a person must not miss: outputs far from the original's with no budget to bound them."""
        if self.budget_given or not any(record.status == "applied" for record in self.passes):
            return []
        error, where = (
            (self.data_error, self._data_error_samples()) if self.data_error is not None else (self.error, "random inputs")
        )
        least = 1 - Budget.parse(DEFAULT_BUDGET).allowances["cosine"]
        if error is None or error.min_cosine is None or error.min_cosine >= least:
            return []
        return [
            f"the outputs moved far from the original's: worst cosine {error.min_cosine:.4f} on {where}, with no "
            f"error budget (--budget none); drop --budget none to keep the default ({DEFAULT_BUDGET}), or give "
            "one, e.g. --budget cosine=0.995"
        ]


def labels_read_on(budget: dict[str, Any]) -> str:
    """Which outputs the budget's labels bound read (its report's `score_outputs`); "" without that bound."""
    names = budget.get("score_outputs")
    if names is None:
        return ""
    return f"labels read on {', '.join(names)}" if names else "no score output for the labels bound"


def write_json(path: str | os.PathLike, payload: dict[str, Any], outputs: OutputSet | None = None) -> None:
    """Write `payload` as indented JSON atomically (temporary file, then rename); with `outputs`, as one of
    its files, renamed into place when it commits."""
    if outputs is None:
        with OutputSet() as own:
            write_json(path, payload, own)
            own.commit()
        return
    text = json.dumps(payload, indent=2, default=str) + "\n"
    outputs.stage_file(path).write_text(text)


def environment() -> dict[str, Any]:
    """Versions and machine facts that make measurements comparable."""
    import onnx
    import onnxruntime

    from onnxforge import __version__

    return {
        "onnxforge": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
