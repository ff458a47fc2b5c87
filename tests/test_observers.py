"""Observers against slow, plainly written references; streaming, merging and bounded state;
hypothesis properties of the quantization parameters; PyTorch's MinMaxObserver where installed."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnq.errors import ArgumentError, DataError
from bnq.observers import (
    CANDIDATES,
    OBSERVERS,
    CandidateObserver,
    EntropyObserver,
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    make_observer,
)
from bnq.quantization import (
    dequantize,
    dequantize_linear,
    qparams_from_range,
    quant_range,
    quantize,
    weight_qparams,
)

METHODS = sorted(OBSERVERS)


def stream(seed, relu, n_batches=5, shape=(3, 6, 5, 5)):
    """Batches whose range grows from batch to batch (the histograms must regrid)."""
    rng = np.random.default_rng(seed)
    batches = []
    for k in range(n_batches):
        x = (rng.standard_normal((rng.integers(1, shape[0] + 1), *shape[1:])) * 3.0**k
             + rng.normal(size=(1, shape[1], 1, 1)))
        batches.append((np.maximum(x, 0) if relu else x).astype(np.float32))
    return batches


def observed(method, per_channel, batches, **options):
    obs = make_observer(method, per_channel=per_channel, **options)
    for x in batches:
        obs.update(x)
    return obs


def rows_of(batches, per_channel):
    """All values per row of state: (1, M) per tensor, (C, M) per channel."""
    x = np.concatenate(batches)
    if not per_channel:
        return x.reshape(1, -1)
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)


def assert_same_qparams(a, b):
    for field in ("scale", "zero_point", "rmin", "rmax"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.dtype == b.dtype


# --- references --------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_minmax_is_min_and_max_of_everything(per_channel, relu):
    batches = stream(1, relu)
    obs = observed("minmax", per_channel, batches)
    values = rows_of(batches, per_channel)
    np.testing.assert_array_equal(obs.min_val, values.min(axis=1))
    np.testing.assert_array_equal(obs.max_val, values.max(axis=1))
    qp = obs.qparams(np.uint8)
    expected_max = values.max(axis=1) if per_channel else values.max()
    np.testing.assert_array_equal(qp.rmax, expected_max)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_is_np_histogram_at_the_final_edges(method, per_channel, relu):
    batches = stream(2, relu)
    obs = observed(method, per_channel, batches, bins=512)
    values, edges = rows_of(batches, per_channel), obs.edges()
    assert obs.histogram.shape == (len(values), 512)
    assert ((edges[:, 0] >= 0) == relu).all()  # one-sided grid for ReLU outputs
    for row, (v, e) in enumerate(zip(values, edges)):
        assert e[0] <= v.min() and v.max() < e[-1]
        np.testing.assert_array_equal(obs.histogram[row], np.histogram(v, bins=e)[0])
    if method == "entropy":
        np.testing.assert_array_equal(obs.zeros, (values == 0).sum(axis=1))


def test_histogram_grows_from_all_zero_and_turns_two_sided():
    batches = [np.zeros((2, 3, 4), np.float32), np.full((1, 3, 4), 1e-30, np.float32),
               np.float32([[[0.5, 2.0, 0, 0]] * 3]), np.float32([[[-7.0, 1, 0, 0]] * 3])]
    for per_channel in (False, True):
        obs = observed("mse", per_channel, batches, bins=512)
        for v, e, h in zip(rows_of(batches, per_channel), obs.edges(), obs.histogram):
            np.testing.assert_array_equal(h, np.histogram(v, bins=e)[0])
            assert e[0] == -8 and e[-1] == 8


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_percentile_within_one_bin_of_np_percentile(per_channel, relu):
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((16, 4, 32), dtype=np.float32) for _ in range(4)]
    if relu:
        batches = [np.maximum(x, 0) for x in batches]
    for p in (99.0, 99.9, 100.0):
        obs = observed("percentile", per_channel, batches, percentile=p, bins=512)
        width = np.diff(obs.edges()[:, :2], axis=1)[:, 0]
        qp = obs.qparams(np.uint8)
        values = rows_of(batches, per_channel)
        for q, got in ((p, qp.rmax), (100 - p, np.maximum(qp.rmin, values.min(axis=1)))):
            # np.percentile interpolates between two samples: within a bin of one of them
            below = np.percentile(values, q, axis=1, method="lower")
            above = np.percentile(values, q, axis=1, method="higher")
            assert np.all((below - width <= got) & (got <= above + width)), (q, got, below)
            if relu:
                break


def test_percentile_100_is_minmax():
    batches = stream(4, relu=False)
    for dtype in (np.uint8, np.int8):
        assert_same_qparams(observed("percentile", True, batches, percentile=100).qparams(dtype),
                            observed("minmax", True, batches).qparams(dtype))


def magnitude(obs, row):
    """The row's histogram of |x| (folded around 0 when two-sided) and its bin width."""
    h, e = obs.histogram[row], obs.edges()[row]
    if e[0] < 0:
        half = len(h) // 2
        h = h[half:] + h[:half][::-1]
    return h, e[1] - e[0]


def brute_kl(hist, i, levels):
    """KL(P || Q) for a threshold of i bins, written as a plain loop (TensorRT's construction);
    ``hist`` is the magnitude histogram of the non-zero values."""
    p = [float(c) for c in hist[:i]]
    outliers = float(sum(hist[i:]))
    p[-1] += outliers
    q = [0.0] * i
    for g in range(levels):
        lo, hi = math.ceil(g * i / levels), math.ceil((g + 1) * i / levels)
        members = [j for j in range(lo, hi) if p[j] > 0]
        for j in members:
            q[j] = float(sum(hist[lo:hi])) / len(members)
    sp, sq = sum(p), sum(q)
    kl = 0.0
    for pj, qj in zip(p, q):
        if pj > 0:
            if qj == 0:
                return math.inf
            kl += pj / sp * math.log((pj / sp) / (qj / sq))
    return kl


def brute_mse(hist, i, lo, hi, steps):
    """Expected squared error of the range clipped at i bins (bin units), bin by bin."""
    span = min(i, hi) - max(-i, lo)
    error = 0.0
    for j, count in enumerate(hist):
        centre = j + 0.5
        if j < i:
            error += count * (span / steps) ** 2 / 12
        else:
            error += count * ((centre - i) ** 2 + 1 / 12)
    return error


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize("relu", [False, True])
def test_threshold_search_against_brute_force(method, relu):
    rng = np.random.default_rng(5)
    # long tails, so clipping pays (it does, for both rows in all 8 cases); channels of two scales
    x = rng.laplace(size=(400, 2, 20)).astype(np.float32) * np.float32([[[1], [0.01]]])
    x[:, :, ::4] = 0  # exact zeros, which the entropy search leaves out (ReLU adds more)
    if relu:
        x = np.maximum(x, 0)
    obs = observed(method, True, [x], bins=512)
    for dtype, reduce_range in ((np.uint8, False), (np.int8, True)):
        qmin, qmax = quant_range(dtype, reduce_range)
        qp = obs.qparams(dtype, reduce_range=reduce_range)
        for row in range(2):
            hist, w = magnitude(obs, row)
            lo, hi = min(obs.min_val[row], 0) / w, max(obs.max_val[row], 0) / w
            codes = qmax - qmin + 1
            if method == "entropy":
                steps = qmax - qmin
                first = codes if relu else codes // 2
                nonzero = hist.copy()
                nonzero[0] -= np.count_nonzero(x[:, row] == 0)
                last = max(first, max(j for j in range(len(hist)) if nonzero[j] > 0) + 1)
                cost = {}
                for i in range(first, last + 1):
                    span = min(i, hi) - max(-i, lo)  # codes: the share of the range in [0, i)
                    levels = min(max(round(codes * min(i, max(-lo, hi)) / span), codes // 2),
                                 codes, i)
                    # KL's threshold, among those no worse than min/max in squared error
                    if (brute_mse(nonzero, i, lo, hi, steps)
                            <= brute_mse(nonzero, last, lo, hi, steps) * (1 + 1e-9)):
                        cost[i] = brute_kl(nonzero, i, levels)
            else:
                nonzero = hist.copy()
                nonzero[0] -= np.count_nonzero(x[:, row] == 0)  # exact in any range
                cost = {i: brute_mse(nonzero, i, lo, hi, qmax - qmin)
                        for i in range(1, len(hist) + 1)}
            best = min(cost.values())
            near = [i for i, c in cost.items() if c <= best + 1e-9 * abs(best) + 1e-12]
            choices = [np.float32(min(i * w, obs.max_val[row])) for i in near]
            assert qp.rmax[row] in choices, (row, qp.rmax[row], choices[:5])
            if not relu:
                assert qp.rmin[row] in [np.float32(max(-i * w, obs.min_val[row])) for i in near]


def brute_mse_symmetric(hist, i, amax, steps):
    """brute_mse for a symmetric range [-t, t], t = min(i, amax) bins: its step is 2 t / steps."""
    step = 2 * min(i, amax) / steps
    return sum(count * (step ** 2 / 12 if j < i else (j + 0.5 - i) ** 2 + 1 / 12)
               for j, count in enumerate(hist))


def test_mse_symmetric_search_against_brute_force():
    """mse with symmetric parameters (int8, zero point 0): the threshold minimises the
    expected error of a range twice as wide as the threshold, 254 steps across it."""
    rng = np.random.default_rng(6)
    x = rng.laplace(size=(400, 2, 20)).astype(np.float32) * np.float32([[[1], [0.01]]])
    obs = observed("mse", True, [x], bins=512)
    qp = obs.qparams(np.int8, symmetric=True)
    for row in range(2):
        hist, w = magnitude(obs, row)
        amax = max(-obs.min_val[row], obs.max_val[row]) / w
        nonzero = hist.copy()
        nonzero[0] -= np.count_nonzero(x[:, row] == 0)
        cost = {i: brute_mse_symmetric(nonzero, i, amax, 254) for i in range(1, len(hist) + 1)}
        best = min(cost.values())
        near = [i for i, c in cost.items() if c <= best + 1e-9 * abs(best) + 1e-12]
        assert qp.rmax[row] in [np.float32(min(i * w, amax * w)) for i in near], row
        assert qp.rmax[row] < amax * w  # the long tail is clipped


@pytest.mark.parametrize("per_channel", [False, True])
def test_entropy_keeps_the_bulk_of_a_relu_output(per_channel):
    """On ReLU(N(0, s**2)) channels, half of each exact zeros, the threshold is above the 99th
    percentile (for s = 1 it was 2L bins = 2.0 < 2.33, while the zeros counted in bin 0).

    Why that bound is sound: clipping at t moves the outliers, a share ``a`` of the non-zero
    values, into P's last bin, where Q holds at most its last level's share ``b``; merging all
    other bins into one (data processing) gives KL(P || Q) >= a log(a / b) + (1 - a)
    log((1 - a) / (1 - b)). At the 99th percentile, 2.33 s, a = 2% and b ~ 2 phi(2.33) 2.33 / 256
    ~ 5e-4: KL >= 0.05, and more for any lower t. Not clipping (t = max) costs only the merging,
    about (i - L) / 2 over the number of non-zero values: 0.011 for a channel here."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((50, 4, 1000), dtype=np.float32) * np.float32([[[1], [0.3], [4],
                                                                            [1e-3]]])
    x = np.maximum(x, 0)
    obs = observed("entropy", per_channel, [x])
    values = rows_of([x], per_channel)
    qp = obs.qparams(np.uint8)
    assert np.all(np.percentile(values, 99, axis=1) <= qp.rmax)
    assert np.all(qp.rmax <= values.max(axis=1))


def quantization_db(x, qp):
    """SQNR of x through QuantizeLinear -> DequantizeLinear with qp, in dB."""
    noise = np.sum((dequantize(quantize(x, qp), qp) - x).astype(np.float64) ** 2)
    return 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / noise)


def best_clip_db(x, steps=400):
    """The best SQNR over ranges [max(-t, min), min(t, max)], t searched on a fine grid."""
    top = max(-x.min(), x.max())
    return max(quantization_db(x, qparams_from_range(max(-t, x.min()), min(t, x.max())))
               for t in np.linspace(0.01, 1, steps) * top)


def hardswish(x):
    return x * np.clip(x + 3, 0, 6) / 6


CONSTRUCTED = {
    # 4 logits of 64 images, ranges as an orientation classifier's: 256 values, so sparse that
    # the KL search saw no rounding error at its smallest threshold and clipped them (-12.7 dB)
    "logits": lambda rng: rng.standard_normal((64, 4)) * 0.7 + [0.8, -0.2, 0.3, 0.5],
    # HardSwish of N(0, 25): [-0.375, ~23]; with 128 codes per side assumed, entropy cut the
    # range to 15.8 (-8.2 dB); the range really puts ~250 codes above zero
    "hardswish": lambda rng: hardswish(rng.standard_normal((16, 8, 32, 32)) * 5),
    # uniform on [-1, 3]: any clipping costs more than it saves, min/max is the best range
    "uniform": lambda rng: rng.uniform(-1, 3, (16, 8, 32, 32)),
    "gaussian": lambda rng: rng.standard_normal((16, 8, 32, 32)),
    "laplace": lambda rng: rng.laplace(size=(16, 8, 32, 32)),
    "relu": lambda rng: np.maximum(rng.standard_normal((16, 8, 32, 32)), 0),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTED))
def test_no_method_much_worse_than_minmax(name):
    """On signed, lopsided, sparse and ReLU distributions every method's range quantizes the
    data within 1 dB of min/max (percentile clips by design; at 99.99 instead of its default
    99.999 it cost 1.3 dB on the ReLU output), entropy and mse within 0.1 dB, and mse within
    0.3 dB of the best clipping."""
    x = CONSTRUCTED[name](np.random.default_rng(0)).astype(np.float32)
    minmax = quantization_db(x, observed("minmax", False, [x]).qparams(np.uint8))
    got = {m: quantization_db(x, observed(m, False, [x]).qparams(np.uint8))
           for m in ("percentile", "entropy", "mse")}
    assert got["percentile"] >= minmax - 1, got
    assert min(got["entropy"], got["mse"]) >= minmax - 0.1, (minmax, got)
    assert got["mse"] >= best_clip_db(x) - 0.3, got


def test_sparse_logits_keep_their_range():
    """256 logit values: the best range is min/max (best_clip_db finds nothing better); the
    99.99th percentile interpolates between the two largest values (it took the second's bin,
    2.29 for a max of 2.65) and entropy does not clip where that costs squared error."""
    x = CONSTRUCTED["logits"](np.random.default_rng(0)).astype(np.float32)
    assert best_clip_db(x) <= quantization_db(x, qparams_from_range(x.min(), x.max())) + 0.01
    top = np.percentile(x, 99.99)
    width = 4 / 1024  # bin width: 2048 bins over [-4, 4)
    assert abs(observed("percentile", False, [x], percentile=99.99).qparams().rmax - top) <= width
    entropy = observed("entropy", False, [x]).qparams()
    assert entropy.rmax == x.max() and entropy.rmin == x.min()


def test_entropy_counts_the_codes_of_a_lopsided_range():
    """HardSwish output: the threshold lies above the 99.9th percentile (the fold with 128
    codes per side put it at the 99.5th, 15.8 for a max of 23.7)."""
    x = CONSTRUCTED["hardswish"](np.random.default_rng(0)).astype(np.float32)
    assert observed("entropy", False, [x]).qparams().rmax >= np.percentile(x, 99.9)


# --- streaming, merging, bounded state ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_batches_of_any_size_equal_one_big_batch(method, per_channel):
    whole = np.concatenate(stream(6, relu=method == "mse", shape=(8, 6, 5, 5)))
    n = len(whole)
    resplit = np.split(whole, [n // 2, n // 2, n // 2 + 1, n - 2])  # with an empty batch
    one = observed(method, per_channel, [whole])
    many = observed(method, per_channel, resplit)
    np.testing.assert_array_equal(one.min_val, many.min_val)
    if method != "minmax":
        np.testing.assert_array_equal(one.histogram, many.histogram)
    for dtype in (np.uint8, np.int8):
        assert_same_qparams(one.qparams(dtype), many.qparams(dtype))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_merge_equals_one_observer_of_both_streams(method, per_channel):
    first, second = stream(7, relu=True), stream(8, relu=False)[:3]  # second turns it two-sided
    both = observed(method, per_channel, first + second)
    for a, b in ((first, second), (second, first), ([], first + second)):
        merged = observed(method, per_channel, a)
        merged.merge(observed(method, per_channel, b))
        np.testing.assert_array_equal(merged.max_val, both.max_val)
        if method != "minmax":
            np.testing.assert_array_equal(merged.histogram, both.histogram)
        if method == "entropy":
            np.testing.assert_array_equal(merged.zeros, both.zeros)
        assert_same_qparams(merged.qparams(np.uint8), both.qparams(np.uint8))


@pytest.mark.parametrize("method", METHODS)
def test_state_size_is_fixed_after_the_first_update(method):
    obs = make_observer(method, per_channel=True)
    rng = np.random.default_rng(9)

    def state_bytes():
        return sum(v.nbytes for v in vars(obs).values() if isinstance(v, np.ndarray))

    obs.update(rng.standard_normal((2, 8, 4, 4), dtype=np.float32))
    size = state_bytes()
    for k in range(60):
        obs.update(rng.standard_normal((1 + k % 5, 8, 4, 4), dtype=np.float32) * 1.5**k)
        assert state_bytes() == size


# --- quantization parameters -------------------------------------------------------------------

finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(a=finite32, b=finite32, dtype=st.sampled_from([np.uint8, np.int8]),
       symmetric=st.booleans(), reduce_range=st.booleans())
def test_qparams_invariants(a, b, dtype, symmetric, reduce_range):
    rmin, rmax = min(a, b), max(a, b)
    qp = qparams_from_range(rmin, rmax, dtype, symmetric=symmetric, reduce_range=reduce_range)
    info = np.iinfo(dtype)
    assert qp.scale.dtype == np.float32 and np.isfinite(qp.scale) and qp.scale > 0
    assert qp.zero_point.dtype == dtype and info.min <= qp.zero_point <= info.max
    assert dequantize(quantize(np.float32(0), qp), qp) == 0  # zero exactly representable
    if rmin >= 0 and not symmetric:
        assert qp.zero_point == quant_range(dtype, reduce_range)[0]
    inside = np.linspace(rmin, rmax, 101, dtype=np.float32)
    error = np.abs(dequantize(quantize(inside, qp), qp) - inside)
    assert np.all(error <= qp.scale / 2 * (1 + 2**-16) + np.abs(inside) * 2**-22)


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, max_side=5),
                    elements=st.floats(-1e4, 1e4, width=32)),
       method=st.sampled_from(METHODS), per_channel=st.booleans(), relu=st.booleans())
def test_observer_qparams_invariants(x, method, per_channel, relu):
    if relu:
        x = np.abs(x)
    obs = make_observer(method, per_channel=per_channel, **({} if method == "minmax" else
                                                            {"bins": 512}))
    obs.update(x)
    for dtype in (np.uint8, np.int8):
        qp = obs.qparams(dtype)
        assert np.all(np.isfinite(qp.scale)) and np.all(qp.scale > 0)
        assert np.all(dequantize(quantize(np.zeros_like(x), qp), qp) == 0)
        if relu:
            assert np.all(qp.zero_point == np.iinfo(dtype).min)
        if method == "minmax":  # every value is inside the range
            scale = qp.scale.reshape(-1, *[1] * (x.ndim - 2)) if per_channel else qp.scale
            error = np.abs(dequantize(quantize(x, qp), qp) - x)
            assert np.all(error <= scale / 2 * (1 + 2**-16) + np.abs(x) * 2**-22)


def test_all_zero_tensor_gets_scale_eps_and_zero_point_qmin():
    for method in METHODS:
        obs = make_observer(method)
        obs.update(np.zeros((2, 3), np.float32))
        qp = obs.qparams(np.uint8)
        assert qp.scale == np.finfo(np.float32).eps and qp.zero_point == 0
        assert qp.rmin == 0 and qp.rmax == 0


def test_formulas_on_a_worked_example():
    qp = qparams_from_range(-1.0, 3.0, np.uint8)
    assert qp.scale == np.float32(4.0) / np.float32(255)
    assert qp.zero_point == 0 - round(-1.0 / float(qp.scale))  # 64
    qp = qparams_from_range(-1.0, 3.0, np.int8, symmetric=True)
    assert qp.scale == np.float32(3.0) / np.float32(127) and qp.zero_point == 0
    assert qp.rmin == -3 and qp.rmax == 3
    qp = qparams_from_range(0.5, 2.0, np.uint8, reduce_range=True)
    assert qp.rmin == 0 and qp.zero_point == 0 and qp.scale == np.float32(2.0) / np.float32(127)
    assert quant_range(np.int8, True) == (-64, 63)


def test_quantize_is_quantizelinear():
    qp = qparams_from_range(np.float32([0, -32]), np.float32([63.75, 31.75]), np.uint8)
    np.testing.assert_array_equal(qp.scale, [0.25, 0.25])
    np.testing.assert_array_equal(qp.zero_point, [0, 128])
    # ties round half to even; out-of-range values saturate
    x = np.float32([[0.125, -0.125], [0.375, 2.625], [-1000, 1000]])
    q = quantize(x, qp, axis=1)
    np.testing.assert_array_equal(q, np.uint8([[0, 128], [2, 138], [0, 255]]))
    np.testing.assert_array_equal(dequantize(q, qp, axis=1),
                                  np.float32([[0, 0], [0.5, 2.5], [0, 31.75]]))
    with pytest.raises(ArgumentError):
        quantize(np.zeros(3, np.float32), qp, axis=1)
    # one value in a 1-d array is per tensor, as onnxruntime reads it, whatever the axis
    np.testing.assert_array_equal(
        dequantize_linear(np.uint8([3, 5]), np.float32([0.5]), np.uint8([1]), axis=1),
        np.float32([1.0, 2.0]))


def test_weight_qparams_symmetric_per_output_channel():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.float32([1, 2, 0, 8])[:, None,
                                                                                         None, None]
    qp = weight_qparams(w)
    amax = np.abs(w).reshape(4, -1).max(axis=1)
    np.testing.assert_array_equal(qp.zero_point, np.zeros(4, np.int8))
    np.testing.assert_array_equal(qp.scale, np.maximum(amax / np.float32(127),
                                                       np.finfo(np.float32).eps))
    q = quantize(w, qp, axis=0)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    assert np.all(np.abs(dequantize(q, qp, axis=0) - w) <= qp.scale[:, None, None, None] / 2 * 1.0001)
    np.testing.assert_array_equal(weight_qparams(np.moveaxis(w, 0, 2), axis=2).scale, qp.scale)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise_data_error(method, bad):
    obs = make_observer(method, per_channel=True)
    x = np.ones((2, 3, 4), np.float32)
    x[1, 2, 3] = bad
    with pytest.raises(DataError, match="non-finite"):
        obs.update(x)


def test_bad_arguments():
    with pytest.raises(ArgumentError, match="minmax"):
        make_observer("kl")
    for p in (0, 49.9, 100.5, float("nan"), True):
        with pytest.raises(ArgumentError, match="percentile"):
            make_observer("percentile", percentile=p)
    with pytest.raises(ArgumentError, match="no option"):
        make_observer("minmax", bins=512)
    with pytest.raises(ArgumentError, match="bins"):
        make_observer("mse", bins=1000)
    with pytest.raises(ArgumentError, match="dtype"):
        qparams_from_range(0, 1, np.int16)
    with pytest.raises(DataError, match="no data"):
        make_observer("entropy").qparams(np.uint8)
    obs = make_observer("minmax", per_channel=True)
    with pytest.raises(DataError, match="rank"):
        obs.update(np.ones(3, np.float32))
    obs.update(np.ones((1, 3), np.float32))
    with pytest.raises(DataError, match="channels"):
        obs.update(np.ones((1, 4), np.float32))
    with pytest.raises(ArgumentError, match="merge"):
        obs.merge(make_observer("mse", per_channel=True))
    assert isinstance(make_observer("percentile", percentile=99), PercentileObserver)
    assert {EntropyObserver, MinMaxObserver, MseObserver} < set(OBSERVERS.values())


# --- PyTorch -----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype,reduce_range", [(np.uint8, False), (np.uint8, True),
                                                (np.int8, False), (np.int8, True)])
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's deprecations of quantized tensors
def test_minmax_matches_torch(per_channel, dtype, reduce_range):
    torch = pytest.importorskip("torch")
    from torch.ao.quantization import MinMaxObserver as TorchMinMax
    from torch.ao.quantization import PerChannelMinMaxObserver

    tdtype = torch.quint8 if dtype == np.uint8 else torch.qint8
    if per_channel:
        ref = PerChannelMinMaxObserver(ch_axis=1, dtype=tdtype, reduce_range=reduce_range,
                                       qscheme=torch.per_channel_affine)
    else:
        ref = TorchMinMax(dtype=tdtype, reduce_range=reduce_range)
    batches = stream(11, relu=False) + [np.zeros((1, 6, 5, 5), np.float32)]
    batches[0][:, 3] = np.abs(batches[0][:, 3]) + 1  # one channel positive in the first batch
    obs = observed("minmax", per_channel, batches)
    for x in batches:
        ref(torch.from_numpy(x))
    scale, zero_point = ref.calculate_qparams()
    qp = obs.qparams(dtype, reduce_range=reduce_range)
    np.testing.assert_array_equal(qp.scale, scale.numpy().astype(np.float32))
    np.testing.assert_array_equal(qp.zero_point.astype(np.int64), zero_point.numpy())
    x = np.concatenate(batches)
    if per_channel:
        tq = torch.quantize_per_channel(torch.from_numpy(x), scale, zero_point, 1, tdtype)
    else:
        tq = torch.quantize_per_tensor(torch.from_numpy(x), float(scale), int(zero_point), tdtype)
    np.testing.assert_array_equal(quantize(x, qp, axis=1), tq.int_repr().numpy())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_candidate_observer_is_every_method_over_one_stream(per_channel, relu):
    """One pass feeds every method: each candidate, also after merges, gives the parameters of
    that method's own observer fed the same batches."""
    batches = stream(7, relu)
    own = {method: make_observer(method, per_channel=per_channel,
                                 **({"percentile": 99.0} if method == "percentile" else {}))
           for method in CANDIDATES}
    halves = [make_observer("auto", per_channel=per_channel, percentile=99.0) for _ in range(2)]
    for index, x in enumerate(batches):
        halves[index % 2].update(x)
        for observer in own.values():
            observer.update(x)
    halves[0].merge(halves[1])
    assert isinstance(halves[0], CandidateObserver)
    clipped = 0
    for method, observer in own.items():
        for dtype in (np.uint8, np.int8):
            expected, actual = observer.qparams(dtype), halves[0].candidate(method).qparams(dtype)
            np.testing.assert_array_equal(actual.scale, expected.scale)
            np.testing.assert_array_equal(actual.zero_point, expected.zero_point)
            clipped += not np.array_equal(expected.scale, own["minmax"].qparams(dtype).scale)
    assert clipped  # the methods differ on this stream: the test tells them apart
    with pytest.raises(DataError, match="seen no data"):
        make_observer("auto").candidate("mse").qparams(np.uint8)
    with pytest.raises(ArgumentError, match="percentile"):
        make_observer("auto", percentile=101)
