"""Small, seeded PyTorch models that export the way real ones do, for tests of the torch frontend and passes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TorchCase:
    """A module, the example inputs it is exported with, and the names given to its inputs and outputs."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]


class ResidualCNN(nn.Module):
    """Conv+BatchNorm+ReLU stem, one residual block, MaxPool, Flatten and a Linear classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(8 * 8 * 8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.pool(x))


class BertLike(nn.Module):
    """A two-layer BERT-style encoder written from plain modules: embeddings, masked attention, GELU MLP."""

    def __init__(self, vocab: int = 32, width: int = 32, heads: int = 4, layers: int = 2, max_len: int = 16):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(max_len, width)
        self.segments = nn.Embedding(2, width)
        self.embed_norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(BertLayer(width, heads) for _ in range(layers))
        self.pooler = nn.Linear(width, width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)
        segments = torch.zeros_like(input_ids)
        x = self.embed_norm(self.tokens(input_ids) + self.positions(positions) + self.segments(segments))
        # 0 where attended, a large negative number where masked, broadcast over heads and queries.
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x, torch.tanh(self.pooler(x[:, 0]))


class BertLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.norm2 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head = width // self.heads
        q, k, v = (proj(x).view(batch, length, self.heads, head).transpose(1, 2) for proj in self.qkv)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head) + bias
        context = (self.dropout(scores.softmax(-1)) @ v).transpose(1, 2).reshape(batch, length, width)
        x = self.norm1(x + self.dropout(self.out(context)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class SpeechRNN(nn.Module):
    """A speech-style recognizer on [batch, frames, features]: a GRU, a bidirectional LSTM and a per-frame head."""

    def __init__(self, features: int = 20, hidden: int = 24, classes: int = 6):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x, _ = self.gru(frames)
        x, _ = self.lstm(x)
        return self.head(x).log_softmax(-1)


@torch.jit.script
def _refine(x: torch.Tensor, steps: int) -> torch.Tensor:
    # A loop and a data-dependent branch that tracing would unroll; scripting keeps them as Loop and If.
    for _ in range(steps):
        x = torch.tanh(x) * 0.9 + 0.1
    if bool(x.sum() > 0):
        x = x * 2.0
    else:
        x = x - 1.0
    return x


class ControlFlow(nn.Module):
    """A Linear, then a scripted loop (trip count from the input's shape) and an `if` on the data."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_refine(self.proj(x), x.shape[0] + 1))


class TiedWeights(nn.Module):
    """One Linear applied twice and an output projection tied to the embedding, as in language models."""

    def __init__(self, vocab: int = 16, width: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = self.mix(torch.relu(self.mix(x)))
        return x @ self.embed.weight.t()


def seeded(build):
    """`build()` with seeded weights, BatchNorm running statistics randomized, in eval mode."""
    torch.manual_seed(0)
    module = build()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            # Running statistics other than 0 and 1, so that what becomes of BatchNorm is really checked.
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return module.eval()


def torch_cases() -> dict[str, TorchCase]:
    """Every exported test model by name; weights and example inputs are drawn from fixed seeds."""
    generator = torch.Generator().manual_seed(1)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    ids = torch.randint(0, 8, (2, 16), generator=generator)
    mask = torch.ones(2, 16, dtype=torch.int64)
    return {
        "cnn": TorchCase(seeded(ResidualCNN), (normal(2, 3, 16, 16),), ["x"], ["logits"]),
        "transformer": TorchCase(
            seeded(
                lambda: nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True), num_layers=2
                )
            ),
            (normal(2, 10, 32),),
            ["x"],
            ["y"],
        ),
        "bert": TorchCase(seeded(BertLike), (ids, mask), ["input_ids", "attention_mask"], ["hidden", "pooled"]),
        "speech_rnn": TorchCase(seeded(SpeechRNN), (normal(1, 25, 20),), ["frames"], ["log_probs"]),
        "control_flow": TorchCase(seeded(ControlFlow), (normal(3, 8),), ["x"], ["y"]),
        "tied_weights": TorchCase(
            seeded(TiedWeights), (torch.randint(0, 8, (2, 5), generator=generator),), ["ids"], ["logits"]
        ),
    }
