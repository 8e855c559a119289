"""Transformer fusions: attention into onnxruntime's Attention / MultiHeadAttention (or the standard op at
opset 23), residual LayerNorm into SkipLayerNormalization, biased GELU into BiasGelu / FastGelu.

Hand-built graphs check each spelling and each refusal; PyTorch exports (nn.MultiheadAttention, nn.Transformer-
Encoder, a BERT-style encoder) check that what exporters write is found. Numerics are compared in onnxruntime
with its own graph optimizations off (so they cannot hide a wrong rewrite), against numpy or PyTorch.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graph_checks import op_counts
from model_builders import torch_cases
from test_cli import OPTIMIZE, run_cli, succeeded
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnxforge
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import Model, load_model
from onnxforge.pipeline import PassContext, create_passes

RTOL = 1e-4
B, S, E, H = 2, 6, 16, 4
D = E // H
T = S + 3  # the key length of cross-attention


# --- helpers ---------------------------------------------------------------------------------------------


def _run(model: Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs in onnxruntime with its graph optimizations off, so only our rewrite is being tested."""
    proto = model.to_proto() if isinstance(model, Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _rel_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    return max(float(np.abs(e - a).max() / np.abs(e).max()) for e, a in zip(expected, actual))


def _fuse(model: Model | onnx.ModelProto, passes: str) -> Model:
    """Run `passes` through the pass manager (checker, onnxruntime load, 1e-4) and insist each was applied."""
    fused, report = onnxforge.optimize(model, passes, seed=0)
    assert [(r.name, r.status) for r in report.passes] == [(n, "applied") for n in passes.split(",")], [
        (r.name, r.status, r.error) for r in report.passes
    ]
    return fused


def _apply(pass_name: str, proto: onnx.ModelProto, backend: str = "ort") -> tuple[Model, dict]:
    (pass_,) = create_passes(pass_name)
    model = load_model(proto)
    result = pass_.run(model, PassContext(backend=backend))
    return model, result.stats


def _contrib(model: Model) -> Counter:
    return Counter(n.op for g in model.graphs() for n in g.nodes if n.domain == "com.microsoft")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _const(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


# --- hand-built batch-major attention -----------------------------------------------------------------------

SCALINGS = ["scores_div", "scores_mul", "query_and_key_mul", "query_mul", "query_div", "baddbmm", "unscaled"]


def _attention_graph(scaling="scores_div", masked=True, opset=17, cross=False, softmax_axis=-1, split=None):
    """A BERT-style self-attention block (or cross-attention, keys and values from input `m`) on [B, S, E]."""
    rng = np.random.default_rng(0)
    inits = [_const(f"w{n}", rng.standard_normal((E, E)).astype(np.float32) * 0.3) for n in "qkv"]
    inits += [_const(f"b{n}", rng.standard_normal(E).astype(np.float32) * 0.1) for n in "qkv"]
    inits += [_const("heads", np.array(split or [B, S, H, D], np.int64)), _const("merged", np.array([B, S, E]))]
    inits += [_const("key_heads", np.array([B, T if cross else S, H, D], np.int64))]
    root_d, inv_d, quarter = math.sqrt(D), 1 / math.sqrt(D), D**-0.25
    inits += [_const(n, np.float32(v)) for n, v in [("root_d", root_d), ("inv_d", inv_d), ("quarter", quarter)]]
    inits += [_const("one", np.float32(1.0))]
    nodes = []
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        source = "m" if cross and n != "q" else "x"
        nodes += [
            helper.make_node("MatMul", [source, f"w{n}"], [f"{n}_mm"]),
            helper.make_node("Add", [f"{n}_mm", f"b{n}"], [n]),
            helper.make_node("Reshape", [n, "heads" if n == "q" else "key_heads"], [f"{n}_split"]),
            helper.make_node("Transpose", [f"{n}_split"], [f"{n}h"], perm=perm),
        ]
    q, k = "qh", "kh"
    if scaling in ("query_and_key_mul", "query_mul", "baddbmm"):
        factor = "quarter" if scaling == "query_and_key_mul" else "inv_d"
        nodes.append(helper.make_node("Mul", ["qh", factor], ["q_scaled"]))
        q = "q_scaled"
    if scaling == "query_and_key_mul":
        nodes.append(helper.make_node("Mul", ["quarter", "kh"], ["k_scaled"]))  # constant first: commutes
        k = "k_scaled"
    if scaling == "query_div":
        nodes.append(helper.make_node("Div", ["qh", "root_d"], ["q_scaled"]))
        q = "q_scaled"
    after = {"scores_div": ("Div", "root_d"), "scores_mul": ("Mul", "inv_d"), "baddbmm": ("Mul", "one")}
    nodes.append(helper.make_node("MatMul", [q, k], ["raw" if scaling in after else "scores"]))
    if scaling in after:
        op, constant = after[scaling]
        nodes.append(helper.make_node(op, ["raw", constant], ["scores"]))
    if masked:
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["masked"]))
    nodes += [
        helper.make_node("Softmax", ["masked" if masked else "scores"], ["probs"], axis=softmax_axis),
        helper.make_node("MatMul", ["probs", "vh"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merged"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, E])]
    if cross:
        inputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [B, T, E]))
    if masked:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, 1, T if cross else S]))
    graph = helper.make_graph(
        nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, E])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _attention_feeds(proto: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs; the mask pads the last positions of the second sequence (0 attended, -10000 not)."""
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in proto.graph.input}
    if "mask" in feeds:
        keep = np.ones((B, feeds["mask"].shape[-1]), np.float32)
        keep[1, -2:] = 0
        feeds["mask"] = ((1 - keep) * -10000.0)[:, None, None, :]
    return feeds


def _attention_reference(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    x, m = feeds["x"], feeds.get("m", feeds["x"])
    heads = lambda t: t.reshape(B, -1, H, D).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (heads(src @ weights[f"w{n}"] + weights[f"b{n}"]) for n, src in (("q", x), ("k", m), ("v", m)))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D) + feeds.get("mask", 0.0)
    return (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(B, S, E)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_every_spelling_of_the_scale_fuses_into_one_attention(scaling, masked):
    proto = _attention_graph(scaling, masked)
    model, stats = _apply("fuse-attention", proto)
    assert stats == {"attention": 1}
    assert _contrib(model) == {"Attention": 1}
    assert not {"Softmax", "Transpose", "MatMul"} & set(op_counts(model))
    feeds = _attention_feeds(proto)
    expected = _attention_reference(proto, feeds)
    if scaling == "unscaled":
        expected = _run(proto, feeds)[0]
    assert _rel_error([expected], _run(model, feeds)) < RTOL


def test_attention_through_the_pass_manager_with_a_padding_mask():
    proto = _attention_graph()
    fused = _fuse(proto, "fuse-attention")
    assert op_counts(fused) == {"Attention": 1, "Expand": 1}  # the mask broadcast over queries, as ORT wants
    for seed in (1, 2):
        feeds = _attention_feeds(proto, seed)
        assert _rel_error([_attention_reference(proto, feeds)], _run(fused, feeds)) < RTOL


def test_cross_attention_fuses_into_multihead_attention_on_the_projections():
    # Keys and values come from another sequence (of another length): no packed projection is possible.
    proto = _attention_graph(cross=True)
    model, stats = _apply("fuse-attention", proto)
    assert stats == {"multihead-attention": 1}
    assert _contrib(model) == {"MultiHeadAttention": 1}
    assert op_counts(model)["MatMul"] == 3  # the projections stay
    feeds = _attention_feeds(proto)
    assert _rel_error([_attention_reference(proto, feeds)], _run(model, feeds)) < RTOL


def test_attention_declines_a_reshape_that_is_not_a_head_split():
    # [B, S, E] -> [S, B, H, D] mixes batch and sequence: valid ONNX, but not heads of one sequence.
    proto = _attention_graph(split=[S, B, H, D])
    model, stats = _apply("fuse-attention", proto)
    assert stats == {} and op_counts(model)["Softmax"] == 1


def test_attention_declines_a_softmax_over_another_axis():
    model, stats = _apply("fuse-attention", _attention_graph(softmax_axis=2))
    assert stats == {} and op_counts(model)["Softmax"] == 1


def _scale_per_head(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The block with its scores divided by a different number in each head: valid, but not one scale."""
    root_d = next(t for t in proto.graph.initializer if t.name == "root_d")
    root_d.CopyFrom(_const("root_d", np.linspace(1.5, 3.0, H, dtype=np.float32).reshape(1, H, 1, 1)))
    return proto


@pytest.mark.parametrize(
    "proto, reason",
    [
        (_attention_graph(softmax_axis=2), "the Softmax is not over the keys"),
        (_scale_per_head(_attention_graph()), "the scale is not one finite constant other than 0"),
    ],
    ids=["softmax_over_queries", "scale_per_head"],
)
def test_explain_says_where_and_why_attention_nearly_matched(tmp_path, proto, reason):
    onnx.save(proto, tmp_path / "model.onnx")
    result = succeeded(run_cli(OPTIMIZE, tmp_path / "model.onnx", "--passes", "cleanup,fuse", "--explain",
                               "-o", tmp_path / "out.onnx"))
    # The notes of fuse's members are fuse's; the root of the match is the last Reshape (an unnamed node).
    assert "fuse (unchanged):" in result.stdout
    assert f"  attention declined at 1 place (Reshape): {reason}" in result.stdout.splitlines()
    assert op_counts(load_model(tmp_path / "out.onnx"))["Softmax"] == 1


def test_attention_declines_when_the_probabilities_are_also_an_output():
    proto = _attention_graph()
    proto.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [B, H, S, S]))
    model, stats = _apply("fuse-attention", proto)
    assert stats == {} and op_counts(model)["Softmax"] == 1


def test_attention_emits_no_contrib_op_for_tvm_below_opset_23():
    model, stats = _apply("fuse-attention", _attention_graph(), backend="tvm")
    assert stats == {} and not _contrib(model)


def test_attention_for_tvm_uses_the_standard_op_at_opset_23():
    proto = _attention_graph(opset=23)
    model, stats = _apply("fuse-attention", proto, backend="tvm")
    assert stats == {"attention-standard": 1}
    attention = [n for n in model.graph.nodes if n.op == "Attention"]
    assert len(attention) == 1 and attention[0].domain in ("", None) and not _contrib(model)
    assert op_counts(model)["Softmax"] == 0
    feeds = _attention_feeds(proto)
    assert _rel_error([_attention_reference(proto, feeds)], _run(model, feeds)) < RTOL


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_row_projection_of_sequence_major_rows_moves_to_batch_major(trans_b):
    # Transpose [B,S,E] -> [S,B,E], rows [S*B, E], Gemm (alpha, beta, either weight layout), back to [B,S,N].
    n = 12
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n, E) if trans_b else (E, n)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["t", "rows_shape"], ["rows"]),
        helper.make_node("Gemm", ["rows", "w", "b"], ["g"], alpha=0.5, beta=2.0, transB=trans_b),
        helper.make_node("Reshape", ["g", "back_shape"], ["back"]),
        helper.make_node("Transpose", ["back"], ["y"], perm=[1, 0, 2]),
    ]
    inits = [_const("rows_shape", np.array([S * B, E])), _const("back_shape", np.array([S, B, n])),
             _const("w", weight), _const("b", rng.standard_normal(n).astype(np.float32))]
    graph = helper.make_graph(
        nodes, "projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, E])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, n])], inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fused = _fuse(proto, "fuse-attention")
    assert op_counts(fused) == {"MatMul": 1, "Add": 1}
    feeds = _feeds(proto)
    assert _rel_error(_run(proto, feeds), _run(fused, feeds)) < RTOL


# --- PyTorch exports ------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """nn.MultiheadAttention used as self-attention, with the masks and weights options users pass."""

    def __init__(self, batch_first: bool, need_weights: bool, causal: bool = False):
        super().__init__()
        self.attention = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.need_weights, self.causal = need_weights, causal

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        length = x.shape[1] if self.attention.batch_first else x.shape[0]
        causal = torch.triu(torch.full((length, length), float("-inf")), 1) if self.causal else None
        return self.attention(
            x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=self.need_weights
        )[0]


def _torch_check(module: nn.Module, inputs: tuple, names: list[str], fused: Model) -> None:
    with torch.no_grad():
        expected = module(*inputs)
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    assert _rel_error([expected.numpy()], _run(fused, feeds)[:1]) < RTOL


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "with_weights"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_multihead_attention_export_fuses(batch_first, need_weights):
    torch.manual_seed(0)
    module = SelfAttention(batch_first, need_weights).eval()
    x = torch.randn((B, S, E) if batch_first else (S, B, E))
    fused = _fuse(from_torch(module, (x,), ["x"], ["y"]), "cleanup,fuse")
    assert _contrib(fused)["Attention"] == 1
    assert not {"Softmax", "Gather", "Squeeze"} & set(op_counts(fused))
    if batch_first:  # the output projection moved to [B, S, E]: no layout op is left
        assert op_counts(fused) == {"Attention": 1, "MatMul": 1, "Add": 1}
    _torch_check(module, (torch.randn(x.shape),), ["x"], fused)


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "with_weights"])
def test_key_padding_and_causal_masks_keep_their_meaning(need_weights):
    torch.manual_seed(0)
    padded = SelfAttention(True, need_weights).eval()
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, S - 2 :] = True
    x = torch.randn(B, S, E)
    fused = _fuse(from_torch(padded, (x, padding), ["x", "padding"], ["y"]), "cleanup,fuse")
    assert _contrib(fused)["Attention"] == 1
    _torch_check(padded, (torch.randn(B, S, E), padding), ["x", "padding"], fused)

    causal = SelfAttention(True, need_weights, causal=True).eval()
    fused = _fuse(from_torch(causal, (x,), ["x"], ["y"]), "cleanup,fuse")
    assert _contrib(fused)["Attention"] == 1
    _torch_check(causal, (torch.randn(B, S, E),), ["x"], fused)


def _torch_case(name: str):
    case = torch_cases()[name]
    return case, from_torch(case.module, case.example_inputs, case.input_names, case.output_names)


def test_transformer_encoder_has_every_attention_block_fused():
    case, model = _torch_case("transformer")
    layers = len(case.module.layers)
    fused = _fuse(model, "cleanup,fuse")
    assert _contrib(fused) == {"Attention": layers, "SkipLayerNormalization": 2 * layers}
    # Per layer: the output projection and the two feed-forward MatMuls, the first one's bias and ReLU.
    assert op_counts(fused) == _contrib(fused) | {"MatMul": 3 * layers, "Add": layers, "Relu": layers}
    _torch_check(case.module, (torch.randn(case.example_inputs[0].shape),), case.input_names, fused)


def test_bert_encoder_has_every_attention_block_fused_and_masks_keep_their_meaning():
    case, model = _torch_case("bert")
    layers = len(case.module.layers)
    fused = _fuse(model, "cleanup,fuse")
    contrib = _contrib(fused)
    assert contrib["Attention"] == layers and contrib["BiasGelu"] == layers
    assert contrib["SkipLayerNormalization"] == 2 * layers + 1  # and the embeddings' sum
    assert not {"Softmax", "LayerNormalization", "Erf"} & set(op_counts(fused))
    ids = torch.randint(0, 32, case.example_inputs[0].shape, generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # padding at the end of the second sequence
    with torch.no_grad():
        expected = [t.numpy() for t in case.module(ids, mask)]
    assert _rel_error(expected, _run(fused, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})) < RTOL


def test_bert_with_dynamic_shapes_fuses_through_computed_head_reshapes():
    # The head reshapes take targets computed from Shape; tests/test_transformer_exports.py covers the rest.
    case = torch_cases()["bert"]
    axes = {name: {0: "batch", 1: "sequence"} for name in case.input_names}
    model = from_torch(case.module, case.example_inputs, case.input_names, case.output_names, dynamic_axes=axes)
    cleaned = _fuse(model, "cleanup")
    assert op_counts(cleaned)["Softmax"] == len(case.module.layers)
    (fuse_attention,) = create_passes("fuse-attention")
    assert fuse_attention.run(cleaned, PassContext()).stats == {"attention": len(case.module.layers)}
    assert "Softmax" not in op_counts(cleaned)


# --- SkipLayerNormalization -------------------------------------------------------------------------------


def _residual_graph(biased=False, sum_read_elsewhere=False, shape=(B, S, E), skip_shape=None, axis=-1):
    """LayerNorm(x [@ W + b] + skip), optionally with the sum also feeding another Add (a pre-norm residual)."""
    rng = np.random.default_rng(0)
    inits = [_const("gamma", rng.standard_normal(E).astype(np.float32)), _const("beta", np.full(E, 0.1, np.float32))]
    nodes, source = [], "x"
    if biased:
        inits += [_const("w", rng.standard_normal((E, E)).astype(np.float32)), _const("b", np.ones(E, np.float32))]
        nodes += [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["b", "xw"], ["xb"])]
        source = "xb"
    nodes += [
        helper.make_node("Add", [source, "skip"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=axis, epsilon=1e-6),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))]
    if sum_read_elsewhere:
        nodes.append(helper.make_node("Add", ["sum", "y"], ["residual"]))
        outputs.append(helper.make_tensor_value_info("residual", TensorProto.FLOAT, list(shape)))
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)),
        helper.make_tensor_value_info("skip", TensorProto.FLOAT, list(skip_shape or shape)),
    ]
    graph = helper.make_graph(nodes, "residual", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(proto: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in proto.graph.input
    }


@pytest.mark.parametrize("shape", [(B, S, E), (S, E)], ids=["3d", "2d"])
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "with_projection_bias"])
def test_add_and_layernorm_fuse_into_skip_layernorm(biased, shape):
    proto = _residual_graph(biased=biased, shape=shape)
    fused = _fuse(proto, "fuse-skip-layernorm")
    assert op_counts(fused) == ({"MatMul": 1} if biased else {}) | {"SkipLayerNormalization": 1}
    node = next(n for n in fused.graph.nodes if n.op == "SkipLayerNormalization")
    assert len(node.inputs) == (5 if biased else 4) and node.attrs["epsilon"] == pytest.approx(1e-6)
    feeds = _feeds(proto)
    assert _rel_error(_run(proto, feeds), _run(fused, feeds)) < RTOL


def test_skip_layernorm_gives_the_sum_where_the_residual_path_reads_it():
    proto = _residual_graph(sum_read_elsewhere=True)
    fused = _fuse(proto, "fuse-skip-layernorm")
    assert op_counts(fused) == {"SkipLayerNormalization": 1, "Add": 1}
    node = next(n for n in fused.graph.nodes if n.op == "SkipLayerNormalization")
    assert [t.name for t in node.outputs] == ["y", "", "", "sum"]
    feeds = _feeds(proto)
    assert _rel_error(_run(proto, feeds), _run(fused, feeds)) < RTOL


@pytest.mark.parametrize(
    "variant, reason",
    [({"skip_shape": (1, S, E)}, "not provably of one shape"), ({"axis": 1}, "other than the last axis")],
    ids=["broadcast_skip", "not_the_last_axis"],
)
def test_skip_layernorm_declines_and_explain_says_why(variant, reason):
    proto = _residual_graph(**variant)
    model, stats = _apply("fuse-skip-layernorm", proto)
    assert stats == {} and op_counts(model) == {"Add": 1, "LayerNormalization": 1}
    _, report = onnxforge.optimize(proto, "fuse-skip-layernorm", seed=0)
    assert "skip-layernorm declined at 1 place" in report.explanation() and reason in report.explanation()


def test_skip_layernorm_emits_nothing_for_tvm():
    model, stats = _apply("fuse-skip-layernorm", _residual_graph(), backend="tvm")
    assert stats == {} and not _contrib(model)


# --- BiasGelu / FastGelu ----------------------------------------------------------------------------------


def _gelu_graph(gelu: str, bias_shape=(E,), read_elsewhere=False):
    """Gelu(x + bias) with `gelu` one of: exact, tanh (standard, opset 20), contrib, contrib_fast."""
    bias = np.linspace(-1, 1, int(np.prod(bias_shape)), dtype=np.float32).reshape(bias_shape)
    op, domain, attrs = {
        "exact": ("Gelu", "", {}),
        "tanh": ("Gelu", "", {"approximate": "tanh"}),
        "contrib": ("Gelu", "com.microsoft", {}),
        "contrib_fast": ("FastGelu", "com.microsoft", {}),
    }[gelu]
    nodes = [
        helper.make_node("Add", ["x", "bias"], ["biased"]),
        helper.make_node(op, ["biased"], ["y"], domain=domain, **attrs),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, E])]
    if read_elsewhere:
        outputs.append(helper.make_tensor_value_info("biased", TensorProto.FLOAT, [B, S, E]))
    graph = helper.make_graph(
        nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, E])], outputs,
        [_const("bias", bias)],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize(
    "gelu, fused_op",
    [("exact", "BiasGelu"), ("contrib", "BiasGelu"), ("tanh", "FastGelu"), ("contrib_fast", "FastGelu")],
)
def test_bias_add_and_gelu_fuse(gelu, fused_op):
    proto = _gelu_graph(gelu)
    fused = _fuse(proto, "fuse-bias-gelu")
    assert op_counts(fused) == {fused_op: 1} and _contrib(fused) == {fused_op: 1}
    assert len(fused.graph.nodes[0].inputs) == 2
    feeds = _feeds(proto)
    assert _rel_error(_run(proto, feeds), _run(fused, feeds)) < RTOL


def test_bias_gelu_takes_a_bias_with_leading_ones():
    proto = _gelu_graph("exact", bias_shape=(1, 1, E))
    fused = _fuse(proto, "fuse-bias-gelu")
    assert op_counts(fused) == {"BiasGelu": 1}
    feeds = _feeds(proto)
    assert _rel_error(_run(proto, feeds), _run(fused, feeds)) < RTOL


@pytest.mark.parametrize(
    "variant, backend",
    [({"bias_shape": (S, E)}, "ort"), ({"read_elsewhere": True}, "ort"), ({}, "tvm")],
    ids=["bias_over_two_axes", "sum_read_elsewhere", "tvm"],
)
def test_bias_gelu_declines(variant, backend):
    model, stats = _apply("fuse-bias-gelu", _gelu_graph("exact", **variant), backend=backend)
    assert stats == {} and op_counts(model) == {"Add": 1, "Gelu": 1}
