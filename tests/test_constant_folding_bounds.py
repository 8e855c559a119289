"""Constant folding estimates a result's size before computing it, and large graphs stay fast."""

import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_checks import op_counts
from onnx import TensorProto, helper, numpy_helper

from onnxforge.api import optimize
from onnxforge.frontends import from_onnx
from onnxforge.pipeline import PassContext, create_passes

_FLOAT_VALUE = numpy_helper.from_array(np.ones(1, np.float32))


def _huge_constant_in_untaken_branch(count: int = 2**30) -> onnx.ModelProto:
    """y = x unless x > 1e30, then the sum of `count` ones: a few hundred bytes that ask for 4 GiB if folded."""
    then_branch = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["big_shape"], ["big"], value=_FLOAT_VALUE),
            helper.make_node("ReduceSum", ["big"], ["then_y"], keepdims=1),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array([count], np.int64), "big_shape")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_y"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Greater", ["x", "huge"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        "untaken_branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array([1e30], np.float32), "huge")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


_FOLD_IN_CHILD = """
import sys
import numpy as np, onnx, onnxruntime as ort
from onnxforge.api import optimize
model, _ = optimize(sys.argv[1], "fold-constants")
session = ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
assert session.run(None, {"x": np.array([2.5], np.float32)})[0].tolist() == [2.5]
# This process's own peak in KiB (ru_maxrss would carry over the peak of the pytest process it was forked from).
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def test_constant_of_shape_of_a_billion_floats_is_never_computed(tmp_path):
    path = tmp_path / "huge.onnx"
    onnx.save(_huge_constant_in_untaken_branch(), path)
    assert path.stat().st_size < 500
    result = subprocess.run([sys.executable, "-c", _FOLD_IN_CHILD, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout.split()[-1]) / 1024
    assert peak_mib < 600, f"peak RSS {peak_mib:.0f} MiB"


def _single_op_model(node: onnx.NodeProto, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    """y = x + node's result (named `r`), with x broadcast against it."""
    graph = helper.make_graph(
        [node, helper.make_node("Add", ["x", "r"], ["y"])],
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _floats(name, values):
    return numpy_helper.from_array(np.array(values, np.float32), name)


# Each op asks for 64 x 64 floats (16 KiB) from constants of a few bytes.
GROWING = {
    "ConstantOfShape": (helper.make_node("ConstantOfShape", ["s"], ["r"], value=_FLOAT_VALUE), [_ints("s", [64, 64])]),
    "Expand": (helper.make_node("Expand", ["a", "s"], ["r"]), [_floats("a", [[1.0]]), _ints("s", [64, 64])]),
    "Tile": (helper.make_node("Tile", ["a", "s"], ["r"]), [_floats("a", [[1.0]]), _ints("s", [64, 64])]),
    "Range": (helper.make_node("Range", ["a", "b", "c"], ["r"]),
              [_floats("a", 0.0), _floats("b", 4096.0), _floats("c", 1.0)]),
    "Pad": (helper.make_node("Pad", ["a", "s"], ["r"]), [_floats("a", [[1.0]]), _ints("s", [0, 0, 63, 63])]),
    "Resize": (helper.make_node("Resize", ["a", "", "", "s"], ["r"]), [_floats("a", [[1.0]]), _ints("s", [64, 64])]),
}


@pytest.mark.parametrize("op", sorted(GROWING))
def test_result_over_the_limit_is_not_folded_and_one_within_it_is(op):
    proto = _single_op_model(*GROWING[op])
    x = {"x": np.array([0.5], np.float32)}
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    for max_bytes, folded in ((16383, False), (16384, True)):
        model = from_onnx(proto)
        options = f"max_bytes={max_bytes}:max_growth=none"  # these results grow the weights: allowed here
        result = create_passes(f"fold-constants:{options}")[0].run(model, PassContext())
        assert result.changed is folded and (op in op_counts(model)) is not folded
        session = ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, x)[0], expected[0])


def _identity_chain(count: int) -> onnx.ModelProto:
    names = ["x", *(f"t{i}" for i in range(1, count)), "y"]
    graph = helper.make_graph(
        [helper.make_node("Identity", [names[i]], [names[i + 1]]) for i in range(count)],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_chain_of_20000_identities_is_cleaned_up_in_seconds():
    start = time.monotonic()
    model, report = optimize(_identity_chain(20000), "cleanup")
    # A bound on the algorithm, not a timing: linear work takes seconds (10.1 s once on a loaded 2-core CI
    # machine), one walk of the chain per node would take hours.
    assert time.monotonic() - start < 60
    assert len(model.graph.nodes) <= 1 and report.passes[0].status == "applied"
