"""onnxruntime's own quantization tools, called as a user following onnxruntime's documentation would: baselines.

Both functions first run `quant_pre_process` (symbolic shape inference, onnxruntime's basic graph optimizations,
ONNX shape inference) with its defaults: onnxruntime's quantization guide and its example
(onnxruntime-inference-examples, quantization/image_classification/cpu) make it the first step, and both
`quantize_dynamic` and `quantize_static` log "Please consider to run pre-processing before quantization" when it
was skipped. Pass `pre_process=False` to call the quantizer on the model as it is. Nothing else is tuned:
`quantize_dynamic` keeps all its defaults (its output grows when weights are shared through Identity nodes:
kept, as users get it), `quantize_static` uses QDQ, per-channel weights and its default MinMax calibration.
A tool that fails returns an `OrtQuantized` with no model and the reason, which the benchmark reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class OrtQuantized:
    """What one of onnxruntime's tools produced: the model (None when it failed), why it failed, how long it took."""

    model_path: Path | None
    failure: str | None
    seconds: float
    pre_processed: bool


def ort_quantize_dynamic(model_path: str | Path, out_path: str | Path, pre_process: bool = True) -> OrtQuantized:
    """Int8 weights, activations quantized at run time: `quantize_dynamic` with its defaults."""
    from onnxruntime.quantization import quantize_dynamic

    return _run_tool(model_path, out_path, pre_process, "quantize_dynamic", quantize_dynamic)


def ort_quantize_static(
    model_path: str | Path,
    out_path: str | Path,
    calibration: Sequence[dict[str, np.ndarray]],
    pre_process: bool = True,
) -> OrtQuantized:
    """Int8 weights and activations, QDQ format, per-channel weights, MinMax calibration over `calibration`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class SamplesReader(CalibrationDataReader):
        def __init__(self, samples: Sequence[dict[str, np.ndarray]]):
            self.samples = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.samples, None)

    def quantize(src: Path, dst: Path) -> None:
        quantize_static(src, dst, SamplesReader(calibration), quant_format=QuantFormat.QDQ, per_channel=True)

    return _run_tool(model_path, out_path, pre_process, "quantize_static", quantize)


def _run_tool(
    model_path: str | Path, out_path: str | Path, pre_process: bool, tool: str, quantize: Callable[[Path, Path], None]
) -> OrtQuantized:
    import onnxruntime
    from onnxruntime.quantization import quant_pre_process

    model_path, out_path = Path(model_path), Path(out_path)
    out_path.unlink(missing_ok=True)
    start = time.perf_counter()
    source = model_path
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(max(quiet, logging.ERROR))  # the quantizer logs one line per tensor
    try:
        if pre_process:
            source = out_path.with_name(out_path.stem + ".preprocessed.onnx")
            try:
                quant_pre_process(str(model_path), str(source))
            except Exception as exc:  # noqa: BLE001 - any failure of the tool is a result to report
                return OrtQuantized(None, _reason("quant_pre_process", exc), _since(start), True)
        try:
            quantize(source, out_path)
        except Exception as exc:  # noqa: BLE001
            return OrtQuantized(None, _reason(tool, exc), _since(start), pre_process)
    finally:
        logging.getLogger().setLevel(quiet)
        if source != model_path:
            source.unlink(missing_ok=True)
    if not out_path.exists():
        return OrtQuantized(None, f"{tool} wrote no model", _since(start), pre_process)
    try:  # a tool can write a model that onnxruntime itself refuses to load
        onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        failure = _reason(f"{tool} wrote a model onnxruntime cannot load", exc)
        return OrtQuantized(None, failure, _since(start), pre_process)
    return OrtQuantized(out_path, None, _since(start), pre_process)


def _reason(tool: str, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{tool}: {type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 3)
