"""The quantized fused op `bnq.QLinearBatchNormRelu` as an ONNX function of standard ops, and its
NumPy kernel for `onnx.reference.ReferenceEvaluator`.

    Y = QLinearBatchNormRelu(X, X_scale, X_zero_point, scale, B, input_mean, input_var,
                             Y_scale, Y_zero_point; epsilon=1e-5)

X is uint8 or int8 (N, C, ...), rank-agnostic like BatchNormalization, channel axis 1; X_scale
and X_zero_point are scalars or one value per channel; Y has Y_zero_point's type. The result is
PyTorch's `quantized::batch_norm{1,2,3}d_relu`, bit for bit (the formula is in `bnq.kernels`).

Four bodies, fastest first (`BODIES`); a model gets the fastest that is exact for all its nodes:
the integer body (one depthwise QLinearConv with per-channel integer parameters that the node
carries as three extra inputs, `bnq.integer`), the float and double bodies (the formula per
element, exact for checked parameter sets) and the table body (exact for every parameter set).

Why the table body builds a table instead of evaluating the formula per element: PyTorch rounds
`alpha * d + beta` ONCE to float32 (an FMA), and ONNX has no FMA. Evaluating it in double and
casting to float rounds twice, which differs from PyTorch whenever the double sum lands exactly
halfway between two float32 values (constructible: a tiny beta next to a product that is such a
midpoint). So the body computes, for each channel and each of the 256 input codes, the exact
float32 FMA (TwoSum error term + a halfway correction, as `bnq.kernels.fma_float32`), quantizes
that C x 256 table with `QuantizeLinear(Relu(v), 1, Y_zero_point)` (= clip(max(rint(v) + zp, zp)))
and applies it with one Gather; onnxruntime constant-folds the table when the parameters are
initializers. Codes are indexed by their byte pattern (`Cast(X, int32) & 255`), so one body serves
uint8 and int8; `CastLike(0..255, X)` relies on the two's-complement wrap of integer Cast, which
onnxruntime and the reference evaluator both do.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference.op_run import OpRun

from bnq.errors import ArgumentError, ModelError
from bnq.graph import constant_values, default_opset, node_label
from bnq.integer import IntegerAffine, integer_affine, requantize
from bnq.kernels import BnReluPlan, input_offsets, output_codes
from bnq.ops import DOMAIN
from bnq.quantization import quant_range

OP_TYPE = "QLinearBatchNormRelu"
INPUTS = ["X", "X_scale", "X_zero_point", "scale", "B", "input_mean", "input_var", "Y_scale",
          "Y_zero_point"]
# The integer body's extra inputs (`bnq.integer.IntegerAffine`, the weight shaped [C, 1, ...] for
# the input's rank) and its `channels` attribute (the convolution's group count).
INTEGER_INPUTS = ["conv_weight", "conv_scale", "conv_bias"]
BODIES = ("integer", "float", "double", "table")  # fastest first; `body_for` picks one per model
MIN_OPSET = 19        # onnx's ReferenceEvaluator implements QuantizeLinear from opset 19 on


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ArgumentError(f"opset: the QLinearBatchNormRelu body needs opset >= {MIN_OPSET}, "
                            f"got {opset}")


_SATURATED = 2.0**30  # far beyond every code: the output saturates long before


def _saturating_relu(value: str, output: str) -> list[onnx.NodeProto]:
    """Relu, with the value first clipped to +-2**30, where every code saturates anyway: onnx's
    reference evaluator casts QuantizeLinear's values to int32 before it saturates, so values
    beyond int32 wrap around (the highest code becomes the lowest)."""
    return [_constant(f"{value}_limit", np.array(_SATURATED, np.float32)),
            _constant(f"{value}_minus_limit", np.array(-_SATURATED, np.float32)),
            helper.make_node("Clip", [value, f"{value}_minus_limit", f"{value}_limit"],
                             [f"{value}_clipped"]),
            helper.make_node("Relu", [f"{value}_clipped"], [output])]


def _fused_params() -> list[onnx.NodeProto]:
    """Nodes computing float32 `alpha` and `beta` [C] with PyTorch's mixed precision."""
    D, F = TensorProto.DOUBLE, TensorProto.FLOAT
    n = helper.make_node
    eps = n("Constant", [], ["eps"])
    eps.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="epsilon",
                                             type=onnx.AttributeProto.FLOAT))
    return [
        eps,
        _constant("one_d", np.array(1.0, np.float64)),
        _constant("one_f", np.array(1.0, np.float32)),
        # PyTorch's compute_fused_params: float sqrt, double reciprocal, double scale ratio
        n("Add", ["input_var", "eps"], ["var_eps"]),
        n("Sqrt", ["var_eps"], ["sigma"]),
        n("Cast", ["sigma"], ["sigma_d"], to=D),
        n("Div", ["one_d", "sigma_d"], ["inv_sigma_d"]),
        n("Cast", ["inv_sigma_d"], ["inv_sigma"], to=F),
        n("Mul", ["inv_sigma", "scale"], ["gain"]),
        n("Cast", ["gain"], ["gain_d"], to=D),
        n("Cast", ["X_scale"], ["x_scale_d"], to=D),
        n("Cast", ["Y_scale"], ["y_scale_d"], to=D),
        n("Div", ["x_scale_d", "y_scale_d"], ["ratio"]),
        n("Mul", ["gain_d", "ratio"], ["alpha_d"]),
        n("Cast", ["alpha_d"], ["alpha"], to=F),
        n("Mul", ["input_mean", "inv_sigma"], ["mean_inv"]),
        n("Mul", ["mean_inv", "scale"], ["mean_gain"]),
        n("Sub", ["B", "mean_gain"], ["shift"]),
        n("Cast", ["shift"], ["shift_d"], to=D),
        n("Div", ["shift_d", "y_scale_d"], ["beta_d"]),
        n("Cast", ["beta_d"], ["beta"], to=F),
    ]


def qlinear_bn_relu_function(opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The table body of `bnq.QLinearBatchNormRelu` (exact for every parameter set), importing
    the default domain at `opset` (>= 19)."""
    _check_opset(opset)
    D, F = TensorProto.DOUBLE, TensorProto.FLOAT
    n = helper.make_node
    nodes = _fused_params() + [
        _constant("zero_d", np.array(0.0, np.float64)),
        _constant("column", np.array([-1, 1], np.int64)),
        _constant("flat", np.array([-1], np.int64)),
        _constant("zero_i64", np.array([0], np.int64)),
        _constant("two_i64", np.array([2], np.int64)),
        _constant("end_i64", np.array([np.iinfo(np.int64).max], np.int64)),
        _constant("bytes", np.arange(256, dtype=np.int32)),
        _constant("byte_mask", np.array(255, np.int32)),
        _constant("row_start", np.array(0, np.int32)),
        _constant("row_step", np.array(256, np.int32)),
        # d = code - zero point for every (channel, byte pattern): C x 256 (or 1 x 256)
        n("CastLike", ["bytes", "X"], ["codes"]),
        n("Cast", ["codes"], ["codes_d"], to=D),
        n("Reshape", ["X_zero_point", "column"], ["x_zp_col"]),
        n("Cast", ["x_zp_col"], ["x_zp_d"], to=D),
        n("Sub", ["codes_d", "x_zp_d"], ["d"]),
        n("Reshape", ["alpha", "column"], ["alpha_col"]),
        n("Cast", ["alpha_col"], ["a"], to=D),
        n("Reshape", ["beta", "column"], ["beta_col"]),
        n("Cast", ["beta_col"], ["b_col"], to=D),
        n("Mul", ["a", "d"], ["p"]),                         # exact: 24 x 9 bits
        # TwoSum: s + e == p + b exactly
        n("Add", ["p", "b_col"], ["s"]),
        n("Sub", ["s", "p"], ["t"]),
        n("Sub", ["s", "t"], ["s_minus_t"]),
        n("Sub", ["p", "s_minus_t"], ["e_p"]),
        n("Sub", ["b_col", "t"], ["e_b"]),
        n("Add", ["e_p", "e_b"], ["e"]),
        # round s to float32; if s is halfway between two floats and e != 0, e decides
        n("Cast", ["s"], ["f"], to=F),
        n("Cast", ["f"], ["g"], to=D),
        n("Sub", ["s", "g"], ["r"]),
        n("Add", ["r", "r"], ["r2"]),
        n("Add", ["g", "r2"], ["h"]),
        n("Cast", ["h"], ["h_f"], to=F),
        n("Cast", ["h_f"], ["h_back"], to=D),
        n("Equal", ["h_back", "h"], ["h_is_float"]),
        n("Equal", ["r", "zero_d"], ["r_zero"]),
        n("Not", ["r_zero"], ["r_nonzero"]),
        n("And", ["r_nonzero", "h_is_float"], ["halfway"]),
        n("Sign", ["e"], ["e_sign"]),
        n("Sign", ["r"], ["r_sign"]),
        n("Equal", ["e_sign", "r_sign"], ["same_side"]),
        n("Equal", ["e", "zero_d"], ["e_zero"]),
        n("Not", ["e_zero"], ["e_nonzero"]),
        n("And", ["same_side", "e_nonzero"], ["toward_h"]),
        n("And", ["halfway", "toward_h"], ["up"]),
        n("Where", ["up", "h_f", "f"], ["v"]),
        *_saturating_relu("v", "v_relu"),
        n("QuantizeLinear", ["v_relu", "one_f", "Y_zero_point"], ["table"]),
        # apply: Y[n, c, l] = table[c, byte(X[n, c, l])]
        n("Reshape", ["table", "flat"], ["table_flat"]),
        n("Shape", ["scale"], ["channels_1d"]),
        n("Squeeze", ["channels_1d"], ["channels"]),
        n("Cast", ["channels"], ["channels_i32"], to=TensorProto.INT32),
        n("Mul", ["channels_i32", "row_step"], ["table_size"]),
        n("Range", ["row_start", "table_size", "row_step"], ["row_offsets"]),
        n("Reshape", ["row_offsets", "column"], ["row_offsets_col"]),
        n("Shape", ["X"], ["x_shape"]),                      # (N, C, L) even when N == 0
        n("Slice", ["x_shape", "zero_i64", "two_i64"], ["x_nc"]),
        n("Slice", ["x_shape", "two_i64", "end_i64"], ["x_spatial"]),
        n("ReduceProd", ["x_spatial"], ["x_l"], keepdims=1),
        n("Concat", ["x_nc", "x_l"], ["ncl"], axis=0),
        n("Reshape", ["X", "ncl"], ["x_ncl"]),
        n("Cast", ["x_ncl"], ["x_i32"], to=TensorProto.INT32),
        n("BitwiseAnd", ["x_i32", "byte_mask"], ["x_byte"]),
        n("Add", ["x_byte", "row_offsets_col"], ["index"]),
        n("Gather", ["table_flat", "index"], ["y_ncl"], axis=0),
        n("Reshape", ["y_ncl", "x_shape"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, OP_TYPE, INPUTS, ["Y"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["epsilon"])


def direct_function(opset: int = MIN_OPSET, precision: str = "double") -> onnx.FunctionProto:
    """A fast body of `bnq.QLinearBatchNormRelu`: the formula evaluated per element,

        d = DequantizeLinear(X, 1, X_zero_point)                 # exact small integers
        v = BatchNormalization(d, alpha, beta, mean=0, var=1, epsilon=0)   # alpha * d + beta
        Y = QuantizeLinear(Relu(float32(v)), 1, Y_zero_point)

    in `precision` "double" or "float". In double the product is exact, so the result is
    `float32(round64(alpha * d + beta))`, PyTorch's single-rounding FMA except where the double
    sum lands exactly halfway between two float32 values. In float it is the FMA itself where a
    runtime contracts BatchNormalization's multiply-add (always exact), and
    `float32(float32(alpha * d) + beta)` where it does not (onnxruntime 1.32 on x86-64), which
    differs from the FMA near rounding ties. `direct_body_is_exact` checks a parameter set
    against the exact table for every channel and input code before a model gets such a body."""
    _check_opset(opset)
    F = TensorProto.FLOAT
    T = TensorProto.DOUBLE if precision == "double" else F
    n = helper.make_node

    def filled(name: str, dtype: int, value: float) -> onnx.NodeProto:
        return n("ConstantOfShape", ["channels"], [name],
                 value=helper.make_tensor(name, dtype, [1], [value]))

    nodes = _fused_params() + [
        n("Shape", ["scale"], ["channels"]),
        filled("ones", F, 1.0), filled("ones_t", T, 1.0), filled("zeros_t", T, 0.0),
        n("Expand", ["X_zero_point", "channels"], ["x_zero_points"]),
        n("DequantizeLinear", ["X", "ones", "x_zero_points"], ["d"], axis=1),
        n("Cast", ["d"], ["d_t"], to=T),
        n("Cast", ["alpha"], ["alpha_t"], to=T),
        n("Cast", ["beta"], ["beta_t"], to=T),
        n("BatchNormalization", ["d_t", "alpha_t", "beta_t", "zeros_t", "ones_t"], ["v_t"],
          epsilon=0.0),
        n("Cast", ["v_t"], ["v"], to=F),
        n("Relu", ["v"], ["v_relu"]),
        n("QuantizeLinear", ["v_relu", "one_f", "Y_zero_point"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, OP_TYPE, INPUTS, ["Y"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["epsilon"])


def integer_function(opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The integer body of `bnq.QLinearBatchNormRelu`: one depthwise 1x1 QLinearConv per node,

        Y = QLinearConv(X, 1, 0, conv_weight, conv_scale, 0, 1, Y_zero_point, conv_bias,
                        group=channels)

    with the node's per-channel integer parameters (`bnq.integer`): onnxruntime runs it with its
    integer convolution kernels, in its channels-last layout like the convolutions around it.
    `integer_body_is_exact` checks a node's parameters against the exact table over every channel
    and input code before a model gets this body."""
    _check_opset(opset)
    n = helper.make_node
    conv = n("QLinearConv", ["X", "one_f", "x_zero", "conv_weight", "conv_scale", "w_zero",
                             "one_f", "Y_zero_point", "conv_bias"], ["Y"])
    conv.attribute.append(onnx.AttributeProto(name="group", ref_attr_name="channels",
                                              type=onnx.AttributeProto.INT))
    nodes = [
        _constant("one_f", np.array(1.0, np.float32)),
        _constant("zero_i32", np.array(0, np.int32)),
        n("CastLike", ["zero_i32", "X"], ["x_zero"]),
        n("Shape", ["conv_scale"], ["channels_1d"]),
        n("ConstantOfShape", ["channels_1d"], ["w_zero"],
          value=helper.make_tensor("w_zero", TensorProto.INT8, [1], [0])),
        conv,
    ]
    return helper.make_function(DOMAIN, OP_TYPE, INPUTS + INTEGER_INPUTS, ["Y"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["epsilon", "channels"])


def integer_body_is_exact(plan: BnReluPlan, y_zero_point, affine: IntegerAffine) -> bool:
    """Whether `integer_function` with `affine` gives `plan`'s exact table for every channel and
    input code (x_zp = 0: the input zero points are in the bias)."""
    y_zp = int(np.asarray(y_zero_point).reshape(()))
    lo, hi = quant_range(plan.out_dtype)
    codes = input_offsets(np.zeros(plan.channels, np.int64), plan.in_dtype)
    y = requantize(affine.weight.reshape(-1), affine.bias, affine.scale, codes, lo - y_zp, hi - y_zp)
    return np.array_equal(y + y_zp, plan.table.astype(np.int64))


def direct_body_is_exact(plan: BnReluPlan, x_zero_point, y_zero_point,
                         precision: str = "double") -> bool:
    """Whether `direct_function(precision=...)` gives `plan`'s exact table for every channel
    and input code."""
    d = input_offsets(np.broadcast_to(x_zero_point, (plan.channels,)), plan.in_dtype)
    kind = np.float64 if precision == "double" else np.float32
    v = (d.astype(kind) * plan.alpha.astype(kind)[:, None]
         + plan.beta.astype(kind)[:, None]).astype(np.float32)
    y = output_codes(v, int(np.asarray(y_zero_point).reshape(())), plan.out_dtype)
    # no value where the reference evaluator's QuantizeLinear wraps (see _saturating_relu): only
    # absurd parameters (zero variance with a large input scale) come near
    return bool(np.all(np.abs(v) < _SATURATED) and np.array_equal(y, plan.table))


def _plans(params: tuple, candidates) -> Iterator[tuple[np.float32, BnReluPlan]]:
    """Each candidate output scale with its plan; `params` are `BnReluPlan`'s, y_scale last but
    one."""
    x_scale, x_zero_point, weight, bias, mean, var, eps, _, y_zero_point = params
    for candidate in candidates:
        yield candidate, BnReluPlan(x_scale, x_zero_point, weight, bias, mean, var, eps, candidate,
                                    y_zero_point, in_dtype=np.asarray(x_zero_point).dtype,
                                    out_dtype=np.asarray(y_zero_point).dtype)


def _ulps(y_scale, steps: int) -> Iterator[np.float32]:
    """`y_scale`, then the float32 values 1, 2, ... `steps` ulps above and below it."""
    up = down = np.float32(y_scale)
    yield up
    for _ in range(steps):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        yield up
        yield down


def integer_output_scale(*params, steps: int = 64) -> tuple[np.float32, IntegerAffine] | None:
    """The output scale nearest to `y_scale` for which the integer body is exact, with its
    integer parameters, or None. `params` are `BnReluPlan`'s.

    The candidates grow from `y_scale` in relative steps of 2**-12, up to `steps` of them (+1.6%):
    a channel fails when `beta / alpha` sits just off a fraction with a small denominator (no
    `b / w` with |w| <= 127 comes close enough), which a change of the scale by ulps does not move
    (alpha and beta both scale with 1 / y_scale) but a change of the targets' rounding does. A
    larger step only widens the output range, so nothing observed is clipped; the range's error
    is far larger (a min/max estimate)."""
    y_scale = np.float32(params[-2])
    candidates = (np.float32(y_scale * (1 + k / 4096)) for k in range(steps + 1))
    for candidate, plan in _plans(params, candidates):
        affine = integer_affine(plan, params[1], params[-1])
        if affine is not None:
            return candidate, affine
    return None


def float_output_scale(*params, steps: int = 64) -> np.float32:
    """The output scale nearest to `y_scale`, within `steps` float32 ulps either way (a relative
    change below 1e-5), for which the float body is exact, else `y_scale`: onnxruntime then runs
    the node at float32 speed, still bit-exact."""
    for candidate, plan in _plans(params, _ulps(params[-2], steps)):
        if direct_body_is_exact(plan, params[1], params[-1], "float"):
            return candidate
    return np.float32(params[-2])


def any_rank(plan: BnReluPlan, x: np.ndarray) -> np.ndarray:
    """`plan` applied to `x` of any rank >= 2: the op is elementwise per channel (axis 1), so
    [N, C, ...] runs as [N, C, rest] through the kernel, which takes rank 3 to 5 as PyTorch's."""
    flat = x.reshape(x.shape[:2] + (math.prod(x.shape[2:]),)) if x.ndim >= 2 else x
    return plan(flat).reshape(x.shape)


def node_plan(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> BnReluPlan | None:
    """The kernel plan of a QLinearBatchNormRelu node whose parameters are constants."""
    if not all(name in constants for name in node.input[1:len(INPUTS)]):
        return None
    x_scale, x_zp, weight, bias, mean, var, y_scale, y_zp = (
        constants[name] for name in node.input[1:len(INPUTS)])
    epsilon = next((helper.get_attribute_value(a) for a in node.attribute
                    if a.name == "epsilon"), 1e-5)
    return BnReluPlan(x_scale, x_zp, weight, bias, mean, var, float(np.float32(epsilon)),
                      y_scale.reshape(()), y_zp.reshape(()), in_dtype=x_zp.dtype,
                      out_dtype=y_zp.dtype)


def _integer_affine_of(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> IntegerAffine:
    names = node.input[len(INPUTS):]
    if len(names) != len(INTEGER_INPUTS) or not all(name in constants for name in names):
        raise ModelError(f"{OP_TYPE} {node_label(node)} has {len(node.input)} inputs: expected "
                         f"{len(INPUTS)}, or {len(INPUTS) + len(INTEGER_INPUTS)} with constant "
                         "integer parameters")
    weight, scale, bias = (constants[name] for name in names)
    return IntegerAffine(weight, bias, scale)


def body_for(model: onnx.ModelProto) -> str:
    """The body `model` gets: "integer" when its QLinearBatchNormRelu nodes carry integer
    parameters (each checked over all channels and input codes: a ModelError if one is not
    exact), else the fastest direct body ("float", then "double") that is exact for every node,
    else "table", which is exact for any parameters (and for parameters that are not constants,
    which cannot be checked)."""
    constants = constant_values(model)
    nodes = [node for node in model.graph.node if node.domain == DOMAIN and node.op_type == OP_TYPE]
    if any(len(node.input) > len(INPUTS) for node in nodes):
        for node in nodes:
            plan = node_plan(node, constants)
            if plan is None or not integer_body_is_exact(plan, constants[node.input[8]],
                                                         _integer_affine_of(node, constants)):
                raise ModelError(f"{OP_TYPE} {node_label(node)}: its integer parameters do not "
                                 "reproduce the quantized BN-ReLU exactly; calibrate the model again")
        return "integer"
    checks = []
    for node in nodes:
        plan = node_plan(node, constants)
        if plan is None:
            return "table"
        checks.append((plan, constants[node.input[2]], constants[node.input[8]]))
    for precision in ("float", "double"):
        if all(direct_body_is_exact(*check, precision) for check in checks):
            return precision
    return "table"


def function_for(model: onnx.ModelProto, body: str | None = None) -> onnx.FunctionProto:
    """The function body of `body`, by default `body_for(model)`, at the model's opset."""
    opset, body = default_opset(model), body or body_for(model)
    if body == "integer":
        return integer_function(opset)
    return qlinear_bn_relu_function(opset) if body == "table" else direct_function(opset, body)


class QLinearBatchNormRelu(OpRun):
    """`bnq.QLinearBatchNormRelu` for `ReferenceEvaluator(model, new_ops=[...])`: the NumPy kernel,
    with the plan cached per parameter values."""

    op_domain = DOMAIN

    def _run(self, X, X_scale, X_zero_point, scale, B, input_mean, input_var, Y_scale,
             Y_zero_point, conv_weight=None, conv_scale=None, conv_bias=None, epsilon=None,
             channels=None):
        # the integer body's parameters (conv_*, channels) are a lowering: the kernel computes
        # the op from its definition
        eps = 1e-5 if epsilon is None else float(np.float32(epsilon))
        key = (X.dtype.str, Y_zero_point.dtype.str, eps) + tuple(
            (a.dtype.str, a.shape, a.tobytes()) for a in (X_scale, X_zero_point, scale, B,
                                                           input_mean, input_var, Y_scale,
                                                           Y_zero_point))
        cache = self.__dict__.setdefault("_plans", {})
        plan = cache.get(key)
        if plan is None:
            plan = BnReluPlan(X_scale, X_zero_point, scale, B, input_mean, input_var, eps,
                              np.asarray(Y_scale).reshape(()), np.asarray(Y_zero_point).reshape(()),
                              in_dtype=X.dtype, out_dtype=Y_zero_point.dtype)
            cache.clear()
            cache[key] = plan
        return (any_rank(plan, X),)
