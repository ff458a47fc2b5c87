"""Thin helpers over `onnx.ModelProto`: constants, producers and consumers, fresh names, checks.

A graph "constant" is an initializer that is not also a graph input, or the output of a `Constant`
node: other converters (Paddle, TensorFlow) keep BatchNormalization parameters in `Constant` nodes,
so everything that reads parameters goes through `constant_values`.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from bnq.errors import ModelError, one_line
from bnq.limits import check_size

MIN_OPSET = 7


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every value of the main graph that is known without running it, by tensor name:
    initializers, Constant node outputs, and the outputs of deterministic standard ops whose inputs
    are all known (torch.onnx.export writes `Identity(weight)` for a parameter two modules share,
    and its dynamo exporter a zero Conv bias as `Expand(CastLike(0), Shape(weight)[0:1])`)."""
    graph = model.graph
    graph_inputs = {value.name for value in graph.input}
    types = {value.name: dtype for value in [*graph.input, *graph.value_info]
             if (dtype := numpy_dtype(value.type.tensor_type.elem_type)) is not None}
    values = {
        tensor.name: tensor_array(tensor, f"initializer {tensor.name!r}")
        for tensor in graph.initializer
        if tensor.name not in graph_inputs  # an overridable default is not a constant
    }
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            values[node.output[0]] = _constant_node_value(node)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
        elif node.op_type == "CastLike" and node.input[0] in values and node.input[1] in types:
            values[node.output[0]] = values[node.input[0]].astype(types[node.input[1]])
        elif (node.op_type in FOLDABLE_OPS and node.input
              and all(name in values for name in node.input if name)):
            check_size(_folded_bytes(node, values), f"node {node_label(node)}: its constant "
                       "output", ModelError)
            try:
                results = _evaluate(node, values, default_opset(model))
            except Exception as error:  # the reference evaluator raises whatever numpy raises
                raise ModelError(f"node {node_label(node)}: its inputs are constants, but computing "
                                 f"its output from them fails ({one_line(error)}); the model "
                                 "cannot run") from error
            values.update(zip(node.output, results))
    return values


# Shape arithmetic that exporters emit around parameters; evaluated when all inputs are known.
FOLDABLE_OPS = {"Shape", "Cast", "CastLike", "Expand", "Slice", "Gather", "Concat", "Reshape",
                "Unsqueeze", "Squeeze", "Add", "Sub", "Mul", "Div", "Sqrt", "ConstantOfShape"}


_BROADCASTING = ("Add", "Sub", "Mul", "Div")


def _folded_bytes(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> int:
    """An upper bound of the bytes of the outputs of `node` (a FOLDABLE_OPS node whose inputs are
    `values`), from shapes and dtypes alone: ConstantOfShape and Expand make tensors of any size
    from a few bytes, broadcasting and Gather more than their inputs; the other ops at most as
    many elements as their inputs hold (Cast at most 8 bytes each)."""
    inputs = [values[name] for name in node.input if name]
    itemsize = 8 if node.op_type in ("Cast", "CastLike") else max(a.itemsize for a in inputs)
    try:
        if node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            itemsize = 4 if value is None else np.dtype(
                onnx.helper.tensor_dtype_to_np_dtype(value.data_type)).itemsize
            shape = tuple(int(d) for d in inputs[0].ravel())
        elif node.op_type in ("Expand", *_BROADCASTING):
            shapes = [inputs[0].shape, tuple(int(d) for d in inputs[1].ravel())] \
                if node.op_type == "Expand" else [array.shape for array in inputs]
            shape = np.broadcast_shapes(*shapes)
        elif node.op_type == "Gather":
            data, indices = inputs
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % max(data.ndim, 1)
            shape = data.shape[:axis] + indices.shape + data.shape[axis + 1:]
        else:
            shape = (sum(array.size for array in inputs),)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError):
        return 0  # shapes or types that do not fit: evaluating the node says so
    return itemsize * math.prod(max(d, 0) for d in shape)


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    inputs = [name for name in node.input if name]
    graph = onnx.helper.make_graph(
        [node], "fold",
        [onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype), values[name].shape)
         for name in inputs],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
         for name in node.output])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    evaluator = ReferenceEvaluator(model)
    return evaluator.run(None, {name: values[name] for name in inputs})


def numpy_dtype(elem_type: int) -> np.dtype | None:
    """The NumPy dtype of an ONNX element type; None for UNDEFINED or a number ONNX does not
    define (which the checker lets through on graph inputs and outputs)."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except KeyError:
        return None


def tensor_array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    """The array a TensorProto holds; a ModelError naming `what` when its data does not decode
    (data that does not fit its dims or type, which the ONNX checker lets through)."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception as error:  # onnx raises ValueError, TypeError, KeyError...
        raise ModelError(f"{what}: its data does not match its type and shape "
                         f"{list(tensor.dims)} ({one_line(error)}); the model is corrupt") from error


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    attribute = node.attribute[0]
    if attribute.name == "value":
        return tensor_array(attribute.t, f"Constant node {node_label(node)}")
    if attribute.name == "sparse_value":
        raise ModelError(f"Constant node {node_label(node)} holds a sparse tensor, which bnq does not read")
    plain = onnx.helper.get_attribute_value(attribute)
    dtype = {"value_float": np.float32, "value_floats": np.float32,
             "value_int": np.int64, "value_ints": np.int64}.get(attribute.name)
    return np.array(plain, dtype=dtype)


def reads(node: onnx.NodeProto) -> list[str]:
    """The tensors `node` reads: its inputs, and the names that its subgraphs (the branches of
    an If, the body of a Loop or Scan) take from the enclosing graph."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH
                      else attribute.graphs):
            local = {value.name for value in graph.input}
            local |= {tensor.name for tensor in graph.initializer}
            local |= {name for inner in graph.node for name in inner.output}
            outer = [name for inner in graph.node for name in reads(inner)]
            outer += [value.name for value in graph.output]
            names += [name for name in dict.fromkeys(outer) if name not in local]
    return names


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (`reads`: subgraphs too), in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(reads(node)):
            readers[name].append(node)
    return readers


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {name: node for node in graph.node for name in node.output if name}


def output_names(graph: onnx.GraphProto) -> set[str]:
    return {value.name for value in graph.output}


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("the model imports no version of the default ONNX domain")


def drop_unused(graph: onnx.GraphProto, candidates: set[str], constants: set[str]) -> None:
    """Remove what the rewrites left unread: nodes that only computed constants, the `candidates`
    among initializers, and the value_info of tensors that no node writes any more."""
    keep = output_names(graph) | {value.name for value in graph.input}
    nodes = list(graph.node)
    while True:
        read = {name for node in nodes for name in reads(node)} | keep
        live = [node for node in nodes
                if any(name in read or name not in constants for name in node.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [tensor for tensor in graph.initializer
            if tensor.name in read or tensor.name not in candidates]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    produced = {name for node in graph.node for name in node.output}
    infos = [info for info in graph.value_info if info.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


class NameScope:
    """Hands out tensor and node names that the model does not use yet."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._taken = {value.name for value in graph.input}
        self._taken |= {value.name for value in graph.output}
        self._taken |= {tensor.name for tensor in graph.initializer}
        for node in graph.node:
            self._taken |= set(node.input) | set(node.output) | {node.name}

    def fresh(self, base: str) -> str:
        name, index = base, 1
        while name in self._taken:
            name, index = f"{base}_{index}", index + 1
        self._taken.add(name)
        return name


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the intermediate tensors `names` (typed by shape
    inference, float where it cannot tell), after the model's own outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = output_names(probe.graph)
    wanted = [name for name in dict.fromkeys(names) if name not in present]
    if not wanted:
        return probe
    inferred = onnx.shape_inference.infer_shapes(shape_sketch(model)).graph
    types = {value.name: value.type.tensor_type.elem_type
             for value in [*inferred.value_info, *inferred.input]}
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, types.get(name) or onnx.TensorProto.FLOAT, None)
        for name in wanted)
    return probe


def shape_sketch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` for shape inference, whose large initializers hold their type and dims
    only: inference needs the values of shape tensors, not of weights (DenseNet-121 whole took
    0.11 s, its sketch 0.02 s)."""
    sketch = onnx.ModelProto()
    sketch.CopyFrom(model)
    for tensor in sketch.graph.initializer:
        if math.prod(tensor.dims) > 4096:
            dims, data_type, name = list(tensor.dims), tensor.data_type, tensor.name
            tensor.Clear()
            tensor.dims.extend(dims)
            tensor.data_type, tensor.name = data_type, name
    return sketch


def concrete_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
                    ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor whose shape onnx's shape inference can tell once the graph
    inputs have `input_shapes`; empty when inference fails (running the model says why)."""
    sketch = shape_sketch(model)
    for value in sketch.graph.input:
        if value.name in input_shapes:
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for size in input_shapes[value.name]:
                shape.dim.add().dim_value = size
    del sketch.graph.value_info[:]
    del sketch.graph.output[:]  # all in value_info then; a graph input as output stops inference
    try:
        inferred = onnx.shape_inference.infer_shapes(sketch, data_prop=True).graph
    except Exception:  # InferenceError, ValueError, protobuf errors...: no estimate
        return {}
    shapes = {}
    for value in [*inferred.input, *inferred.value_info]:
        tensor_type = value.type.tensor_type
        dtype = numpy_dtype(tensor_type.elem_type)
        if (dtype is not None and tensor_type.HasField("shape")
                and all(dim.HasField("dim_value") for dim in tensor_type.shape.dim)):
            shapes[value.name] = (tuple(dim.dim_value for dim in tensor_type.shape.dim), dtype)
    return shapes


# Ops that only a quantized model holds: QDQ pairs, onnxruntime's integer ops, bnq's own.
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                 "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearBatchNormRelu")


def quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of the main graph that only a quantized model holds."""
    return [node for node in model.graph.node if node.op_type in QUANTIZED_OPS]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> number of nodes in the main graph, sorted by name."""
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        counts[text(node.op_type)] += 1
    return dict(sorted(counts.items()))


def text(name: str | bytes) -> str:
    """A name for reports and messages: protobuf hands out a string that is not valid UTF-8 as
    bytes, which reports (str fields) must not carry."""
    return name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name


def node_label(node: onnx.NodeProto) -> str:
    """How messages and reports name a node: its name, or its type and first output."""
    return text(node.name) or f"{text(node.op_type)}({text(node.output[0])})"


def check(model: onnx.ModelProto, what: str) -> None:
    """Run the full ONNX checker (with shape inference) and turn a failure into a ModelError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ModelError(f"{what} fails the ONNX checker: {one_line(error)}") from error
