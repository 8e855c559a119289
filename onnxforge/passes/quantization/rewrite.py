"""Rewrite layers into quantized form: QDQ (standard ONNX ops) or onnxruntime's quantized operators.

QDQ keeps every op as it was and surrounds it with DequantizeLinear nodes (and QuantizeLinear for
activations); onnxruntime fuses such groups into its integer kernels at load, and other backends read them
as plain ONNX. The "qoperator" form writes onnxruntime's fused operators directly (DynamicQuantizeMatMul,
MatMulNBits), or, for other backends, MatMulInteger and its rescaling; static Conv layers become the
QLinearConv that onnxruntime would fuse their QDQ group into.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxforge.ir import Model
from onnxforge.ir.layers import Layer
from onnxforge.ir.ops import CONTRIB_DOMAIN
from onnxforge.passes.quantization.qlinear import conv_group, write_qlinear_conv
from onnxforge.passes.quantization.weights import QuantizedWeight, QuantSpec, int4_tensor, pack_matmul_nbits

# Inserted tensors are named after the tensor they stand for: "<name>_q" holds its integer codes, "<name>_scale" and
# "<name>_zp" their scale and zero point, "<name>_dq" the codes dequantized (short: a CNN repeats each many times).
Mode = Literal["dynamic", "static", "weight-only"]
Form = Literal["qdq", "qoperator"]
# A constant an int8 kernel reads as a second operand: uint8 codes over its own range, as activations are.
UINT8_PER_TENSOR = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per-tensor")
# An activation (Relu, Clip) right after a layer is quantized at its output, where onnxruntime fuses it.
FUSED_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class LayerFormat:
    """How one layer is quantized: the mode, the ONNX form written, and how its weight is quantized.

    `accuracy_level` is MatMulNBits' compute type: 4 multiplies in int8 (fast with VNNI), 0 in float.
    """

    mode: Mode
    form: Form
    spec: QuantSpec
    accuracy_level: int = 4

    def describe(self, contrib_ops: bool) -> str:
        """A few words for reports: 'int8 dynamic, per-channel weights, QDQ'."""
        spec = self.spec
        grain = f"block {spec.block_size}" if spec.granularity == "block" else spec.granularity
        what = f"int{spec.bits} {self.mode}, {grain} {'symmetric' if spec.symmetric else 'asymmetric'} weights"
        if self.form == "qdq":
            return f"{what}, QDQ"
        if self.mode == "static":
            return f"{what}, QLinearConv"
        if self.mode == "weight-only" and contrib_ops:
            return f"{what}, MatMulNBits (accuracy level {self.accuracy_level})"
        if self.mode == "dynamic" and contrib_ops:
            return f"{what}, DynamicQuantizeMatMul"
        return f"{what}, MatMulInteger"


@dataclass(frozen=True)
class ActivationQuantization:
    """The calibrated scale and zero point of one activation tensor (static mode)."""

    scale: np.float32
    zero_point: np.ndarray  # a 0-d uint8 or int8 array: its dtype is the code type


class LayerRewriter:
    """Quantizes layers of one model, sharing each quantized weight and activation between the layers using it.

    `quantize_weight(layer, spec)` returns the layer's quantized weight (the caller caches it across candidate
    models); `activations` holds static mode's calibrated tensors by name (main graph layers only).
    `seven_bit_weights`: the int8 weights of layers that integer kernels run (dynamic and static MatMul, Conv,
    LSTM) keep to 7 bits, for the kernels that overflow otherwise (`BackendCapabilities.seven_bit_int8_weights`).
    """

    def __init__(
        self,
        model: Model,
        quantize_weight: Callable[[Layer, QuantSpec], QuantizedWeight],
        activations: Mapping[str, ActivationQuantization],
        contrib_ops: bool,
        seven_bit_weights: bool = False,
    ):
        self.main_graph = self.graph = model.graph  # `graph` is the one being edited: the current layer's
        # A subgraph reads the values of the graphs around it: a new name must be new in every graph.
        self._taken = {name for graph in model.graphs() for name in (*graph.tensors(), *(n.name for n in graph.nodes))}
        self.quantize_weight = quantize_weight
        self.activations = activations
        self.contrib_ops = contrib_ops
        self.seven_bit_weights = seven_bit_weights
        self._dequantized_weights: dict[tuple[int, int, QuantSpec], gs.Variable] = {}  # by graph, weight, spec
        self._static_tensors: dict[str, gs.Variable] = {}
        self._static_sources: dict[str, str] = {}  # dequantized tensor -> the float tensor it stands for
        self._constants: dict[tuple, list[gs.Constant]] = {}

    def rewrite(self, layer: Layer, fmt: LayerFormat, graph: gs.Graph | None = None) -> None:
        """Quantize `layer`, a node of `graph` (the main graph when None), as `fmt` says (Gemm is made a MatMul
        first). Quantized constants are shared across graphs (export stores one that several subgraphs read in
        the main graph); the nodes that dequantize them are added to the layer's graph."""
        self.graph = self.main_graph if graph is None else graph
        if self.seven_bit_weights and _runs_integer_kernels(layer, fmt):
            fmt = dataclasses.replace(fmt, spec=dataclasses.replace(fmt.spec, seven_bit=True))
        if layer.op == "Gather" and fmt.spec.granularity == "block":
            self._gather_blocks(layer, fmt)
        elif layer.op == "Gather":
            self._gather_rows(layer, fmt)
        elif layer.op == "LSTM":
            self._dynamic_lstm(layer, fmt)
        elif layer.op == "GRU":
            self._dequantized_recurrent_weights(layer, fmt)
        elif fmt.mode == "weight-only" and fmt.form == "qoperator" and self.contrib_ops:
            self._matmul_nbits(layer, fmt)
        elif fmt.mode == "dynamic" and fmt.form == "qoperator" and layer.op == "MatMul":
            self._dynamic_matmul_operator(layer, fmt)
        elif fmt.mode == "static" and fmt.form == "qoperator" and layer.op == "Conv":
            self._qlinear_conv(layer, fmt)
        else:
            self._qdq(layer, fmt)

    # --- QDQ --------------------------------------------------------------------------------------------

    def _qdq(self, layer: Layer, fmt: LayerFormat) -> None:
        node = layer.node
        weight = self._dequantized_weight(layer, fmt.spec)
        if fmt.mode == "dynamic":
            node.inputs[0] = self._dynamic_activation(layer.activation)
        elif fmt.mode == "static":
            x_scale = self.activations[self._static_source(layer.activation)].scale
            self.static_activation(layer.activation)
            if node.op == "Conv" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                node.inputs[2] = self._int32_bias(layer, x_scale, fmt.spec)
            self.static_activation(quantized_output(layer))
        node.inputs[layer.weight_input] = weight

    def _dequantized_weight(self, layer: Layer, spec: QuantSpec) -> gs.Variable:
        key = (id(self.graph), id(layer.weight), spec)
        if key in self._dequantized_weights:
            return self._dequantized_weights[key]
        quantized = self.quantize_weight(layer, spec)
        base = layer.weight.name
        attrs: dict = {}
        if quantized.axis is not None:
            attrs["axis"] = quantized.axis
        if spec.granularity == "block":
            attrs["block_size"] = spec.block_size
        codes, scale, zero_point = self._weight_constants(layer, spec, "codes")
        output = self._new_tensor(f"{base}_dq")
        # A signed symmetric weight's zero points are all 0, DequantizeLinear's default: not stored.
        inputs = [codes, scale] if spec.signed and spec.symmetric else [codes, scale, zero_point]
        self._add("DequantizeLinear", inputs, [output], attrs)
        self._dequantized_weights[key] = output
        return output

    def _weight_constants(self, layer: Layer, spec: QuantSpec, layout: str) -> list[gs.Constant]:
        """The constants holding `layer`'s quantized weight in `layout`, made once for all layers sharing it.

        Layouts: "codes" (codes, scale, zero point: DequantizeLinear and DynamicQuantizeMatMul inputs),
        "nbits" (MatMulNBits' packed codes, scales, zero points), "rows" (codes, one scale per row), "lstm"
        (DynamicQuantizeLSTM's transposed codes, scales and zero points per direction).
        """
        key = (id(layer.weight), spec, layout)
        if key not in self._constants:
            quantized = self.quantize_weight(layer, spec)
            if layout == "nbits":
                arrays = dict(zip(("packed", "scales", "zero_points"), pack_matmul_nbits(quantized)))
            elif layout == "rows":
                arrays = {"q": quantized.codes, "row_scales": quantized.scale.reshape(-1, 1)}
            elif layout == "lstm":  # [directions, input, 4 * hidden] codes, a scale per direction and gate column
                directions = quantized.codes.shape[0]
                scale = np.broadcast_to(quantized.scale.reshape(1, -1), (directions, quantized.scale.size))
                codes = np.ascontiguousarray(quantized.codes.transpose(0, 2, 1))
                arrays = {"q": codes, "scale": scale, "zp": np.zeros(scale.shape, np.int8)}
            else:
                arrays = {"q": quantized.codes, "scale": quantized.scale, "zp": quantized.zero_point}
            constants = []
            for suffix, values in arrays.items():
                name = self._unique(f"{layer.weight.name}_{suffix}")
                if spec.bits == 4 and layout == "codes" and suffix != "scale":
                    constants.append(gs.Constant(name, LazyValues(int4_tensor(name, values, spec.signed))))
                else:
                    values = values.astype(np.float32) if values.dtype.kind == "f" else values
                    constants.append(gs.Constant(name, values))
            self._constants[key] = constants
        return self._constants[key]

    def _dynamic_activation(self, x: gs.Tensor) -> gs.Variable:
        # One DynamicQuantizeLinear per layer: onnxruntime fuses it into a single consumer's integer kernel.
        quantized = self._dynamic_quantize(x)
        output = self._new_tensor(f"{x.name}_dq")
        self._add("DequantizeLinear", quantized, [output])
        return output

    def _dynamic_quantize(self, x: gs.Tensor) -> list[gs.Variable]:
        """DynamicQuantizeLinear of `x`: its uint8 codes, scale and zero point."""
        parts = [self._new_tensor(f"{x.name}_{part}") for part in ("q", "scale", "zp")]
        self._add("DynamicQuantizeLinear", [x], parts)
        return parts

    def _static_source(self, x: gs.Tensor) -> str:
        """The name of the float tensor `x` is, or dequantizes (a consumer may have been rewired already)."""
        return self._static_sources.get(x.name, x.name)

    def static_activation(self, x: gs.Tensor) -> gs.Variable:
        """Quantize `x` once with its calibrated scale; every consumer then reads the dequantized value."""
        if x.name in self._static_sources:
            return x
        if x.name in self._static_tensors:
            return self._static_tensors[x.name]
        calibrated = self.activations[x.name]
        scale = gs.Constant(self._unique(f"{x.name}_scale"), np.array(calibrated.scale, np.float32))
        zero_point = gs.Constant(self._unique(f"{x.name}_zp"), calibrated.zero_point)
        quantized = self._new_tensor(f"{x.name}_q")
        output = self._new_tensor(f"{x.name}_dq")
        consumers = list(x.outputs)
        quantize = self._add("QuantizeLinear", [x, scale, zero_point], [quantized])
        self._add("DequantizeLinear", [quantized, scale, zero_point], [output])
        for consumer in consumers:
            if consumer is not quantize:
                for index, tensor in enumerate(consumer.inputs):
                    if tensor is x:
                        consumer.inputs[index] = output
        self._static_tensors[x.name] = output
        self._static_sources[output.name] = x.name
        return output

    def static_constant(self, constant: gs.Constant) -> gs.Variable:
        """A float constant an int8 kernel reads as a second operand (an Add's bias, a Mul's factor), as uint8 codes
        over its own range and their DequantizeLinear, made once per constant."""
        if constant.name in self._static_tensors:
            return self._static_tensors[constant.name]
        values = np.asarray(constant.values, np.float32)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        scale, zero_point = UINT8_PER_TENSOR.scale_and_zero_point(low, high)
        # asarray: the codes of a 0-d constant come back a numpy scalar, which a Constant cannot hold.
        codes = np.asarray(UINT8_PER_TENSOR.quantize(values, scale, zero_point))
        inputs = [
            gs.Constant(self._unique(f"{constant.name}_q"), codes),
            gs.Constant(self._unique(f"{constant.name}_scale"), scale),
            gs.Constant(self._unique(f"{constant.name}_zp"), zero_point),
        ]
        output = self._new_tensor(f"{constant.name}_dq")
        self._add("DequantizeLinear", inputs, [output])
        self._static_tensors[constant.name] = output
        return output

    def _int32_bias(self, layer: Layer, x_scale: np.float32, spec: QuantSpec) -> gs.Variable:
        """The bias as int32 codes on scale x_scale * w_scale, the form onnxruntime's QLinearConv takes."""
        bias = layer.node.inputs[2]
        w_scale = np.broadcast_to(self.quantize_weight(layer, spec).scale.reshape(-1), bias.shape)
        scale = (np.float32(x_scale) * w_scale).astype(np.float32)
        # A product of scales that underflows to 0 can hold no bias: those codes are 0.
        # In float64: float32 cannot hold 2**31 - 1, the clip bound, and would round it out of int32's range.
        safe = np.where(scale > 0, scale, 1).astype(np.float64)
        codes = np.where(scale > 0, np.round(bias.values / safe), 0).clip(-(2**31), 2**31 - 1).astype(np.int32)
        output = self._new_tensor(f"{bias.name}_dq")
        # One scale per tensor when the weight has one: no axis, which DequantizeLinear takes from opset 13 only.
        uniform = scale.size > 0 and bool(np.all(scale == scale.flat[0]))
        inputs = [  # the zero point is 0, DequantizeLinear's default: not stored
            gs.Constant(self._unique(f"{bias.name}_q"), codes),
            gs.Constant(self._unique(f"{bias.name}_scale"), scale[:1].reshape(()) if uniform else scale),
        ]
        self._add("DequantizeLinear", inputs, [output], {} if uniform else {"axis": 0})
        return output

    # --- operators ----------------------------------------------------------------------------------------

    def _qlinear_conv(self, layer: Layer, fmt: LayerFormat) -> None:
        """The QDQ group of a static Conv, then its QLinearConv where onnxruntime would fuse the group into one."""
        self._qdq(layer, fmt)
        output = quantized_output(layer)
        group = conv_group(self.graph, layer.node)
        if group is None:
            return
        write_qlinear_conv(group, self._zero_point(np.dtype(group.dequantize[1].inputs[0].dtype)))
        # The float output is gone: its dequantized value, which the float consumers read, takes over its name.
        dequantized = self._static_tensors[output.name]
        del self._static_sources[dequantized.name]
        dequantized.name = output.name
        self._static_sources[output.name] = output.name

    def _zero_point(self, dtype: np.dtype) -> gs.Constant:
        """A scalar 0 of `dtype`, one for the whole graph."""
        key = ("zero_point", dtype.name)
        if key not in self._constants:
            self._constants[key] = [gs.Constant(self._unique(f"{dtype.name}_zero"), np.zeros((), dtype))]
        return self._constants[key][0]

    def _matmul_nbits(self, layer: Layer, fmt: LayerFormat) -> None:
        k, n = layer.weight.shape
        packed, scales, zero_points = self._weight_constants(layer, fmt.spec, "nbits")
        # Without zero points MatMulNBits centres the codes itself (at 8 or 128): symmetric weights need none.
        inputs = [layer.activation, packed, scales] + ([] if fmt.spec.symmetric else [zero_points])
        attrs = {
            "K": int(k),
            "N": int(n),
            "bits": fmt.spec.bits,
            "block_size": fmt.spec.block_size,
            "accuracy_level": fmt.accuracy_level,
        }
        self._replace(layer.node, "MatMulNBits", inputs, attrs, CONTRIB_DOMAIN)

    def _gather_rows(self, layer: Layer, fmt: LayerFormat) -> None:
        """An embedding as int8 rows with one scale each: gather the codes and scales, multiply."""
        node, indices, output = layer.node, layer.activation, layer.node.outputs[0]
        codes, scales = self._weight_constants(layer, fmt.spec, "rows")
        rows = self._new_tensor(f"{output.name}_codes")
        self._add("Gather", [codes, indices], [rows], {"axis": 0})
        row_scales = self._new_tensor(f"{output.name}_scales")
        self._add("Gather", [scales, indices], [row_scales], {"axis": 0})
        as_float = self._new_tensor(f"{output.name}_float")
        self._add("Cast", [rows], [as_float], {"to": onnx.TensorProto.FLOAT})
        self._replace(node, "Mul", [as_float, row_scales], {}, "")

    def _gather_blocks(self, layer: Layer, fmt: LayerFormat) -> None:
        """An embedding as int4 blocks along each row: onnxruntime's GatherBlockQuantized."""
        codes, scales, _ = self._weight_constants(layer, fmt.spec, "codes")
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": fmt.spec.block_size, "bits": fmt.spec.bits}
        self._replace(layer.node, "GatherBlockQuantized", [codes, layer.activation, scales], attrs, CONTRIB_DOMAIN)

    def _dynamic_lstm(self, layer: Layer, fmt: LayerFormat) -> None:
        """onnxruntime's DynamicQuantizeLSTM: int8 W and R, one scale per gate column, stored transposed."""
        inputs = list(layer.node.inputs) + [gs.Variable.empty()] * (8 - len(layer.node.inputs))
        for index in (1, 2):
            weight = dataclasses.replace(layer, weight_input=index)
            codes, scale, zero_point = self._weight_constants(weight, fmt.spec, "lstm")
            inputs[index] = codes
            inputs += [scale, zero_point]
        # LSTM's layout attribute (opset 14; find_layers takes only its default, 0) is unknown to the contrib op,
        # which then refuses to load: an opset-11 export upgraded to 17 carries it.
        attrs = {name: value for name, value in layer.node.attrs.items() if name != "layout"}
        self._replace(layer.node, "DynamicQuantizeLSTM", inputs, attrs, CONTRIB_DOMAIN)

    def _dequantized_recurrent_weights(self, layer: Layer, fmt: LayerFormat) -> None:
        """W and R of a recurrent layer without an integer kernel (GRU) stored as int8 and dequantized before it:
        a smaller file, float arithmetic."""
        for index in (1, 2):
            weight = dataclasses.replace(layer, weight_input=index)
            layer.node.inputs[index] = self._dequantized_weight(weight, fmt.spec)

    def _dynamic_matmul_operator(self, layer: Layer, fmt: LayerFormat) -> None:
        codes, scale, zero_point = self._weight_constants(layer, fmt.spec, "codes")
        if self.contrib_ops:
            inputs = [layer.activation, codes, scale, zero_point]
            self._replace(layer.node, "DynamicQuantizeMatMul", inputs, {}, CONTRIB_DOMAIN)
            return
        parts = self._dynamic_quantize(layer.activation)
        accumulated = self._new_tensor(f"{layer.name}_int32")
        self._add("MatMulInteger", [parts[0], codes, parts[2], zero_point], [accumulated])
        as_float = self._new_tensor(f"{layer.name}_float")
        self._add("Cast", [accumulated], [as_float], {"to": onnx.TensorProto.FLOAT})
        combined = self._new_tensor(f"{layer.name}_scale")
        self._add("Mul", [parts[1], scale], [combined])
        self._replace(layer.node, "Mul", [as_float, combined], {}, "")

    # --- graph edits --------------------------------------------------------------------------------------

    def _unique(self, prefix: str) -> str:
        """`prefix`, or `prefix_N`, whichever no tensor or node of the model is named yet; taken from then on."""
        name = prefix
        if name in self._taken:
            name = next(f"{prefix}_{i}" for i in itertools.count(1) if f"{prefix}_{i}" not in self._taken)
        self._taken.add(name)
        return name

    def _new_tensor(self, name: str) -> gs.Variable:
        """A tensor for an inserted node's output, untyped: onnx infers its type and shape from the node's inputs,
        and leaving it out of value_info keeps the file small."""
        return gs.Variable(self._unique(name))

    def _add(self, op: str, inputs: list, outputs: list, attrs: dict | None = None, domain: str = "") -> gs.Node:
        """Insert an unnamed node: names for the hundreds of Q/DQ nodes of a model would grow the file."""
        node = gs.Node(op, inputs=inputs, outputs=outputs, attrs=attrs or {}, domain=domain or None)
        self.graph.nodes.append(node)
        return node

    def _replace(self, node: gs.Node, op: str, inputs: list, attrs: dict, domain: str) -> None:
        node.op, node.domain, node.attrs = op, domain or None, attrs
        node.inputs.clear()
        node.inputs.extend(inputs)


def quantized_output(layer: Layer) -> gs.Tensor:
    """The tensor static mode quantizes after `layer`: its output, or that of a Relu/Clip right after it."""
    output = layer.node.outputs[0]
    consumers = list(output.outputs)
    if len(consumers) == 1 and consumers[0].op in FUSED_ACTIVATIONS:
        return consumers[0].outputs[0]
    return output


def _runs_integer_kernels(layer: Layer, fmt: LayerFormat) -> bool:
    """Whether onnxruntime multiplies `layer` in uint8 x int8 when it is quantized as `fmt`."""
    integer = fmt.mode in ("dynamic", "static") and fmt.spec.bits == 8 and fmt.spec.signed
    return integer and fmt.spec.granularity != "block" and layer.op in ("MatMul", "Gemm", "Conv", "LSTM")
