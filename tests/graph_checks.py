"""Helpers for pass tests: run a pass on a model, count ops, and prove the function did not change."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.backends import BackendOptions, get_backend
from onnxforge.comparison import compare_outputs
from onnxforge.data import random_inputs
from onnxforge.ir import Model, load_model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.pipeline import PassContext, PassResult, create_passes


def op_counts(model: Model) -> Counter:
    """Op types of all nodes, nested subgraphs included."""
    return Counter(node.op for graph in model.graphs() for node in graph.nodes)


def apply(
    pass_spec: str, source: onnx.ModelProto | Model, backend: str = "ort", data: list[dict] | None = None
) -> tuple[Model, PassResult]:
    """Run one pass (e.g. 'fold-constants:max_bytes=64') directly on a fresh IR model of `source`."""
    (pass_,) = create_passes(pass_spec)
    model = load_model(source.to_proto() if isinstance(source, Model) else source)
    return model, pass_.run(model, PassContext(data=data, backend=backend))


def max_rel_error(
    before: onnx.ModelProto | Model, after: Model, samples: int = 3, seed: int = 123, graph_optimization: str = "all"
) -> float:
    """Largest output error (relative to each output's scale) between two models on fresh random inputs.

    graph_optimization="disable" runs both as written: onnxruntime's own fusions would otherwise turn a
    decomposed original into the very op a fusion pass emits, and hide any difference.
    """
    before_model = before if isinstance(before, Model) else load_model(before)
    proto = skeleton_proto(before_model)
    inputs = [random_inputs(proto, seed=seed + i) for i in range(samples)]
    backend, options = get_backend("ort"), BackendOptions(graph_optimization=graph_optimization)
    ref, new = backend.prepare(before_model, options), backend.prepare(after, options)
    return compare_outputs([ref.run(x) for x in inputs], [new.run(x) for x in inputs]).max_rel


def held_out_cosine(source: onnx.ModelProto, model: Model, samples: list[dict]) -> float:
    """The worst cosine of `model` against `source` on the held-out quarter of `samples` (the run's one split),
    both run anew in onnxruntime."""
    held_out = samples[-len(samples) // 4 :]
    ort = get_backend("ort")
    before, after = ort.prepare(source.SerializeToString()), ort.prepare(model)
    return compare_outputs([before.run(s) for s in held_out], [after.run(s) for s in held_out]).min_cosine


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    """A one-graph model of `nodes` at the given default-domain opset."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def value_info(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def constant(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def padded_token_samples(count: int, width: int, seed: int, tokens: int = 12) -> tuple[list[dict], list[dict]]:
    """Samples of x [1, tokens, width] with an attention_mask marking the first 3 to tokens-1 real, and the same
    samples with large noise added at the padding positions only."""
    rng = np.random.default_rng(seed)
    samples, garbled = [], []
    for real in rng.integers(3, tokens, size=count):
        mask = (np.arange(tokens) < real).astype(np.int64)[None]
        x = rng.standard_normal((1, tokens, width)).astype(np.float32)
        noise = np.where(mask[..., None] == 0, 100 * rng.standard_normal(x.shape), 0).astype(np.float32)
        samples.append({"x": x, "attention_mask": mask})
        garbled.append({"x": x + noise, "attention_mask": mask})
    return samples, garbled
