"""Float rewrites: fold BatchNormalization into the Conv / ConvTranspose / Gemm before it, and fuse
a BatchNormalization that cannot be folded with the Relu after it into one `bnq.BatchNormRelu`.

BatchNormalization in inference mode is, per channel c,

    y = (x - mean[c]) / sqrt(var[c] + eps) * gamma[c] + beta[c] = x * s[c] + (beta[c] - mean[c] * s[c])

with s = gamma / sqrt(var + eps). When x is the output of a Conv with weight W and bias b (zero when
absent), y is the output of a Conv with

    W_fused[c, ...] = W[c, ...] * s[c]          b_fused[c] = (b[c] - mean[c]) * s[c] + beta[c]

(ConvTranspose holds output channels on its weight's axis 1, per group; Gemm on the columns of its
output). The folded parameters are computed in float64 and stored in the weight's dtype.

Each rewrite is match -> check -> rewrite: `check` returns the reason a match cannot be rewritten
exactly (parameters computed at run time, training mode, an intermediate tensor someone else reads,
...) and that reason lands in the report, so every BatchNormalization is accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnq import ops
from bnq.errors import ModelError
from bnq.graph import (
    NameScope,
    check,
    constant_values,
    consumers,
    drop_unused,
    node_label,
    op_counts,
    output_names,
    producers,
    reads,
)

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
BN_PARAMS = ("scale", "B", "input_mean", "input_var")


@dataclass(frozen=True)
class Action:
    """What happened to one BatchNormalization node."""

    node: str
    outcome: str  # "folded", "fused" or "kept"
    detail: str


@dataclass(frozen=True)
class FuseReport:
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    actions: tuple[Action, ...]

    def count(self, outcome: str) -> int:
        return sum(action.outcome == outcome for action in self.actions)


@dataclass(frozen=True)
class _BatchNorm:
    node: onnx.NodeProto
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float

    def factor(self) -> np.ndarray:
        """s = gamma / sqrt(var + eps), in float64."""
        return self.scale.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + self.epsilon)


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseReport]:
    """Fold every foldable BatchNormalization, fuse the rest with a following Relu when exact."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    scope = NameScope(graph)
    constants = constant_values(result)
    readers = consumers(graph)
    writers = producers(graph)
    outputs = output_names(graph)
    actions: list[Action] = []
    removed: set[int] = set()  # ids of nodes that the rewrites replace
    added: dict[int, onnx.NodeProto] = {}  # id of a node -> the node standing in its place

    for node in list(graph.node):
        if node.op_type != "BatchNormalization":
            continue
        label = node_label(node)
        batch_norm = _read_batch_norm(node, constants)
        if isinstance(batch_norm, str):
            actions.append(Action(label, "kept", batch_norm))
            continue
        source = writers.get(node.input[0])
        reason = _check_fold(source, node, readers, outputs, constants)
        if reason is None:
            folded = _fold(source, batch_norm, constants, scope, graph)
            if isinstance(folded, onnx.NodeProto):
                added[id(source)] = folded
                removed.add(id(node))
                actions.append(Action(label, "folded",
                                      f"into {source.op_type} {node_label(source)}"))
                continue
            reason = folded
        relu = _only_reader(node.output[0], readers, outputs)
        if relu is None or relu.op_type != "Relu":
            actions.append(Action(label, "kept", f"{reason}; and {_relu_failure(node, readers, outputs)}"))
            continue
        fused = helper.make_node("BatchNormRelu", list(node.input[:5]), [relu.output[0]],
                                 name=scope.fresh(f"{node.name or 'BatchNormalization'}_relu"),
                                 domain=ops.DOMAIN, epsilon=batch_norm.epsilon)
        added[id(node)] = fused
        removed.add(id(relu))
        actions.append(Action(label, "fused", f"with Relu {node_label(relu)}"))

    replaced = {name for node in graph.node if id(node) in removed or id(node) in added
                for name in reads(node)}
    nodes = [added.get(id(node), node) for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused(graph, replaced, set(constants))
    ops.attach_functions(result)
    check(result, "the fused model")
    return result, FuseReport(op_counts(model), op_counts(result), tuple(actions))


def _read_batch_norm(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> _BatchNorm | str:
    """The node's parameters, or the reason it is not an exact inference-mode BatchNormalization."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("training_mode", 0):
        return "training_mode=1: export the model in eval mode"
    if not attributes.get("spatial", 1):
        return "spatial=0 (statistics per activation) is not supported"
    if any(name for name in node.output[1:]):
        return "its running statistics outputs are used (training graph)"
    values = []
    for role, name in zip(BN_PARAMS, node.input[1:5]):
        if name not in constants:
            return f"its {role} {name!r} is computed at run time, not a constant"
        values.append(constants[name])
    scale, bias, mean, var = values
    epsilon = float(attributes.get("epsilon", 1e-5))
    label = f"BatchNormalization {node_label(node)}"
    channels = {v.size for v in values}
    if len(channels) != 1 or any(v.ndim != 1 for v in values):
        raise ModelError(f"{label}: parameters must be 1-D of one length, got shapes "
                         f"{[list(v.shape) for v in values]}; the model cannot run")
    if channels == {0}:
        raise ModelError(f"{label} has 0 channels (its parameters are empty): it normalizes "
                         "nothing; remove it or fix its parameters")
    if not np.isfinite(epsilon) or epsilon < 0:
        raise ModelError(f"{label}: epsilon is {epsilon}, not a finite number >= 0; fix the "
                         "model's epsilon")
    for role, name, value in zip(BN_PARAMS, node.input[1:5], values):
        if value.dtype.kind != "f":
            raise ModelError(f"{label}: {role} {name!r} has dtype {value.dtype}, not a float type; "
                             "the model cannot run")
        if not np.all(np.isfinite(value)):
            raise ModelError(f"{label}: {role} {name!r} holds NaN or infinity; fix or retrain "
                             "the model")
    if np.any(var < 0):
        raise ModelError(f"{label}: input_var {node.input[4]!r} holds negative values (a variance "
                         "is never negative); fix the model's running variance")
    if np.any(var + epsilon <= 0):
        raise ModelError(f"{label}: input_var {node.input[4]!r} holds zeros and epsilon is "
                         f"{epsilon}: a division by zero; give the node a positive epsilon")
    return _BatchNorm(node, scale, bias, mean, var, epsilon)


def _only_reader(name: str, readers: dict[str, list[onnx.NodeProto]],
                 outputs: set[str]) -> onnx.NodeProto | None:
    """The single node reading `name`, if nothing else (not even the graph's caller) sees it."""
    nodes = readers.get(name, [])
    if len(nodes) != 1 or name in outputs:
        return None
    return nodes[0]


def _relu_failure(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]],
                  outputs: set[str]) -> str:
    name = node.output[0]
    if name in outputs:
        return "its output is a graph output"
    nodes = readers.get(name, [])
    if len(nodes) != 1:
        return f"its output has {len(nodes)} readers, not one Relu"
    return f"it is followed by {nodes[0].op_type}, not Relu"


def _check_fold(source: onnx.NodeProto | None, node: onnx.NodeProto,
                readers: dict[str, list[onnx.NodeProto]], outputs: set[str],
                constants: dict[str, np.ndarray]) -> str | None:
    """None when BatchNormalization `node` folds into `source`, else the reason it does not."""
    if source is None:
        return "its input is a graph input"
    if source.op_type not in FOLDABLE:
        return f"its input comes from {source.op_type}, not {'/'.join(FOLDABLE)}"
    if _only_reader(source.output[0], readers, outputs) is not node:
        return f"the {source.op_type} output is also read elsewhere"
    for name in source.input[1:]:
        if name and name not in constants:
            return f"the {source.op_type} parameter {name!r} is not a constant"
    if source.op_type == "Gemm" and (reason := _check_gemm(source, constants)):
        return reason
    _check_shapes(source, node, constants)
    return None


def _check_shapes(source: onnx.NodeProto, node: onnx.NodeProto,
                  constants: dict[str, np.ndarray]) -> None:
    """Refuse a weight or bias whose shape does not fit the BatchNormalization after it (which
    shape inference lets through when the dimensions are dynamic)."""
    weight = constants[source.input[1]]
    attributes = {a.name: helper.get_attribute_value(a) for a in source.attribute}
    if weight.ndim < 2 or (source.op_type == "Gemm" and weight.ndim != 2):
        made = None
    elif source.op_type == "Conv":
        made = weight.shape[0]
    elif source.op_type == "ConvTranspose":
        group = attributes.get("group", 1)
        made = weight.shape[1] * group if group >= 1 and weight.shape[0] % group == 0 else None
    else:
        made = weight.shape[0] if attributes.get("transB", 0) else weight.shape[1]
    wanted = constants[node.input[1]].size
    bias = constants[source.input[2]] if len(source.input) > 2 and source.input[2] else None
    if made != wanted:
        raise ModelError(f"BatchNormalization {node_label(node)} has {wanted} channels, but the "
                         f"weight {source.input[1]!r} of {source.op_type} {node_label(source)} "
                         f"before it has shape {list(weight.shape)}; the model cannot run")
    if bias is not None and bias.size not in (1, made):
        raise ModelError(f"{source.op_type} {node_label(source)}: its bias {source.input[2]!r} "
                         f"has shape {list(bias.shape)}, not [{made}]; the model cannot run")


def _check_gemm(gemm: onnx.NodeProto, constants: dict[str, np.ndarray]) -> str | None:
    if len(gemm.input) > 2 and gemm.input[2]:
        bias = constants[gemm.input[2]]
        if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            return f"the Gemm bias has shape {list(bias.shape)}, which varies along the batch"
    return None


def _fold(source: onnx.NodeProto, batch_norm: _BatchNorm, constants: dict[str, np.ndarray],
          scope: NameScope, graph: onnx.GraphProto) -> onnx.NodeProto | str:
    """A copy of `source` with `batch_norm` folded into fresh weight and bias tensors, or the
    reason it cannot be: folded values that the weight's dtype cannot hold."""
    weight = constants[source.input[1]]
    has_bias = len(source.input) > 2 and bool(source.input[2])
    bias = constants[source.input[2]].astype(np.float64) if has_bias else np.zeros(1)
    factor = batch_norm.factor()
    attributes = {a.name: helper.get_attribute_value(a) for a in source.attribute}
    if source.op_type == "Conv":
        shape = (-1,) + (1,) * (weight.ndim - 1)
        new_weight = weight * factor.reshape(shape)
    elif source.op_type == "ConvTranspose":
        group = attributes.get("group", 1)
        grouped = weight.reshape(group, weight.shape[0] // group, weight.shape[1], -1)
        new_weight = (grouped * factor.reshape(group, 1, -1, 1)).reshape(weight.shape)
    else:  # Gemm: output column j = alpha * A @ B[:, j] + beta * C[j]
        new_weight = weight * (factor[:, None] if attributes.get("transB", 0) else factor[None, :])
        bias = attributes.get("beta", 1.0) * bias.reshape(-1)
    new_bias = (bias - batch_norm.mean) * factor + batch_norm.bias
    with np.errstate(over="ignore", invalid="ignore"):
        new_weight = new_weight.astype(weight.dtype)
        new_bias = np.broadcast_to(new_bias, factor.shape).astype(weight.dtype)
    if np.all(np.isfinite(weight)) and not (np.all(np.isfinite(new_weight))
                                            and np.all(np.isfinite(new_bias))):
        return f"folding it overflows {weight.dtype} in the {source.op_type} weights or bias"
    base = source.name or source.op_type
    weight_name = scope.fresh(f"{base}_folded_weight")
    bias_name = scope.fresh(f"{base}_folded_bias")
    graph.initializer.extend([numpy_helper.from_array(new_weight, weight_name),
                              numpy_helper.from_array(new_bias, bias_name)])
    folded = onnx.NodeProto()
    folded.CopyFrom(source)
    del folded.input[:], folded.output[:]
    folded.input.extend([source.input[0], weight_name, bias_name])
    folded.output.append(batch_norm.node.output[0])
    if source.op_type == "Gemm":
        for attribute in folded.attribute:
            if attribute.name == "beta":
                attribute.f = 1.0
    return folded
