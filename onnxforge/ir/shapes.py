"""Shape and type inference on the IR: onnx's inference, tolerant of ops it does not know."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx.external_data_helper
import onnx.shape_inference
import onnx_graphsurgeon as gs

from onnxforge.ir.model import Model, proto_graphs


# Where the skeleton's large weights claim to be; nothing is ever read from it.
SKELETON_DATA = "skeleton.data"


@dataclass(frozen=True)
class ShapeInferenceResult:
    """Whether onnx's inference ran, how many tensors got a shape, and why it failed if it did."""

    ok: bool
    tensors_with_shape: int
    message: str = ""


def infer_shapes(model: Model) -> ShapeInferenceResult:
    """Fill in the shapes and dtypes of intermediate tensors, in place.

    Uses onnx's strict shape inference with data propagation (so static shape computations resolve).
    When that fails (an inconsistent node), it falls back to onnx's lenient mode, which infers what it
    can around the failure; ops it does not know (custom domains) are skipped. The failure is returned
    in the result instead of raised.
    """
    proto = skeleton_proto(model)
    message = ""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError, ValidationError or RuntimeError
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception:  # even lenient inference failed: keep the shapes the graph has
            return ShapeInferenceResult(False, 0, message)
    infos = {}
    _collect_value_infos(inferred.graph, infos)
    updated = 0
    for graph in model.graphs():
        for name, tensor in graph.tensors().items():
            info = infos.get(name)
            if isinstance(tensor, gs.Variable) and info is not None and info.type.HasField("tensor_type"):
                tensor_type = info.type.tensor_type
                if tensor_type.elem_type:
                    tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
                if tensor_type.HasField("shape"):
                    tensor.shape = [_dim(d) for d in tensor_type.shape.dim]
                    updated += 1
    return ShapeInferenceResult(not message, updated, message)


def skeleton_proto(model: Model) -> onnx.ModelProto:
    """Export the model with large weights marked external (not read), for inference and checking."""
    proto = model.to_proto()
    for tensor in _initializers(proto.graph):
        if onnx.external_data_helper.uses_external_data(tensor) or (
            tensor.HasField("raw_data") and len(tensor.raw_data) > 1024
        ):
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", SKELETON_DATA
    return proto


def _initializers(graph: onnx.GraphProto):
    for g in proto_graphs(graph):
        yield from g.initializer


def _collect_value_infos(graph: onnx.GraphProto, infos: dict) -> None:
    for g in proto_graphs(graph):
        for info in [*g.value_info, *g.output, *g.input]:
            infos.setdefault(info.name, info)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None
