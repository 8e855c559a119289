"""quant on recurrent layers: LSTM/GRU text models exported by torch at opset 11 and 12 (as is and upgraded to 17),
and LSTM/GRU nodes that share their weights."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graph_checks import constant, make_model, op_counts, value_info
from onnx import TensorProto, helper
from torch import nn

import onnxforge
from onnxforge.backends import get_backend
from onnxforge.comparison import compare_outputs

VOCABULARY = 50


class _TextModel(nn.Module):
    """Token ids [batch, sequence] -> embedding -> (Bi)LSTM or GRU -> a linear head per token."""

    def __init__(self, cell: str, bidirectional: bool):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, 32)
        recurrent = nn.LSTM if cell == "LSTM" else nn.GRU
        self.recurrent = recurrent(32, 48, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(96 if bidirectional else 48, 5)

    def forward(self, ids):
        states, _ = self.recurrent(self.embedding(ids))
        return self.head(states)


_EXPORTS: dict[tuple[str, bool, int], bytes] = {}


def _exported(cell: str, bidirectional: bool, opset: int) -> onnx.ModelProto:
    """The model as users export it: TorchScript exporter, dynamic batch and sequence axes (made once per case)."""
    key = (cell, bidirectional, opset)
    if key not in _EXPORTS:
        torch.manual_seed(0)
        buffer = io.BytesIO()
        ids = torch.randint(0, VOCABULARY, (2, 7))
        axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(
            _TextModel(cell, bidirectional).eval(),
            (ids,),
            buffer,
            opset_version=opset,
            input_names=["ids"],
            output_names=["logits"],
            dynamic_axes={"ids": axes, "logits": axes},
            dynamo=False,
        )
        _EXPORTS[key] = buffer.getvalue()
    return onnx.load_from_string(_EXPORTS[key])


def _max_rel_error_on_fresh_ids(source: onnx.ModelProto, written: bytes) -> float:
    """The worst output error of `written` against `source` on token ids of shapes the export never saw."""
    rng = np.random.default_rng(5)
    feeds = [{"ids": rng.integers(0, VOCABULARY, shape).astype(np.int64)} for shape in [(3, 11), (1, 4), (2, 20)]]
    return compare_outputs(_run(source.SerializeToString(), feeds), _run(written, feeds)).max_rel


def _run(model: bytes, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """The model's outputs by name on each feed, run by onnxruntime as it loads the bytes."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return [dict(zip(names, session.run(None, feed))) for feed in feeds]


@pytest.mark.parametrize("passes", ["upgrade-opset:to=17,quant:measure=false", "quant:measure=false"])
@pytest.mark.parametrize("opset", [11, 12])
@pytest.mark.parametrize(("cell", "bidirectional"), [("LSTM", False), ("LSTM", True), ("GRU", True)])
def test_an_old_opset_recurrent_export_quantizes_to_a_model_that_loads_and_stays_close(
    cell, bidirectional, opset, passes
):
    source = _exported(cell, bidirectional, opset)
    optimized, report = onnxforge.optimize(source, passes, seed=0)
    quant = report.passes[-1]
    assert quant.status == "applied", quant.error
    written = optimized.to_proto().SerializeToString()
    counts = op_counts(optimized)
    if cell == "LSTM":
        assert counts["DynamicQuantizeLSTM"] == 1 and "LSTM" not in counts
    else:  # no int8 GRU kernel: W and R stored int8 and dequantized before the float GRU
        gru = next(node for node in optimized.graph.nodes if node.op == "GRU")
        assert [gru.inputs[i].inputs[0].op for i in (1, 2)] == ["DequantizeLinear", "DequantizeLinear"]
    assert len(written) < 0.5 * len(source.SerializeToString())
    assert _max_rel_error_on_fresh_ids(source, written) < 0.03


def test_cli_quantizes_an_opset_11_bilstm_upgraded_to_17_into_a_file_onnxruntime_loads(tmp_path):
    from test_cli import OPTIMIZE, run_cli, succeeded

    source = _exported("LSTM", True, 11)
    path, out = tmp_path / "bilstm.onnx", tmp_path / "bilstm.int8.onnx"
    onnx.save(source, path)
    result = succeeded(run_cli(OPTIMIZE, path, "--passes", "upgrade-opset:to=17,quant:measure=false", "-o", out))
    assert "quant:measure=false      applied" in result.stdout
    assert _max_rel_error_on_fresh_ids(source, out.read_bytes()) < 0.03


def test_explain_says_why_a_gru_is_stored_int8_but_runs_in_float(tmp_path):
    from test_cli import OPTIMIZE, run_cli, succeeded

    path, out = tmp_path / "gru.onnx", tmp_path / "gru.int8.onnx"
    onnx.save(_exported("GRU", True, 12), path)
    result = succeeded(run_cli(OPTIMIZE, path, "--passes", "quant:measure=false", "-o", out, "--explain"))
    assert "dequantized to a float GRU: onnxruntime has no int8 GRU kernel" in result.stdout


# --- recurrent nodes sharing their weights --------------------------------------------------------------------

HIDDEN = 64


def _two_layers_sharing_weights(cell: str) -> onnx.ModelProto:
    """Two stacked one-direction layers that read the same W, R and B initializers (input size = hidden size)."""
    gates = 4 if cell == "LSTM" else 3
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((1, gates * HIDDEN, HIDDEN)) * 0.2).astype(np.float32)
    r = (rng.standard_normal((1, gates * HIDDEN, HIDDEN)) * 0.2).astype(np.float32)
    b = (rng.standard_normal((1, 2 * gates * HIDDEN)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node(cell, ["x", "W", "R", "B"], ["y1"], hidden_size=HIDDEN),
        helper.make_node("Squeeze", ["y1", "direction_axis"], ["h1"]),
        helper.make_node(cell, ["h1", "W", "R", "B"], ["y2"], hidden_size=HIDDEN),
    ]
    initializers = [constant("W", w), constant("R", r), constant("B", b), constant("direction_axis", np.array([1]))]
    outputs = [value_info("y2", [9, 1, 2, HIDDEN])]
    return make_model(nodes, [value_info("x", [9, 2, HIDDEN])], outputs, initializers, opset=17)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_two_recurrent_layers_sharing_weights_get_one_int8_copy_of_each(cell):
    source = _two_layers_sharing_weights(cell)
    optimized, report = onnxforge.optimize(source, "quant:measure=false", seed=0)
    assert report.passes[0].status == "applied", report.passes[0].error
    written = optimized.to_proto()
    int8_weights = [t.name for t in written.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 3]
    assert len(int8_weights) == 2  # W and R, once each
    assert not any(t.data_type == TensorProto.FLOAT and len(t.dims) == 3 for t in written.graph.initializer)
    # Two int8 copies of W and R would be as large as the float model's W and R.
    assert len(written.SerializeToString()) < 0.4 * len(source.SerializeToString())
    feeds = [{"x": np.random.default_rng(3).standard_normal((9, 2, HIDDEN)).astype(np.float32)}]
    want, got = _run(source.SerializeToString(), feeds), _run(written.SerializeToString(), feeds)
    # Two int8 layers in a row: each adds its error; 7-bit weights (a CPU without VNNI) have twice the step.
    seven_bit = get_backend("ort").capabilities.seven_bit_int8_weights
    assert compare_outputs(want, got).max_rel < (0.08 if seven_bit and cell == "LSTM" else 0.05)
