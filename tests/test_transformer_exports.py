"""Transformers exported the way users export them: TorchScript with `dynamic_axes` and the dynamo exporter.

Every attention block fuses (head reshapes computed from Shape or written with 0 and -1 are reasoned about
symbolically), the outputs stay the export's at two sequence lengths (onnxruntime, its own optimizations
off), `prune` finds the heads as on a static export, and `--explain` says why a rule that almost matched
declined. The BertLike cases run in CI; the Hugging Face matrix (needs `transformers`) is slow.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from model_builders import BertLayer, BertLike
from test_cli import OPTIMIZE, run_cli, succeeded
from transformer_exports import ARCHITECTURES, export, feeds

import onnxforge
from onnxforge.ir import load_model
from onnxforge.passes.pruning import ChannelGroups

RTOL = 1e-4
CI_CASES = [("bert-like", "torchscript"), ("bert-like", "dynamo")]
# Hugging Face models whose every attention block fuses, by exporter. Not here (docs/fusion.md says why): BERT,
# DistilBERT and RoBERTa exported by TorchScript (a -inf mask and a softmax guarded against fully masked rows,
# as test_explain_says_which_condition_declined_attention_and_where builds) and HuBERT exported by dynamo (its
# sequence length is arithmetic on the number of samples, which the head split's target cannot be read through).
HF_CASES = [
    ("bert", "dynamo"), ("distilbert", "dynamo"), ("roberta", "dynamo"), ("vit", "torchscript"), ("vit", "dynamo"),
    ("whisper-encoder", "torchscript"), ("whisper-encoder", "dynamo"), ("hubert", "torchscript"),
]


@functools.cache
def _export(name: str, exporter: str, opset: int = 17) -> onnx.ModelProto:
    return export(ARCHITECTURES[name], exporter, opset)


def _run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def _fuses_every_block(name: str, exporter: str, opset: int = 17) -> None:
    arch = ARCHITECTURES[name]
    proto = _export(name, exporter, opset)
    assert _ops(proto)["Softmax"] == arch.layers
    samples = [feeds(arch, 2, length) for length in arch.lengths]
    fused, report = onnxforge.optimize(proto, "cleanup,fuse", data=samples[:1], seed=0)
    fused_proto = fused.to_proto()
    ops = _ops(fused_proto)
    assert ops["Attention"] + ops["MultiHeadAttention"] == arch.layers, report.explanation()
    assert "Softmax" not in ops and "Erf" not in ops
    assert ops["SkipLayerNormalization"] >= 2 * arch.layers - 1  # the first residual may follow the embeddings
    for sample in samples:  # two sequence lengths, neither the one the model was exported with... nor verified on
        expected, actual = _run(proto, sample), _run(fused_proto, sample)
        assert max(float(np.abs(e - a).max() / np.abs(e).max()) for e, a in zip(expected, actual)) < RTOL


@pytest.mark.parametrize("name, exporter", CI_CASES)
def test_fuse_fuses_every_attention_block_of_a_dynamic_export(name, exporter):
    _fuses_every_block(name, exporter)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [14, 21])
def test_fuse_fuses_every_attention_block_of_a_dynamic_torchscript_export_at_other_opsets(opset):
    _fuses_every_block("bert-like", "torchscript", opset)


@pytest.mark.slow
@pytest.mark.parametrize("name, exporter", HF_CASES)
def test_fuse_fuses_every_attention_block_of_hugging_face_exports(name, exporter):
    pytest.importorskip("transformers")
    _fuses_every_block(name, exporter)


def test_fused_dynamic_export_has_at_least_the_fused_ops_of_onnxruntimes_optimizer(tmp_path):
    from onnxruntime.transformers.optimizer import optimize_model

    arch = ARCHITECTURES["bert-like"]
    proto = _export("bert-like", "torchscript")
    onnx.save(proto, tmp_path / "model.onnx")
    theirs = _ops(optimize_model(str(tmp_path / "model.onnx"), model_type="bert", num_heads=arch.heads,
                                 hidden_size=arch.hidden, opt_level=0).model)
    fused, _ = onnxforge.optimize(proto, "cleanup,fuse", data=[feeds(arch, 2, 8)], seed=0)
    ours = _ops(fused.to_proto())
    for kinds in (("Attention", "MultiHeadAttention"), ("LayerNormalization", "SkipLayerNormalization"),
                  ("Gelu", "BiasGelu", "FastGelu")):
        assert sum(ours[k] for k in kinds) >= sum(theirs[k] for k in kinds), kinds


# --- heads -------------------------------------------------------------------------------------------------


def _params_after_pruning(proto: onnx.ModelProto, arch) -> float:
    pruned, report = onnxforge.optimize(proto, "cleanup,prune:ratio=0.3", data=[feeds(arch, 2, 8)], seed=0)
    assert [r.status for r in report.passes][-1] == "applied", report.passes
    return pruned.stats().params / load_model(proto).stats().params


@pytest.mark.parametrize("name, exporter", CI_CASES)
def test_prune_finds_the_attention_heads_of_a_dynamic_export(name, exporter):
    arch = ARCHITECTURES[name]
    proto = _export(name, exporter)
    cleaned, _ = onnxforge.optimize(proto, "cleanup", data=[feeds(arch, 2, 8)], seed=0)
    heads = [g for g in ChannelGroups.compute(cleaned) if g.unit == "heads"]
    assert [(g.channels, g.prunable) for g in heads] == [(arch.heads, True)] * arch.layers, [g.reason for g in heads]


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
    scaled_dot_product_attention's export does: onnxruntime's Attention gives NaN there, so it must not fuse."""

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
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(_GuardedLayer(32, 4) for _ in range(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        batch, length = input_ids.shape
        positions = torch.arange(length).unsqueeze(0).expand(batch, length)
        x = self.embed_norm(self.tokens(input_ids) + self.positions(positions))
        bias = torch.where(attention_mask[:, None, None, :] == 0, float("-inf"), 0.0)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def test_explain_says_which_condition_declined_attention_and_where(tmp_path):
    torch.manual_seed(0)
    module, arch = _GuardedBert().eval(), ARCHITECTURES["bert-like"]
    with torch.no_grad():
        torch.onnx.export(module, arch.example(2, 8), tmp_path / "model.onnx", input_names=arch.input_names,
                          dynamic_axes=arch.dynamic, opset_version=17, dynamo=False)
    result = succeeded(run_cli(OPTIMIZE, tmp_path / "model.onnx", "--passes", "cleanup,fuse", "--explain",
                               "--no-verify", "-o", tmp_path / "out.onnx"))
    lines = [line.strip() for line in result.stdout.splitlines() if "may hold -inf" in line]
    # One line per (rule, reason), with the count of places and their node names.
    assert [line.split(" declined")[0] for line in lines] == ["attention", "multihead-attention"], result.stdout
    assert lines[0].startswith("attention declined at 2 places (/layers.0/Reshape_3, /layers.1/Reshape_3): ")
    assert "onnxruntime's Attention would give NaN there" in lines[0]
    assert _ops(onnx.load(tmp_path / "out.onnx"))["Softmax"] == 2


# --- the symbolic reasoning underneath ------------------------------------------------------------------------


def test_reshape_targets_with_symbolic_dims_zeros_and_minus_one_resolve_to_heads():
    from onnxforge.ir.shape_values import reshaped

    assert reshaped(["B", "S", 32], [0, 0, 4, -1]) == ["B", "S", 4, 8]
    assert reshaped(["B", "S", 32], ["B", "S", -1, 8]) == ["B", "S", 4, 8]
    assert reshaped(["B", "S", 4, 8], ["B", "S", -1]) == ["B", "S", 32]
    assert reshaped(["B", "S", 32], [-1, 4, 8]) is None  # B*S is no single dim
    assert reshaped(["B", "S", 32], [0, 0, -1, -1]) is None
    assert reshaped(["B", "S", 32], [0, 0, 4, 8], allowzero=1) == [0, 0, 4, 8]
