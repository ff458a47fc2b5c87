"""Bias correction: remove the mean error that quantization adds to each Conv / Gemm output.

Rounding a layer's weights (and its input) shifts the mean of its outputs, channel by channel;
the next layers see that shift as a bias and pass it on. For each quantized Conv or Gemm whose input is
quantized per tensor, with an int32 bias (``b = b_q * s_b``, ``s_b = x_scale * w_scale[c]``) or
none (it gets one: the convolutions after DenseNet's BN-ReLUs have no bias), the shift is
measured on the calibration data, layer by layer with the float model's input to the layer (NNCF's fast bias
correction does the same)::

    y  = Conv(x, W) + b                                   # the float layer
    y' = Conv(DQ(Q(x)), DQ(W_q)) + b                       # quantized input and weights
    d[c] = mean over samples and positions of (y'[c] - y[c])
    b_q[c] <- b_q[c] - rint(d[c] / s_b[c])                 # int32, saturating

One onnxruntime run per batch computes every ``d``: the float model, plus for each layer a copy
that reads the float tensor through its quantizer and the dequantized integer weights, and a
``ReduceMean`` of the difference. Several quantized models (method ``auto``'s candidates,
``bnq.choice``) are corrected in the same run, each on all the samples or on those of one fold.
The integer formats are unchanged: int32 bias initializers get new values, and a layer without a
bias gets an int32 one (a DequantizeLinear that onnxruntime folds into its QLinearConv / QGemm,
as the others).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnq.choice import in_fold
from bnq.execution import Job, RunResult
from bnq.graph import NameScope, check, constant_values, producers


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
    weight: np.ndarray  # dequantized weight, float32
    bias_codes: str | None  # the int32 initializer; None: the layer has no bias yet
    bias_scale: np.ndarray  # x_scale * w_scale, per output channel
    axes: list[int]  # output axes averaged over per sample (the spatial axes of a Conv)


def correct_biases(models: Sequence[onnx.ModelProto], reference: onnx.ModelProto,
                   execute: Callable[[Job], RunResult], folds: Sequence[int] | None = None
                   ) -> list[tuple[onnx.ModelProto, BiasCorrection]]:
    """Each of ``models``, quantized from ``reference`` (the fused float model, same tensor
    names), with its int32 biases corrected by the mean shifts measured against ``reference``;
    ``execute`` runs a job over the calibration data (``bnq.execution.run`` with the data and
    options), ``folds[i]``, when given, the fold (``bnq.choice``) of the samples model i is
    corrected on, else all. One run measures every model: a layer depends only on its own input
    quantizer and weights, so a layer the models quantize alike is probed once."""
    layers = [_layers(model, reference) for model in models]
    subsets = list(folds or [None] * len(models))
    probed: dict[int | None, dict[tuple, _Layer]] = {subset: {} for subset in subsets}
    for model_layers, subset in zip(layers, subsets):
        for layer in model_layers:
            probed[subset].setdefault(_key(layer), layer)
    probed = {subset: found for subset, found in probed.items() if found}
    if not probed:
        return [(model, BiasCorrection(0, 0.0, 0.0)) for model in models]
    probes = [_probe(reference, list(found.values())) for found in probed.values()]
    job = Job(tuple(probe for probe, _ in probes), ("onnxruntime",) * len(probes),
              (tuple(tuple(names) for _, names in probes),),
              functools.partial(_Shifts, len(probes)), (),
              tuple(None if subset is None else functools.partial(in_fold, subset)
                    for subset in probed))
    shifts = execute(job).accumulator.means()
    where = {(subset, key): (index, name) for index, (subset, found) in enumerate(probed.items())
             for key, name in zip(found, probes[index][1])}
    return [_corrected(model, model_layers,
                       [shifts[where[subset, _key(layer)]] for layer in model_layers])
            for model, model_layers, subset in zip(models, layers, subsets)]


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


class _Shifts:
    """Accumulator of ``bnq.execution``: per probe model, each sample's per-channel mean shifts,
    kept in sample order (units merge in order), so that the means, and the model, are the same
    bit for bit however the work is split into micro-batches, passes and workers."""

    def __init__(self, probes: int) -> None:
        self.samples: list[dict[str, list[np.ndarray]]] = [{} for _ in range(probes)]

    def update(self, batch, fetched, groups) -> None:
        for mine, tensors in zip(self.samples, fetched):
            for name, shifts in tensors.items():
                mine.setdefault(name, []).append(shifts)

    def merge(self, other: _Shifts) -> None:
        for mine, theirs in zip(self.samples, other.samples):
            for name, parts in theirs.items():
                mine.setdefault(name, []).extend(parts)

    def means(self) -> dict[tuple[int, str], np.ndarray]:
        """(probe, tensor) -> the mean over the samples the probe ran on."""
        return {(index, name): np.concatenate(parts).astype(np.float64).mean(axis=0)
                for index, probe in enumerate(self.samples) for name, parts in probe.items()}


def _layers(quantized: onnx.ModelProto, reference: onnx.ModelProto) -> list[_Layer]:
    """The Conv / Gemm nodes with a per-tensor quantized input, and an int32 bias or none, whose
    float source and output exist in ``reference``."""
    constants = constant_values(quantized)
    writers = producers(quantized.graph)
    float_names = {name for node in reference.graph.node for name in node.output}
    float_names |= {value.name for value in reference.graph.input}
    found = []
    for node in quantized.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        if node.op_type == "Gemm" and any(a.name in ("alpha", "beta", "transA")
                                          and helper.get_attribute_value(a) not in (1, 1.0, 0)
                                          for a in node.attribute):
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
        if source not in float_names or node.output[0] not in float_names:
            continue
        w_codes, w_scale, w_zero_point = (constants[name] for name in w_dq.input[:3])
        w_axis = next((helper.get_attribute_value(a) for a in w_dq.attribute
                       if a.name == "axis"), 1)
        shape = [1] * w_codes.ndim
        shape[w_axis] = -1
        weight = ((w_codes.astype(np.float32) - w_zero_point.reshape(shape).astype(np.float32))
                  * w_scale.reshape(shape)).astype(np.float32)
        rank = weight.ndim if node.op_type == "Conv" else 2
        bias_scale = (constants[b_dq.input[1]] if b_dq is not None else np.broadcast_to(
            x_scale * w_scale, w_codes.shape[w_axis:w_axis + 1]).astype(np.float32))
        found.append(_Layer(node, source, (x_scale, x_zero_point), weight,
                            b_dq.input[0] if b_dq is not None else None,
                            bias_scale.astype(np.float64), list(range(2, rank))))
    return found


def _probe(reference: onnx.ModelProto, layers: list[_Layer]) -> tuple[onnx.ModelProto, list[str]]:
    """``reference`` plus, per layer, the quantized layer on the float input and, per sample and
    channel, the mean of its output minus the float layer's, as graph outputs (their names
    returned)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(reference)
    graph = probe.graph
    scope = NameScope(graph)
    writers = producers(graph)
    names = []
    for layer in layers:
        node, base = layer.node, layer.node.output[0]

        def constant(suffix, array):
            name = scope.fresh(f"{base}_{suffix}")
            graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
            return name

        scale = constant("x_scale", layer.input_qdq[0])
        zero_point = constant("x_zero_point", layer.input_qdq[1])
        codes = scope.fresh(f"{base}_x_codes")
        x = scope.fresh(f"{base}_x_dequantized")
        y = scope.fresh(f"{base}_quantized_layer")
        diff = scope.fresh(f"{base}_error")
        mean = scope.fresh(f"{base}_mean_error")
        float_layer = writers[base]  # as in the reference, with its float bias if it has one
        graph.node.extend([
            helper.make_node("QuantizeLinear", [layer.source, scale, zero_point], [codes],
                             name=scope.fresh(f"{base}_probe_quantize")),
            helper.make_node("DequantizeLinear", [codes, scale, zero_point], [x],
                             name=scope.fresh(f"{base}_probe_dequantize")),
            helper.make_node(node.op_type, [x, constant("weight", layer.weight),
                                            *float_layer.input[2:3]], [y],
                             name=scope.fresh(f"{base}_probe_layer"),
                             **{a.name: helper.get_attribute_value(a) for a in node.attribute}),
            helper.make_node("Sub", [y, base], [diff], name=scope.fresh(f"{base}_probe_sub")),
        ])
        if layer.axes:  # (N, C, ...) -> (N, C); a Gemm's (N, C) difference is that already
            graph.node.append(helper.make_node(
                "ReduceMean", [diff, constant("axes", np.array(layer.axes))], [mean], keepdims=0,
                name=scope.fresh(f"{base}_probe_mean")))
        else:
            mean = diff
        graph.output.append(helper.make_tensor_value_info(mean, onnx.TensorProto.FLOAT, None))
        names.append(mean)
    return probe, names
