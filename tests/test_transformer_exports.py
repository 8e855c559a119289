"""Transformers exported the way users export them: TorchScript with `dynamic_axes` and the dynamo exporter.

Every attention block fuses (head reshapes computed from Shape or written with 0 and -1 are reasoned about
symbolically), the outputs stay the export's at two sequence lengths (onnxruntime, its own optimizations
off), `prune` finds the heads as on a static export, and `--explain` says why a rule that almost matched
declined; every fused export has at least the fused ops onnxruntime's transformer optimizer makes of the same
file. The whole matrix runs in CI (`transformers` is in the test extra); other opsets are slow.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from model_builders import BertLayer, BertLike
from test_cli import OPTIMIZE, run_cli, succeeded
from torch_exports import op_counts, run_as_exported
from transformer_exports import ARCHITECTURES, export, feeds

import onnxforge
from onnxforge.ir import load_model
from onnxforge.passes.pruning import ChannelGroups

RTOL = 1e-4
CI_CASES = [("bert-like", "torchscript"), ("bert-like", "dynamo")]
# Hugging Face models, each exporter: every attention block fuses. BERT, DistilBERT and RoBERTa exported by
# TorchScript mask with -inf and guard the softmax against fully masked rows (as _GuardedBert builds), HuBERT's
# dynamo export computes its sequence length from the number of samples (a dim named `((s71//10)) - 1`).
HF_CASES = [
    ("bert", "torchscript"), ("bert", "dynamo"), ("distilbert", "torchscript"), ("distilbert", "dynamo"),
    ("roberta", "torchscript"), ("roberta", "dynamo"), ("vit", "torchscript"), ("vit", "dynamo"),
    ("whisper-encoder", "torchscript"), ("whisper-encoder", "dynamo"), ("hubert", "torchscript"), ("hubert", "dynamo"),
]


@functools.cache
def _export(name: str, exporter: str, opset: int = 17) -> onnx.ModelProto:
    return export(ARCHITECTURES[name], exporter, opset)


def _fuses_every_block(name: str, exporter: str, opset: int = 17) -> None:
    arch = ARCHITECTURES[name]
    proto = _export(name, exporter, opset)
    assert op_counts(proto)["Softmax"] == arch.layers
    fused, report = onnxforge.optimize(proto, "cleanup,fuse", data=[feeds(arch, 2, arch.lengths[0])], seed=0)
    fused_proto = fused.to_proto()
    ops = op_counts(fused_proto)
    assert ops["Attention"] + ops["MultiHeadAttention"] == arch.layers, report.explanation()
    assert "Softmax" not in ops and "Erf" not in ops
    assert ops["SkipLayerNormalization"] >= 2 * arch.layers - 1  # the first residual may follow the embeddings
    _assert_same_outputs(proto, fused_proto, arch)


def _samples(arch) -> list[dict[str, np.ndarray]]:
    """Inputs at two sequence lengths (padding in the first sequence); for a masked model, also with every token
    of the second sequence masked, so that its rows attend to no key at all."""
    samples = []
    for length in arch.lengths:
        sample = feeds(arch, 2, length)
        samples.append(sample)
        if "attention_mask" in sample:
            masked = sample["attention_mask"].copy()
            masked[1] = 0
            samples.append({**sample, "attention_mask": masked})
    return samples


def _assert_same_outputs(proto: onnx.ModelProto, fused_proto: onnx.ModelProto, arch) -> None:
    for sample in _samples(arch):  # neither the length the model was exported with nor the one verified on
        expected, actual = run_as_exported(proto, sample), run_as_exported(fused_proto, sample)
        assert max(float(np.abs(e - a).max() / np.abs(e).max()) for e, a in zip(expected, actual)) < RTOL


@pytest.mark.parametrize("name, exporter", CI_CASES)
def test_fuse_fuses_every_attention_block_of_a_dynamic_export(name, exporter):
    _fuses_every_block(name, exporter)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [14, 21])
def test_fuse_fuses_every_attention_block_of_a_dynamic_torchscript_export_at_other_opsets(opset):
    _fuses_every_block("bert-like", "torchscript", opset)


@pytest.mark.parametrize("name, exporter", HF_CASES)
def test_fuse_fuses_every_attention_block_of_hugging_face_exports(name, exporter):
    pytest.importorskip("transformers")
    _fuses_every_block(name, exporter)


# Against onnxruntime's optimizer: every model's TorchScript export, and BERT's dynamo exports, in CI; the other
# dynamo exports when slow (each of them is still fused block by block in CI by the test above).
_SLOW_AGAINST_ORT = {("distilbert", "dynamo"), ("roberta", "dynamo"), ("vit", "dynamo"), ("whisper-encoder", "dynamo"),
                     ("hubert", "dynamo")}
ORT_CASES = [pytest.param(name, exporter, marks=pytest.mark.slow if (name, exporter) in _SLOW_AGAINST_ORT else ())
             for name, exporter in CI_CASES + HF_CASES]


@pytest.mark.parametrize("name, exporter", ORT_CASES)
def test_fused_dynamic_export_has_at_least_the_fused_ops_of_onnxruntimes_optimizer(name, exporter, tmp_path,
                                                                                     monkeypatch):
    from onnxruntime.transformers.optimizer import optimize_model

    if name != "bert-like":
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # its symbolic shape inference saves a model into the working folder at times
    arch = ARCHITECTURES[name]
    proto = _export(name, exporter)
    onnx.save(proto, tmp_path / "model.onnx")
    theirs = op_counts(optimize_model(str(tmp_path / "model.onnx"), model_type="bert", num_heads=arch.heads,
                                      hidden_size=arch.hidden, opt_level=0).model)
    fused, _ = onnxforge.optimize(proto, "cleanup,fuse", data=[feeds(arch, 2, arch.lengths[0])], seed=0)
    ours = op_counts(fused.to_proto())
    for kinds in (("Attention", "MultiHeadAttention"), ("LayerNormalization", "SkipLayerNormalization",
                                                        "EmbedLayerNormalization"), ("Gelu", "BiasGelu", "FastGelu")):
        assert sum(ours[k] for k in kinds) >= sum(theirs[k] for k in kinds), kinds


# --- heads -------------------------------------------------------------------------------------------------


def _params_after_pruning(proto: onnx.ModelProto, arch, passes: str = "cleanup,prune:ratio=0.3:measure=false") -> float:
    pruned, report = onnxforge.optimize(proto, passes, data=[feeds(arch, 2, 8)], seed=0)
    assert [r.status for r in report.passes][-1] == "applied", report.passes
    return pruned.stats().params / load_model(proto).stats().params


@pytest.mark.parametrize("name, exporter", CI_CASES)
def test_prune_finds_the_attention_heads_of_a_dynamic_export(name, exporter):
    arch = ARCHITECTURES[name]
    proto = _export(name, exporter)
    cleaned, _ = onnxforge.optimize(proto, "cleanup", data=[feeds(arch, 2, 8)], seed=0)
    heads = [g for g in ChannelGroups.compute(cleaned) if g.unit == "heads"]
    assert [(g.channels, g.prunable) for g in heads] == [(arch.heads, True)] * arch.layers, [g.reason for g in heads]


@pytest.mark.parametrize("name, exporter", [("bert", "torchscript"), ("distilbert", "torchscript"),
                                            ("roberta", "torchscript"), ("hubert", "dynamo")])
def test_prune_finds_the_fused_attention_heads_of_hugging_face_exports(name, exporter):
    pytest.importorskip("transformers")
    arch = ARCHITECTURES[name]
    proto = _export(name, exporter)
    fused, _ = onnxforge.optimize(proto, "cleanup,fuse", data=[feeds(arch, 2, arch.lengths[0])], seed=0)
    heads = [g for g in ChannelGroups.compute(fused) if g.unit == "heads"]
    assert [(g.channels, g.prunable) for g in heads] == [(arch.heads, True)] * arch.layers, [g.reason for g in heads]
    assert _params_after_pruning(proto, arch, "cleanup,fuse,prune:ratio=0.3:measure=false") < 0.85


def test_prune_removes_as_many_parameters_from_a_dynamic_export_as_from_a_static_one():
    arch = ARCHITECTURES["bert-like"]
    module = arch.build()
    static = load_model(_export_static(module, arch)).to_proto()
    dynamic = _export("bert-like", "torchscript")
    assert _params_after_pruning(dynamic, arch) == pytest.approx(_params_after_pruning(static, arch), abs=0.01)


def _export_static(module: torch.nn.Module, arch) -> onnx.ModelProto:
    import io

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, arch.example(2, 8), buffer, input_names=arch.input_names, opset_version=17,
                          dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


# --- why a rule declined ------------------------------------------------------------------------------------


class _GuardedLayer(BertLayer):
    """A BERT layer masking with -inf and guarding the softmax against fully masked rows (NaN becomes 0), as
    Hugging Face's BERT, DistilBERT and RoBERTa export by TorchScript: onnxruntime's Attention gives NaN there."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head = width // self.heads
        q, k, v = (proj(x).view(batch, length, self.heads, head).transpose(1, 2) for proj in self.qkv)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(head) + bias).softmax(-1)
        probs = probs.masked_fill(torch.isnan(probs), 0.0)
        context = (probs @ v).transpose(1, 2).reshape(batch, length, width)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.mlp(x))


class _GuardedBert(BertLike):
    """BertLike with _GuardedLayer; `head_bias` adds a bias per head (as ALiBi does), so masked rows are per head."""

    def __init__(self, head_bias: bool = False):
        super().__init__()
        self.layers = torch.nn.ModuleList(_GuardedLayer(32, 4) for _ in range(2))
        self.head_bias = head_bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        batch, length = input_ids.shape
        positions = torch.arange(length).unsqueeze(0).expand(batch, length)
        x = self.embed_norm(self.tokens(input_ids) + self.positions(positions))
        bias = torch.where(attention_mask[:, None, None, :] == 0, float("-inf"), 0.0)
        if self.head_bias:
            bias = bias + torch.arange(4.0).view(1, 4, 1, 1)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def _export_guarded(path, head_bias: bool = False, opset: int = 17) -> onnx.ModelProto:
    torch.manual_seed(0)
    module, arch = _GuardedBert(head_bias).eval(), ARCHITECTURES["bert-like"]
    with torch.no_grad():
        torch.onnx.export(module, arch.example(2, 8), path, input_names=arch.input_names, dynamic_axes=arch.dynamic,
                          opset_version=opset, dynamo=False)
    return onnx.load(path)


@pytest.mark.parametrize("opset", [14, 18])  # ReduceMax's axes: an attribute, an input
def test_softmax_guarded_against_fully_masked_rows_fuses_and_gives_their_zeros(tmp_path, opset):
    arch = ARCHITECTURES["bert-like"]
    proto = _export_guarded(tmp_path / "model.onnx", opset=opset)
    fused, report = onnxforge.optimize(proto, "cleanup,fuse", data=[feeds(arch, 2, 8)], seed=0)
    ops = op_counts(fused.to_proto())
    assert ops["Attention"] == 2 and "Softmax" not in ops, report.explanation()
    # Padding, and a sequence whose every token is masked: the guard's 0 rows, where Attention alone gives NaN.
    _assert_same_outputs(proto, fused.to_proto(), arch)


def test_explain_says_which_condition_declined_attention_and_where(tmp_path):
    _export_guarded(tmp_path / "model.onnx", head_bias=True)
    result = succeeded(run_cli(OPTIMIZE, tmp_path / "model.onnx", "--passes", "cleanup,fuse", "--explain",
                               "--no-verify", "-o", tmp_path / "out.onnx"))
    lines = [line.strip() for line in result.stdout.splitlines() if "may differ between heads" in line]
    # One line per (rule, reason), with the count of places and their node names.
    assert [line.split(" declined")[0] for line in lines] == ["attention", "multihead-attention"], result.stdout
    assert lines[0].startswith("attention declined at 2 places (/layers.0/Reshape_3, /layers.1/Reshape_3): ")
    assert "the softmax is guarded against fully masked rows" in lines[0]
    assert op_counts(onnx.load(tmp_path / "out.onnx"))["Softmax"] == 2


# --- embeddings below opset 17 ------------------------------------------------------------------------------


class _Embeddings(torch.nn.Module):
    """Token embeddings plus `added` ([1, S, H] position rows sliced from a table as Hugging Face does, or one
    learned [1, 1, H] vector), LayerNorm: decomposed at opset 14, which has no LayerNormalization."""

    def __init__(self, added: str):
        super().__init__()
        self.tokens, self.positions = torch.nn.Embedding(30, 32), torch.nn.Embedding(16, 32)
        self.register_buffer("position_ids", torch.arange(16).unsqueeze(0))
        self.vector = torch.nn.Parameter(torch.randn(1, 1, 32))
        self.norm, self.added = torch.nn.LayerNorm(32), added

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(input_ids)
        if self.added == "positions":
            return self.norm(tokens + self.positions(self.position_ids[:, : input_ids.shape[1]]))
        return self.norm(tokens + self.vector)


@pytest.mark.parametrize("added, fused", [("positions", 1), ("vector", 0)])
def test_embeddings_layernorm_below_opset_17_becomes_skip_layernorm_with_position_rows_as_skip(tmp_path, added, fused):
    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(_Embeddings(added).eval(), (torch.randint(0, 30, (2, 8)),), tmp_path / "model.onnx",
                          input_names=["ids"], dynamic_axes={"ids": {0: "batch", 1: "sequence"}}, opset_version=14,
                          dynamo=False)
    proto = onnx.load(tmp_path / "model.onnx")
    optimized, report = onnxforge.optimize(proto, "cleanup,fuse", seed=0)
    assert op_counts(optimized.to_proto())["SkipLayerNormalization"] == fused, report.explanation()
    for length in (5, 13):
        sample = {"ids": np.random.default_rng(length).integers(0, 30, (3, length))}
        expected, actual = run_as_exported(proto, sample)[0], run_as_exported(optimized.to_proto(), sample)[0]
        assert float(np.abs(expected - actual).max()) < RTOL


# --- the symbolic reasoning underneath ------------------------------------------------------------------------


def test_reshape_targets_with_symbolic_dims_zeros_and_minus_one_resolve_to_heads():
    from onnxforge.ir.shape_values import reshaped

    assert reshaped(["B", "S", 32], [0, 0, 4, -1]) == ["B", "S", 4, 8]
    assert reshaped(["B", "S", 32], ["B", "S", -1, 8]) == ["B", "S", 4, 8]
    assert reshaped(["B", "S", 4, 8], ["B", "S", -1]) == ["B", "S", 32]
    assert reshaped(["B", "S", 32], [-1, 4, 8]) is None  # B*S is no single dim
    assert reshaped(["B", "S", 32], [0, 0, -1, -1]) is None
    assert reshaped(["B", "S", 32], [0, 0, 4, 8], allowzero=1) == [0, 0, 4, 8]


def test_shape_arithmetic_on_a_dim_matches_the_dim_the_exporter_named_with_that_expression():
    from onnxforge.ir.shape_values import canonical_dim, dims_of, shape_value

    # The dynamo export of HuBERT: frames = samples // 10 - 1, computed from Shape and named by the exporter.
    audio = gs.Variable("audio", np.float32, ["batch", "s71"])
    frames = gs.Variable("frames", np.float32, ["batch", "((s71//10)) - 1", 32])
    samples, quotient, length = (gs.Variable(name, np.int64) for name in ("samples", "quotient", "length"))
    gs.Node("Shape", inputs=[audio], outputs=[samples], attrs={"start": 1, "end": 2})
    gs.Node("Div", inputs=[samples, gs.Constant("ten", np.array([10]))], outputs=[quotient])
    gs.Node("Add", inputs=[gs.Constant("minus_one", np.array([-1])), quotient], outputs=[length])
    assert shape_value(length) == [dims_of(frames)[1]]
    assert canonical_dim("((s71//10)) - 1") == canonical_dim("(s71 // 10) - 1") != canonical_dim("s71//10")
    assert canonical_dim("sequence") == "sequence"
