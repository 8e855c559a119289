"""quant on transformers: onnxruntime's QAttention for the int8 attention projections, chosen by timing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_checks import apply, constant, make_model, op_counts, value_info
from onnx import helper

from onnxforge import optimize
from onnxforge.ir import Model, load_model, save_model
from onnxforge.measure import InterleavedTiming
from onnxforge.passes.quantization.attention_int8 import to_qattention
from onnxforge.pipeline import PassContext, PassManager, create_passes

LENGTH = 16
SPEC = "quant:min_speedup=0.5"
QUICK = InterleavedTiming(blocks=3, block_s=0.01, min_runs=2, warmup=1)


@pytest.fixture(scope="module")
def fused_encoder() -> Model:
    """A one-layer BERT-style encoder with a padding mask, exported from PyTorch and fused (one Attention)."""
    import torch
    from model_builders import BertLike

    from onnxforge.frontends.torch import from_torch

    torch.manual_seed(0)
    net = BertLike(vocab=50, width=64, heads=4, layers=1, max_len=LENGTH)
    ids, mask = torch.randint(0, 50, (1, LENGTH)), torch.ones(1, LENGTH, dtype=torch.int64)
    exported = from_torch(net, (ids, mask), input_names=["input_ids", "attention_mask"])
    fused, _ = optimize(exported, "cleanup,fuse", verify=False)
    assert op_counts(fused)["Attention"] == 1
    return fused


def _feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Token ids with padding masks of random lengths (the padded keys masked out)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        mask = np.zeros((1, LENGTH), np.int64)
        mask[0, : rng.integers(3, LENGTH + 1)] = 1
        feeds.append({"input_ids": rng.integers(0, 50, (1, LENGTH)).astype(np.int64), "attention_mask": mask})
    return feeds


def _outputs(model: Model, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def test_qattention_computes_what_the_int8_projection_and_attention_compute(fused_encoder):
    quantized, _ = apply("quant:measure=false", fused_encoder)
    assert op_counts(quantized)["MultiHeadAttention"] == 1
    rewritten = quantized.copy()
    assert to_qattention(rewritten) == 1
    counts = op_counts(rewritten)
    assert counts["QAttention"] == 1 and counts["DynamicQuantizeLinear"] == 1
    assert counts["MultiHeadAttention"] == 0 and counts["Split"] == 0
    feeds = _feeds(6, seed=4)  # padding masks: the raw mask QAttention reads must mask the same keys
    for before, after in zip(_outputs(quantized, feeds), _outputs(rewritten, feeds)):
        for expected, got in zip(before, after):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_quant_times_qattention_against_its_parts_and_replays_the_choice(fused_encoder, tmp_path):
    # A model this small hardly runs faster in int8: a low min_speedup keeps its layers quantized to time the rest.
    data = _feeds(12, seed=5)
    context = PassContext(data=data, timing=QUICK)
    model, records = PassManager(create_passes(SPEC), context=context).run(load_model(fused_encoder.to_proto()))
    lines = [note for note in records[0].notes if "as QAttention" in note]
    assert len(lines) == 1 and "taken" in lines[0]
    values = context.decisions.to_dict()["values"]
    taken = values[next(key for key in values if key.endswith("/attention projections as QAttention"))]
    assert lines[0].endswith(": taken" if taken else ": not taken")
    if records[0].status == "applied":  # (not stepped back as slower than float as a whole)
        assert op_counts(model)["QAttention"] == (1 if taken else 0)
    replayed, _ = optimize(
        fused_encoder, SPEC, data=data, budget=None, decisions={"decisions": {"values": values}}
    )
    save_model(model, tmp_path / "measured.onnx")
    save_model(replayed, tmp_path / "replayed.onnx")
    assert (tmp_path / "measured.onnx").read_bytes() == (tmp_path / "replayed.onnx").read_bytes()


def test_an_attention_bias_that_is_no_padding_mask_keeps_multiheadattention():
    width, heads, length = 32, 4, 8
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, 3 * width)) * 0.1).astype(np.float32)
    bias = (rng.standard_normal(3 * width) * 0.1).astype(np.float32)
    position_bias = rng.standard_normal((1, heads, length, length)).astype(np.float32)  # learned, not a mask
    nodes = [
        helper.make_node(
            "Attention", ["x", "w", "b", "", "", "position_bias"], ["y"], name="attention", domain="com.microsoft",
            num_heads=heads,
        )
    ]
    source = make_model(
        nodes, [value_info("x", [1, length, width])], [value_info("y", [1, length, width])],
        [constant("w", weight), constant("b", bias), constant("position_bias", position_bias)], 17,
    )
    source.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    quantized, _ = apply("quant:measure=false", source)
    assert op_counts(quantized)["MultiHeadAttention"] == 1
    assert to_qattention(quantized) == 0
