import contextlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.backends import Backend, BackendOptions, backend_names, get_backend
from onnxforge.backends.onnxruntime import OrtBackend
from onnxforge.errors import BackendError, ModelLoadError
from onnxforge.measure import MeasureOptions

_WEIGHT = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)


def _matmul_add_model() -> onnx.ModelProto:
    """y = x @ W + b with x of shape (batch, 4)."""
    bias = np.arange(3, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(_WEIGHT, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _expected(x: np.ndarray) -> np.ndarray:
    return x @ _WEIGHT + np.arange(3, dtype=np.float32)


def _x(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 4)).astype(np.float32)


def _single_node_model(node: onnx.NodeProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _ModelWithRuntimeSource:
    """Stands in for onnxforge.ir.Model: hands out its bytes within a context."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.open = False

    @contextlib.contextmanager
    def runtime_source(self):
        self.open = True
        try:
            yield self.model.SerializeToString()
        finally:
            self.open = False


def test_registry_returns_ort_backend_under_both_names():
    assert isinstance(get_backend("ort"), OrtBackend)
    assert isinstance(get_backend("onnxruntime"), OrtBackend)
    assert {"ort", "onnxruntime"} <= set(backend_names())
    assert isinstance(get_backend("ort"), Backend)


def test_registry_rejects_unknown_backend_listing_known_ones():
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'.*ort"):
        get_backend("tensorrt")


def test_run_matches_numpy():
    prepared = OrtBackend().prepare(_matmul_add_model())
    x = _x()

    outputs = prepared.run({"x": x})

    assert prepared.input_names == ["x"]
    assert prepared.output_names == ["y"]
    np.testing.assert_allclose(outputs["y"], _expected(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["proto", "bytes", "str_path", "pathlike", "runtime_source"])
def test_prepare_accepts_every_model_form(tmp_path, form):
    model = _matmul_add_model()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    source = {
        "proto": model,
        "bytes": model.SerializeToString(),
        "str_path": str(path),
        "pathlike": path,
        "runtime_source": _ModelWithRuntimeSource(model),
    }[form]

    prepared = OrtBackend().prepare(source)

    x = _x(batch=3)
    np.testing.assert_allclose(prepared.run({"x": x})["y"], _expected(x), rtol=1e-5, atol=1e-5)


def test_runtime_source_context_is_closed_after_prepare():
    holder = _ModelWithRuntimeSource(_matmul_add_model())

    prepared = OrtBackend().prepare(holder)

    assert not holder.open
    assert prepared.run({"x": _x()})["y"].shape == (2, 3)


@pytest.mark.parametrize(
    "options",
    [
        BackendOptions(threads=1, graph_optimization="disable"),
        BackendOptions(threads=2, graph_optimization="basic", allow_spinning=True),
        BackendOptions(graph_optimization="extended", extra={"session.use_env_allocators": "0"}),
    ],
)
def test_session_options_give_the_same_results(options):
    x = _x()

    outputs = OrtBackend().prepare(_matmul_add_model(), options).run({"x": x})

    np.testing.assert_allclose(outputs["y"], _expected(x), rtol=1e-5, atol=1e-5)


def test_spinning_is_off_unless_asked_for():
    prepared = OrtBackend().prepare(_matmul_add_model())

    config = prepared.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert config == "0"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (helper.make_node("Add", ["x", "missing"], ["y"]), "missing"),
        (helper.make_node("NoSuchOp", ["x"], ["y"]), "NoSuchOp"),
    ],
)
def test_broken_model_raises_one_line_backend_error(node, message):
    with pytest.raises(BackendError, match=message) as info:
        OrtBackend().prepare(_single_node_model(node))

    text = str(info.value)
    assert text.startswith("onnxruntime cannot load the model: ")
    assert "\n" not in text
    assert "[ONNXRuntimeError]" not in text


def test_garbage_bytes_raise_backend_error():
    with pytest.raises(BackendError, match="cannot load"):
        OrtBackend().prepare(b"definitely not onnx")


def test_missing_model_file_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        OrtBackend().prepare(tmp_path / "nope.onnx")


def test_unknown_target_lists_available_targets():
    with pytest.raises(BackendError, match="no target 'cuda'.*cpu"):
        OrtBackend().prepare(_matmul_add_model(), BackendOptions(target="cuda"))


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"graph_optimization": "max"}])
def test_bad_backend_options_raise_backend_error(kwargs):
    with pytest.raises(BackendError):
        BackendOptions(**kwargs)


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"x": np.zeros((2, 5), np.float32)}, "dimensions"),
        ({"x": np.zeros((2, 4), np.float64)}, "data type"),
        ({}, "missing"),
        ({"x": np.zeros((2, 4), np.float32), "z": np.zeros(1, np.float32)}, "input name"),
    ],
)
def test_bad_feed_raises_one_line_backend_error(feed, message):
    prepared = OrtBackend().prepare(_matmul_add_model())

    with pytest.raises(BackendError, match=message) as info:
        prepared.run(feed)

    assert str(info.value).startswith("onnxruntime cannot run the model: ")
    assert "\n" not in str(info.value)


def test_measure_returns_stats_for_requested_repeats():
    prepared = OrtBackend().prepare(_matmul_add_model())
    options = MeasureOptions(warmup=2, min_repeats=5, min_time_s=0.0, max_repeats=5)

    stats = prepared.measure({"x": _x()}, options)

    assert stats.repeats == 5
    assert stats.warmup == 2
    assert 0 < stats.min_ms <= stats.median_ms <= stats.max_ms


def test_measure_rejects_bad_feed_before_timing():
    prepared = OrtBackend().prepare(_matmul_add_model())

    with pytest.raises(BackendError):
        prepared.measure({"x": np.zeros((1, 7), np.float32)}, MeasureOptions(min_time_s=0.0))
