"""bnq.kernels against a slow exact reference (Python fractions) and against PyTorch."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnq import fastpath, kernels
from bnq.errors import ArgumentError
from bnq.kernels import BnReluPlan, fma_float32, fused_params, quantized_batch_norm_relu

RANGES = {np.uint8: (0, 255), np.int8: (-128, 127)}


def _f32(value) -> float:
    return float(np.float32(value))


def reference(x, x_scale, x_zero_point, weight, bias, mean, var, eps, y_scale, y_zero_point,
              out_dtype=None):
    """Per element, with exact rationals for the FMA: slow, but structurally unlike the kernel."""
    out_dtype = np.dtype(out_dtype or x.dtype)
    lo, hi = RANGES[out_dtype.type]
    channels = x.shape[1]
    x_scale = np.broadcast_to(np.asarray(x_scale, np.float64), (channels,))
    x_zero_point = np.broadcast_to(np.asarray(x_zero_point), (channels,))
    y = np.empty(x.shape, out_dtype)
    table = {}
    for c in range(channels):
        alpha, beta = reference_params(x_scale[c], weight[c], bias[c], mean[c], var[c], eps,
                                       y_scale)
        for code in range(RANGES[x.dtype.type][0], RANGES[x.dtype.type][1] + 1):
            exact = Fraction(alpha) * (code - int(x_zero_point[c])) + Fraction(beta)
            v = _round_float32(exact)
            q = int(np.rint(np.clip(v, -2.0**40, 2.0**40))) + int(y_zero_point)
            table[c, code] = min(max(q, int(y_zero_point), lo), hi)
    for index in np.ndindex(x.shape):
        y[index] = table[index[1], int(x[index])]
    return y


def reference_params(x_scale, weight, bias, mean, var, eps, y_scale) -> tuple[float, float]:
    """One channel's (alpha, beta), written out from PyTorch's compute_fused_params: float32
    sqrt and products, the reciprocal and both divisions in double."""
    inv_sigma = _f32(1.0 / float(np.sqrt(np.float32(var) + np.float32(eps))))
    gain = _f32(np.float32(inv_sigma) * np.float32(weight))
    alpha = _f32(gain * (float(x_scale) / float(y_scale)))
    shift = _f32(np.float32(bias) - np.float32(np.float32(mean) * np.float32(inv_sigma))
                 * np.float32(weight))
    return alpha, _f32(shift / float(y_scale))


def _round_float32(exact: Fraction) -> float:
    """Round a rational to float32, ties to even (inf beyond the range)."""
    candidate = np.float32(float(exact))        # float() rounds correctly to double first
    if not np.isfinite(candidate):
        return float(candidate)
    below = np.nextafter(candidate, np.float32(-np.inf))
    above = np.nextafter(candidate, np.float32(np.inf))
    best = min((candidate, below, above),
               key=lambda f: (abs(Fraction(float(f)) - exact) if np.isfinite(f) else Fraction(10**60),
                              int(np.array(f, np.float32).view(np.int32)) & 1))
    return float(best)


def torch_reference(x, x_scale, x_zero_point, weight, bias, mean, var, eps, y_scale,
                    y_zero_point):
    torch = pytest.importorskip("torch")
    op = {3: torch.ops.quantized.batch_norm1d_relu, 4: torch.ops.quantized.batch_norm2d_relu,
          5: torch.ops.quantized.batch_norm3d_relu}[x.ndim]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(np.ascontiguousarray(x)),
                                                     float(x_scale), int(x_zero_point))
        t = [torch.from_numpy(np.asarray(a, np.float32)) for a in (weight, bias, mean, var)]
        y = op(qx, *t, float(eps), float(y_scale), int(y_zero_point))
    return y.int_repr().contiguous().numpy().view(x.dtype)


@st.composite
def cases(draw, per_channel=False):
    dtype = draw(st.sampled_from([np.uint8, np.int8]))
    lo, hi = RANGES[dtype]
    rank = draw(st.integers(3, 5))
    channels = draw(st.integers(1, 40))
    shape = (draw(st.integers(0, 3)), channels) + tuple(
        draw(st.lists(st.integers(1, 4), min_size=rank - 2, max_size=rank - 2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(lo, hi + 1, shape).astype(dtype)
    scale = st.floats(1e-6, 1e3).map(_f32) | st.sampled_from([1e-9, 1.0, 7e3])
    zero_point = st.integers(lo, hi) | st.sampled_from([lo, hi])
    gamma = rng.normal(0.5, 1.5, channels)
    gamma[rng.random(channels) < 0.2] *= -1
    var = rng.uniform(0, 2, channels) ** 3
    var[rng.random(channels) < 0.2] = 0.0
    x_scale = (np.array([draw(scale) for _ in range(channels)]) if per_channel else draw(scale))
    x_zero_point = (np.array([draw(zero_point) for _ in range(channels)]) if per_channel
                    else draw(zero_point))
    return dict(x=x, x_scale=x_scale, x_zero_point=x_zero_point, weight=gamma,
                bias=rng.normal(0, 2, channels), running_mean=rng.normal(0, 2, channels),
                running_var=var, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                y_scale=draw(scale), y_zero_point=draw(zero_point))


def _run(case, **kw):
    return quantized_batch_norm_relu(**case, **kw)


def _reference(case):
    return reference(case["x"], case["x_scale"], case["x_zero_point"], case["weight"],
                     case["bias"], case["running_mean"], case["running_var"], case["eps"],
                     case["y_scale"], case["y_zero_point"])


@settings(max_examples=30, deadline=None)
@given(cases())
def test_matches_reference(case):
    y = _run(case)
    assert y.dtype == case["x"].dtype and y.shape == case["x"].shape
    np.testing.assert_array_equal(y, _reference(case))


@settings(max_examples=30, deadline=None)
@given(cases())
def test_matches_torch(torch, case):
    if case["x"].size and not _overflows_int32(case):
        assert_matches_torch(_run(case), case)


def _overflows_int32(case) -> bool:
    """PyTorch's kernel overflows int32 (vector path) or long (scalar path) once
    |alpha * d + beta| nears 2**31, and then returns the zero point instead of saturating
    (depending on the channel's position and the zero point); bnq saturates."""
    plan = BnReluPlan(case["x_scale"], case["x_zero_point"], case["weight"], case["bias"],
                      case["running_mean"], case["running_var"], case["eps"], case["y_scale"],
                      case["y_zero_point"], in_dtype=case["x"].dtype)
    bound = np.abs(plan.alpha.astype(np.float64)) * 256 + np.abs(plan.beta)
    return bool((bound >= 2.0**31 - 512).any())


@settings(max_examples=12, deadline=None)
@given(cases(per_channel=True))
def test_per_channel_input_quantization_matches_reference(case):
    np.testing.assert_array_equal(_run(case), _reference(case))


def _tie_case(signed: bool, bias_sign: float):
    """alpha * 3 lands exactly halfway between two float32 values next to 2.5 and beta is tiny:
    one FMA rounding gives 3 (beta > 0) or 2 (beta < 0); a double sum cast to float gives 2."""
    dtype = np.int8 if signed else np.uint8
    x = np.full((2, 2, 5), 3, dtype)
    x[:, :, 0] = 0
    weight = np.array([6990507 * 2.0**-23, 0.25])
    bias = np.array([bias_sign * 1e-30, 0.5])
    return dict(x=x, x_scale=1.0, x_zero_point=0, weight=weight, bias=bias,
                running_mean=np.zeros(2), running_var=np.ones(2), eps=0.0, y_scale=1.0,
                y_zero_point=0)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bias_sign, expected", [(1.0, 3), (-1.0, 2)])
def test_single_rounding_fma_on_a_constructed_tie(signed, bias_sign, expected):
    case = _tie_case(signed, bias_sign)
    y = _run(case)
    assert int(y[0, 0, 1]) == expected
    np.testing.assert_array_equal(y, _reference(case))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bias_sign", [1.0, -1.0])
def test_constructed_tie_matches_torch(torch, signed, bias_sign):
    case = _tie_case(signed, bias_sign)
    assert_matches_torch(_run(case), case)


def assert_matches_torch(y, case):
    """y equals PyTorch's output on `case` (callers take the `torch` fixture: skipped without
    torch)."""
    np.testing.assert_array_equal(y, torch_reference(*(case[k] for k in (
        "x", "x_scale", "x_zero_point", "weight", "bias", "running_mean", "running_var", "eps",
        "y_scale", "y_zero_point"))))


def test_fused_params_against_the_written_out_formula():
    """alpha and beta bit for bit on 2000 random channels: a float32 scale ratio (instead of
    PyTorch's double) changes alpha on many of them, even where no output code moves."""
    rng = np.random.default_rng(2)
    n = 2000
    x_scale = np.exp(rng.uniform(-8, 2, n)).astype(np.float32)
    y_scale = np.float32(np.exp(rng.uniform(-8, 2)))
    weight, bias, mean = (rng.normal(0, 2, n).astype(np.float32) for _ in range(3))
    var = rng.uniform(0, 3, n).astype(np.float32)
    alpha, beta = fused_params(weight, bias, mean, var, 1e-5, x_scale, y_scale)
    expected = [reference_params(*args, 1e-5, y_scale)
                for args in zip(x_scale, weight, bias, mean, var)]
    np.testing.assert_array_equal(alpha, np.array([a for a, _ in expected], np.float32))
    np.testing.assert_array_equal(beta, np.array([b for _, b in expected], np.float32))


def test_fma_float32_against_fractions():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 3, 4000).astype(np.float32)
    d = rng.integers(-255, 256, 4000)
    b = (rng.normal(0, 1, 4000) * 10.0 ** rng.integers(-30, 3, 4000)).astype(np.float32)
    got = fma_float32(a, d, b)
    want = [_round_float32(Fraction(float(ai)) * int(di) + Fraction(float(bi)))
            for ai, di, bi in zip(a, d, b)]
    np.testing.assert_array_equal(got, np.array(want, np.float32))


def test_saturation_both_ends_and_out_dtype():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 256)
    y = quantized_batch_norm_relu(x, 1.0, 128, [50.0], [0.0], [0.0], [1.0], 0.0, 1.0, 10)
    assert y[0, 0, 0] == 10 and y[0, 0, -1] == 255
    y8 = quantized_batch_norm_relu(x, 1.0, 128, [50.0], [0.0], [0.0], [1.0], 0.0, 1.0, -5,
                                   out_dtype=np.int8)
    assert y8.dtype == np.int8 and y8[0, 0, 0] == -5 and y8[0, 0, -1] == 127


def test_plan_reuse_empty_batch_and_strategies():
    rng = np.random.default_rng(0)
    c = 8
    plan = BnReluPlan(0.02, 128, rng.normal(1, .3, c), rng.normal(0, .5, c), rng.normal(0, .5, c),
                      rng.uniform(.5, 2, c), 1e-5, 0.03, 0)
    assert plan.strategies["float"] == c     # ordinary parameters: the fastest path everywhere
    assert plan(np.zeros((0, c, 4, 4), np.uint8)).shape == (0, c, 4, 4)
    x = rng.integers(0, 256, (4, c, 64, 70), dtype=np.uint8)       # large: the blocked path
    np.testing.assert_array_equal(plan(x), plan.table[np.arange(c)[None, :, None, None], x])


GOOD = dict(x=np.zeros((1, 2, 3), np.uint8), x_scale=0.1, x_zero_point=0, weight=[1.0, 1.0],
            bias=[0.0, 0.0], running_mean=[0.0, 0.0], running_var=[1.0, 1.0], eps=1e-5,
            y_scale=0.1, y_zero_point=0)


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((2, 2), np.uint8)), r"x: expected 3D, 4D or 5D input \(got 2D input\)"),
    (dict(x=np.zeros((1, 2, 3), np.float32)), "x: expected uint8 or int8"),
    (dict(weight=[1.0]), "weight: has 1 values but the input has 2 channels"),
    (dict(bias=[0.0, 0.0, 0.0]), "bias: has 3 values"),
    (dict(running_mean=[0.0, np.nan]), "running_mean: contains NaN"),
    (dict(running_var=[1.0, -1.0]), "running_var: variances must be >= 0"),
    (dict(running_var=[0.0, 1.0], eps=0.0), "running_var, eps: channel 0"),
    (dict(x_scale=0.0), "x_scale: scales must be finite and > 0"),
    (dict(x_scale=[0.1, 0.1, 0.1]), "x_scale: has 3 values"),
    (dict(y_scale=np.inf), "y_scale: scales must be finite and > 0"),
    (dict(y_scale=[0.1, 0.1]), "y_scale: expected a scalar"),
    (dict(x_zero_point=256), r"x_zero_point: zero points must lie in \[0, 255\]"),
    (dict(y_zero_point=-1), r"y_zero_point: zero points must lie in \[0, 255\]"),
    (dict(y_zero_point=0.5), "y_zero_point: zero points must be integers"),
    (dict(eps=-1.0), "eps: expected a finite value >= 0"),
])
def test_argument_errors(change, message):
    with pytest.raises(ArgumentError, match=message):
        quantized_batch_norm_relu(**{**GOOD, **change})


def test_plan_rejects_wrong_input():
    plan = BnReluPlan(0.1, 0, [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0], 1e-5, 0.1, 0)
    with pytest.raises(ArgumentError, match="x: has 3 channels"):
        plan(np.zeros((1, 3, 4), np.uint8))
    with pytest.raises(ArgumentError, match="expected uint8 input"):
        plan(np.zeros((1, 2, 4), np.int8))


def _plan_case(rng, channels, in_dtype, out_dtype, gain):
    """Ordinary BN parameters with |alpha| around `gain` codes out per code in, some negative."""
    lo, hi = RANGES[in_dtype]
    weight = rng.normal(1.0, 0.3, channels) * np.where(rng.random(channels) < 0.25, -1, 1)
    out_lo = RANGES[out_dtype][0]
    return dict(x_scale=0.02 * gain, x_zero_point=int(rng.integers(lo, hi + 1)), weight=weight,
                bias=rng.normal(0, 0.5, channels), running_mean=rng.normal(0, 0.5, channels),
                running_var=rng.uniform(0.5, 2.0, channels), eps=1e-5, y_scale=0.02,
                y_zero_point=int(rng.integers(out_lo, out_lo + 40)))


@pytest.mark.parametrize("in_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("gain", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("kind, out_dtype", [("float", np.uint8),  # the float path: uint8 only
                                             ("float_int16", np.uint8), ("float_int16", np.int8),
                                             ("int32", np.uint8), ("int32", np.int8)])
def test_forced_fast_path_equals_table_on_every_code(in_dtype, out_dtype, gain, kind, monkeypatch):
    """Each arithmetic path, forced on every channel it has constants for (no re-check against
    the table), reproduces the table on all 256 codes, in uneven blocks."""
    monkeypatch.setattr(fastpath, "_BLOCK", 777)         # many blocks, ragged edges
    rng = np.random.default_rng(int(gain * 10) + 7 * (in_dtype is np.int8))
    c = 24
    params = _plan_case(rng, c, in_dtype, out_dtype, gain)
    plan = BnReluPlan(**params, in_dtype=in_dtype, out_dtype=out_dtype)
    fast = plan.fast_path
    code = {"float": fastpath._FLOAT, "float_int16": fastpath._FLOAT_I16,
            "int32": fastpath._I32}[kind]
    usable = fast._plan_rows(code, np.arange(c)) & (fast._kind != fastpath._CONST)
    # exact plateau ends are rare for the clamped float line when steps skip output values
    assert usable.sum() >= (1 if kind == "float" and gain > 1 else c // 2)
    fast._kind = np.where(usable, code, fastpath._TABLE)
    fast._steps_cache = None
    x = rng.permuted(np.tile(np.arange(256, dtype=np.uint8), (3, c, 7)), axis=2)
    x = x.reshape(3, c, 28, 64).view(in_dtype)              # every code in every channel
    y = plan(x)
    np.testing.assert_array_equal(y, plan.table[np.arange(c)[None, :, None, None], x.view(np.uint8)])


def _large_case(in_dtype, gain):
    """12 channels of ordinary parameters and a (2, 12, 48, 48) input: the blocked fast path."""
    rng = np.random.default_rng(int(gain * 100))
    c = 12
    params = _plan_case(rng, c, in_dtype, np.dtype(in_dtype).type, gain)
    lo, hi = RANGES[in_dtype]
    return dict(x=rng.integers(lo, hi + 1, (2, c, 48, 48)).astype(in_dtype), **params)


@pytest.mark.parametrize("in_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("gain", [0.2, 1.0, 3.0])
def test_large_input_matches_reference(in_dtype, gain):
    case = _large_case(in_dtype, gain)
    x, c = case["x"], case["x"].shape[1]
    plan = BnReluPlan(**{k: v for k, v in case.items() if k != "x"}, in_dtype=in_dtype)
    y = plan(x)
    assert plan.strategies["table"] <= 1
    small = dict(case, x=x[:, :, :1, :256 // 48 + 1])
    np.testing.assert_array_equal(_run(small), _reference(small))
    np.testing.assert_array_equal(y, plan.table[np.arange(c)[None, :, None, None], x.view(np.uint8)])


@pytest.mark.parametrize("in_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("gain", [0.2, 1.0, 3.0])
def test_large_input_matches_torch(torch, in_dtype, gain):
    case = _large_case(in_dtype, gain)
    assert_matches_torch(_run(case), case)


def test_the_recheck_rejects_wrong_constants(monkeypatch):
    """The safety net: the FLOAT strategy's lines off by 0.75 of a step, with a margin that
    claims they fit. The plan's re-check on all 256 codes rejects them, those channels take
    another path, and every code still equals the table."""
    real = fastpath._float_lines

    def wrong_lines(z, codes, slope, exact_ends):
        a, b, width = real(z, codes, slope, exact_ends)
        return a, (b + np.float32(0.75)) if exact_ends else b, width   # exact_ends: FLOAT's

    monkeypatch.setattr(fastpath, "_float_lines", wrong_lines)
    rng = np.random.default_rng(5)
    c = 16
    plan = BnReluPlan(**_plan_case(rng, c, np.uint8, np.uint8, 1.0))
    fast = plan.fast_path
    assert fast._plan_rows(fastpath._FLOAT, np.arange(c)).sum() >= c // 4   # wrong, yet offered
    assert not (fast._kind == fastpath._FLOAT).any()                        # and refused
    assert (fast._kind != fastpath._TABLE).sum() >= c // 2                  # another path took them
    x = np.tile(np.arange(256, dtype=np.uint8), (2, c, 9))    # every code, the blocked path
    np.testing.assert_array_equal(plan(x), plan.table[np.arange(c)[None, :, None], x])


def test_float_lines_margin_and_range():
    """The FLOAT path's line stays inside [0, 256) after the clamp and has a positive margin."""
    rng = np.random.default_rng(3)
    plan = BnReluPlan(**_plan_case(rng, 32, np.uint8, np.uint8, 1.0))
    fast = plan.fast_path
    floats = fast._kind == fastpath._FLOAT
    assert floats.sum() >= 24
    codes = np.arange(256)
    clamped = np.clip(codes[None, :], fast._lo[:, None], fast._hi[:, None]).astype(np.float32)
    values = (clamped * fast._a[:, None] + fast._b[:, None])[floats]
    assert ((values >= 0) & (values < 256)).all()
    np.testing.assert_array_equal(np.floor(values).astype(np.uint8), plan.table[floats])


def test_threads_split_channels_without_changing_a_code():
    rng = np.random.default_rng(7)
    case = _plan_case(rng, 5, np.uint8, np.uint8, 1.0)
    plan = BnReluPlan(**case)
    x = rng.integers(0, 256, (3, 5, 40, 40)).astype(np.uint8)  # large: the blocked path
    expected = plan(x)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(plan(x, threads), expected)
    np.testing.assert_array_equal(expected, plan.table[np.arange(5)[None, :, None, None], x])


def test_a_plan_gathers_its_first_large_input_and_plans_the_fast_path_on_the_second():
    case = _large_case(np.uint8, 1.0)
    x = case.pop("x")
    plan = BnReluPlan(**case)
    expected = plan.table[np.arange(x.shape[1])[None, :, None, None], x]
    np.testing.assert_array_equal(plan(x), expected)
    assert "fast_path" not in plan.__dict__               # planning would cost more than it saves
    np.testing.assert_array_equal(plan(x), expected)
    assert "fast_path" in plan.__dict__ and plan.strategies["table"] <= 1


def test_the_one_call_function_reuses_the_plan_of_parameters_it_has_seen(monkeypatch):
    monkeypatch.setattr(kernels, "_PLANS", {})
    case = _large_case(np.uint8, 1.0)
    x = case.pop("x")
    first = quantized_batch_norm_relu(x, **case)
    (plan,) = kernels._PLANS.values()
    np.testing.assert_array_equal(quantized_batch_norm_relu(x, **case), first)
    assert list(kernels._PLANS.values()) == [plan]
    other = dict(case, bias=np.asarray(case["bias"]) + 0.5)   # other values: another plan
    assert not np.array_equal(quantized_batch_norm_relu(x, **other), first)
    assert len(kernels._PLANS) == 2
    for shift in range(kernels._PLANS_KEPT):                  # the oldest plans are dropped
        quantized_batch_norm_relu(x, **dict(case, bias=np.asarray(case["bias"]) + shift + 1))
    assert len(kernels._PLANS) == kernels._PLANS_KEPT and plan not in kernels._PLANS.values()
