"""Bias correction: remove the mean error that quantization adds to each Conv / Gemm output.

Rounding a layer's weights (and its input) shifts the mean of its outputs, channel by channel;
the next layers see that shift as a bias and pass it on. For each quantized Conv or Gemm whose
input is quantized per tensor, with an int32 bias (``b = b_q * s_b``, ``s_b = x_scale *
w_scale[c]``) or none (it gets one: the convolutions after DenseNet's BN-ReLUs have no bias), the
shift is measured on the calibration data, layer by layer with the float model's input to the
layer (NNCF's fast bias correction does the same)::

    y  = Conv(x, W) + b                                   # the float layer
    y' = Conv(x', W') + b,  x' = DQ(Q(x)), W' = DQ(W_q)   # quantized input and weights
    d[c] = mean over samples and positions of (y'[c] - y[c])
    b_q[c] <- b_q[c] - rint(d[c] / s_b[c])                 # int32, saturating

A convolution is linear, and the mean over output positions of ``Conv(z, K)[c]`` is
``sum over inputs i and kernel taps t of K[c, i, t] * T(z)[i, t]``, where ``T(z)[i, t]`` is the
mean of the input values that tap t reads (zero padding included). A tap's positions are a
strided box: along each spatial axis a, tap k reads the input positions p with ``A_a[p, k] = 1``
(``p = o * stride + k * dilation - pad_begin`` for some output position o), so T contracts z
with one small 0/1 matrix per axis. The float bias cancels::

    d[c] = sum over i, t of  W'[c, i, t] * mean T(x')[i, t]  -  W[c, i, t] * mean T(x)[i, t]
    T(x') = x_scale * (codes - zero_point, contracted with A_1 ... A_D) / positions

The trailing axes are contracted at once with the Kronecker product of their matrices while it
stays small (every axis of a 224 x 224 classifier's convolutions), the others one at a time (a
7x7 convolution of a 1024 x 2048 image would need 100 million entries at once). The codes go
through MatMulInteger (int32 sums of at most 255 * 2**22 values: a layer with a longer spatial
axis is left as it is) and int64 MatMuls: exact integers.
So the data pass runs the float model plus, per layer, its input's QuantizeLinear and a few
small MatMuls (float ones for T(x), with 1 / positions folded in), and the weights are applied
once, in float64, to the means. On DenseNet-121 (64 samples, 2-core AMD EPYC) that pass took
2.2 s, against 3.3 to 3.6 s for a probe with a second, quantized copy of every layer, and
MobileNetV2 0.74 s against 1.15 s; the corrections were the same but for 2 of DenseNet-121's
11,240 channels, rounded to the other side. A Gemm is the case without spatial axes
(T(z) = z); grouped and depthwise convolutions sum within their group.

The integer sums add up exactly in int64. T(x) is added as integers too, in units of
``2**(floor(log2 x_scale) - 24)`` (a sample's mean beyond 2**16 quantization steps of the input
would be clipped), so the sums, and the model, are the same bit for bit however the samples are
split into micro-batches, passes and workers, in memory that does not grow with the samples.

Several quantized models (method ``auto``'s candidates, ``bnq.choice``) are corrected in the same
run, each on all the samples or on those of one fold. The integer formats are unchanged: int32
bias initializers get new values, and a layer without a bias gets an int32 one (a
DequantizeLinear that onnxruntime folds into its QLinearConv / QGemm, as the others).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnq.choice import in_fold
from bnq.execution import Job, RunResult
from bnq.graph import NameScope, check, concrete_shapes, constant_values, producers
from bnq.quantization import dequantize_linear

_GRID_BITS = 24  # units per quantization step of the layer's input: 2**24 or more
_LIMIT = float(1 << 40)  # per-sample |value| in units: 2**16 steps at least; sums fit 2**23 samples
_JOINT_ENTRIES = 1 << 22  # of the matrix that contracts several spatial axes at once
# Input positions along one axis, at most: MatMulInteger's int32 sums stay exact (255 * 2**22 <
# 2**31) whether the axis is contracted alone or with others (_JOINT_ENTRIES bounds those).
_LONGEST_AXIS = 1 << 22


@dataclass(frozen=True)
class BiasCorrection:
    """What bias correction changed: layers corrected and the mean shifts it removed."""

    layers: int
    mean_abs_shift: float  # mean over layers and channels of |d|, in the layers' output units
    max_abs_shift: float


@dataclass(frozen=True)
class _Layer:
    node: onnx.NodeProto  # the quantized Conv / Gemm
    source: str  # the float tensor its input quantizer reads
    input_qdq: tuple[np.ndarray, np.ndarray]  # per-tensor scale, zero point of that input
    weight: np.ndarray  # dequantized weight as (groups, outputs / groups, inputs / groups * taps)
    float_weight: np.ndarray  # the float layer's, the same way
    taps: tuple[np.ndarray, ...]  # per spatial axis, A_a: (input size, kernel size) of 0 and 1
    positions: int  # output positions per channel
    bias_codes: str | None  # the int32 initializer; None: the layer has no bias yet
    bias_scale: np.ndarray  # x_scale * w_scale, per output channel

    @property
    def inputs(self) -> int:
        """Input channels (features of a Gemm)."""
        return len(self.weight) * self.weight.shape[2] // math.prod(len(a.T) for a in self.taps)

    @property
    def exponent(self) -> int:
        """The units of its sums: 2**exponent."""
        return math.frexp(float(self.input_qdq[0]))[1] - 1 - _GRID_BITS


def correct_biases(models: Sequence[onnx.ModelProto], reference: onnx.ModelProto,
                   sample_shapes: dict[str, tuple[int, ...]], execute: Callable[[Job], RunResult],
                   folds: Sequence[int] | None = None
                   ) -> list[tuple[onnx.ModelProto, BiasCorrection]]:
    """Each of ``models``, quantized from ``reference`` (the fused float model, same tensor
    names), with its int32 biases corrected by the mean shifts measured against ``reference``
    on data whose samples have ``sample_shapes`` (per input, the batch axis left out; a layer
    whose input shape inference cannot tell is left as it is); ``execute`` runs a job over the
    calibration data (``bnq.execution.run`` with the data and options), ``folds[i]``, when given,
    the fold (``bnq.choice``) of the samples model i is corrected on, else all. One run measures
    every model: a layer depends only on its own input quantizer and weights, so a layer the
    models quantize alike is probed once."""
    known = _Reference(reference, sample_shapes)
    layers = [_layers(model, known) for model in models]
    keys = [[_key(layer) for layer in model_layers] for model_layers in layers]
    subsets = list(folds or [None] * len(models))
    probed: dict[int | None, dict[tuple, _Layer]] = {subset: {} for subset in subsets}
    for model_layers, model_keys, subset in zip(layers, keys, subsets):
        for layer, key in zip(model_layers, model_keys):
            probed[subset].setdefault(key, layer)
    probed = {subset: found for subset, found in probed.items() if found}
    if not probed:
        return [(model, BiasCorrection(0, 0.0, 0.0)) for model in models]
    probes = [_probe(reference, list(found.values())) for found in probed.values()]
    exponents = tuple(units for _, _, units in probes)
    job = Job(tuple(probe for probe, _, _ in probes), ("onnxruntime",) * len(probes),
              (tuple(tuple(units) for units in exponents),),
              functools.partial(_TapSums, exponents), (),
              tuple(None if subset is None else functools.partial(in_fold, subset)
                    for subset in probed))
    means = execute(job).accumulator.means()
    shifts = {(subset, key): _shift(layer, means[index, error], means[index, value])
              for index, (subset, found) in enumerate(probed.items())
              for (key, layer), (error, value) in zip(found.items(), probes[index][1])}
    return [_corrected(model, model_layers, [shifts[subset, key] for key in model_keys])
            for model, model_layers, model_keys, subset in zip(models, layers, keys, subsets)]


def _shift(layer: _Layer, code_sums: np.ndarray, value: np.ndarray) -> np.ndarray:
    """d per output channel from the means of the code tap sums and of T(x) (module
    docstring), whose taps come in `_tap_order`."""
    groups, order = len(layer.weight), _tap_order(layer.taps)

    def per_group(means):
        taps = means.reshape(layer.inputs, *(len(layer.taps[axis].T) for axis in order))
        return taps.transpose(0, *(1 + order.index(axis) for axis in range(len(order)))
                              ).reshape(groups, -1)

    dequantized = per_group(code_sums) * (float(layer.input_qdq[0]) / layer.positions)
    return (np.einsum("gok,gk->go", layer.weight.astype(np.float64), dequantized)
            - np.einsum("gok,gk->go", layer.float_weight.astype(np.float64),
                        per_group(value))).reshape(-1)


def _joint(taps: tuple[np.ndarray, ...]) -> int:
    """How many trailing axes `_probe` contracts at once: as many as keep their Kronecker
    product within _JOINT_ENTRIES, at least one: every axis, for the convolutions of a 224 x 224
    classifier (one MatMul per tensor: DenseNet-121's pass took 2.2 s, against 2.4 s with every
    axis apart, 64 samples)."""
    count, entries = 1, taps[-1].size
    while count < len(taps) and entries * taps[-count - 1].size <= _JOINT_ENTRIES:
        count += 1
        entries *= taps[-count].size
    return count


def _tap_order(taps: tuple[np.ndarray, ...]) -> list[int]:
    """The spatial axes whose taps `_probe`'s outputs hold, outer to inner: the joint trailing
    axes in order, then the others from the last to the first."""
    first = len(taps) - _joint(taps)
    return [*range(first, len(taps)), *range(first - 1, -1, -1)]


def _corrected(quantized: onnx.ModelProto, layers: list[_Layer], shifts: list[np.ndarray]
               ) -> tuple[onnx.ModelProto, BiasCorrection]:
    if not layers:
        return quantized, BiasCorrection(0, 0.0, 0.0)
    result = onnx.ModelProto()
    result.CopyFrom(quantized)
    graph = result.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    info = np.iinfo(np.int32)
    scope = NameScope(graph)
    added = {}  # layer output -> the DequantizeLinear of its new bias
    for layer, shift in zip(layers, shifts):
        codes = -np.rint(shift / layer.bias_scale).astype(np.int64)
        if layer.bias_codes is None:
            added[layer.node.output[0]] = _new_bias(graph, scope, layer, np.clip(
                codes, info.min, info.max).astype(np.int32))
            continue
        tensor = initializers[layer.bias_codes]
        codes += numpy_helper.to_array(tensor).astype(np.int64)
        tensor.CopyFrom(numpy_helper.from_array(np.clip(codes, info.min, info.max)
                                                .astype(np.int32), tensor.name))
    if added:
        nodes = []
        for node in graph.node:
            if node.output[0] in added:
                dequantize = added[node.output[0]]
                nodes.append(dequantize)
                del node.input[2:]  # an empty name, if the bias was given as one
                node.input.append(dequantize.output[0])
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    check(result, "the bias-corrected model")
    flat = np.abs(np.concatenate(shifts))
    return result, BiasCorrection(len(layers), float(flat.mean()), float(flat.max()))


def _new_bias(graph: onnx.GraphProto, scope: NameScope, layer: _Layer,
              codes: np.ndarray) -> onnx.NodeProto:
    """Initializers for a bias-less layer's new int32 bias and the DequantizeLinear reading them
    (added to the graph before the layer by the caller)."""
    base = layer.node.output[0]
    names = [scope.fresh(f"{base}_{suffix}") for suffix in ("bias_quantized", "bias_scale",
                                                            "bias_zero_point", "bias")]
    graph.initializer.extend(numpy_helper.from_array(array, name) for array, name in zip(
        (codes, layer.bias_scale.astype(np.float32), np.zeros(codes.shape, np.int32)), names))
    return helper.make_node("DequantizeLinear", names[:3], names[3:], axis=0,
                            name=scope.fresh(f"{base}_bias_DequantizeLinear"))


def _key(layer: _Layer) -> tuple:
    """What a layer's shift depends on: the layer, its input quantizer and its weights."""
    return (layer.node.output[0], layer.source, layer.input_qdq[0].tobytes(),
            layer.input_qdq[1].tobytes(), hashlib.sha256(layer.weight.tobytes()).digest())


class _TapSums:
    """Accumulator of ``bnq.execution``: per probe model and fetched tensor, the per-sample
    values summed as int64 in the tensor's units (module docstring), and the samples counted."""

    def __init__(self, exponents: tuple[dict[str, int], ...]) -> None:
        self.exponents = exponents
        self.sums: list[dict[str, np.ndarray]] = [{} for _ in exponents]
        self.counts: list[dict[str, int]] = [{} for _ in exponents]

    def update(self, batch, fetched, groups) -> None:
        for exponents, sums, counts, tensors in zip(self.exponents, self.sums, self.counts,
                                                    fetched):
            for name, values in tensors.items():
                values = values.reshape(len(values), -1)
                if values.dtype.kind == "f":
                    values = np.clip(np.rint(np.ldexp(values.astype(np.float64),
                                                      -exponents[name])), -_LIMIT, _LIMIT)
                total = values.astype(np.int64).sum(axis=0)
                sums[name] = sums[name] + total if name in sums else total
                counts[name] = counts.get(name, 0) + len(values)

    def merge(self, other: _TapSums) -> None:
        for sums, counts, their_sums, their_counts in zip(self.sums, self.counts, other.sums,
                                                          other.counts):
            for name, total in their_sums.items():
                sums[name] = sums[name] + total if name in sums else total
                counts[name] = counts.get(name, 0) + their_counts[name]

    def means(self) -> dict[tuple[int, str], np.ndarray]:
        """(probe, tensor) -> the float64 mean over the samples the probe ran on."""
        return {(index, name): np.ldexp(total.astype(np.float64), exponents[name])
                / counts[name]
                for index, (exponents, sums, counts) in enumerate(zip(
                    self.exponents, self.sums, self.counts))
                for name, total in sums.items()}


class _Reference:
    """What the layers need of the float model: its constants, producers, tensor names and
    shapes at one sample of the data."""

    def __init__(self, reference: onnx.ModelProto, sample_shapes: dict[str, tuple[int, ...]]
                 ) -> None:
        self.constants = constant_values(reference)
        self.writers = producers(reference.graph)
        self.shapes = {name: shape for name, (shape, _) in concrete_shapes(
            reference, {name: (1, *shape) for name, shape in sample_shapes.items()}).items()}


def _layers(quantized: onnx.ModelProto, reference: _Reference) -> list[_Layer]:
    """The Conv / Gemm nodes with a per-tensor quantized input, and an int32 bias or none, whose
    float layer exists in ``reference`` with constant weights and known input and output
    shapes."""
    constants = constant_values(quantized)
    writers = producers(quantized.graph)
    found = []
    for node in quantized.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attributes.get("alpha", 1.0) != 1.0
                                       or attributes.get("beta", 1.0) != 1.0
                                       or attributes.get("transA", 0)):
            continue
        x_dq, w_dq = (writers.get(name) for name in node.input[:2])
        b_dq = writers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if not all(n is not None and n.op_type == "DequantizeLinear" for n in (x_dq, w_dq)):
            continue
        if len(node.input) > 2 and node.input[2] and not (
                b_dq is not None and b_dq.op_type == "DequantizeLinear"
                and constants.get(b_dq.input[0], np.zeros(0)).dtype == np.int32):
            continue
        x_scale, x_zero_point = (constants.get(name) for name in x_dq.input[1:3])
        if x_scale is None or x_zero_point is None or x_scale.ndim:
            continue
        before = writers.get(x_dq.input[0])
        source = before.input[0] if before is not None and before.op_type == "QuantizeLinear" \
            else x_dq.output[0]  # a fused BN-ReLU's codes: its float output keeps this name
        float_layer = reference.writers.get(node.output[0])
        float_weight = None if float_layer is None else reference.constants.get(
            float_layer.input[1])
        in_shape, out_shape = (reference.shapes.get(name) for name in (source, node.output[0]))
        if (float_weight is None or in_shape is None or out_shape is None
                or any(size > _LONGEST_AXIS for size in in_shape[2:])):
            continue
        w_codes, w_scale, w_zero_point = (constants[name] for name in w_dq.input[:3])
        w_axis = next((helper.get_attribute_value(a) for a in w_dq.attribute
                       if a.name == "axis"), 1)
        weight = dequantize_linear(w_codes, w_scale, w_zero_point, w_axis)
        bias_scale = (constants[b_dq.input[1]] if b_dq is not None else np.broadcast_to(
            x_scale * w_scale, w_codes.shape[w_axis:w_axis + 1]).astype(np.float32))
        if node.op_type == "Conv":
            taps = _taps(attributes, weight.shape[2:], in_shape[2:], out_shape[2:])
            as_matrix = functools.partial(_grouped, groups=attributes.get("group", 1))
        else:
            taps = (np.ones((1, 1), np.int8),)  # (N, features) read as (N, features, 1)
            as_matrix = functools.partial(_gemm_matrix, transposed=attributes.get("transB", 0))
        found.append(_Layer(node, source, (x_scale, x_zero_point), as_matrix(weight),
                            as_matrix(float_weight), taps, math.prod(out_shape[2:]),
                            b_dq.input[0] if b_dq is not None else None,
                            bias_scale.astype(np.float64)))
    return found


def _grouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """A Conv weight (outputs, inputs / groups, kernel...) as (groups, outputs / groups, rest)."""
    return weight.reshape(groups, len(weight) // groups, -1)


def _gemm_matrix(weight: np.ndarray, transposed: int) -> np.ndarray:
    """A Gemm's B (inputs, outputs), or (outputs, inputs) if `transposed`, as (1, outputs,
    inputs)."""
    return (weight if transposed else weight.T)[None]


def _taps(attributes: dict, kernel: Sequence[int], inputs: Sequence[int],
          outputs: Sequence[int]) -> tuple[np.ndarray, ...]:
    """A_a (module docstring) of each spatial axis of a Conv with these attributes and sizes."""
    rank = len(kernel)
    strides = attributes.get("strides", [1] * rank)
    dilations = attributes.get("dilations", [1] * rank)
    pads = attributes.get("pads", [0] * 2 * rank)
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    matrices = []
    for axis, (size, out, k) in enumerate(zip(inputs, outputs, kernel)):
        stride, dilation = strides[axis], dilations[axis]
        total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
        begin = {"SAME_UPPER": total // 2, "SAME_LOWER": total - total // 2,
                 "VALID": 0}.get(auto_pad, pads[axis])
        read = np.arange(out)[:, None] * stride + np.arange(k) * dilation - begin  # (out, k)
        inside = (read >= 0) & (read < size)
        a = np.zeros((size, k), np.int8)
        a[read[inside], np.nonzero(inside)[1]] = 1
        matrices.append(a)
    return tuple(matrices)


def _probe(reference: onnx.ModelProto, layers: list[_Layer]
           ) -> tuple[onnx.ModelProto, list[tuple[str, str]], dict[str, int]]:
    """``reference`` plus, per layer, graph outputs per sample: the tap sums of its input codes
    minus their zero point (exact integers) and T(x): their names per layer, and each output's
    exponent (its units; 0 for the integer sums). Layers reading the same tensor in the same
    units through the same taps share its T(x)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(reference)
    graph = probe.graph
    scope = NameScope(graph)
    names, exponents = [], {}
    shared: dict[tuple, str] = {}
    initializers: dict[tuple, str] = {}

    def constant(base, array):
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in initializers:
            initializers[key] = scope.fresh(base)
            graph.initializer.append(numpy_helper.from_array(array, initializers[key]))
        return initializers[key]

    def node(op, inputs, base, **attributes):
        output = scope.fresh(base)
        graph.node.append(helper.make_node(op, inputs, [output], name=scope.fresh(f"{base}_{op}"),
                                           **attributes))
        return output

    def contracted(tensor, layer, base, zero_point=None):
        """`tensor` as (N, inputs, sizes...) contracted with each axis's A_a (module docstring):
        the trailing axes of `_joint` at once, with their Kronecker product, then each other axis
        by a MatMul from the right after moving it last, so that the taps come in `_tap_order`.
        Codes minus `zero_point` by MatMulInteger, then in int64; without a zero point the float
        tensor, with 1 / positions in the first matrix."""
        sizes = [len(a) for a in layer.taps]
        first = len(sizes) - _joint(layer.taps)
        block = functools.reduce(np.kron, layer.taps[first:])
        current = node("Reshape", [tensor, constant("probe_shape", np.array(
            [0, layer.inputs, *sizes[:first], -1]))], f"{base}_shaped")
        if zero_point is None:
            current = node("MatMul", [current, constant("probe_taps", (
                block / layer.positions).astype(np.float32))], f"{base}_contracted")
        else:
            current = node("MatMulInteger", [current, constant("probe_taps", block.astype(
                layer.input_qdq[1].dtype)), zero_point], f"{base}_contracted")
            if first:
                current = node("Cast", [current], f"{base}_exact", to=onnx.TensorProto.INT64)
        dtype = np.float32 if zero_point is None else np.int64
        for axis in reversed(range(first)):  # (..., size, taps so far) -> its taps last
            current = node("Reshape", [current, constant("probe_shape", np.array(
                [0, layer.inputs, *sizes[:axis + 1], -1]))], f"{base}_shaped")
            current = node("Transpose", [current], f"{base}_moved",
                           perm=[*range(axis + 2), axis + 3, axis + 2])
            current = node("MatMul", [current, constant("probe_taps", layer.taps[axis].astype(
                dtype))], f"{base}_contracted")
        kind = (onnx.TensorProto.FLOAT if zero_point is None else onnx.TensorProto.INT64
                if first else onnx.TensorProto.INT32)
        graph.output.append(helper.make_tensor_value_info(current, kind, None))
        exponents[current] = 0 if zero_point is not None else layer.exponent
        return current

    for layer in layers:
        base = layer.node.output[0]
        scale, zero_point = (constant(f"{base}_x_{what}", array)
                             for what, array in zip(("scale", "zero_point"), layer.input_qdq))
        codes = node("QuantizeLinear", [layer.source, scale, zero_point], f"{base}_x_codes")
        key = (layer.source, tuple((a.shape, a.tobytes()) for a in layer.taps),
               layer.positions, layer.exponent)
        if key not in shared:
            shared[key] = contracted(layer.source, layer, f"{base}_x_tap_means")
        names.append((contracted(codes, layer, f"{base}_x_code_sums", zero_point), shared[key]))
    return probe, names, exponents
