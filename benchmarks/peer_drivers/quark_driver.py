"""AMD Quark's ONNX quantizer (`quark.onnx.ModelQuantizer`) on CPU, through its Python API.

Mode `static`: its A8W8 configuration (`quark.onnx.A8W8_QCONFIG`: int8 QDQ weights and activations, symmetric,
per-tensor, Percentile calibration), the general int8 one (XINT8's power-of-two scales target AMD's NPUs), calibrated
on the calibration feeds.
"""

from __future__ import annotations

import copy

from onnxruntime.quantization import CalibrationDataReader
from quark.onnx import A8W8_QCONFIG, ModelQuantizer

from driver_common import load_feeds, make_parser


class FeedsReader(CalibrationDataReader):
    """The calibration feeds, one per `get_next`, then None."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def main() -> None:
    args = make_parser(("static",), __doc__).parse_args()
    quantizer = ModelQuantizer(copy.deepcopy(A8W8_QCONFIG))  # the quantizer updates its config's options
    quantizer.quantize_model(args.model, args.out, FeedsReader(load_feeds(args.calibration)))


if __name__ == "__main__":
    main()
