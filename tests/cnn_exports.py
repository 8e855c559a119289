"""Small CNNs of the torchvision families exported the way users export them: TorchScript with `dynamic_axes`, or
dynamo with dynamic shapes.

ResNet (basic and bottleneck blocks), MobileNetV3 and EfficientNet. Where `import torchvision` works, the
architectures are torchvision.models' own builders (weights=None); its PyPI wheel needs CUDA torch, so on a
CPU-only torch they are the re-implementations below, block for block as torchvision defines them, at small
widths. Either way the weights are seeded and every BatchNorm's running statistics and affine parameters are
random, so that folding them is really checked (fresh BatchNorms are the identity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn
from torch_exports import export_dynamic

DEFAULT_OPSETS = {"torchscript": 17, "dynamo": 18}
CLASSES = 10


@dataclass
class Architecture:
    """How to build a module and its example inputs, what its inputs are called and which axes are dynamic."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[int, int], tuple[torch.Tensor, ...]]  # (batch, image size) -> inputs
    input_names: list[str]
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: symbolic name}
    sizes: tuple[int, int] = (64, 48)  # two image sizes the exported model is checked at


def torchvision_available() -> bool:
    """Whether torchvision imports here (its PyPI wheel's operators need the CUDA build of torch)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a wheel for another torch build fails in several ways
        return False
    return True


# --- the blocks, as torchvision.models defines them -------------------------------------------------------------


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: the nearest multiple of `divisor`, never 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: Conv (no bias) -> BatchNorm -> activation (or none)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU, eps: float = 1e-5):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * scale(fc2(act(fc1(mean over H, W of x))))."""

    def __init__(self, channels: int, squeeze: int, activation: type[nn.Module], scale: type[nn.Module]):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = activation(), scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 Conv+BN, the residual (1x1 Conv+BN where the shape changes) added, ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """ResNet's bottleneck block (v1.5: the stride on the 3x3): 1x1, 3x3, 1x1 to 4x the width, residual, ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        width = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """torchvision.models.ResNet: 7x7 stem with max pooling, four stages of blocks, global pooling, Linear."""

    def __init__(self, block: type[BasicBlock | Bottleneck], widths: tuple[int, ...], depths: tuple[int, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(widths[0]), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for index, (planes, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for layer in range(depth):
                blocks.append(block(cin, planes, 2 if index > 0 and layer == 0 else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResidualBlock(nn.Module):
    """A sequence of layers, its input added to its output where `residual` (stride 1, as many channels out as in)."""

    def __init__(self, layers: list[nn.Module], residual: bool):
        super().__init__()
        self.block = nn.Sequential(*layers)
        self.use_res_connect = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class InvertedResidual(ResidualBlock):
    """MobileNetV3's block: 1x1 expansion, depthwise kxk, squeeze-excitation (ReLU, Hardsigmoid), 1x1 projection;
    the input added where the shape allows."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hardswish: bool, stride: int):
        act = nn.Hardswish if hardswish else nn.ReLU
        norm = {"eps": 0.001}  # torchvision's MobileNetV3 BatchNorm
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=act, **norm))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, activation=act, **norm))
        if se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None, **norm))
        super().__init__(layers, residual=stride == 1 and cin == cout)


class MobileNetV3(nn.Module):
    """torchvision.models.MobileNetV3 (the small variant's first five blocks at width 0.5): Hardswish stem,
    inverted residuals, 1x1 head Conv, global pooling, Linear-Hardswish-Dropout-Linear."""

    # input, kernel, expanded, output, squeeze-excitation, Hardswish, stride (mobilenet_v3_small's table)
    BLOCKS = ((16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2), (24, 3, 88, 24, False, False, 1),
              (24, 5, 96, 40, True, True, 2), (40, 5, 240, 40, True, True, 1))

    def __init__(self, width: float = 0.5):
        super().__init__()

        def scaled(channels):
            return _make_divisible(channels * width)

        stem = scaled(16)
        layers: list[nn.Module] = [ConvNormActivation(3, stem, 3, 2, activation=nn.Hardswish, eps=0.001)]
        for cin, kernel, expanded, cout, se, hardswish, stride in self.BLOCKS:
            layers.append(InvertedResidual(scaled(cin), kernel, scaled(expanded), scaled(cout), se, hardswish, stride))
        last = scaled(self.BLOCKS[-1][3])
        layers.append(ConvNormActivation(last, 6 * last, 1, activation=nn.Hardswish, eps=0.001))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = _make_divisible(1024 * width)
        self.classifier = nn.Sequential(nn.Linear(6 * last, hidden), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(hidden, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MBConv(ResidualBlock):
    """EfficientNet's block: 1x1 expansion, depthwise kxk, squeeze-excitation (SiLU, Sigmoid), 1x1 projection, with
    stochastic depth on the residual (the identity in eval, so not written)."""

    def __init__(self, expand_ratio: int, kernel: int, stride: int, cin: int, cout: int):
        expanded = _make_divisible(cin * expand_ratio)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, activation=nn.SiLU))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, activation=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), nn.SiLU, nn.Sigmoid))
        layers.append(ConvNormActivation(expanded, cout, 1, activation=None))
        super().__init__(layers, residual=stride == 1 and cin == cout)


class EfficientNet(nn.Module):
    """torchvision.models.EfficientNet (B0's first stages at width 0.5): SiLU stem, MBConv stages, 1x1 head Conv to
    4x the width, global pooling, Dropout, Linear."""

    # expand ratio, kernel, stride, input, output, layers (efficientnet_b0's table)
    STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 1), (6, 3, 2, 40, 80, 1))

    def __init__(self, width: float = 0.5):
        super().__init__()

        def scaled(channels):
            return _make_divisible(channels * width)

        layers: list[nn.Module] = [ConvNormActivation(3, scaled(32), 3, 2, activation=nn.SiLU)]
        for expand_ratio, kernel, stride, cin, cout, depth in self.STAGES:
            for index in range(depth):
                layers.append(MBConv(expand_ratio, kernel, stride if index == 0 else 1,
                                     scaled(cin) if index == 0 else scaled(cout), scaled(cout)))
        last = scaled(self.STAGES[-1][4])
        layers.append(ConvNormActivation(last, 4 * last, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * last, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- the zoo ------------------------------------------------------------------------------------------------------


def _own(name: str) -> nn.Module:
    if name == "resnet-basic":
        return ResNet(BasicBlock, (8, 16, 24, 32), (1, 1, 1, 1))
    if name == "resnet-bottleneck":
        return ResNet(Bottleneck, (8, 16, 24, 32), (1, 1, 1, 1))
    if name == "mobilenetv3":
        return MobileNetV3()
    if name == "efficientnet":
        return EfficientNet()
    raise ValueError(name)


def _torchvision(name: str) -> nn.Module:
    from torchvision import models

    builders = {"resnet-basic": models.resnet18, "resnet-bottleneck": models.resnet50,
                "mobilenetv3": models.mobilenet_v3_small, "efficientnet": models.efficientnet_b0}
    return builders[name](weights=None, num_classes=CLASSES)


def randomize_batchnorms(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm random running statistics and affine parameters, as a trained network has."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            channels = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
                bn.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
                bn.weight.copy_(0.5 + torch.rand(channels, generator=generator))
                bn.bias.copy_(0.2 * torch.randn(channels, generator=generator))


def _seeded(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        module = _torchvision(name) if torchvision_available() else _own(name)
        randomize_batchnorms(module, torch.Generator().manual_seed(1))
        return module.eval()

    return build


def _images(batch: int, size: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1000 * batch + size)),)


_IMAGE_AXES = {"image": {0: "batch", 2: "height", 3: "width"}}
ARCHITECTURES: dict[str, Architecture] = {
    name: Architecture(name, _seeded(name), _images, ["image"], _IMAGE_AXES)
    for name in ("resnet-basic", "resnet-bottleneck", "mobilenetv3", "efficientnet")
}


def export(arch: Architecture, exporter: str, opset: int | None = None, folding: bool = True) -> onnx.ModelProto:
    """The architecture exported by `exporter` ("torchscript" with dynamic_axes, or "dynamo" with dynamic shapes).

    opset: by default each exporter's own (17 for TorchScript; dynamo writes 18 and fails to convert CNNs lower).
    folding=False turns the exporter's own graph optimization off (TorchScript's `do_constant_folding`,
    dynamo's `optimize`); both fold BatchNorm into the Conv before it otherwise, so only then is it left to us.
    """
    opset = opset or DEFAULT_OPSETS[exporter]
    inputs = arch.example(2, arch.sizes[0])
    return export_dynamic(arch.build(), inputs, arch.input_names, ("logits", {0: "batch"}), arch.dynamic, exporter,
                          opset, folding)


def feeds(arch: Architecture, batch: int, size: int) -> dict[str, np.ndarray]:
    """Fresh inputs for the exported model: `batch` images of size x size."""
    return {name: t.numpy() for name, t in zip(arch.input_names, arch.example(batch, size))}
