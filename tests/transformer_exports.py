"""Small transformers exported the way users export them: TorchScript with `dynamic_axes`, or dynamo.

Each architecture is built from a small config with seeded random weights (BertLike from plain modules,
Hugging Face `transformers` models when that package is installed), then exported at a chosen opset with
dynamic batch and sequence (or frames / patches) axes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn
from torch_exports import export_dynamic


@dataclass
class Architecture:
    """How to build a module and its example inputs, what its inputs are called and which axes are dynamic."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[int, int], tuple[torch.Tensor, ...]]  # (batch, length) -> inputs
    input_names: list[str]
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: symbolic name}
    heads: int
    hidden: int
    layers: int
    lengths: tuple[int, int] = (8, 13)  # two sequence lengths the exported model is checked at


class _Outputs(nn.Module):
    """A Hugging Face model returning its last hidden state only (a tensor, which both exporters take)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs).last_hidden_state


class _MaskedOutputs(_Outputs):
    """The same for a model of token ids and an attention mask."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()

    return seeded


def _ids(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(1, 30, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length - 2 :] = 0  # padding in the first sequence, so the mask matters
    return ids, mask


_TEXT = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
_HF_TEXT = {
    "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64
}


def _bert_like() -> nn.Module:
    from model_builders import BertLike

    return BertLike()


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "bert":
        config = tf.BertConfig(**_HF_TEXT, max_position_embeddings=32)
        return _MaskedOutputs(tf.BertModel(config, add_pooling_layer=False))
    if kind == "roberta":
        config = tf.RobertaConfig(**_HF_TEXT, max_position_embeddings=40, pad_token_id=0)
        return _MaskedOutputs(tf.RobertaModel(config, add_pooling_layer=False))
    if kind == "distilbert":
        config = tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                     max_position_embeddings=32)
        return _MaskedOutputs(tf.DistilBertModel(config))
    if kind == "vit":
        config = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, **{k: v for k, v in _HF_TEXT.items()
                                                                             if k != "vocab_size"})
        return _Outputs(tf.ViTModel(config, add_pooling_layer=False))
    if kind == "whisper":
        config = tf.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                  decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  num_mel_bins=16, max_source_positions=16, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        return _Outputs(tf.WhisperModel(config).get_encoder())
    if kind == "hubert":
        config = tf.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                 num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
        return _Outputs(tf.HubertModel(config))
    raise ValueError(kind)


def _images(batch: int, _length: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)),)


def _mels(batch: int, _length: int) -> tuple[torch.Tensor]:
    # Whisper's encoder takes exactly 2 * max_source_positions frames.
    return (torch.randn(batch, 16, 32, generator=torch.Generator().manual_seed(batch)),)


def _audio(batch: int, length: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 40 * length, generator=torch.Generator().manual_seed(length)),)


ARCHITECTURES: dict[str, Architecture] = {
    "bert-like": Architecture("bert-like", _seeded(_bert_like), _ids, ["input_ids", "attention_mask"], _TEXT,
                              heads=4, hidden=32, layers=2),
    "bert": Architecture("bert", _seeded(lambda: _hf("bert")), _ids, ["input_ids", "attention_mask"], _TEXT,
                         heads=4, hidden=32, layers=2),
    "distilbert": Architecture("distilbert", _seeded(lambda: _hf("distilbert")), _ids,
                               ["input_ids", "attention_mask"], _TEXT, heads=4, hidden=32, layers=2),
    "roberta": Architecture("roberta", _seeded(lambda: _hf("roberta")), _ids, ["input_ids", "attention_mask"], _TEXT,
                            heads=4, hidden=32, layers=2),
    "vit": Architecture("vit", _seeded(lambda: _hf("vit")), _images, ["pixel_values"],
                        {"pixel_values": {0: "batch"}}, heads=4, hidden=32, layers=2, lengths=(1, 1)),
    "whisper-encoder": Architecture("whisper-encoder", _seeded(lambda: _hf("whisper")), _mels, ["input_features"],
                                    {"input_features": {0: "batch"}}, heads=4, hidden=32, layers=2,
                                    lengths=(1, 1)),
    "hubert": Architecture("hubert", _seeded(lambda: _hf("hubert")), _audio, ["input_values"],
                           {"input_values": {0: "batch", 1: "samples"}}, heads=4, hidden=32, layers=2),
}


def export(arch: Architecture, exporter: str, opset: int = 17) -> onnx.ModelProto:
    """The architecture exported by `exporter` ("torchscript" with dynamic_axes, or "dynamo" with dynamic shapes)."""
    module = arch.build()
    inputs = arch.example(2, arch.lengths[0])
    return export_dynamic(module, inputs, arch.input_names, ("hidden", {0: "batch"}), arch.dynamic, exporter, opset)


def feeds(arch: Architecture, batch: int, length: int) -> dict[str, np.ndarray]:
    """Fresh inputs for the exported model."""
    return {name: t.numpy() for name, t in zip(arch.input_names, arch.example(batch, length))}
