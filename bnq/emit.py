"""The quantized model that `bnq.calibrate` writes, emitted node by node from a fused float model,
its `bnq.planning.Plan` and each tensor's quantization parameters (the layout of the quantized
model is described in `bnq.calibrate`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnq import ops
from bnq.graph import NameScope, constant_values, output_names, reads
from bnq.machine import IntegerFormats
from bnq.planning import WEIGHTED, Plan
from bnq.qops import (
    INPUTS,
    INTEGER_INPUTS,
    body_for,
    float_output_scale,
    integer_output_scale,
)
from bnq.quantization import QuantParams, quantize, weight_qparams
from bnq.rounding import weight_axis


class _Builder:
    """Emits the quantized graph node by node; `codes` maps a float tensor to the name of its
    integer codes and their scale and zero point (0-d per tensor, [C] per channel)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.scope = NameScope(model.graph)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.codes: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.scope.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output_base: str, **attrs) -> str:
        output = self.scope.fresh(output_base)
        self.nodes.append(helper.make_node(op, inputs, [output],
                                           name=self.scope.fresh(f"{output_base}_{op}"), **attrs))
        return output

    def quantize(self, name: str, q: QuantParams) -> str:
        """QuantizeLinear of float tensor `name` (per channel on axis 1 for [C] parameters)."""
        params = [self.constant(f"{name}_scale", q.scale),
                  self.constant(f"{name}_zero_point", q.zero_point)]
        codes = self.node("QuantizeLinear", [name, *params], f"{name}_quantized",
                          **({"axis": 1} if q.scale.ndim else {}))
        self.codes[name] = (codes, q.scale, q.zero_point)
        return codes

    def dequantize(self, codes: str, scale: np.ndarray, zero_point: np.ndarray, base: str,
                   axis: int = 1) -> str:
        params = [self.constant(f"{base}_scale", scale),
                  self.constant(f"{base}_zero_point", zero_point)]
        return self.node("DequantizeLinear", [codes, *params], f"{base}_dequantized",
                         **({"axis": axis} if np.ndim(scale) else {}))



def quantized_model(model: onnx.ModelProto, plan: Plan, qparams: dict[str, QuantParams],
                    formats: IntegerFormats, rounded: dict[str, np.ndarray]
                    ) -> tuple[onnx.ModelProto, dict[str, QuantParams], str]:
    """The quantized model, its weights' parameters and the body of its fused BN-ReLU nodes
    (`bnq.qops.BODIES`; bias correction, after, changes no BN-ReLU)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    constants = constant_values(result)
    build = _Builder(result)
    rename: dict[str, str] = {}  # float tensor -> its quantize-dequantized copy, for readers
    weights: dict[str, QuantParams] = {}
    qdq = set(plan.activations) | set(plan.aliases)

    def emit_qdq(name: str) -> None:
        q = qparams[name]
        rename[name] = build.dequantize(build.quantize(name, q), q.scale, q.zero_point, name)

    for value in graph.input:
        if value.name in qdq:
            emit_qdq(value.name)
    for node in graph.node:
        if node.domain == ops.DOMAIN and node.op_type == "BatchNormRelu":
            _emit_batch_norm(build, node, plan, qparams, constants)
            continue
        source = node.input[0] if node.input else ""
        # a per-channel BN input is computed from float tensors: onnxruntime would fuse
        # DequantizeLinear -> op -> its per-channel QuantizeLinear into a QLinear op (such as
        # QLinearAveragePool) that takes no per-channel scale, and refuse to load the model
        node = _copy_renamed(node, {} if node.output[0] in plan.bn_inputs else rename)
        if node.op_type in WEIGHTED and node.input[1] in constants:
            weights |= _quantize_weights(build, node, constants, build.codes.get(source), formats,
                                         rounded.get(node.input[1]))
        build.nodes.append(node)
        for name in node.output:
            if name in qdq:
                emit_qdq(name)

    fused = [node for node in build.nodes if node.domain == ops.DOMAIN]
    integer = bool(fused) and all(len(node.input) > len(INPUTS) for node in fused)
    if not integer:
        for node in fused:  # one body serves every node: all integer, or none
            del node.input[len(INPUTS):]
            kept = [a for a in node.attribute if a.name != "channels"]
            del node.attribute[:]
            node.attribute.extend(kept)
    del graph.node[:]
    graph.node.extend(_live(build.nodes, output_names(graph)))
    graph.initializer.extend(build.initializers)
    used = {name for node in graph.node for name in reads(node)}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    # each node's integer parameters were checked on every input code as they were found
    # (`bnq.integer.integer_affine`), so only a model without them needs body_for's checks
    body = "integer" if integer else body_for(result)
    return ops.attach_functions(result, body), weights, body



def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes whose results are still read: a float Concat whose readers now take the
    integer Concat beside it is left with none (ONNX nodes have no side effects)."""
    live = list(nodes)
    while True:
        read = {name for node in live for name in reads(node)} | outputs
        kept = [node for node in live if any(name in read for name in node.output)]
        if len(kept) == len(live):
            return live
        live = kept



def _copy_renamed(node: onnx.NodeProto, rename: dict[str, str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for index, name in enumerate(copy.input):
        copy.input[index] = rename.get(name, name)
    return copy



def _emit_batch_norm(build: _Builder, node: onnx.NodeProto, plan: Plan,
                     qparams: dict[str, QuantParams], constants: dict[str, np.ndarray]) -> None:
    """QLinearBatchNormRelu on integer codes of the input, then DequantizeLinear for readers."""
    x = node.input[0]
    if x in plan.concat_sources:
        _emit_concat(build, plan.concat_sources[x], plan)
    elif x not in build.codes:
        build.quantize(x, qparams[x])
    codes, x_scale, x_zero_point = build.codes[x]
    y, q = node.output[0], qparams[node.output[0]]
    epsilon = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"),
                   1e-5)
    params = (x_scale, x_zero_point, *(constants[name] for name in node.input[1:5]),
              float(np.float32(epsilon)), q.scale, q.zero_point)
    scale, affine = integer_output_scale(*params) or (float_output_scale(*params), None)
    q = qparams[y] = dataclasses.replace(q, scale=np.asarray(scale, np.float32))
    inputs = [codes, build.constant(f"{x}_scale", x_scale),
              build.constant(f"{x}_zero_point", x_zero_point), *node.input[1:5],
              build.constant(f"{y}_scale", q.scale), build.constant(f"{y}_zero_point", q.zero_point)]
    rank = plan.shapes.get(x, (0, 0))[0]
    if affine is not None and rank in (3, 4, 5):
        kernel = affine.weight.reshape((-1,) + (1,) * (rank - 1))
        inputs += [build.constant(f"{node.name}_{name}", value) for name, value in
                   zip(INTEGER_INPUTS, (kernel, affine.scale, affine.bias))]
    y_codes = build.scope.fresh(f"{y}_quantized")
    fused = helper.make_node("QLinearBatchNormRelu", inputs, [y_codes],
                             name=node.name, domain=ops.DOMAIN)
    fused.attribute.extend(a for a in node.attribute if a.name == "epsilon")
    if len(inputs) > len(INPUTS):
        fused.attribute.append(helper.make_attribute("channels", len(affine.scale)))
    build.nodes.append(fused)
    build.codes[y] = (y_codes, q.scale, q.zero_point)
    build.nodes.append(helper.make_node(
        "DequantizeLinear", [y_codes, build.constant(f"{y}_scale", q.scale),
                             build.constant(f"{y}_zero_point", q.zero_point)], [y],
        name=build.scope.fresh(f"{y}_DequantizeLinear")))



def _emit_concat(build: _Builder, concat: onnx.NodeProto, plan: Plan) -> None:
    """Concatenate the integer codes of `concat`'s inputs, each branch keeping its own scale and
    zero point, repeated over its channels."""
    if concat.output[0] in build.codes:
        return
    names, scales, zero_points = [], [], []
    for name in concat.input:
        if name not in build.codes:
            _emit_concat(build, plan.producers[name], plan)
        codes, scale, zero_point = build.codes[name]
        channels = plan.shapes[name][1]
        names.append(codes)
        scales.append(np.broadcast_to(scale, (channels,)))
        zero_points.append(np.broadcast_to(zero_point, (channels,)))
    codes = build.node("Concat", names, f"{concat.output[0]}_quantized", axis=1)
    build.codes[concat.output[0]] = (codes, np.concatenate(scales), np.concatenate(zero_points))



def _quantize_weights(build: _Builder, node: onnx.NodeProto, constants: dict[str, np.ndarray],
                      source: tuple[str, np.ndarray, np.ndarray] | None,
                      formats: IntegerFormats, rounded: np.ndarray | None) -> dict[str, QuantParams]:
    """Replace the node's weight, and its bias when the input is quantized, by DequantizeLinear
    of integer initializers: int8 per output channel (the `rounded` codes, else the nearest),
    int32 bias at x_scale * w_scale."""
    weight_name = node.input[1]
    weight = constants[weight_name]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = weight_axis(node, weight.ndim)
    q = weight_qparams(weight, axis=axis, dtype=np.dtype(formats.weight),
                       reduce_range=formats.reduce_range)
    codes = build.constant(f"{weight_name}_quantized",
                           quantize(weight, q, axis=axis) if rounded is None else rounded)
    node.input[1] = build.dequantize(codes, q.scale, q.zero_point, weight_name, axis=axis)
    has_bias = len(node.input) > 2 and node.input[2] in constants
    plain_gemm = node.op_type != "Gemm" or (attributes.get("alpha", 1.0) == 1.0
                                             and attributes.get("beta", 1.0) == 1.0)
    if source is not None and has_bias and source[1].ndim == 0 and plain_gemm:
        bias = constants[node.input[2]]
        if bias.shape == q.scale.shape:
            scale = (source[1] * q.scale).astype(np.float32)
            info = np.iinfo(np.int32)
            bias_codes = np.clip(np.rint(bias / scale), info.min, info.max).astype(np.int32)
            name = build.constant(f"{node.input[2]}_quantized", bias_codes)
            node.input[2] = build.dequantize(name, scale, np.zeros(scale.shape, np.int32),
                                             node.input[2], axis=0)
    return {weight_name: q}
