"""CNNs of the torchvision families (ResNet, MobileNetV3, EfficientNet) exported with dynamic batch, height and
width by TorchScript (`dynamic_axes`) and dynamo, through `cleanup,fuse` and `cleanup,fuse,quant`.

`cleanup,fuse` keeps the outputs of the export at two batch sizes and image sizes (onnxruntime, its own
optimizations off), folds every BatchNorm the exporter left and fuses every SiLU; `cleanup,fuse,quant` gives a
valid int8 model within its error budget. The TorchScript exports and one dynamo export run in CI; the rest of
the matrix is slow.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter

import numpy as np
import onnx
import pytest
from cnn_exports import ARCHITECTURES, export, feeds
from torch import nn
from torch_exports import EXPORTERS, op_counts, run_as_exported

import onnxforge

RTOL = 1e-4  # the lossless bound: max |fused - export| / max |export|, per output
MIN_COSINE = 0.99  # quant's error budget in these tests (held-out samples), and what fresh inputs must meet


def _cases(ci: list[tuple[str, str]]) -> list:
    """Every architecture x exporter, those not in `ci` marked slow (a dynamo export takes 5 to 20 s here)."""
    return [pytest.param(*case, marks=[] if case in ci else [pytest.mark.slow])
            for case in itertools.product(ARCHITECTURES, EXPORTERS)]


TORCHSCRIPT_CI = [(name, "torchscript") for name in ("resnet-basic", "mobilenetv3", "efficientnet")]
CHECKED_AT = [(1, 64), (3, 48)]  # (batch, image size): neither is the (2, 64) the model was exported with


@functools.cache
def _export(name: str, exporter: str, folding: bool = True) -> onnx.ModelProto:
    return export(ARCHITECTURES[name], exporter, folding=folding)


def _modules(name: str, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in ARCHITECTURES[name].build().modules())


def _max_rel_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    return max(float(np.abs(e - a).max() / np.abs(e).max()) for e, a in zip(expected, actual))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _fused_keeps_outputs(name: str, exporter: str, folding: bool) -> Counter:
    arch = ARCHITECTURES[name]
    proto = _export(name, exporter, folding)
    fused, report = onnxforge.optimize(proto, "cleanup,fuse", data=[feeds(arch, 2, 64)], seed=0)
    assert all(r.status in ("applied", "unchanged") for r in report.passes), [(r.name, r.error) for r in report.passes]
    fused_proto = fused.to_proto()
    for batch, size in CHECKED_AT:
        sample = feeds(arch, batch, size)
        expected, actual = run_as_exported(proto, sample), run_as_exported(fused_proto, sample)
        assert _max_rel_error(expected, actual) < RTOL, (batch, size)
    return op_counts(fused_proto)


@pytest.mark.parametrize("name, exporter", _cases(TORCHSCRIPT_CI))
def test_cleanup_fuse_keeps_the_outputs_of_a_dynamic_export_and_fuses_every_activation(name, exporter):
    proto = _export(name, exporter)
    (image,) = proto.graph.input
    assert [bool(d.dim_param) for d in image.type.tensor_type.shape.dim] == [True, False, True, True]
    ops = _fused_keeps_outputs(name, exporter, folding=True)
    # What fuse made, against the modules of the network: every SiLU (x * Sigmoid(x)) one op, onnxruntime's
    # QuickGelu; Hardswish and Hardsigmoid are single ops in the export already; no BatchNorm anywhere.
    assert ops["QuickGelu"] == _modules(name, nn.SiLU)
    assert ops["Sigmoid"] == op_counts(proto)["Sigmoid"] - _modules(name, nn.SiLU)
    assert ops["HardSwish"] == _modules(name, nn.Hardswish)
    assert ops["Conv"] == _modules(name, nn.Conv2d) and ops["BatchNormalization"] == 0


@pytest.mark.parametrize("name, exporter", _cases([("resnet-basic", "torchscript"), ("mobilenetv3", "dynamo")]))
def test_cleanup_fuse_folds_every_batchnorm_the_exporter_left(name, exporter):
    # The exporters fold BatchNorm themselves unless their graph optimization is off; then it is left to fuse.
    proto = _export(name, exporter, folding=False)
    assert op_counts(proto)["BatchNormalization"] == _modules(name, nn.BatchNorm2d)
    ops = _fused_keeps_outputs(name, exporter, folding=False)
    assert ops["BatchNormalization"] == 0 and ops["Conv"] == _modules(name, nn.Conv2d)


@pytest.mark.parametrize("name, exporter", _cases(TORCHSCRIPT_CI))
def test_cleanup_fuse_quant_gives_a_valid_int8_model_within_its_error_budget(name, exporter):
    arch = ARCHITECTURES[name]
    proto = _export(name, exporter)
    data = [feeds(arch, 1, 64 - 4 * i) for i in range(8)]  # the last two are quant's held-out samples
    model, report = onnxforge.optimize(proto, f"cleanup,fuse,quant:measure=false:min_cosine={MIN_COSINE}",
                                       data=data, seed=0)
    quant = report.passes[-1]
    assert quant.status == "applied", (quant.error, quant.notes)
    assert quant.stats["held_out_min_cosine"] >= MIN_COSINE
    assert any("QLinearConv" in note for note in quant.notes)
    quantized = model.to_proto()
    onnx.checker.check_model(quantized, full_check=True)
    assert op_counts(quantized)["QLinearConv"] > 0
    for batch, size in CHECKED_AT:
        sample = feeds(arch, batch, size)
        expected, actual = run_as_exported(proto, sample), run_as_exported(quantized, sample)
        assert min(_cosine(e, a) for e, a in zip(expected, actual)) >= MIN_COSINE, (batch, size)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet-basic", "efficientnet"])
def test_measured_quant_applies_or_declines_with_a_reason(name):
    arch = ARCHITECTURES[name]
    data = [feeds(arch, 1, 64 - 4 * i) for i in range(8)]
    model, report = onnxforge.optimize(_export(name, "torchscript"), "cleanup,fuse,quant", data=data, seed=0)
    quant = report.passes[-1]
    onnx.checker.check_model(model.to_proto(), full_check=True)
    if quant.status == "applied":
        assert any(": quantized: " in note for note in quant.notes), quant.notes
    else:
        assert quant.status == "unchanged", (quant.status, quant.error)
        assert any("kept float" in note for note in quant.notes), quant.notes
        assert quant.notes[-1] in ("nothing quantized: the model is left as it was",
                                   "slower than float as a whole: the model is left as it was")
