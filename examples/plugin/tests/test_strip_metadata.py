"""strip-metadata removes the doc strings and the metadata entries it is told to, and the outputs stay identical."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxforge
from onnxforge_example_plugin import StripMetadata


def _documented_model() -> onnx.ModelProto:
    """y = relu(x @ w) + 1, or - 1 in the If's else branch, with doc strings everywhere and three metadata entries."""

    def branch(name: str, value: float) -> onnx.GraphProto:
        one = numpy_helper.from_array(np.array(value, np.float32), f"{name}_value")
        node = helper.make_node("Add", ["r", f"{name}_value"], [f"{name}_out"])
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, 4])
        return helper.make_graph([node], name, [], [out], initializer=[one], doc_string=f"{name} branch")

    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], doc_string="a node's doc string"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", -1.0)),
    ]
    graph = helper.make_graph(
        nodes,
        "documented",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[numpy_helper.from_array(weight, "w")],
        doc_string="the main graph",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string="the model")
    helper.set_model_props(model, {"author": "someone", "source": "/home/someone/run42", "license": "Apache-2.0"})
    return model


def _run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _doc_strings(model: onnx.ModelProto) -> list[str]:
    then_branch, else_branch = (attr.g for attr in model.graph.node[-1].attribute)
    texts = [model.doc_string, model.graph.doc_string, then_branch.doc_string, else_branch.doc_string]
    texts += [node.doc_string for node in model.graph.node]
    return [text for text in texts if text]


def test_strips_every_doc_string_and_entry_by_default_and_keeps_the_outputs():
    original = _documented_model()

    optimized, report = onnxforge.optimize(original, [StripMetadata()], seed=0)

    proto = optimized.to_proto()
    assert _doc_strings(proto) == [] and list(proto.metadata_props) == []
    assert report.passes[0].status == "applied"
    assert report.passes[0].stats == {"doc_strings_removed": 4, "metadata_removed": 3}
    rng = np.random.default_rng(1)
    for flag in (True, False):
        inputs = {"x": rng.standard_normal((2, 8)).astype(np.float32), "flag": np.array(flag)}
        for before, after in zip(_run(original, inputs), _run(proto, inputs), strict=True):
            np.testing.assert_array_equal(before, after)


def test_removes_only_the_named_entries_and_keeps_doc_strings_when_told():
    optimized, report = onnxforge.optimize(_documented_model(), "strip-metadata:keys=author+source:doc_strings=false", seed=0)

    proto = optimized.to_proto()
    assert {entry.key: entry.value for entry in proto.metadata_props} == {"license": "Apache-2.0"}
    assert "the model" in _doc_strings(proto)
    assert report.passes[0].notes == ["removed metadata author, source"]


@pytest.mark.parametrize("keys", ["", "missing"])
def test_changes_nothing_when_nothing_matches(keys):
    _, report = onnxforge.optimize(_documented_model(), [StripMetadata(keys=keys, doc_strings="false")], seed=0)

    assert report.passes[0].status == "unchanged"
