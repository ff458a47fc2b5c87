"""Float rewrites that keep a quantized model integer from end to end.

`fold_average_pool`: a 1x1 Conv (stride 1, no padding, no dilation, one group) whose only reader
is an AveragePool with a k x k kernel, stride k and no padding (DenseNet's transitions) is one
k x k Conv with stride k:

    AvgPool(Conv1x1(x; W, b))[o, i, j] = sum_{u,v < k} (W[o, :] . x[:, ki + u, kj + v] + b[o]) / k^2
                                       = Conv_kxk(x; W_k, b)[o, i, j],   W_k[o, :, u, v] = W[o, :] / k^2

exact in real arithmetic (float results differ by rounding only), with the same number of
multiply-adds, and without the pooled intermediate: quantized, the convolution's integer output
feeds the next block's Concat directly, where an AveragePool's float output would make the Concat,
and everything it feeds, float (onnxruntime's QLinearAveragePool, its integer alternative, is
slower than the float one: measured 13x on the digits sample, AVX2).

Each rewrite is match -> check -> rewrite, and the passes report what they rewrote.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnq.graph import NameScope, constant_values, consumers, node_label, output_names


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pool_window(pool: onnx.NodeProto) -> int | None:
    """k for a k x k (or k, k x k x k) AveragePool with stride k and no padding, else None."""
    a = _attributes(pool)
    kernel = a.get("kernel_shape", [])
    if (not kernel or len(set(kernel)) != 1 or list(a.get("strides", [1] * len(kernel))) != kernel
            or any(a.get("pads", [])) or a.get("ceil_mode", 0)
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")
            or any(d != 1 for d in a.get("dilations", []))):
        return None
    return int(kernel[0])


def _is_pointwise(conv: onnx.NodeProto, weight: np.ndarray) -> bool:
    a = _attributes(conv)
    spatial = weight.ndim - 2
    return (spatial >= 1 and weight.shape[2:] == (1,) * spatial and a.get("group", 1) == 1
            and all(v == 1 for v in a.get("strides", [])) and not any(a.get("pads", []))
            and all(v == 1 for v in a.get("dilations", []))
            and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID"))


def fold_average_pool(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """`model` with every pointwise Conv + AveragePool pair folded into one strided Conv (see the
    module docstring), and the labels of the AveragePool nodes folded."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    constants = constant_values(result)
    readers = consumers(graph)
    outputs = output_names(graph)
    scope = NameScope(graph)
    folded, replaced = [], {}
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in constants:
            continue
        after = readers.get(conv.output[0], [])
        if len(after) != 1 or after[0].op_type != "AveragePool" or conv.output[0] in outputs:
            continue
        pool, weight = after[0], constants[conv.input[1]]
        k = _pool_window(pool)
        if k is None or not _is_pointwise(conv, weight) or len(_attributes(pool)["kernel_shape"]) != weight.ndim - 2:
            continue
        spatial = weight.ndim - 2
        tiled = np.broadcast_to(weight.astype(np.float64) / k**spatial,
                                weight.shape[:2] + (k,) * spatial).astype(weight.dtype)
        name = scope.fresh(f"{conv.input[1]}_pooled")
        graph.initializer.append(numpy_helper.from_array(tiled, name))
        replaced[id(conv)] = helper.make_node(
            "Conv", [conv.input[0], name, *conv.input[2:]], [pool.output[0]],
            name=scope.fresh(f"{conv.name or 'Conv'}_pooled"), kernel_shape=[k] * spatial,
            strides=[k] * spatial)
        replaced[id(pool)] = None
        folded.append(node_label(pool))
    if not folded:
        return result, ()
    nodes = [replaced.get(id(node), node) for node in graph.node]
    del graph.node[:]
    graph.node.extend(node for node in nodes if node is not None)
    return result, tuple(folded)
