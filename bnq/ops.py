"""bnq's custom-domain operators, each shipped inside the model as an ONNX model-local function.

A node of domain `bnq` carries its meaning as a body of standard ONNX ops in `ModelProto.functions`,
so stock onnxruntime (and any ONNX runtime that inlines functions) runs a model bnq writes with no
extra library, while bnq's own backend swaps the body for a NumPy kernel.

`BatchNormRelu(X, scale, B, input_mean, input_var; epsilon)` is the float fused op,
`Relu(BatchNormalization(X, ...))` (PyTorch's `torch.ao.nn.intrinsic.BNReLU2d` before
quantization); rank-agnostic like BatchNormalization, channel axis 1.

A function body must import the default domain at the model's own version (the ONNX checker
refuses anything else), so bodies are built for the opset of the model they go into.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import helper

from bnq.graph import default_opset

DOMAIN = "bnq"
DOMAIN_VERSION = 1


def _ref_attribute(name: str, kind: int) -> onnx.AttributeProto:
    """An attribute of a body node that takes its value from the calling node's attribute."""
    return onnx.AttributeProto(name=name, ref_attr_name=name, type=kind)


def batch_norm_relu_function(model: onnx.ModelProto) -> onnx.FunctionProto:
    batch_norm = helper.make_node("BatchNormalization", ["X", "scale", "B", "input_mean", "input_var"],
                                  ["normalized"])
    batch_norm.attribute.append(_ref_attribute("epsilon", onnx.AttributeProto.FLOAT))
    relu = helper.make_node("Relu", ["normalized"], ["Y"])
    return helper.make_function(DOMAIN, "BatchNormRelu",
                                ["X", "scale", "B", "input_mean", "input_var"], ["Y"],
                                [batch_norm, relu], [helper.make_opsetid("", default_opset(model))],
                                attributes=["epsilon"])


def qlinear_batch_norm_relu_function(model: onnx.ModelProto, body: str | None = None
                                     ) -> onnx.FunctionProto:
    """The quantized fused op's body: `body` (a name of `bnq.qops.BODIES`) or, by default, the one
    `bnq.qops.body_for` chooses for the model's parameters."""
    from bnq.qops import function_for  # bnq.qops builds on this module's DOMAIN

    return function_for(model, body)


FUNCTIONS: dict[str, Callable[[onnx.ModelProto], onnx.FunctionProto]] = {
    "BatchNormRelu": batch_norm_relu_function,
    "QLinearBatchNormRelu": qlinear_batch_norm_relu_function,
}


def attach_functions(model: onnx.ModelProto, body: str | None = None) -> onnx.ModelProto:
    """Give `model` the function bodies and the opset import of every bnq op its graph uses; the
    quantized op gets `body` when the caller has chosen it (`bnq.qops.body_for`)."""
    used = sorted({node.op_type for node in model.graph.node if node.domain == DOMAIN})
    kept = [function for function in model.functions if function.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(kept + [qlinear_batch_norm_relu_function(model, body)
                                   if op == "QLinearBatchNormRelu" else FUNCTIONS[op](model)
                                   for op in used])
    imports = [o for o in model.opset_import if o.domain != DOMAIN]
    if used:
        imports.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    del model.opset_import[:]
    model.opset_import.extend(imports)
    return model
