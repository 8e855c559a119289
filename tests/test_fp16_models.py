"""fp16 models through every pass: each applies and keeps the function, or leaves the model as it was and says why.

The models are made the ways users get them: a PyTorch module `.half()` exported (a CNN with its BatchNorms
kept, and a BERT-style encoder), a float32 module whose body computes in float16 between a Cast at each input
and output (what onnxconverter-common's `convert_float_to_float16(keep_io_types=True)` writes; that package is
not a dependency), and a float32 export converted by onnxforge's own `fp16` pass. The dynamo exporter's fp16
models run as slow tests. Lossless passes are held to `lossless_tolerance`: 4 steps of float16 (3.9e-3 of an
output's scale) on a model that computes in float16.
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from graph_checks import op_counts
from model_builders import BertLike, seeded
from torch import nn

import onnxforge
from onnxforge.backends import BackendOptions, get_backend
from onnxforge.comparison import compare_outputs
from onnxforge.data import random_inputs
from onnxforge.ir import load_model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.pipeline.registry import available_passes
from onnxforge.pipeline.verifier import lossless_tolerance

OPTIMIZE = [sys.executable, "-c", "import sys; from onnxforge.cli import optimize_main; sys.exit(optimize_main())"]
# Options a pass needs to run at all on these models.
PASS_OPTIONS = {"set-shapes": {"cnn": "set-shapes:x=2x3x16x16", "bert": "set-shapes:input_ids=2x16,attention_mask=2x16"}}
UPGRADED_OPSET = 21
# Lossy passes on a float16 model: the outputs must still be those of the model (bf16 rounds to 8 bits of mantissa,
# prune and lowrank at their defaults change a random model's outputs by design, so they are held to cosine only).
LOSSY_MIN_COSINE = {"fp16": 0.999, "bf16": 0.99, "quant": 0.99, "prune": 0.0, "lowrank": 0.0, "distill": 0.9999}


class SmallCNN(nn.Module):
    """Conv/BatchNorm/ReLU, a residual Add, GlobalAveragePool and a Linear head (Gemm)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class CastAtInputsAndOutputs(nn.Module):
    """A float16 module behind float32 inputs and outputs, as keep_io_types converters write it."""

    def __init__(self, half: nn.Module):
        super().__init__()
        self.body = half

    def forward(self, *inputs: torch.Tensor):
        out = self.body(*(x.half() if x.is_floating_point() else x for x in inputs))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _export(module: nn.Module, inputs: tuple, names: list[str], outputs: list[str]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # No constant folding: BatchNorm and Identity nodes stay, as in exports that skip it.
        torch.onnx.export(
            module.eval(), inputs, buffer, input_names=names, output_names=outputs, opset_version=17,
            dynamo=False, do_constant_folding=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _seeded_cnn() -> nn.Module:
    return seeded(SmallCNN)


def _seeded_bert() -> nn.Module:
    torch.manual_seed(0)
    return BertLike(width=64, heads=4).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    x = torch.randn(2, 3, 16, 16)
    ids, mask = torch.randint(0, 8, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    bert_io = (["input_ids", "attention_mask"], ["hidden", "pooled"])
    converted, _ = onnxforge.optimize(_export(_seeded_cnn(), (x,), ["x"], ["y"]), "fp16", seed=0)
    return {
        "cnn half": _export(_seeded_cnn().half(), (x.half(),), ["x"], ["y"]),
        "cnn cast at io": _export(CastAtInputsAndOutputs(_seeded_cnn().half()), (x,), ["x"], ["y"]),
        "cnn by the fp16 pass": converted.to_proto(),
        "bert half": _export(_seeded_bert().half(), (ids, mask), *bert_io),
        "bert cast at io": _export(CastAtInputsAndOutputs(_seeded_bert().half()), (ids, mask), *bert_io),
    }


@pytest.fixture(scope="module")
def dynamo_models() -> dict[str, onnx.ModelProto]:
    x = torch.randn(2, 3, 16, 16)
    ids, mask = torch.randint(0, 8, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            name: torch.onnx.export(module, inputs, dynamo=True, opset_version=18, verbose=False).model_proto
            for name, module, inputs in (
                ("cnn half dynamo", _seeded_cnn().half(), (x.half(),)),
                ("bert half dynamo", _seeded_bert().half(), (ids, mask)),
            )
        }


def _pass_spec(name: str, model_name: str) -> str:
    if name == "upgrade-opset":
        return f"upgrade-opset:to={UPGRADED_OPSET}"
    return PASS_OPTIONS.get(name, {}).get(model_name.split()[0], name)


def _outputs(model, inputs: list[dict]) -> list[dict]:
    prepared = get_backend("ort").prepare(model, BackendOptions())
    return [prepared.run(feed) for feed in inputs]


def _fresh_inputs(proto: onnx.ModelProto) -> list[dict]:
    """Inputs the run did not verify on (its seed is 0); token ids within the vocabulary of BertLike."""
    inputs = [random_inputs(skeleton_proto(load_model(proto)), seed=1000 + i) for i in range(2)]
    for feed in inputs:
        if "input_ids" in feed:
            feed["input_ids"] = np.abs(feed["input_ids"]) % 8
            feed["attention_mask"] = np.ones_like(feed["attention_mask"])
    return inputs


@pytest.mark.parametrize(
    "model_name", ["cnn half", "cnn cast at io", "cnn by the fp16 pass", "bert half", "bert cast at io"]
)
@pytest.mark.parametrize("pass_name", sorted(available_passes()))
def test_every_pass_keeps_an_fp16_model_working_or_leaves_it_and_says_why(models, model_name, pass_name):
    _check_pass_on(models[model_name], model_name, pass_name)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["cnn half dynamo", "bert half dynamo"])
@pytest.mark.parametrize("pass_name", sorted(available_passes()))
def test_every_pass_keeps_an_fp16_dynamo_export_working_or_leaves_it_and_says_why(dynamo_models, model_name, pass_name):
    _check_pass_on(dynamo_models[model_name], model_name, pass_name)


def _check_pass_on(proto: onnx.ModelProto, model_name: str, pass_name: str) -> None:
    """The pass applied and kept the function (lossless: within lossless_tolerance; lossy: by cosine) on fresh
    inputs, or left the model as it was; never rolled back, never an invalid model."""
    spec = _pass_spec(pass_name, model_name)
    optimized, report = onnxforge.optimize(proto, spec, seed=0)
    (record,) = report.passes
    assert record.status in ("applied", "unchanged"), (record.status, record.error)
    onnx.checker.check_model(optimized.to_proto())
    inputs = _fresh_inputs(proto)
    comparison = compare_outputs(_outputs(proto.SerializeToString(), inputs), _outputs(optimized, inputs))
    pass_ = onnxforge.pipeline.create_passes(spec)[0]
    if pass_.lossless:
        assert comparison.within(lossless_tolerance(load_model(proto), 1e-4)), comparison.to_dict()
    else:
        assert comparison.min_cosine >= LOSSY_MIN_COSINE[pass_name], comparison.to_dict()
    if record.status == "unchanged" and pass_name in ("quant", "lowrank"):
        assert any("float16/bfloat16 layers left as they are" in note for note in record.notes), record.notes


def test_lossless_passes_on_an_fp16_model_are_held_to_four_float16_steps_not_the_float32_bound(models):
    # upgrade-opset changes no op, yet onnxruntime runs other float16 kernels at opset 21: outputs move by
    # less than a float16 step relative to the output's scale, which the 1e-4 float32 bound would roll back.
    model = load_model(models["bert half"])
    assert lossless_tolerance(model, 1e-4) == pytest.approx(4 * 2**-10)
    _, report = onnxforge.optimize(models["bert half"], f"upgrade-opset:to={UPGRADED_OPSET}", seed=0)
    assert report.passes[0].status == "applied"
    assert 0 < report.passes[0].max_rel_error < 4 * 2**-10


def test_batchnorm_of_an_fp16_cnn_folds_into_float16_conv_weights(models):
    optimized, report = onnxforge.optimize(models["cnn half"], "cleanup,fold-batchnorm", seed=0)
    assert report.passes[1].status == "applied" and report.passes[1].stats == {"fold-batchnorm": 3}
    assert "BatchNormalization" not in op_counts(optimized)
    conv_weights = [node.inputs[1] for node in optimized.graph.nodes if node.op == "Conv"]
    assert {str(w.values.dtype) for w in conv_weights} == {"float16"}


def test_prune_removes_heads_and_channels_of_an_fp16_transformer_and_keeps_its_weights_float16(models):
    optimized, report = onnxforge.optimize(models["bert half"], "cleanup,prune", seed=0)
    prune = report.passes[1]
    assert prune.status == "applied" and prune.stats["groups_pruned"] > 0, prune.notes
    assert any(note.startswith("heads of /layers.0/qkv.0/MatMul") for note in prune.notes)
    matmuls = [node for node in optimized.graph.nodes if node.op == "MatMul"]
    assert {str(node.inputs[1].dtype) for node in matmuls if isinstance(node.inputs[1], gs.Constant)} == {"float16"}


def test_a_float32_model_keeps_the_float32_lossless_bound():
    torch.manual_seed(0)
    proto = _export(_seeded_cnn(), (torch.randn(2, 3, 16, 16),), ["x"], ["y"])
    assert lossless_tolerance(load_model(proto), 1e-4) == 1e-4


def test_quant_on_an_fp16_model_leaves_it_and_names_the_float16_layers(models):
    _, report = onnxforge.optimize(models["cnn half"], "quant", seed=0)
    (record,) = report.passes
    assert record.status == "unchanged" and not record.error
    assert "4 float16/bfloat16 layers left as they are" in " ".join(record.notes)


def test_fuse_on_an_fp16_transformer_says_the_activations_are_float32_only(models):
    _, report = onnxforge.optimize(models["bert half"], "cleanup,fuse", seed=0, verify=True)
    notes = " ".join(report.passes[-1].notes)
    assert "gelu-erf declined at 2 places" in notes
    assert "the input is float16: onnxruntime's CPU kernels of the fused op are float32 only" in notes


def test_fp16_model_from_a_cast_at_io_export_has_float32_inputs_and_float16_weights(models):
    proto = models["bert cast at io"]
    assert {i.type.tensor_type.elem_type for i in proto.graph.input} == {onnx.TensorProto.INT64}
    assert {o.type.tensor_type.elem_type for o in proto.graph.output} == {onnx.TensorProto.FLOAT}
    assert op_counts(load_model(proto))["Cast"] >= 2


def test_cli_runs_cleanup_fuse_quant_and_upgrade_on_an_fp16_model_without_a_rollback(models, tmp_path):
    source, output = tmp_path / "bert_fp16.onnx", tmp_path / "bert_fp16.opt.onnx"
    source.write_bytes(models["bert half"].SerializeToString())
    before = source.read_bytes()
    passes = f"cleanup,fuse,quant,upgrade-opset:to={UPGRADED_OPSET}"
    result = subprocess.run(
        [*OPTIMIZE, str(source), "--passes", passes, "-o", str(output), "--seed", "0"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "rolled back" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert source.read_bytes() == before
    onnx.checker.check_model(onnx.load(output))
