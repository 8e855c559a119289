"""onnxslim as its Python API runs it: `onnxslim.slim(model)`, its graph simplification (constant folding, dead
code, pattern fusions, shape inference) in fp32; it quantizes nothing.

Mode: `slim`.
"""

from __future__ import annotations

import onnx
import onnxslim

from driver_common import make_parser


def main() -> None:
    args = make_parser(("slim",), __doc__).parse_args()
    onnx.save(onnxslim.slim(onnx.load(args.model)), args.out)


if __name__ == "__main__":
    main()
