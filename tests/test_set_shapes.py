"""`set-shapes`, and `--shape` fixing the inputs for a backend that compiles static shapes only (TVM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graph_checks import make_model, value_info
from onnx import helper
from test_cli import ONNXFORGE, OPTIMIZE, only_error_line, run_cli, succeeded

from onnxforge import optimize
from onnxforge.api import for_backend
from onnxforge.errors import BackendError, PassError, PassUsageError
from onnxforge.ir import load_model
from onnxforge.pipeline import PassContext, create_passes


class _Classifier(torch.nn.Module):
    """Conv, pooling to 1x1, then a flatten computed from the input's shape, as exporters write it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1)
        return self.head(y.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def dynamic_model(tmp_path_factory) -> Path:
    """The classifier exported with a dynamic batch, height and width, as most users export."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dynamic") / "classifier.onnx"
    torch.onnx.export(
        _Classifier().eval(), (torch.randn(1, 3, 32, 32),), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


def _input_dims(path: Path) -> list:
    (value,) = onnx.load(str(path)).graph.input
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _set_shapes(source, spec: str):
    model = load_model(source)
    (pass_,) = create_passes(spec)
    return model, pass_.run(model, PassContext())


def test_set_shapes_fixes_the_inputs_and_makes_every_shape_in_the_graph_static(dynamic_model):
    model, result = _set_shapes(dynamic_model, "set-shapes:x=2x3x64x48")
    assert result.changed and result.stats["tensors_still_dynamic"] == 0
    assert model.graph.inputs[0].shape == [2, 3, 64, 48]
    assert model.graph.outputs[0].shape == [2, 4]
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 48)).astype(np.float32)
    expected = ort.InferenceSession(str(dynamic_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    fixed = ort.InferenceSession(model.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(fixed.run(None, {"x": x})[0], expected)


def test_a_symbolic_dim_fixed_in_one_input_takes_the_same_size_in_every_input_sharing_it():
    proto = make_model(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        [value_info("x", ["batch", 4]), value_info("z", ["batch", 4])],
        [value_info("y", ["batch", 4])],
    )
    model, result = _set_shapes(proto, "set-shapes:x=3x4")
    assert [tensor.shape for tensor in model.graph.inputs] == [[3, 4], [3, 4]]
    assert model.graph.outputs[0].shape == [3, 4]
    assert result.stats["inputs_fixed"] == 2


def test_set_shapes_on_inputs_of_those_shapes_already_changes_nothing():
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [2, 4])], [value_info("y", [2, 4])])
    _, result = _set_shapes(proto, "set-shapes:x=2x4")
    assert not result.changed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("set-shapes:x=1x4x64x64", r"x axis 1 is fixed at 3 \(batchx3xheightxwidth\), not 4"),
        ("set-shapes:x=1x3x64", r"x has rank 4 \(batchx3xheightxwidth\), not 3"),
        ("set-shapes:image=1x3x64x64", "the model has no input image; its inputs are x"),
    ],
)
def test_shapes_that_do_not_fit_the_model_stop_the_pass_with_one_error(dynamic_model, spec, message):
    with pytest.raises(PassUsageError, match=message):
        _set_shapes(dynamic_model, spec)
    assert _input_dims(dynamic_model) == ["batch", 3, "height", "width"]


@pytest.mark.parametrize("spec", ["set-shapes", "set-shapes:x=1xbigx3", "set-shapes:x="])
def test_set_shapes_without_readable_sizes_is_refused_when_the_pass_list_is_read(spec):
    with pytest.raises(PassError, match="set-shapes"):
        create_passes(spec)


def test_set_shapes_describes_itself_as_written():
    (pass_,) = create_passes("set-shapes:x=1x3x224x224,mask=1x16")
    assert pass_.describe() == "set-shapes:x=1x3x224x224:mask=1x16"


def test_optimize_with_set_shapes_verifies_on_inputs_of_those_shapes_and_writes_a_static_model(dynamic_model, tmp_path):
    out = tmp_path / "static.onnx"
    result = succeeded(run_cli(OPTIMIZE, dynamic_model, "--passes", "set-shapes:x=1x3x40x40,cleanup", "-o", out))
    assert "set-shapes:x=1x3x40x40   applied" in result.stdout
    assert _input_dims(out) == [1, 3, 40, 40]


def test_a_shape_option_that_disagrees_with_set_shapes_is_one_error(dynamic_model):
    result = run_cli(OPTIMIZE, dynamic_model, "--passes", "set-shapes:x=1x3x40x40", "--shape", "x=1x3x32x32")
    assert "disagree" in only_error_line(result)


def test_shape_on_onnxruntime_leaves_the_model_dynamic(dynamic_model, tmp_path):
    out = tmp_path / "out.onnx"
    result = succeeded(run_cli(OPTIMIZE, dynamic_model, "--passes", "cleanup", "--shape", "x=1x3x64x64", "-o", out))
    assert "inputs fixed" not in result.stdout
    assert _input_dims(out) == ["batch", 3, "height", "width"]


# --- TVM: it compiles for static shapes only ---


def test_optimize_for_tvm_fixes_the_inputs_given_by_shape_and_says_so(dynamic_model):
    pytest.importorskip("tvm")
    model, report = optimize(dynamic_model, "cleanup", backend="tvm", shapes={"x": [1, 3, 64, 64]})
    assert "inputs fixed to x=1x3x64x64 for tvm" in report.summary()
    assert report.to_dict()["inputs_fixed"] == {"backend": "tvm", "shapes": {"x": [1, 3, 64, 64]}}
    assert [record.status for record in report.passes] == ["applied"]
    assert model.graph.inputs[0].shape == [1, 3, 64, 64] and model.graph.outputs[0].shape == [1, 4]


def test_tvm_without_shape_on_a_dynamic_model_is_one_error_naming_each_dynamic_dim(dynamic_model):
    pytest.importorskip("tvm")
    expected = r"--shape x=<batch>x3x<height>x<width> with a number for each <dim>"
    with pytest.raises(BackendError, match=expected):
        optimize(dynamic_model, "cleanup", backend="tvm", verify=False)
    with pytest.raises(BackendError, match=expected):  # what bench asks for the model it times
        for_backend(load_model(dynamic_model), "tvm", {})
    model = load_model(dynamic_model)
    assert for_backend(model, "ort", {}) is model


def test_bench_on_tvm_times_a_dynamic_model_at_the_given_shape(dynamic_model):
    pytest.importorskip("tvm")
    result = succeeded(
        run_cli(ONNXFORGE, "bench", dynamic_model, "--backend", "tvm", "--shape", "x=1x3x64x64",
                "--warmup", 1, "--repeats", 3, "--min-time", 0)
    )  # fmt: skip
    assert "tvm cpu  median" in result.stdout


def test_set_shapes_then_cleanup_for_tvm_exports_an_artifact(dynamic_model, tmp_path):
    pytest.importorskip("tvm")
    out, artifact = tmp_path / "static.onnx", tmp_path / "model.so"
    succeeded(
        run_cli(OPTIMIZE, dynamic_model, "--passes", "set-shapes:x=1x3x64x64,cleanup", "-o", out,
                "--backend", "tvm", "--artifact", artifact)
    )  # fmt: skip
    assert artifact.is_file() and _input_dims(out) == [1, 3, 64, 64]
