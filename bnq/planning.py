"""What `bnq.calibrate` quantizes in a fused float model: the tensors that get a per-tensor
quantizer (the activations that integer ops read and write), the fused BN-ReLUs, the BN inputs
that are Concats of quantized branches (kept as integer codes, each branch with its own scale)
and those that get their own per-channel quantizer, the Clip bounds a range must stay inside,
and the classifier's input, which keeps its observed range under every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from bnq import ops
from bnq.graph import constant_values, consumers, output_names, producers, shape_sketch

WEIGHTED = ("Conv", "Gemm", "MatMul")
# Ops whose integer kernels in onnxruntime beat float: their activation inputs and outputs are
# quantized. Add (QLinearAdd): the digits sample's residual Add, 1 thread, AVX-512 VNNI: the model
# 1.43x faster at batch 32 and 1.03 vs 0.85x float at batch 1 with it, same SQNR (37.9 dB). Left
# out, as measured slower than float (onnxruntime 1.32, AVX2): QLinearAveragePool, 13x slower than
# AveragePool on the sample (a 1x1 Conv + AveragePool is folded into one Conv instead:
# `bnq.rewrites`).
QUANTIZED_IO = ("GlobalAveragePool", "MaxPool", "Add")
# What may stand between a classifier and the features it reads (`_final_inputs`).
_FINAL_CHAIN = ("Flatten", "Reshape", "Squeeze", "GlobalAveragePool", "GlobalMaxPool",
                "AveragePool", "MaxPool", "ReduceMean", "Relu", "Clip")
# Ops that move or pick values without changing them: their output reuses their input's
# parameters. MaxPool too: onnxruntime then runs it on the codes with no requantization, which
# its own range, narrower for the histogram methods, cost (1 DequantizeLinear, 1 QuantizeLinear
# and 2 Transposes more in ResNet-50's optimized graph).
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool")


@dataclass
class Plan:
    """What to quantize in a fused float model."""

    activations: list[str]  # per-tensor QDQ, in graph order
    aliases: dict[str, str]  # pass-through output -> the input whose parameters it reuses
    batch_norms: list[onnx.NodeProto]
    bn_inputs: list[str]  # BN inputs that get their own per-channel observer
    concat_sources: dict[str, onnx.NodeProto]  # BN input -> the Concat of quantized branches
    shapes: dict[str, tuple[int, int]]  # tensor -> (rank, channels), where shape inference knows
    clips: dict[str, tuple[float, float]]  # a Clip's output -> its bounds, which its range respects
    producers: dict[str, onnx.NodeProto]
    full_range: set[str]  # tensors that keep their observed min/max whatever the method


def plan_quantization(model: onnx.ModelProto) -> Plan:
    """The Plan of a fused float model (`bnq.calibrate.prepare`)."""
    graph = model.graph
    constants = constant_values(model)
    readers = consumers(graph)
    writers = producers(graph)
    outputs = output_names(graph)
    wanted: list[str] = []

    def want(name: str) -> None:
        if name and name not in constants and name not in outputs and name not in wanted:
            wanted.append(name)

    for value in graph.input:
        if any(r.op_type in WEIGHTED + QUANTIZED_IO for r in readers.get(value.name, [])):
            want(value.name)
    batch_norms = []
    clips = {}
    for node in graph.node:
        bounds = _activation_bounds(node, constants)
        if node.domain == ops.DOMAIN and node.op_type == "BatchNormRelu":
            batch_norms.append(node)
        elif bounds is not None:  # onnxruntime folds it into the quantizer after it
            want(node.output[0])
            if node.op_type == "Clip":
                clips[node.output[0]] = bounds
        elif (node.op_type in WEIGHTED and node.input[1] in constants
              or node.op_type in QUANTIZED_IO):
            for name in node.input[:1] if node.op_type in WEIGHTED else node.input:
                want(name)
            after = readers.get(node.output[0], [])
            if not (len(after) == 1 and _activation_bounds(after[0], constants)):
                want(node.output[0])  # else the activation's output: onnxruntime fuses it
    bn_outputs = {node.output[0] for node in batch_norms}
    activations = [name for name in wanted if name not in bn_outputs]
    aliases = {}
    for name in list(activations):
        node = writers.get(name)
        if node is not None and node.op_type in PASS_THROUGH and node.input[0] in activations:
            aliases[name] = node.input[0]
            activations.remove(name)
    sourced = set(activations) | bn_outputs | set(aliases)
    shapes = _channel_counts(model)
    concat_sources, bn_inputs = {}, []
    for node in batch_norms:
        x = node.input[0]
        if x in sourced:
            continue
        concat = writers.get(x)
        if concat is not None and _is_channel_concat(concat, shapes, sourced, writers):
            concat_sources[x] = concat
        elif x not in bn_inputs:
            bn_inputs.append(x)
    return Plan(activations, aliases, batch_norms, bn_inputs, concat_sources, shapes, clips,
                 writers, _final_inputs(graph, constants, readers, writers, outputs))


def _final_inputs(graph: onnx.GraphProto, constants: dict[str, np.ndarray], readers: dict,
                  writers: dict, outputs: set[str]) -> set[str]:
    """The inputs of the layers that write model outputs (a classifier's Gemm) through pooling
    or reshaping, back through those ops (and activations) to the tensor they start from: the
    pooled features the logits are read from. Their largest values carry the classes, and no
    later layer averages a clipping error there: under every method they keep their observed
    min/max (on DenseNet-121, mse clipping that vector alone cost 0.75 dB of logit SQNR)."""
    found = set()
    for node in graph.node:
        if node.op_type in WEIGHTED and node.input[1] in constants and node.output[0] in outputs:
            chain, name = [], node.input[0]
            while (name in writers and writers[name].op_type in _FINAL_CHAIN
                   and len(readers.get(name, [])) == 1):
                chain.append(name)
                name = writers[name].input[0]
            if any(writers[link].op_type not in ("Relu", "Clip") for link in chain):
                found.update(chain, [name])  # features pooled or flattened for the classifier
    return found


def _activation_bounds(node: onnx.NodeProto, constants: dict[str, np.ndarray]
                       ) -> tuple[float, float] | None:
    """(min, max) of a Relu or of a Clip with constant bounds and min <= 0 <= max, else None.

    onnxruntime folds such an activation into the QuantizeLinear after it (ReluQuantFusion,
    ClipQuantFusion) when the quantized range lies inside its bounds, and then the op before it
    (Conv, Gemm, Add) into one integer op: so after such ops only the activation's output is
    quantized, and the integer op's clamp is the activation (ReLU6 in MobileNets)."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip" or not all(name in constants for name in node.input[1:] if name):
        return None
    names = list(node.input[1:]) + ["", ""]
    low = float(constants[names[0]]) if names[0] else -float("inf")
    high = float(constants[names[1]]) if names[1] else float("inf")
    return (low, high) if low <= 0 <= high else None


def _channel_counts(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Tensor name -> (rank, channels) where shape inference knows both."""
    inferred = onnx.shape_inference.infer_shapes(shape_sketch(model))
    counts = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value"):
            counts[value.name] = (len(dims), dims[1].dim_value)
    return counts


def _is_channel_concat(node: onnx.NodeProto, shapes: dict, sourced: set[str],
                       writers: dict[str, onnx.NodeProto]) -> bool:
    """A Concat along the channel axis whose inputs all have integer codes (or are such Concats)."""
    if node.op_type != "Concat" or node.output[0] not in shapes:
        return False
    rank = shapes[node.output[0]][0]
    axis = helper.get_attribute_value(node.attribute[0])
    if axis % rank != 1:
        return False
    for name in node.input:
        if name not in shapes:
            return False
        if name not in sourced and not (
                name in writers and _is_channel_concat(writers[name], shapes, sourced, writers)):
            return False
    return True
