"""Fuzz what a user or a model file hands onnxforge: model bytes, model folders, pass lists, shapes, configs.

    pip install ".[fuzz]"
    python tests/fuzz/fuzz_inputs.py TARGET [libFuzzer flags, e.g. -max_total_time=300 -seed=1]

TARGET is `model` (serialized model bytes), `external` (a model file with external data beside it), `options`
(the pass-list, --shape and config parsers). Only OnnxforgeError may come out of a target; anything else is a
crash, which libFuzzer saves as `crash-*`: turn it into a case of tests/hostile_models.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from onnxforge.config import load_config
    from onnxforge.data import parse_shape_overrides, random_inputs
    from onnxforge.errors import OnnxforgeError
    from onnxforge.ir import load_model
    from onnxforge.ir.shapes import skeleton_proto
    from onnxforge.pipeline import create_passes

FOLDER = Path(tempfile.mkdtemp(prefix="onnxforge-fuzz-"))
(FOLDER / "weights.bin").write_bytes(np.arange(32, dtype=np.float32).tobytes())


def seed_model() -> bytes:
    """A small model with an external weight, an If and a Constant, for the mutations to start from."""
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[8, 4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", "128")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    branch = helper.make_graph([helper.make_node("Neg", ["h"], ["n"])], "then", [],
                               [helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, 4])])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        ],
        "seed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def load_and_use(source) -> None:
    """Load a model and do what every command does next: count it, export it, draw its random inputs."""
    model = load_model(source)
    model.stats()
    model.to_proto()
    random_inputs(skeleton_proto(model))


def model_target(data: bytes) -> None:
    try:
        load_and_use(data)
    except OnnxforgeError:
        pass


def external_target(data: bytes) -> None:
    path = FOLDER / "model.onnx"
    path.write_bytes(data)
    try:
        load_and_use(path)
    except OnnxforgeError:
        pass


def options_target(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    text = provider.ConsumeUnicodeNoSurrogates(200)
    config = FOLDER / ("pipeline.toml" if provider.ConsumeBool() else "pipeline.json")
    config.write_text(provider.ConsumeUnicodeNoSurrogates(400))
    for call in (lambda: create_passes(text), lambda: parse_shape_overrides([text]), lambda: load_config(config)):
        try:
            call()
        except OnnxforgeError:
            pass


TARGETS = {"model": model_target, "external": external_target, "options": options_target}


def main() -> None:
    target = TARGETS[sys.argv.pop(1)]
    seeds = Path(tempfile.mkdtemp(prefix="onnxforge-fuzz-seeds-"))
    (seeds / "seed.onnx").write_bytes(seed_model())
    atheris.Setup([*sys.argv, str(seeds)], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
