"""The inputs a run feeds the model: dims found by running it, --shape reaching every pass, real models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_cli import ONNXFORGE, OPTIMIZE, run_cli, succeeded

from onnxforge import optimize
from onnxforge.backends import get_backend
from onnxforge.data import save_samples
from onnxforge.errors import DataError
from onnxforge.feeds import Feeds
from onnxforge.frontends import from_onnx
from onnxforge.measure import InterleavedTiming
from onnxforge.pipeline import Pass, PassContext, PassResult, create_passes
from onnxforge.pipeline.acceptance import Acceptance

QUICK = InterleavedTiming(blocks=2, block_s=0.01, min_runs=2, warmup=1)


def _graph_model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reflect_pad_model(pad: int = 200, name: str = "x") -> onnx.ModelProto:
    """x [batch, samples] reflect-padded by `pad` on both sides, then averaged: runs only when samples > pad."""
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, pad, 0, pad])
    nodes = [
        helper.make_node("Pad", [name, "pads"], ["padded"], mode="reflect"),
        helper.make_node("ReduceMean", ["padded"], ["y"], keepdims=0),
    ]
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [pads],
    )


def _runner(model: onnx.ModelProto):
    return get_backend("ort").prepare(model.SerializeToString()).run


def test_search_finds_a_length_that_a_reflect_pad_needs():
    model = _reflect_pad_model(pad=200)
    feeds = Feeds()

    feeds.resolve(model, _runner(model))

    assert feeds.input_shapes == {"x": [1, 256]}
    assert feeds.how.startswith("searched: samples=256")
    assert feeds.random(model, seed=3)["x"].shape == (1, 256)
    assert feeds.describe()["shapes"] == {"x": [1, 256]}


def test_dims_that_share_a_name_get_the_same_value():
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 20, 0, 20])
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Pad", ["sum", "pads"], ["y"], mode="reflect"),
    ]
    model = _graph_model(
        nodes,
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "width"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "width"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [pads],
    )
    feeds = Feeds()

    feeds.resolve(model, _runner(model))

    assert feeds.input_shapes == {"a": [1, 32], "b": [1, 32]}


def test_an_unnamed_dim_that_is_really_the_batch_is_left_at_one_while_another_grows():
    """silero-vad's layout: x [?, ?] and state [2, ?, 128] whose unnamed dims are the batch and the length."""
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 40, 0, 40])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [2, 1, 8])
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
        helper.make_node("ReduceMean", ["padded"], ["m"], axes=[1], keepdims=1),  # [batch, 1]
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),  # [1, batch, 1]
        helper.make_node("Expand", ["m3", "shape"], ["wide"]),  # [2, batch, 8]
        helper.make_node("Concat", ["wide", "state"], ["y"], axis=2),  # needs the state's batch to be x's
    ]
    model = _graph_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [pads, axes, shape],
    )
    feeds = Feeds()

    feeds.resolve(model, _runner(model))

    assert feeds.input_shapes == {"x": [1, 64], "state": [2, 1, 8]}


def test_search_gives_up_with_one_error_naming_the_input_and_what_to_pass():
    model = _reflect_pad_model(pad=100_000, name="wave")

    with pytest.raises(DataError) as caught:
        Feeds().resolve(model, _runner(model))

    message = str(caught.value)
    assert "fails on random inputs of 'wave'" in message and "--shape wave=batchxsamples" in message
    assert "--data" in message
    assert "Pad" in message  # the model's own reason, from the last try


def test_shape_given_is_used_as_it_is_without_searching():
    model = _reflect_pad_model(pad=200)
    feeds = Feeds(shapes={"x": [2, 576]})

    feeds.resolve(model, _runner(model))

    assert feeds.input_shapes == {"x": [2, 576]} and feeds.how == "--shape" and feeds.tries == 1


def test_random_token_ids_that_index_out_of_range_point_at_data():
    # ids + 4 index a table of 4 rows: no random id is in range, and the input is not the indices themselves.
    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32))
    offset = helper.make_tensor("offset", TensorProto.INT64, [], [4])
    model = _graph_model(
        [
            helper.make_node("Add", ["ids", "offset"], ["shifted"]),
            helper.make_node("Gather", ["table", "shifted"], ["y"]),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table, offset],
    )

    with pytest.raises(DataError, match=r"out of range with the random integers of 'ids'.*--data"):
        Feeds().resolve(model, _runner(model))


def test_a_sample_rate_input_is_tried_at_16000_then_8000():
    """The model runs only when sr is 8000: its input x[4] is reshaped to [sr - 7996]."""
    offset = helper.make_tensor("offset", TensorProto.INT64, [], [7996])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    nodes = [
        helper.make_node("Sub", ["sr", "offset"], ["length"]),
        helper.make_node("Unsqueeze", ["length", "axes"], ["shape"]),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    model = _graph_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [offset, axes],
    )
    feeds = Feeds()

    feeds.resolve(model, _runner(model))

    assert feeds.scalar_values == {"sr": 8000} and "sr=8000" in feeds.how
    assert int(feeds.random(model, seed=0)["sr"]) == 8000


# --- every pass that runs or times the model takes the run's inputs ----------------------------------------


class RecordsItsFeed(Pass):
    """Changes nothing; keeps the shapes of the feed the context gives it."""

    name = "records-its-feed"
    shapes: ClassVar[dict] = {}

    def run(self, model, ctx):
        RecordsItsFeed.shapes = {name: value.shape for name, value in ctx.runtime.feed(model).items()}
        return PassResult(False)


@pytest.mark.parametrize(
    ("shapes", "verify", "expected"),
    [
        pytest.param({"x": [1, 576]}, True, (1, 576), id="shape-given"),
        pytest.param(None, True, (1, 256), id="found-by-verification"),
        pytest.param(None, False, (1, 256), id="found-by-the-pass-itself"),
    ],
)
def test_passes_get_the_inputs_of_the_run(shapes, verify, expected):
    RecordsItsFeed.shapes = {}

    _, report = optimize(_reflect_pad_model(), [RecordsItsFeed()], shapes=shapes, verify=verify, seed=0)

    assert RecordsItsFeed.shapes == {"x": expected}
    assert report.verification["inputs"]["shapes"] == {"x": list(expected)}


def test_the_acceptance_timing_runs_on_the_shape_given():
    """It drew its own random input with every dynamic dim at its default, which this model cannot run."""
    original = from_onnx(_reflect_pad_model())
    model = original.copy()
    ctx = PassContext(timing=QUICK, feeds=Feeds(shapes={"x": [1, 576]}))

    verdict = Acceptance(min_speedup=0.0).judge(original, model, ctx)

    assert verdict.kept and verdict.stats["measured_speedup"] > 0


def test_quant_times_its_choices_on_the_shape_given(exported):
    model = from_onnx(exported["reflect"])
    (quant,) = create_passes("quant")

    result = quant.run(model, PassContext(timing=QUICK, feeds=Feeds(shapes={"x": [1, 576]})))

    assert result.stats["layers"] == 3


def test_a_dim_declared_minus_one_is_dynamic_and_searched_like_one_without_a_name():
    # Paddle2ONNX (rapidocr's OCR models) and early converters write a dynamic dim as dim_value -1.
    model = _reflect_pad_model(pad=200)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, -1]))

    _, report = optimize(model, "cleanup", seed=0)

    assert report.verification["inputs"]["shapes"] == {"x": [1, 256]}
    assert report.passes[0].status == "unchanged"


def test_verification_report_says_how_the_shapes_were_found():
    _, report = optimize(_reflect_pad_model(), "cleanup", seed=0)

    inputs = report.verification["inputs"]
    assert inputs["source"] == "random" and inputs["shapes"] == {"x": [1, 256]}
    assert inputs["found_by"].startswith("searched: samples=256")
    assert "random inputs x=1x256: dynamic dims searched: samples=256" in report.summary()


# --- models exported from PyTorch with dynamic axes ---------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A reflect-padded STFT-like front end (samples > 200) and a CNN concatenating upsampled feature maps
    (height and width divisible by 32), exported by the TorchScript exporter with dynamic axes."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class ReflectFrontEnd(nn.Module):
        def __init__(self):
            super().__init__()
            self.frames = nn.Conv1d(1, 32, kernel_size=400, stride=160)
            self.mix = nn.Conv1d(32, 32, kernel_size=3, padding=1)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            x = F.pad(x.unsqueeze(1), (200, 200), mode="reflect")
            return self.head(torch.relu(self.mix(self.frames(x).abs())).mean(dim=2))

    class SkipConcatCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList([nn.Conv2d(3 if i == 0 else 8, 8, 3, stride=2, padding=1) for i in range(5)])
            self.up = nn.ModuleList([nn.Conv2d(16, 8, 3, padding=1) for _ in range(4)])

        def forward(self, x):
            skips = []
            for conv in self.down:
                x = torch.relu(conv(x))
                skips.append(x)
            for conv, skip in zip(self.up, reversed(skips[:-1])):
                x = torch.relu(conv(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], dim=1)))
            return x

    folder = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    cases = {
        "reflect": (ReflectFrontEnd(), torch.randn(1, 1000), "x", {0: "batch", 1: "samples"}),
        "skip-concat": (SkipConcatCNN(), torch.randn(1, 3, 64, 64), "image", {0: "batch", 2: "height", 3: "width"}),
    }
    paths = {}
    for name, (module, example, input_name, axes) in cases.items():
        paths[name] = folder / f"{name}.onnx"
        torch.onnx.export(
            module.eval(), (example,), str(paths[name]), input_names=[input_name], output_names=["y"],
            dynamic_axes={input_name: axes}, opset_version=17, dynamo=False,
        )
    return paths


@pytest.mark.parametrize(
    ("case", "found"),
    [("reflect", "x=1x256: dynamic dims searched: samples=256"), ("skip-concat", "image=1x3x32x32")],
)
def test_cleanup_needs_no_flags_on_exported_models_that_cannot_run_with_dims_of_one(exported, tmp_path, case, found):
    result = succeeded(run_cli(OPTIMIZE, exported[case], "--passes", "cleanup", "-o", tmp_path / "out.onnx"))

    assert found in result.stdout
    assert "error vs original (random inputs): max rel 0" in result.stdout


def test_prune_times_on_the_shape_given_on_the_command_line(exported, tmp_path):
    report = tmp_path / "report.json"

    succeeded(
        run_cli(
            OPTIMIZE, exported["reflect"], "--passes", "prune:ratio=0.3", "--shape", "x=1x576", "--budget", "none",
            "-o", tmp_path / "out.onnx", "--report", report,
        )
    )

    written = json.loads(report.read_text())
    (record,) = written["passes"]
    assert record["status"] in ("applied", "unchanged") and not record["error"]
    assert "measured_speedup" in record["stats"] or any("timed" in note for note in record["notes"])
    assert written["verification"]["inputs"]["shapes"] == {"x": [1, 576]}


# --- a trained model shipped on PyPI: silero-vad (If subgraphs, an LSTM state, a scalar sample rate) --------
# Its ONNX files are read from the installed package without importing it (importing it imports torch). It is
# not a test dependency: these tests skip when it is not installed (pip install silero-vad==6.2.3 --no-deps).

_SILERO = importlib.util.find_spec("silero_vad")
silero = pytest.mark.skipif(_SILERO is None, reason="silero-vad is not installed")


def _silero_model(name: str) -> Path:
    return Path(_SILERO.submodule_search_locations[0]) / "data" / name


@silero
@pytest.mark.parametrize("name", ["silero_vad.onnx", "silero_vad_16k_op15.onnx"])
def test_cleanup_needs_no_flags_on_silero_vad(tmp_path, name):
    result = succeeded(run_cli(OPTIMIZE, _silero_model(name), "--passes", "cleanup", "-o", tmp_path / "out.onnx"))

    assert "random inputs input=1x256, state=2x1x128, sr=scalar: dynamic dims searched" in result.stdout


@silero
@pytest.mark.parametrize("layout", ["folder", "stacked"])
def test_silero_vad_runs_on_data_with_its_state_and_sample_rate(tmp_path, layout):
    rng = np.random.default_rng(0)
    feeds = [
        {
            "input": rng.standard_normal((1, 512)).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(16000, np.int64),
        }
        for _ in range(3)
    ]
    data = tmp_path / ("samples" if layout == "folder" else "samples.npz")
    save_samples(data, feeds, layout=layout)

    result = succeeded(
        run_cli(OPTIMIZE, _silero_model("silero_vad_16k_op15.onnx"), "--passes", "cleanup", "--data", data,
                "-o", tmp_path / "out.onnx")
    )

    summary = "error vs original (3 --data samples, fewer than 4: none held out from calibration): max rel 0"
    assert summary in result.stdout


@pytest.mark.parametrize(
    "command", [["bench", "--min-time", "0.01", "--repeats", "3"], ["compare", "--samples", "2"]], ids=["bench", "compare"]
)
def test_bench_and_compare_find_the_dims_a_model_needs_with_no_flags(tmp_path, command):
    path = tmp_path / "reflect.onnx"
    onnx.save(_reflect_pad_model(pad=200), path)
    models = [path] if command[0] == "bench" else [path, path]

    succeeded(run_cli(ONNXFORGE, command[0], *models, *command[1:]))
