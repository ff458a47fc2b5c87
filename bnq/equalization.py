"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction"): rescale the output channels of one layer and the input channels of the
next, so that their weight ranges match, without changing what the float model computes.

Two layers (Conv or Gemm with constant weights) in a row, with between them nothing or only ops
f that are positively homogeneous channel by channel, f(x / s) = f(x) / s for s > 0 (Relu,
LeakyRelu, PRelu, MaxPool), compute, for every positive vector s over the channels c of the
tensor between them,

    y = W2 f(W1 x + b1) + b2 = (W2 S) f(S^-1 W1 x + S^-1 b1) + b2,      S = diag(s)

that is: output channel c of the first layer (its weights W1[c] and bias b1[c]) divided by s[c],
input channel c of the second (for a grouped Conv with C / g inputs per group, the column c mod
(C / g) of the output channels of group c div (C / g); for a depthwise Conv, output channel c
itself) multiplied by s[c]. Exact in real arithmetic; float results differ by rounding (1e-5
relative at most in the tests). With r1[c] = max |W1[c]| and r2[c] = max |W2[:, c]|, the paper's
choice

    s[c] = sqrt(r1[c] / r2[c])      (then both ranges are sqrt(r1[c] r2[c]))

matches the two ranges. In a chain (Conv -> Relu -> Conv -> Relu -> Conv) the middle layer's
rows and columns are both rescaled, so the pairs are equalized in turn until no s moves by more
than `TOLERANCE` (the paper's iteration; it converges). A dead channel (r1 or r2 zero) keeps
s = 1.

bnq quantizes weights per output channel, which absorbs any scale of W1's rows, and the tensor
between the layers per tensor: what s changes is how that tensor's channels share one scale
(r1[c] stands for channel c's range) and how W2's columns share each of its rows' scales. So it
is off by default in `calibrate`: measured with bias correction, it moved the logits' SQNR by
-0.11 to +0.10 dB on MobileNetV2, ResNet-50, DenseNet-121 and the sample, and by -1.40 to
+1.50 dB (mean -0.07) on a trained depthwise-separable CNN over six seeds (README, "Measured").

Not across ReLU6 (Clip(0, 6): f(x / s) would clip at 6 s), BatchNormRelu, Add, Concat or any
other op; not where the tensor between the layers (or between the ops) has another reader or is a
graph output, or a weight or bias is computed at run time or not float32. A weight or bias that
another node also reads is copied, not changed in place. The rewritten weights get fresh names.

Match -> check -> rewrite, like `bnq.fusion` and `bnq.rewrites`: the pass reports the pairs it
equalized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnq.graph import (
    NameScope,
    constant_values,
    consumers,
    drop_unused,
    node_label,
    output_names,
)

# Ops between the two layers: per channel, f(x / s) = f(x) / s for every s > 0.
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "MaxPool")
TOLERANCE = 1e-4  # stop when every |log s| of a sweep over the pairs is below this
MAX_SWEEPS = 1000  # a bound only: ResNet-50 (chains of 2 pairs) took 8, a chain of 4 pairs 16


@dataclass(frozen=True)
class Equalization:
    """What cross-layer equalization changed."""

    pairs: tuple[tuple[str, str], ...]  # (first layer, second layer), by node label
    sweeps: int  # passes over the pairs until the scales settled


class _Layer:
    """A Conv or Gemm's weight as float64 rows = output channels, (O, C / groups, ...), and its
    bias, rescaled in place."""

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None) -> None:
        self.node = node
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.transposed = node.op_type == "Gemm" and not attributes.get("transB", 0)
        self.transposed_input = bool(attributes.get("transA", 0))  # channels on A's rows
        self.groups = int(attributes.get("group", 1))
        rows = weight.T if self.transposed else weight
        self.rows = np.array(rows, np.float64, order="C")  # reshaped views write into it
        self.bias = None if bias is None else bias.astype(np.float64)
        # a Gemm's C may be (O,) or (1, O), scaled along its last axis; a C broadcast over the
        # rows, or a scalar, is not per output channel
        self.bias_per_channel = bias is None or bias.shape in ((self.outputs,), (1, self.outputs))

    @property
    def outputs(self) -> int:
        return self.rows.shape[0]

    @property
    def inputs(self) -> int:
        return self.rows.shape[1] * self.groups

    def _grouped(self) -> np.ndarray:
        """The rows as (groups, outputs per group, inputs per group, rest), a view."""
        return self.rows.reshape(self.groups, self.outputs // self.groups, self.rows.shape[1], -1)

    def output_ranges(self) -> np.ndarray:
        return np.abs(self.rows.reshape(self.outputs, -1)).max(axis=1)

    def input_ranges(self) -> np.ndarray:
        return np.abs(self._grouped()).max(axis=(1, 3)).reshape(-1)

    def scale_outputs(self, s: np.ndarray) -> None:
        self.rows /= s.reshape((-1,) + (1,) * (self.rows.ndim - 1))
        if self.bias is not None:
            self.bias = self.bias / s

    def scale_inputs(self, s: np.ndarray) -> None:
        grouped = self._grouped()
        grouped *= s.reshape(self.groups, 1, -1, 1)

    def weight(self) -> np.ndarray:
        return (self.rows.T if self.transposed else self.rows).astype(np.float32)


def equalize_layers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Equalization]:
    """`model` with every pair of layers that the module docstring allows equalized, and what
    was done. A model without such pairs comes back as an unchanged copy."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    constants = constant_values(result)
    pairs = _pairs(graph, constants)
    if not pairs:
        return result, Equalization((), 0)
    sweeps = _equalize(pairs)
    scope = NameScope(graph)
    replaced = set()
    rescaled = {id(layer): layer for pair in pairs for layer in pair}
    firsts = {id(first) for first, _ in pairs}
    for key, layer in rescaled.items():
        node = layer.node
        values = [(1, layer.weight())]
        if layer.bias is not None and key in firsts:
            values.append((2, layer.bias.astype(np.float32)))
        for index, value in values:
            name = scope.fresh(f"{node.input[index]}_equalized")
            graph.initializer.append(numpy_helper.from_array(value, name))
            replaced.add(node.input[index])
            node.input[index] = name
    drop_unused(graph, replaced, set(constants))
    return result, Equalization(
        tuple((node_label(a.node), node_label(b.node)) for a, b in pairs), sweeps)


def _pairs(graph: onnx.GraphProto, constants: dict[str, np.ndarray]
           ) -> list[tuple[_Layer, _Layer]]:
    """Every (first, second) layer pair that can be rescaled exactly, in graph order; a chain's
    middle layer is one object in both of its pairs."""
    readers = consumers(graph)
    outputs = output_names(graph)
    layers: dict[int, _Layer] = {}
    pairs = []
    for node in graph.node:
        first = _layer(node, constants, layers)
        if first is None or not first.bias_per_channel:
            continue
        second = _layer(_next_layer(node, readers, outputs), constants, layers)
        if second is not None and not second.transposed_input and first.outputs == second.inputs:
            pairs.append((first, second))
    return pairs


def _equalize(pairs: list[tuple[_Layer, _Layer]]) -> int:
    """Rescale the pairs in turn (s = sqrt(r1 / r2)) until the scales settle; the sweeps made."""
    for sweep in range(1, MAX_SWEEPS + 1):
        moved = 0.0
        for first, second in pairs:
            r1, r2 = first.output_ranges(), second.input_ranges()
            live = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[live] = np.sqrt(r1[live] / r2[live])
            first.scale_outputs(s)
            second.scale_inputs(s)
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < TOLERANCE:
            break
    return sweep


def _layer(node: onnx.NodeProto | None, constants: dict[str, np.ndarray],
           layers: dict[int, _Layer]) -> _Layer | None:
    """The node as a layer to rescale (the same object for both pairs of a chain's middle layer),
    or None when it is not a Conv or Gemm with a float32 constant weight (and bias)."""
    if node is None:
        return None
    if id(node) in layers:
        return layers[id(node)]
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[0] in constants:
        return None
    weight = constants.get(node.input[1])
    bias_name = node.input[2] if len(node.input) > 2 else ""
    bias = constants.get(bias_name) if bias_name else None
    if (weight is None or weight.dtype != np.float32 or (bias_name and bias is None)
            or (bias is not None and bias.dtype != np.float32)):
        return None
    groups = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
    shaped = (weight.ndim == 2 if node.op_type == "Gemm"
              else weight.ndim >= 3 and weight.shape[0] % groups == 0)
    if not shaped:
        return None
    layer = layers[id(node)] = _Layer(node, weight, bias)
    return layer


def _next_layer(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]],
                outputs: set[str]) -> onnx.NodeProto | None:
    """The node that reads `node`'s output as its data input through nothing but HOMOGENEOUS
    ops, each tensor on the way read by exactly one node and none a graph output; else None."""
    tensor = node.output[0]
    while True:
        after = readers.get(tensor, [])
        if tensor in outputs or len(after) != 1:
            return None
        (reader,) = after
        if list(reader.input).count(tensor) != 1 or reader.input[0] != tensor:
            return None  # read twice, or as a weight, bias or slope
        if reader.op_type in ("Conv", "Gemm"):
            return reader
        if reader.op_type not in HOMOGENEOUS or reader.domain not in ("", "ai.onnx") or len(
                [name for name in reader.output if name]) != 1:
            return None  # MaxPool's Indices output is not a channel value
        tensor = reader.output[0]
