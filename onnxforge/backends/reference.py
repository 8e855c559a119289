"""The reference runtime: onnxruntime on the CPU, which gives passes the same answers whatever backend a run
targets. It evaluates models without inputs exactly (the values constant folding stores), and holds the schemas of
the ops onnx does not define (the contrib ops of com.microsoft)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxforge.backends.onnxruntime import OrtPrepared, create_session


def evaluate(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The tensor outputs of `model`, a graph without inputs, by name (sequences and optionals are left out).

    onnxruntime's CPU kernels compute them as the model is written (graph optimizations off, so no fused kernel
    changes a value), in a run stopped like every other (deadlines, the bound of one execution, Ctrl-C).
    BackendError when onnxruntime cannot load or run the model.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only
    outputs = OrtPrepared(create_session(model.SerializeToString(), options)).run({})
    return {name: value for name, value in outputs.items() if isinstance(value, np.ndarray)}


@dataclass(frozen=True)
class OperatorSchema:
    """An operator's formal inputs and outputs, each a type string ('T', 'tensor(float)') and its option
    ('Single', 'Optional' or 'Variadic'), and the types each type variable allows."""

    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    allowed: Mapping[str, frozenset[str]]


@functools.cache
def operator_schema(op: str, domain: str, opset: int) -> OperatorSchema | None:
    """onnxruntime's newest schema of `op` in `domain` up to version `opset`, or None if it has none."""
    candidates = [s for s in _schemas().get((domain, op), []) if s.since_version <= opset]
    schema = max(candidates, key=lambda s: s.since_version, default=None)
    if schema is None:
        return None
    return OperatorSchema(
        inputs=tuple((p.typeStr, p.option.name) for p in schema.inputs),
        outputs=tuple((p.typeStr, p.option.name) for p in schema.outputs),
        allowed={c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints},
    )


@functools.cache
def _schemas() -> dict[tuple[str, str], list]:
    schemas: dict[tuple[str, str], list] = {}
    for schema in ort.capi._pybind_state.get_all_operator_schema():
        schemas.setdefault((schema.domain, schema.name), []).append(schema)
    return schemas
