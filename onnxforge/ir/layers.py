"""Layers: nodes with a constant weight, what each axis of the weight means, their bias, their weight as a matrix,
and what they cost.

One model for every pass that rewrites weights (quantization, pruning, factorization) and for recovery: each pass
selects the layers it takes from `as_layer`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxforge.ir.ops import is_onnx_op

CONVOLUTIONS = ("Conv", "ConvTranspose")
# Layers that compute x @ W at each output position (x a row of their input, or a window of it for a convolution).
LINEAR_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Where a MatMul's reader holds the bias added to its output: an Add's constant input, or the bias input of
# onnxruntime's fused ops that add a bias before doing more (their first input is the MatMul's output).
BIAS_INPUTS = {"Add": (0, 1), "BiasGelu": (1,), "FastGelu": (1,), "SkipLayerNormalization": (4,)}


@dataclass(frozen=True)
class LayerCost:
    """A layer's weight and bias elements, and its multiply-accumulates per run (None: shapes unknown)."""

    params: int
    macs: int | None


@dataclass(frozen=True)
class Layer:
    """A node with a constant weight: which input holds it, and how the weight's axes are used.

    `out_axis` is the weight's output-channel axis (one scale per channel, the axis pruning slices); `in_axis` the
    axis summed over (blocks of block quantization run along it). For an embedding Gather, rows are the channels
    and the activation is the indices; for LSTM and GRU the weight is W [directions, gates * hidden, input].

    The bias, the output's channel axis, the matrix view, the input rows and the cost are those of a Conv,
    ConvTranspose, MatMul or Gemm (LINEAR_OPS).
    """

    node: gs.Node
    weight_input: int
    out_axis: int
    in_axis: int
    activation_input: int = 0

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def weight(self) -> gs.Constant:
        return self.node.inputs[self.weight_input]

    @property
    def activation(self) -> gs.Tensor:
        return self.node.inputs[self.activation_input]

    @property
    def bias(self) -> tuple[gs.Node, int] | None:
        """(node, input) of the constant added to each output channel: the layer's own 0-D or 1-D bias input
        (Conv, ConvTranspose, Gemm), or the constant that the one reader of a MatMul adds to its output (an Add,
        or a fused op of onnxruntime's that adds a bias first: BIAS_INPUTS)."""
        node = self.node
        if self.op in ("Conv", "ConvTranspose", "Gemm") and _own_bias(node):
            return node, 2
        readers = node.outputs[0].outputs
        if self.op != "MatMul" or len(readers) != 1 or readers[0].op not in BIAS_INPUTS:
            return None
        reader, width = readers[0], self.weight.shape[-1]
        if reader.op != "Add" and reader.inputs[0] is not node.outputs[0]:
            return None
        for index in BIAS_INPUTS[reader.op]:
            tensor = reader.inputs[index] if index < len(reader.inputs) else None
            if isinstance(tensor, gs.Constant) and tensor.shape in ([width], (width,)):
                return reader, index
        return None

    @property
    def channel_axis(self) -> int:
        """The axis of the output that holds the output channels, counted from the end: axis 1 of a
        convolution's, the last of a MatMul's or Gemm's."""
        return 1 - len(self.weight.shape) if self.op in CONVOLUTIONS else -1

    def output_positions(self, shape: Sequence[int]) -> int:
        """How many rows `output_rows` gives for an output of `shape`: every axis but the channels'."""
        return int(np.prod(np.delete(np.asarray(shape), self.channel_axis)))

    def output_rows(self, value: np.ndarray) -> np.ndarray:
        """A value of the layer's output as rows of channels: [positions, channels]."""
        return np.moveaxis(value, self.channel_axis, -1).reshape(-1, value.shape[self.channel_axis])

    def matrix(self) -> np.ndarray:
        """The weight as the float64 matrix W [inputs, outputs] that an ungrouped layer applies at each output
        position (`input_rows` @ W): a Gemm's transposed with transB, a Conv's [C kh kw, O] (its input window), a
        ConvTranspose's [C kh kw, O] (what each input value scatters there)."""
        weight = np.asarray(self.weight.values, np.float64)
        if self.op == "Conv":
            return weight.reshape(len(weight), -1).T
        if self.op == "ConvTranspose":  # [C, O, kh, kw]: a row per (C, kh, kw), as the input rows
            return weight.transpose(0, 2, 3, 1).reshape(-1, weight.shape[1])
        return weight.T if self._transposed else weight

    def stored(self, matrix: np.ndarray) -> np.ndarray:
        """A matrix [inputs, outputs], as `matrix()` gives the weight, in the weight's own layout: of the weight's
        size for a convolution, of any size for a MatMul or Gemm (a factor of its weight)."""
        if self.op == "Conv":
            return matrix.T.reshape(self.weight.shape)
        if self.op == "ConvTranspose":
            c, o, kh, kw = self.weight.shape
            return matrix.reshape(c, kh, kw, o).transpose(0, 3, 1, 2)
        return matrix.T if self._transposed else matrix

    def input_rows(self, x: np.ndarray, positions: np.ndarray, output_shape: tuple[int, ...]) -> np.ndarray:
        """What the layer reads from its input `x` at the output `positions` (flat indices over the output's batch
        and position axes), as float64 rows of `matrix()`'s inputs, for an ungrouped layer (2-D if a convolution)."""
        if self.op == "Conv":
            rows = _patches(self, x, positions)
        elif self.op == "ConvTranspose":
            rows = _transposed_patches(self, x, output_shape[2:])[positions]
        else:
            rows = x.reshape(-1, x.shape[-1])[positions]
        return rows.astype(np.float64)

    def matrix_rows(self, channels: np.ndarray) -> np.ndarray:
        """The rows of `matrix()` that read the given positions of the input's channel axis."""
        taps = math.prod(self.weight.shape[2:]) if self.op in CONVOLUTIONS else 1
        return (np.asarray(channels, np.int64)[:, None] * taps + np.arange(taps)).ravel()

    @property
    def cost(self) -> LayerCost:
        """Its weight and bias input's elements, and its multiply-accumulates per run where shapes are known."""
        node, weight = self.node, self.weight
        params = math.prod(weight.shape) + sum(
            math.prod(t.shape) for t in node.inputs[2:3] if isinstance(t, gs.Constant)
        )
        data, output = node.inputs[0].shape, node.outputs[0].shape
        if self.op == "ConvTranspose":  # every input element meets (outputs / group) x kernel weights
            known = data is not None and all(isinstance(d, int) for d in data)
            per_input = math.prod(weight.shape[1:])
            return LayerCost(params, math.prod(data) * per_input if known else None)
        if output is None or not all(isinstance(d, int) for d in output):
            return LayerCost(params, None)
        if self.op == "Conv":  # every output element reads (inputs / group) x kernel weights
            return LayerCost(params, math.prod(output) * math.prod(weight.shape[1:]))
        return LayerCost(params, math.prod(output) * weight.shape[self.in_axis])

    @property
    def _transposed(self) -> bool:
        return self.op == "Gemm" and bool(self.node.attrs.get("transB", 0))


def as_layer(node: gs.Node) -> Layer | None:
    """`node` as a layer: a Conv, ConvTranspose, MatMul (weight of 2 axes or more) or Gemm of the ONNX domain
    whose input 1 is a constant, an LSTM or GRU (default layout) with constant W and R, or a Gather of rows
    (axis 0) of a constant 2-D table at computed indices; None for any other node."""
    if not is_onnx_op(node) or len(node.inputs) < 2:
        return None
    if node.op == "Gather":
        table, indices = node.inputs
        if isinstance(table, gs.Constant) and len(table.shape) == 2 and not isinstance(indices, gs.Constant):
            if node.attrs.get("axis", 0) == 0:
                return Layer(node, 0, out_axis=0, in_axis=1, activation_input=1)
        return None
    if node.op in ("LSTM", "GRU"):
        if all(isinstance(w, gs.Constant) for w in node.inputs[1:3]) and not node.attrs.get("layout", 0):
            return Layer(node, 1, out_axis=1, in_axis=2)  # W [directions, gates * hidden, input]; R alike
        return None
    weight = node.inputs[1]
    if node.op not in LINEAR_OPS or not isinstance(weight, gs.Constant):
        return None
    rank = len(weight.shape)
    if node.op == "MatMul" and rank >= 2:
        return Layer(node, 1, out_axis=rank - 1, in_axis=rank - 2)
    if node.op == "Gemm" and rank == 2:
        if node.attrs.get("transB", 0):
            return Layer(node, 1, out_axis=0, in_axis=1)
        return Layer(node, 1, out_axis=1, in_axis=0)
    if node.op in CONVOLUTIONS and rank >= 3:  # Conv [O, C / group, k...]; ConvTranspose [C, O / group, k...]
        return Layer(node, 1, out_axis=0, in_axis=1) if node.op == "Conv" else Layer(node, 1, out_axis=1, in_axis=0)
    return None


def layer_costs(graph: gs.Graph) -> dict[int, LayerCost]:
    """The cost of every Conv, ConvTranspose, MatMul and Gemm layer of `graph`, by node id."""
    layers = (as_layer(node) for node in graph.nodes)
    return {id(layer.node): layer.cost for layer in layers if layer is not None and layer.op in LINEAR_OPS}


def describe_change(before: LayerCost, after: LayerCost) -> str:
    """'params 4608 -> 2304, MACs 1.2M -> 0.6M (2.00x fewer)' for a report line."""
    text = f"params {before.params} -> {after.params}"
    if before.macs and after.macs:
        text += f", MACs {_short(before.macs)} -> {_short(after.macs)} ({before.macs / after.macs:.2f}x fewer)"
    return text


def _own_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and len(node.inputs[2].shape) <= 1


def _patches(layer: Layer, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """im2col at some output positions of a 2-D Conv: the input window each reads (C, kh, kw order)."""
    node, kernel = layer.node, layer.weight.shape[2:]
    strides = node.attrs.get("strides", [1] * len(kernel))
    dilations = node.attrs.get("dilations", [1] * len(kernel))
    pads = node.attrs.get("pads", [0] * 2 * len(kernel))
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, c, oh, ow, kh, kw = windows.shape
    batch, row, column = np.unravel_index(positions, (n, oh, ow))
    return windows[batch, :, row, column].reshape(len(positions), c * kh * kw)


def _transposed_patches(layer: Layer, x: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """One row per output position of a 2-D ConvTranspose, holding the input value each kernel tap scatters
    there, or 0 (C, kh, kw order)."""
    node = layer.node
    n, c, h, w = x.shape
    kh, kw = layer.weight.shape[2:]
    strides = node.attrs.get("strides", [1, 1])
    dilations = node.attrs.get("dilations", [1, 1])
    pads = node.attrs.get("pads", [0, 0, 0, 0])
    oh, ow = output_size
    rows = np.zeros((n, oh, ow, c, kh, kw), x.dtype)
    for ky in range(kh):
        oy = np.arange(h) * strides[0] - pads[0] + ky * dilations[0]
        inside_y = (oy >= 0) & (oy < oh)
        for kx in range(kw):
            ox = np.arange(w) * strides[1] - pads[1] + kx * dilations[1]
            inside_x = (ox >= 0) & (ox < ow)
            tap = rows[:, :, :, :, ky, kx]
            tap[:, oy[inside_y][:, None], ox[inside_x][None, :], :] = x[:, :, inside_y][:, :, :, inside_x].transpose(
                0, 2, 3, 1
            )
    return rows.reshape(n * oh * ow, c * kh * kw)


def _short(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
