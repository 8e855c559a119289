"""`prune` finds attention heads on transformers exported the way Hugging Face models are written, with dynamic axes,
by both exporters, and `fuse` after it still fuses every attention block.

The encoder here is written as `transformers`' BERT is, where it matters to shapes: positions sliced from a
registered table (`position_ids[:, :length]`), heads split with `view(*shape, -1, head)` and merged with
`reshape(*shape, -1)`, the mask broadcast from the input's own batch. TorchScript's export then names the batch and
sequence axes anew after the embeddings, so the head merge reads as `[b', s, -1]` with `b'` unrelated to the batch
its input has; the dynamo export states the sliced table's length as `Min(16, s)`, which onnx's inference cannot
find again once a pass forgets it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch_exports import export_dynamic

import onnxforge
from onnxforge.ir import infer_shapes, load_model
from onnxforge.ir.shape_values import refine_reshapes
from onnxforge.passes.pruning import ChannelGroups

WIDTH, HEADS, LAYERS, MAX_LENGTH = 32, 4, 2, 16
PRUNE = "cleanup,prune:ratio=0.3:measure=false,fuse"  # heads found, not timed: a tiny model is noise


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
        self.norm2 = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        head = WIDTH // HEADS
        q, k, v = (p(x).view(*x.shape[:-1], -1, head).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * head**-0.5 + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(*x.shape[:-1], -1)
        x = self.norm(x + self.out(context))
        return self.norm2(x + self.mlp(x))


class _HuggingFaceStyleEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(64, WIDTH)
        self.positions = nn.Embedding(MAX_LENGTH, WIDTH)
        self.register_buffer("position_ids", torch.arange(MAX_LENGTH).unsqueeze(0), persistent=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.layers = nn.ModuleList(_Layer() for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        return x


def _feeds(batch: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(length)
    mask = np.ones((batch, length), np.int64)
    mask[0, -2:] = 0
    return {"input_ids": rng.integers(1, 64, (batch, length)), "attention_mask": mask}


def _export(exporter: str) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = _HuggingFaceStyleEncoder().eval()
    example = tuple(torch.from_numpy(v) for v in _feeds(2, 8).values())
    axes = {0: "batch", 1: "sequence"}
    opset = 17 if exporter == "torchscript" else 18
    return export_dynamic(module, example, ["input_ids", "attention_mask"], ("hidden", axes),
                          {"input_ids": axes, "attention_mask": axes}, exporter, opset)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_prune_finds_every_head_group_of_a_hugging_face_style_dynamic_export(exporter):
    cleaned, _ = onnxforge.optimize(_export(exporter), "cleanup", seed=0)
    heads = [g for g in ChannelGroups.compute(cleaned) if g.unit == "heads"]
    assert [(g.channels, g.prunable) for g in heads] == [(HEADS, True)] * LAYERS, [g.reason for g in heads]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_fuse_after_prune_fuses_every_attention_block_of_a_hugging_face_style_dynamic_export(exporter):
    proto = _export(exporter)
    pruned, report = onnxforge.optimize(proto, PRUNE, data=[_feeds(2, 8), _feeds(1, 5)], seed=0, budget=None)

    assert [r.status for r in report.passes][1:] == ["applied", "applied"], report.passes
    assert pruned.stats().params / load_model(proto).stats().params < 0.8  # heads went, not just MLP channels
    ops = Counter(node.op for node in pruned.graph.nodes)
    assert ops["Attention"] + ops["MultiHeadAttention"] == LAYERS, report.explanation()


def test_the_dims_the_head_analysis_merges_do_not_stay_in_the_model():
    # They are assumptions (a broadcast's operands equal): onnxruntime reuses buffers between tensors whose dims
    # share a name, so a model that kept them could fail to run (PP-OCRv4's detector did, after prune).
    cleaned, _ = onnxforge.optimize(_export("torchscript"), "cleanup", seed=0)
    infer_shapes(cleaned)
    if refine_reshapes(cleaned.graph):  # what the analysis does before it merges
        infer_shapes(cleaned)
    inferred = {name: t.shape for name, t in cleaned.graph.tensors().items()}

    ChannelGroups.compute(cleaned)

    assert {name: t.shape for name, t in cleaned.graph.tensors().items()} == inferred
