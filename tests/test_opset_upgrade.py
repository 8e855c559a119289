"""upgrade-opset: onnx's version converter as a pass; and cleanup lifting weights held by Constant nodes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graph_checks import apply, make_model, max_rel_error, op_counts, value_info
from onnx import helper, numpy_helper

from onnxforge.errors import PassError


def _conv_with_constant_node_weights(opset: int):
    """A Conv whose 16 KiB weight is a Constant node, as some exporters (PaddlePaddle's) write every weight."""
    weight = np.random.default_rng(0).standard_normal((16, 16, 4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
        helper.make_node("Conv", ["x", "w"], ["y"]),
    ]
    return make_model(nodes, [value_info("x", [1, 16, 8, 8])], [value_info("y", None)], opset=opset)


def test_upgrade_moves_the_model_to_the_asked_opset_and_keeps_its_function():
    source = _conv_with_constant_node_weights(opset=12)
    model, result = apply("upgrade-opset:to=17", source)
    assert result.changed and model.graph.opset == 17
    assert result.stats == {"opset_from": 12, "opset_to": 17}
    assert max_rel_error(source, model) == 0


def test_the_bodies_of_local_functions_are_moved_with_the_model():
    """onnx's version converter drops a model's local functions: the pass converts their bodies and keeps them."""
    body = [helper.make_node("Unsqueeze", ["a"], ["u"], axes=[0]), helper.make_node("Squeeze", ["u"], ["b"], axes=[0])]
    function = helper.make_function("local", "Roundtrip", ["a"], ["b"], body, [helper.make_opsetid("", 11)])
    source = _conv_with_constant_node_weights(opset=11)
    source.graph.node.append(helper.make_node("Roundtrip", ["y"], ["z"], domain="local"))
    source.graph.output[0].name = "z"
    source.functions.append(function)
    source.opset_import.append(helper.make_opsetid("local", 1))
    source.ir_version = 8
    model, result = apply("upgrade-opset:to=13", source)
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)  # the function's opset is the model's
    (moved,) = proto.functions
    assert [o.version for o in moved.opset_import if o.domain == ""] == [13]
    assert [n.op_type for n in moved.node] == ["Constant", "Unsqueeze", "Constant", "Squeeze"]
    assert max_rel_error(source, model) == 0


def test_a_model_at_or_above_the_opset_is_left_alone():
    model, result = apply("upgrade-opset:to=13", _conv_with_constant_node_weights(opset=17))
    assert not result.changed and model.graph.opset == 17
    assert "opset 17 already" in result.notes[0]


def test_an_opset_onnx_does_not_know_is_refused():
    with pytest.raises(PassError, match="choose an opset from 1 to"):
        apply("upgrade-opset:to=99", _conv_with_constant_node_weights(opset=12))


def test_cleanup_lifts_weights_of_constant_nodes_however_large():
    source = _conv_with_constant_node_weights(opset=17)
    model, result = apply("cleanup", source)
    assert op_counts(model) == {"Conv": 1}
    assert model.stats().bytes == 16 * 16 * 4 * 4 * 4
    assert max_rel_error(source, model) == 0
