"""PyTorch models the benchmarks export: a residual CNN with BatchNorm, a transformer encoder, a BERT-like encoder.

Each `*_module` builder seeds torch and draws weights that look trained (BatchNorm statistics, per-layer weights);
it needs torch alone, so the GPU machine can rebuild the same modules. The exporting builders export them with
`onnxforge.frontends.torch.from_torch` (TorchScript exporter, opset 17, static shapes); keyword arguments go to
the exporter (`do_constant_folding=False` keeps BatchNormalization nodes in the graph).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnxforge.ir import Model

TESTS = Path(__file__).resolve().parent.parent / "tests"


CNN_INPUT = (1, 3, 224, 224)


def residual_cnn(**export_options: Any) -> Model:
    """A 10-conv residual CNN with BatchNorm and a Linear head, input 1x3x224x224."""
    import torch

    from onnxforge.frontends.torch import from_torch

    net = residual_cnn_module()
    return from_torch(net, torch.randn(*CNN_INPUT), input_names=["x"], output_names=["logits"], **export_options)


def residual_cnn_module():
    """The CNN of `residual_cnn`, as a torch module in eval mode."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.a = conv_bn(cin, cout, 2)
            self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.a(x)
            return torch.relu(self.b(y) + y)

    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 32, 2)
            self.stages = nn.Sequential(Block(32, 48), Block(48, 96), Block(96, 160), Block(160, 256))
            self.extra = conv_bn(256, 256)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.drop = nn.Dropout(0.2)
            self.fc = nn.Linear(256, 1000)

        def forward(self, x):
            x = self.pool(self.extra(self.stages(self.stem(x))))
            return self.fc(self.drop(x.view(x.size(0), -1)))

    torch.manual_seed(0)
    net = Cnn()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as after training
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def transformer_encoder(
    layers: int = 6, d_model: int = 256, heads: int = 4, ff: int = 1024, length: int = 128, **export_options: Any
) -> Model:
    """torch.nn.TransformerEncoder (batch first, post-norm, ReLU), input 1 x length x d_model."""
    import torch

    from onnxforge.frontends.torch import from_torch

    encoder = transformer_encoder_module(layers, d_model, heads, ff)
    example = torch.randn(1, length, d_model)
    return from_torch(encoder, example, input_names=["x"], output_names=["y"], **export_options)


def transformer_encoder_module(layers: int = 6, d_model: int = 256, heads: int = 4, ff: int = 1024):
    """The encoder of `transformer_encoder`, as a torch module in eval mode."""
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=d_model, nhead=heads, dim_feedforward=ff, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
    # TransformerEncoder deep-copies one layer, so all layers start equal and the exporter would store one
    # set of weights shared through Identity nodes; after training they differ, so draw each layer's anew.
    with torch.no_grad():
        for parameter in encoder.parameters():
            if parameter.dim() > 1:
                torch.nn.init.xavier_uniform_(parameter)
            else:
                parameter.uniform_(-0.1, 0.1)
    return encoder.eval()


def bert_like(
    layers: int = 6, width: int = 384, heads: int = 6, length: int = 128, vocab: int = 1000, **export_options: Any
) -> Model:
    """tests/model_builders.py's BertLike (embeddings, masked attention, GELU MLP) scaled up; inputs 1 x length."""
    import torch

    from onnxforge.frontends.torch import from_torch

    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from model_builders import BertLike

    torch.manual_seed(0)
    net = BertLike(vocab=vocab, width=width, heads=heads, layers=layers, max_len=length)
    with torch.no_grad():  # LayerNorm scales and shifts other than 1 and 0, as after training
        for name, parameter in net.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.8, 1.2) if name.endswith("weight") else parameter.uniform_(-0.1, 0.1)
    ids = torch.randint(0, vocab, (1, length))
    mask = torch.ones(1, length, dtype=torch.int64)
    return from_torch(
        net, (ids, mask), input_names=["input_ids", "attention_mask"], output_names=["hidden", "pooled"],
        **export_options,
    )
