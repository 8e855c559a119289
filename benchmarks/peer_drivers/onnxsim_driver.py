"""onnxsim (onnx-simplifier 0.8) as its command line uses it: simplify the model, then quantize it; then simplify
once more, which drops the fp32 weights that quantization left unreferenced (its quantizers leave that to `simplify`,
accuracy.py says; the command line skips it and writes them).

Modes: `dynamic` (int8 weights, activations quantized at run time: `--dynamic-quantize`), `static` (int8 QDQ, MinMax
ranges from the calibration feeds: `--static-quantize`, given our feeds through the Python API, as the command line
only takes random or Hugging Face data), `full-graph` (int8 QDQ on every float activation, as for a whole-graph
integer NPU: `onnxsim.qdq_full_graph.quantize_full_graph` with `onnxsim.calibrate`'s MinMax ranges of the tensors
`list_full_graph_activations` names; it needs opset 13, so an older model is moved there by onnx's version converter
first), `auto` (`recommend_quantization`: the most compressed of its default schemes
whose worst relative L2 error on the calibration feeds stays under --max-drop; when none does, the least lossy one
that shrinks the model, as `quantize_auto` returns it with a warning; the log says which and whether it met the budget).
"""

from __future__ import annotations

import onnx
import onnxsim
import onnx.version_converter
from onnxsim import QuantizationConfig, calibrate, quantize, recommend_quantization
from onnxsim.qdq_full_graph import list_full_graph_activations, quantize_full_graph

from driver_common import load_feeds, make_parser


def main() -> None:
    args = make_parser(("dynamic", "static", "full-graph", "auto"), __doc__).parse_args()
    model, _ = onnxsim.simplify(args.model)
    if args.mode == "dynamic":
        model = quantize(model, QuantizationConfig(scheme="dynamic"))
    elif args.mode == "full-graph":
        if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
            model = onnx.version_converter.convert_version(model, 13)
        names = list_full_graph_activations(model)
        ranges = calibrate(model, load_feeds(args.calibration), tensor_names=names)
        model = quantize_full_graph(model, ranges)
    elif args.mode == "static":
        model = quantize(model, QuantizationConfig(scheme="static", calibration_data=load_feeds(args.calibration)))
    else:
        found = recommend_quantization(model, args.max_drop, calibration_data=load_feeds(args.calibration))
        print(f"chose {found.config.scheme}/{found.config.dtype}/{found.config.granularity}, "
              f"worst relative L2 {found.report.worst_relative_l2:.4g}, within budget: {found.meets_budget}")
        model = found.quantized_model
    model, _ = onnxsim.simplify(model)
    onnx.save(model, args.out)


if __name__ == "__main__":
    main()
