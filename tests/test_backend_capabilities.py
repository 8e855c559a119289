"""Backends say what they can run; passes ask that (through PassContext), never the backend's name. What must
not depend on the backend (constant folding's values, contrib-op schemas) comes from the reference runtime."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from graph_checks import apply, constant, make_model, value_info
from model_builders import BertLike
from onnx import TensorProto, helper
from test_cli import OPTIMIZE, run_cli, succeeded

from onnxforge.backends import backend_names, get_backend
from onnxforge.errors import BackendError
from onnxforge.frontends.torch import from_torch
from onnxforge.ir import Model, load_model
from onnxforge.ir.ops import CONTRIB_DOMAIN
from onnxforge.pipeline import PassContext, create_passes
from onnxforge.passes.fusion.base import FUSED_CONTRIB_OPS
from onnxforge.passes.quantization.quant import QUANTIZED_CONTRIB_OPS

PACKAGE = Path(__file__).parent.parent / "onnxforge"
# The code passes run: the pass families and the calibration layer they share.
PASS_CODE = (PACKAGE / "passes", PACKAGE / "calibration")
PIPELINE = "cleanup,fuse,quant:bits=4:measure=false"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A two-layer BERT-style encoder: attention, GELU and residual LayerNorm blocks for the fusions, MatMuls and
    an embedding table for 4-bit quantization."""
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 32, (1, 16)), torch.ones(1, 16, dtype=torch.int64)
    proto = from_torch(BertLike().eval(), (ids, mask), input_names=["input_ids", "attention_mask"]).to_proto()
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    onnx.save(proto, str(path))
    return path


def _contrib_ops(model: Model | onnx.ModelProto) -> Counter:
    if isinstance(model, onnx.ModelProto):
        model = load_model(model)
    return Counter(node.op for graph in model.graphs() for node in graph.nodes if node.domain == CONTRIB_DOMAIN)


def _run_pipeline(path: Path, passes: str, backend: str) -> Model:
    """The passes run directly (unverified) on `path` for `backend`."""
    model, ctx = load_model(path), PassContext(backend=backend)
    for pass_ in create_passes(passes):
        pass_.run(model, ctx)
    return model


def test_every_name_of_a_backend_gives_the_same_backend_object():
    assert get_backend("onnxruntime") is get_backend("ort")
    assert get_backend("onnxruntime").name == "ort"
    assert {"ort", "onnxruntime", "tvm"} <= set(backend_names())
    assert PassContext(backend="onnxruntime").runtime.capabilities is PassContext(backend="ort").runtime.capabilities


def test_onnxruntime_runs_every_contrib_op_the_passes_write_and_takes_dynamic_shapes():
    capabilities = get_backend("ort").capabilities
    assert capabilities.runs_contrib_ops(*FUSED_CONTRIB_OPS, *QUANTIZED_CONTRIB_OPS, "QLinearAdd")
    assert not capabilities.runs_contrib_ops("NoSuchOp")
    assert not capabilities.static_shapes


def test_tvm_compiles_static_shapes_only_and_runs_just_the_contrib_ops_its_importer_converts():
    pytest.importorskip("tvm")
    capabilities = get_backend("tvm").capabilities
    assert capabilities.static_shapes
    assert capabilities.runs_contrib_ops("Attention", "SkipLayerNormalization")
    assert not capabilities.runs_contrib_ops("MatMulNBits")
    assert not capabilities.runs_contrib_ops(*FUSED_CONTRIB_OPS)


def _optimize_for_ort_and_its_alias(path: Path, passes: str, folder: Path) -> dict[str, bytes]:
    """The bytes `optimize --passes <passes>` writes for --backend ort and for --backend onnxruntime."""
    outputs = {}
    for name in ("ort", "onnxruntime"):
        output = folder / f"{name}.onnx"
        succeeded(run_cli(OPTIMIZE, path, "--passes", passes, "--backend", name, "--seed", 1, "-o", output))
        outputs[name] = output.read_bytes()
    return outputs


def test_fuse_and_int4_quant_write_byte_identical_models_for_ort_and_its_alias_onnxruntime(encoder, tmp_path):
    outputs = _optimize_for_ort_and_its_alias(encoder, PIPELINE, tmp_path)
    assert outputs["ort"] == outputs["onnxruntime"]
    contrib = _contrib_ops(onnx.load_from_string(outputs["onnxruntime"]))
    assert contrib["MatMulNBits"] > 0 and contrib["SkipLayerNormalization"] > 0
    assert contrib["MultiHeadAttention"] + contrib["Attention"] == 2


def test_fuse_and_fp16_write_byte_identical_models_for_ort_and_its_alias_onnxruntime(encoder, tmp_path):
    outputs = _optimize_for_ort_and_its_alias(encoder, "cleanup,fuse,fp16", tmp_path)
    assert outputs["ort"] == outputs["onnxruntime"]
    proto = onnx.load_from_string(outputs["onnxruntime"])
    assert _contrib_ops(proto)["SkipLayerNormalization"] > 0
    assert any(weight.data_type == TensorProto.FLOAT16 for weight in proto.graph.initializer)


def _constant_subexpression() -> onnx.ModelProto:
    """y = x + sqrt(c * 2) + sum(c): three nodes computed from constants only."""
    return make_model(
        [
            helper.make_node("Mul", ["c", "two"], ["c2"]),
            helper.make_node("Sqrt", ["c2"], ["c3"]),
            helper.make_node("ReduceSum", ["c"], ["total"], keepdims=0),
            helper.make_node("Add", ["x", "c3"], ["s"]),
            helper.make_node("Add", ["s", "total"], ["y"]),
        ],
        [value_info("x", [4])],
        [value_info("y", [4])],
        [constant("c", np.arange(1, 5, dtype=np.float32)), constant("two", np.array(2.0, np.float32))],
    )


def test_the_reference_runtime_evaluates_a_model_without_inputs_as_written():
    proto = _constant_subexpression()
    del proto.graph.node[3:]  # the constant part only: c3 and total are its outputs
    proto.graph.ClearField("input")
    proto.graph.ClearField("output")
    proto.graph.output.extend([helper.make_empty_tensor_value_info("c3"), helper.make_empty_tensor_value_info("total")])

    values = PassContext().runtime.evaluate(proto)

    np.testing.assert_array_equal(values["c3"], np.sqrt(np.arange(1, 5, dtype=np.float32) * 2))
    assert values["total"] == np.float32(10)
    proto.graph.node.append(helper.make_node("NoSuchOp", ["c3"], ["bad"]))
    proto.graph.output.append(helper.make_empty_tensor_value_info("bad"))
    with pytest.raises(BackendError, match="onnxruntime cannot load the model"):
        PassContext().runtime.evaluate(proto)


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_constant_folding_stores_the_same_values_whatever_the_backend(backend):
    proto = _constant_subexpression()
    for_ort, result = apply("fold-constants", proto, backend="ort")
    for_backend, _ = apply("fold-constants", proto, backend=backend)
    assert result.stats["tensors_made_constant"] == 2
    assert for_backend.to_proto().SerializeToString() == for_ort.to_proto().SerializeToString()


def test_fp16_reads_contrib_op_schemas_from_the_reference_runtime_whatever_the_backend():
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Gelu", ["h"], ["y"], domain=CONTRIB_DOMAIN)],
        [value_info("x", [2, 8])],
        [value_info("y", [2, 4])],
        [constant("W", np.ones((8, 4), np.float32))],
    )
    proto.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    assert PassContext(backend="tvm").runtime.operator_schema("Gelu", CONTRIB_DOMAIN, 1) is not None
    assert PassContext().runtime.operator_schema("NoSuchOp", CONTRIB_DOMAIN, 1) is None
    for_ort, result = apply("fp16", proto, backend="ort")
    for_tvm, _ = apply("fp16", proto, backend="tvm")
    assert result.stats["nodes_converted"] == 2  # Gelu too: its com.microsoft schema admits float16
    assert for_tvm.to_proto().SerializeToString() == for_ort.to_proto().SerializeToString()


def test_passes_write_for_tvm_no_contrib_op_that_only_onnxruntime_runs(encoder):
    pytest.importorskip("tvm")
    passes = "cleanup,fuse,quant:measure=false"  # 8 bits: int4 in standard ops needs opset 21, the encoder has 17
    for_ort, for_tvm = _run_pipeline(encoder, passes, "ort"), _run_pipeline(encoder, passes, "tvm")
    only_onnxruntime = set(_contrib_ops(for_ort)) - get_backend("tvm").capabilities.contrib_ops
    assert only_onnxruntime  # the same pipeline does write them for onnxruntime
    assert not set(_contrib_ops(for_tvm)) & only_onnxruntime
    assert not _contrib_ops(for_tvm)  # today's choice: standard ONNX ops only, which TVM fuses itself


def test_no_pass_compares_the_backend_name():
    """Passes ask `ctx.runtime.capabilities`: a comparison with a backend's name would treat aliases differently."""
    comparison = re.compile(r"""(==|!=|\bin)\s*[(\[{]?["'](ort|onnxruntime|tvm)["']|["'](ort|onnxruntime|tvm)["']\s*(==|!=)""")
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for folder in PASS_CODE
        for path in sorted(folder.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if comparison.search(line)
    ]
    assert not found, found
