"""bnq.integer and the integer body: the depthwise QLinearConv parameters reproduce the exact
table, and onnxruntime's QLinearConv with them gives the NumPy kernel's codes (and PyTorch's) for
every channel and input code, at ranks 3 to 5, for uint8 and int8."""

import graphs
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnq.errors import ModelError
from bnq.integer import IntegerAffine, integer_affine, requantize
from bnq.kernels import BnReluPlan
from bnq.ops import DOMAIN
from bnq.qops import (
    INPUTS,
    MIN_OPSET,
    OP_TYPE,
    body_for,
    integer_body_is_exact,
    integer_function,
    integer_output_scale,
)
from bnq.runtime import numpy_runner

ONNX_TYPES = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}


def random_params(rng, channels, dtype, *, per_channel=True):
    lo = np.iinfo(dtype).min
    return dict(
        x_scale=rng.uniform(0.005, 0.1, channels if per_channel else ()).astype(np.float32),
        x_zero_point=rng.integers(lo, lo + 80, channels if per_channel else ()).astype(dtype),
        weight=(rng.normal(0.8, 0.6, channels) * rng.choice([-1, 1], channels, p=[0.2, 0.8])
                ).astype(np.float32),
        bias=rng.normal(0, 1, channels).astype(np.float32),
        running_mean=rng.normal(0, 1, channels).astype(np.float32),
        running_var=rng.uniform(0.05, 4, channels).astype(np.float32), eps=1e-5,
        y_scale=np.float32(rng.uniform(0.01, 0.1)), y_zero_point=np.array(lo, dtype))


def plan_of(p, dtype):
    return BnReluPlan(p["x_scale"], p["x_zero_point"], p["weight"], p["bias"], p["running_mean"],
                      p["running_var"], p["eps"], p["y_scale"], p["y_zero_point"],
                      in_dtype=dtype, out_dtype=dtype)


def integer_model(p, dtype, rank, affine):
    """One QLinearBatchNormRelu node with the integer body and `affine`'s parameters."""
    channels = len(p["weight"])
    arrays = [("x_scale", p["x_scale"], np.float32), ("x_zero_point", p["x_zero_point"], dtype),
              ("weight", p["weight"], np.float32), ("bias", p["bias"], np.float32),
              ("mean", p["running_mean"], np.float32), ("var", p["running_var"], np.float32),
              ("y_scale", p["y_scale"], np.float32), ("y_zero_point", p["y_zero_point"], dtype),
              ("conv_weight", affine.weight.reshape((-1,) + (1,) * (rank - 1)), np.int8),
              ("conv_scale", affine.scale, np.float32), ("conv_bias", affine.bias, np.int32)]
    inits = [numpy_helper.from_array(np.asarray(value, kind), name) for name, value, kind in arrays]
    node = helper.make_node(OP_TYPE, ["X"] + [name for name, _, _ in arrays], ["Y"],
                            domain=DOMAIN, epsilon=p["eps"], channels=channels)
    dims = ["N", channels] + [f"s{i}" for i in range(rank - 2)]
    graph = helper.make_graph(
        [node], "integer", [helper.make_tensor_value_info("X", ONNX_TYPES[np.dtype(dtype)], dims)],
        [helper.make_tensor_value_info("Y", ONNX_TYPES[np.dtype(dtype)], dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET),
                                                    helper.make_opsetid(DOMAIN, 1)],
                              functions=[integer_function(MIN_OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def every_code(channels, rank, dtype):
    """Every input byte in every channel: shape (2, C, 256) or (2, C, 16, 16) or (2, C, 4, 8, 8)."""
    spatial = {3: (256,), 4: (16, 16), 5: (4, 8, 8)}[rank]
    codes = np.arange(256, dtype=np.uint8).view(dtype).reshape(spatial)
    x = np.broadcast_to(codes, (2, channels, *spatial)).copy()
    x[1] = x[1][..., ::-1] if rank == 3 else x[1]
    return x


def run_ort(model, x):
    return graphs.run_ort(model, {"X": x})[0]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), channels=st.integers(1, 70), rank=st.sampled_from([3, 4, 5]),
       dtype=st.sampled_from([np.uint8, np.int8]), per_channel=st.booleans())
def test_integer_body_in_onnxruntime_equals_the_kernel_on_every_code(seed, channels, rank, dtype,
                                                                    per_channel):
    rng = np.random.default_rng(seed)
    p = random_params(rng, channels, dtype, per_channel=per_channel)
    found = integer_output_scale(p["x_scale"], p["x_zero_point"], p["weight"], p["bias"],
                                 p["running_mean"], p["running_var"], p["eps"], p["y_scale"],
                                 p["y_zero_point"])
    assert found is not None
    p["y_scale"], affine = found
    plan = plan_of(p, dtype)
    assert integer_body_is_exact(plan, p["y_zero_point"], affine)
    model = integer_model(p, dtype, rank, affine)
    assert body_for(model) == "integer"
    x = every_code(channels, rank, dtype)
    expected = plan(x)
    np.testing.assert_array_equal(run_ort(model, x), expected)
    np.testing.assert_array_equal(numpy_runner(model)({"X": x})[0], expected)


def test_integer_body_matches_pytorch(torch):
    rng = np.random.default_rng(7)
    p = random_params(rng, 48, np.uint8, per_channel=False)
    p["y_scale"], affine = integer_output_scale(
        p["x_scale"], p["x_zero_point"], p["weight"], p["bias"], p["running_mean"],
        p["running_var"], p["eps"], p["y_scale"], p["y_zero_point"])
    x = every_code(48, 4, np.uint8)
    q = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), float(p["x_scale"]),
                                                int(p["x_zero_point"]))
    tensors = [torch.from_numpy(p[k]) for k in ("weight", "bias", "running_mean", "running_var")]
    expected = torch.ops.quantized.batch_norm2d_relu(q, *tensors, p["eps"], float(p["y_scale"]),
                                                     int(p["y_zero_point"])).int_repr().numpy()
    np.testing.assert_array_equal(run_ort(integer_model(p, np.uint8, 4, affine), x), expected)


# A channel of torchvision's DenseNet-121 (denseblock2, layer 8, norm1, as calibrated on natural
# images) with no exact setting at its output scale: beta / alpha = 4.0019 sits between 4 and the
# nearest fractions b / w with |w| <= 127 (4 +- 1/127), and the codes at d = -2 and 2 (values
# 4.502 and 13.497) leave the line a window of 0.005 only.
HARD_ALPHA, HARD_BETA = np.float32(2.248843), np.float32(8.999726)


def hard_channel_params():
    """BN parameters giving (alpha, beta) = (HARD_ALPHA, HARD_BETA) at x_scale = y_scale = 1."""
    return dict(x_scale=np.float32(1), x_zero_point=np.uint8(40),
                weight=np.array([HARD_ALPHA], np.float32), bias=np.array([HARD_BETA], np.float32),
                running_mean=np.zeros(1, np.float32), running_var=np.ones(1, np.float32),
                eps=0.0, y_scale=np.float32(1), y_zero_point=np.uint8(0))


def test_a_channel_next_to_a_simple_fraction_has_no_setting_but_a_nearby_scale_does():
    p = hard_channel_params()
    plan = plan_of(p, np.uint8)
    assert plan.alpha[0] == HARD_ALPHA and plan.beta[0] == HARD_BETA
    assert integer_affine(plan, p["x_zero_point"], p["y_zero_point"]) is None
    scale, affine = integer_output_scale(*(p[k] for k in (
        "x_scale", "x_zero_point", "weight", "bias", "running_mean", "running_var", "eps",
        "y_scale", "y_zero_point")))
    assert 1 < scale < 1.02  # a wider range: nothing observed is clipped
    p["y_scale"] = scale
    model = integer_model(p, np.uint8, 4, affine)
    x = every_code(1, 4, np.uint8)
    np.testing.assert_array_equal(run_ort(model, x), plan_of(p, np.uint8)(x))


def test_no_integer_setting_unless_the_output_zero_point_is_the_lowest_code():
    p = random_params(np.random.default_rng(1), 8, np.uint8)
    p["y_zero_point"] = np.array(3, np.uint8)  # the ReLU clamps at 3, QLinearConv at 0
    assert integer_affine(plan_of(p, np.uint8), p["x_zero_point"], p["y_zero_point"]) is None
    plan = BnReluPlan(p["x_scale"], p["x_zero_point"], p["weight"], p["bias"],
                      p["running_mean"], p["running_var"], p["eps"], p["y_scale"], np.int8(-128),
                      in_dtype=np.uint8, out_dtype=np.int8)
    assert integer_affine(plan, p["x_zero_point"], np.int8(-128)) is None  # types differ


def test_requantize_rounds_half_to_even_and_clamps():
    codes = np.array([[0, 1, 2, 3, 250]])
    # s * (w * x + b) = 0.5 * (x + 0): 0, 0.5, 1, 1.5, 125 -> 0, 0, 1, 2, 125, clamped to 100
    y = requantize(np.array([1]), np.array([0]), np.array([0.5], np.float32), codes, 0, 100)
    np.testing.assert_array_equal(y, [[0, 0, 1, 2, 100]])


def test_tampered_integer_parameters_are_refused():
    rng = np.random.default_rng(3)
    p = random_params(rng, 16, np.uint8)
    p["y_scale"], affine = integer_output_scale(*(p[k] for k in (
        "x_scale", "x_zero_point", "weight", "bias", "running_mean", "running_var", "eps",
        "y_scale", "y_zero_point")))
    model = integer_model(p, np.uint8, 4, affine)
    bias = next(t for t in model.graph.initializer if t.name == "conv_bias")
    bias.CopyFrom(numpy_helper.from_array(affine.bias + 1000, "conv_bias"))
    with pytest.raises(ModelError, match="integer parameters"):
        body_for(model)
    del model.graph.node[0].input[len(INPUTS) + 1:]
    with pytest.raises(ModelError, match="inputs"):
        body_for(model)


def test_the_numpy_backend_computes_the_op_not_its_lowering():
    """bnq's NumPy kernel computes the node from its definition, whatever its conv_* inputs say."""
    p = random_params(np.random.default_rng(4), 4, np.uint8)
    garbage = IntegerAffine(np.zeros(4, np.int8), np.zeros(4, np.int32), np.ones(4, np.float32))
    x = every_code(4, 4, np.uint8)
    got = numpy_runner(integer_model(p, np.uint8, 4, garbage))({"X": x})[0]
    np.testing.assert_array_equal(got, plan_of(p, np.uint8)(x))
