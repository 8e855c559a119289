"""Intel Neural Compressor's ONNX quantizer, through its ONNX Runtime-like API.

neural-compressor 3.x quantizes PyTorch, TensorFlow and JAX models only (its wheel has no ONNX module); ONNX models
moved to the separate onnx-neural-compressor package, whose API this driver calls. Each mode first lets onnxruntime
apply its basic graph optimizations, as `quantize` and `autotune` do by default.

Modes: `dynamic` (`DynamicQuantConfig()` defaults; its CPU op list has MatMul but not Gemm, and onnxruntime's basic
optimizations fuse MatMul+Add into Gemm where they can), `static` (`StaticQuantConfig` defaults: QOperator format,
per-tensor, MinMax calibration over the calibration feeds), `tune` (`autotune` over
`StaticQuantConfig.get_config_set_for_tuning()`, stopping at the first configuration whose metric on the held-out feeds
loses at most --max-drop relative to fp32's; the metric is the worst cosine of the first output against fp32's, so its
relative loss is 1 - that cosine).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnx_neural_compressor import data_reader
from onnx_neural_compressor.quantization import config, quantize, tuning

from driver_common import first_outputs, load_feeds, make_parser, worst_cosine


class FeedsReader(data_reader.CalibrationDataReader):
    """The calibration feeds, one per `get_next`, then None; `rewind` starts them again."""

    def __init__(self, feeds):
        self.feeds = feeds
        self.rewind()

    def get_next(self):
        return next(self.iterator, None)

    def rewind(self):
        self.iterator = iter(self.feeds)


def quantize_to(out: str, model: str, quant_config: config.BaseConfig) -> None:
    """`quantize`, its model saved as one file: it writes the weights of models over 1 KB to a file beside it."""
    with tempfile.TemporaryDirectory() as work:
        quantized = Path(work) / "model.onnx"
        quantize(model, quantized, quant_config)
        onnx.save(onnx.load(quantized), out)


def main() -> None:
    args = make_parser(("dynamic", "static", "tune"), __doc__).parse_args()
    if args.mode == "dynamic":
        quantize_to(args.out, args.model, config.DynamicQuantConfig())
        return
    reader = FeedsReader(load_feeds(args.calibration))
    if args.mode == "static":
        quantize_to(args.out, args.model, config.StaticQuantConfig(reader))
        return
    held_out = load_feeds(args.held_out)
    reference = first_outputs(args.model, held_out)
    tune = tuning.TuningConfig(
        config_set=config.StaticQuantConfig.get_config_set_for_tuning(), tolerable_loss=args.max_drop
    )

    def metric(path: str) -> float:
        return worst_cosine(reference, first_outputs(path, held_out))

    try:
        quantized = tuning.autotune(args.model, tune, metric, calibration_data_reader=reader)
    except SystemExit:  # autotune ends the process when no configuration meets the budget
        raise SystemExit("autotune found no configuration within --max-drop") from None
    onnx.save(quantized, args.out)


if __name__ == "__main__":
    main()
