"""bnq.qops: the ONNX function body in onnxruntime and the reference evaluator, byte for byte
against the NumPy kernel, and the checker on a model holding the node and its function."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnq.errors import ArgumentError
from bnq.kernels import BnReluPlan, quantized_batch_norm_relu
from bnq.ops import DOMAIN
from bnq.qops import (
    MIN_OPSET,
    OP_TYPE,
    QLinearBatchNormRelu,
    body_for,
    direct_body_is_exact,
    direct_function,
    float_output_scale,
    function_for,
    qlinear_bn_relu_function,
)

RANGES = {np.uint8: (0, 255), np.int8: (-128, 127)}
ONNX_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


def make_model(rank, channels, dtype, p, opset=MIN_OPSET, body="table"):
    """A model of one QLinearBatchNormRelu node with the `body` ("table", "double", or "chosen":
    the one `function_for` picks for these parameters)."""
    inits = [numpy_helper.from_array(np.asarray(value, kind), name) for name, value, kind in (
        ("x_scale", p["x_scale"], np.float32), ("x_zero_point", p["x_zero_point"], dtype),
        ("weight", p["weight"], np.float32), ("bias", p["bias"], np.float32),
        ("mean", p["running_mean"], np.float32), ("var", p["running_var"], np.float32),
        ("y_scale", p["y_scale"], np.float32), ("y_zero_point", p["y_zero_point"], dtype))]
    node = helper.make_node(OP_TYPE, ["X", "x_scale", "x_zero_point", "weight", "bias", "mean",
                                      "var", "y_scale", "y_zero_point"], ["Y"], domain=DOMAIN,
                            epsilon=p["eps"])
    dims = ["N", channels] + [f"s{i}" for i in range(rank - 2)]
    graph = helper.make_graph(
        [node], "qbnrelu", [helper.make_tensor_value_info("X", ONNX_TYPES[dtype], dims)],
        [helper.make_tensor_value_info("Y", ONNX_TYPES[dtype], dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, 1)],
                              functions=[qlinear_bn_relu_function(opset)])
    model.ir_version = 9
    if body != "table":
        del model.functions[:]
        model.functions.append(function_for(model) if body == "chosen"
                               else direct_function(opset, body))
    return model


def run_all(model, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return (session.run(None, {"X": x})[0],
            ReferenceEvaluator(model).run(None, {"X": x})[0],
            ReferenceEvaluator(model, new_ops=[QLinearBatchNormRelu]).run(None, {"X": x})[0])


def kernel(x, p):
    # ONNX stores scales and epsilon as float32: feed the kernel the same values
    return quantized_batch_norm_relu(
        x, np.asarray(p["x_scale"], np.float32), p["x_zero_point"], p["weight"], p["bias"],
        p["running_mean"], p["running_var"], float(np.float32(p["eps"])),
        float(np.float32(p["y_scale"])), p["y_zero_point"])


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([np.uint8, np.int8]))
    lo, hi = RANGES[dtype]
    rank = draw(st.integers(3, 5))
    channels = draw(st.integers(1, 20))
    per_channel = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (draw(st.integers(0, 3)), channels) + tuple(rng.integers(1, 5, rank - 2))
    width = channels if per_channel else ()
    gamma = rng.normal(0.5, 1.5, channels)
    var = rng.uniform(0, 2, channels) ** 3
    var[rng.random(channels) < 0.2] = 0.0
    p = dict(x_scale=np.exp(rng.uniform(-8, 3, width)), x_zero_point=rng.integers(lo, hi + 1, width),
             weight=gamma, bias=rng.normal(0, 2, channels), running_mean=rng.normal(0, 2, channels),
             running_var=var, eps=draw(st.sampled_from([1e-5, 1e-3])),
             y_scale=float(np.exp(rng.uniform(-8, 3))),
             y_zero_point=draw(st.integers(lo, hi) | st.sampled_from([lo, hi])))
    x = rng.integers(lo, hi + 1, shape).astype(dtype)
    return rank, channels, dtype, p, x


@pytest.mark.parametrize("body", ["table", "chosen"])
@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_function_body_equals_kernel(body, case):
    """Both bodies a model can get: the table (exact for all parameters) and the one
    function_for picks (the fast double body whenever its exactness check passes)."""
    rank, channels, dtype, p, x = case
    model = make_model(rank, channels, dtype, p, body=body)
    expected = kernel(x, p)
    for got in run_all(model, x):
        assert got.dtype == dtype and got.shape == x.shape
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("bias_sign, expected", [(1.0, 3), (-1.0, 2)])
def test_function_body_rounds_once_on_a_constructed_tie(dtype, bias_sign, expected):
    """alpha * 3 is exactly halfway between two float32 values next to 2.5 and beta is tiny: a
    double sum cast to float would give 2 for both signs; one FMA rounding (PyTorch) gives 3/2."""
    p = dict(x_scale=1.0, x_zero_point=0, weight=[6990507 * 2.0**-23, 0.5],
             bias=[bias_sign * 1e-30, -1e-30], running_mean=[0.0, 0.0], running_var=[1.0, 1.0],
             eps=0.0, y_scale=1.0, y_zero_point=0)
    x = np.full((1, 2, 4), 3, dtype)
    expected_all = kernel(x, p)
    assert expected_all[0, 0, 0] == expected
    for got in run_all(make_model(3, 2, dtype, p), x):
        np.testing.assert_array_equal(got, expected_all)
    chosen = make_model(3, 2, dtype, p, body="chosen")
    for got in run_all(chosen, x):
        np.testing.assert_array_equal(got, expected_all)
    if bias_sign > 0:  # the double body rounds twice here and gives 2: the check refuses it
        assert run_all(make_model(3, 2, dtype, p, body="double"), x)[0][0, 0, 0] == 2
        assert "Gather" in {node.op_type for node in chosen.functions[0].node}


def test_typical_parameters_get_a_fast_direct_body():
    rng = np.random.default_rng(0)
    p = dict(x_scale=0.02, x_zero_point=128, weight=rng.normal(1, 0.3, 64),
             bias=rng.normal(0, 0.5, 64), running_mean=rng.normal(0, 0.5, 64),
             running_var=rng.uniform(0.2, 2, 64), eps=1e-5, y_scale=0.03, y_zero_point=0)
    model = make_model(4, 64, np.uint8, p, body="chosen")
    assert "BatchNormalization" in {node.op_type for node in model.functions[0].node}
    x = rng.integers(0, 256, (2, 64, 5, 5)).astype(np.uint8)
    for got in run_all(model, x):
        np.testing.assert_array_equal(got, kernel(x, p))


@pytest.mark.parametrize("opset", [MIN_OPSET, 21])
def test_checker_full_check(opset):
    p = dict(x_scale=0.1, x_zero_point=3, weight=[1.0, 2.0], bias=[0.0, 1.0],
             running_mean=[0.0, 0.5], running_var=[1.0, 0.0], eps=1e-5, y_scale=0.05,
             y_zero_point=0)
    onnx.checker.check_model(make_model(4, 2, np.uint8, p, opset), full_check=True)


def test_function_needs_opset_19():
    with pytest.raises(ArgumentError, match="opset"):
        qlinear_bn_relu_function(17)


ARGS = ("x_scale", "x_zero_point", "weight", "bias", "running_mean", "running_var", "eps",
        "y_scale", "y_zero_point")


def float_body_inexact_case():
    """Typical 64-channel parameters for which the float body is not exact as they stand (its
    float32 mul-then-add rounds unlike PyTorch's FMA on some code), and every channel and code
    of all 256 as input."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = dict(x_scale=np.float32(rng.uniform(0.005, 0.05)), x_zero_point=np.uint8(128),
                 weight=rng.normal(1, 0.3, 64).astype(np.float32),
                 bias=rng.normal(0, 0.5, 64).astype(np.float32),
                 running_mean=rng.normal(0, 0.5, 64).astype(np.float32),
                 running_var=rng.uniform(0.2, 2, 64).astype(np.float32), eps=1e-5,
                 y_scale=np.float32(rng.uniform(0.005, 0.05)), y_zero_point=np.uint8(0))
        if not direct_body_is_exact(BnReluPlan(*(p[k] for k in ARGS)), p["x_zero_point"],
                                    p["y_zero_point"], "float"):
            x = rng.integers(0, 256, (2, 64, 16, 16)).astype(np.uint8)
            x[1] = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every code in every channel
            return p, x
    pytest.fail("no parameter set needed a nudge")


def test_the_double_body_where_the_float_body_is_inexact():
    """Where the float body would give a wrong code, the chosen body is the double one, and
    onnxruntime and the reference evaluator give the kernel's codes on every input code."""
    p, x = float_body_inexact_case()
    model = make_model(4, 64, np.uint8, p, body="chosen")
    assert body_for(model) == "double"
    assert run_all(make_model(4, 64, np.uint8, p, body="float"), x)[0].tolist() != \
        kernel(x, p).tolist()  # onnxruntime's float body is wrong here: the choice matters
    for got in run_all(model, x):
        np.testing.assert_array_equal(got, kernel(x, p))


def test_a_nudged_output_scale_makes_the_float_body_exact():
    """Some parameter sets round differently in float32 mul-then-add than in PyTorch's FMA; the
    calibrator then moves y_scale by a few ulps, which makes the fast float body exact."""
    p, x = float_body_inexact_case()
    scale = float_output_scale(*(p[k] for k in ARGS))
    assert scale != p["y_scale"] and abs(scale / p["y_scale"] - 1) < 1e-5
    p["y_scale"] = scale
    model = make_model(4, 64, np.uint8, p, body="float")
    assert body_for(model) == "float"
    for got in run_all(model, x):
        np.testing.assert_array_equal(got, kernel(x, p))


@pytest.mark.parametrize("body", ["table", "chosen"])
def test_values_beyond_int32_saturate(body):
    """alpha * d + beta far beyond 2**31 (zero variance, a large input scale, a tiny output
    scale): the reference evaluator's QuantizeLinear wraps there. The table body clips first;
    the direct bodies are refused for such parameters."""
    p = dict(x_scale=[12.96, 0.5], x_zero_point=[4, 0], weight=[1.47, 1.0], bias=[-4.4, 0.0],
             running_mean=[3.7, 0.0], running_var=[0.0, 1.0], eps=1e-5, y_scale=3.7e-4,
             y_zero_point=0)
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 256).repeat(2, axis=1)
    expected = kernel(x, p)
    assert expected[0, 0, -1] == 255
    model = make_model(3, 2, np.uint8, p, body=body)
    assert "Gather" in {node.op_type for node in model.functions[0].node}
    for got in run_all(model, x):
        np.testing.assert_array_equal(got, expected)
    with np.errstate(invalid="ignore"):
        forced = run_all(make_model(3, 2, np.uint8, p, body="float"), x)[1]  # the evaluator
    assert forced[0, 0, -1] == 0  # what the check protects from
