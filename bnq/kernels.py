"""Quantized BatchNorm + ReLU, bit-exact with PyTorch's `quantized::batch_norm{1,2,3}d_relu`.

The math (PyTorch's `compute_fused_params` in qbatch_norm.cpp and `q_batch_norm_kernel` in
QuantizedOpKernels.cpp, checked against torch 2.13 on this machine element by element). Per
channel c, from float32 parameters, with `f32(.)` a rounding to float32 and `.` in double
where PyTorch uses double:

    inv_sigma[c] = f32(1.0 / sqrtf(var[c] + f32(eps)))                 # float sqrt, double 1/x
    alpha[c]     = f32(double(f32(inv_sigma[c] * weight[c])) * (x_scale / y_scale))
    beta[c]      = f32(double(bias[c] - f32(f32(mean[c] * inv_sigma[c]) * weight[c])) / y_scale)

and per element, `d = x_q - x_zero_point` (an exact small integer):

    v   = fma(alpha[c], d, beta[c])           # float32 fused multiply-add: ONE rounding
    y_q = clip(max(rint(v) + y_zero_point, y_zero_point), qmin, qmax)      # rint: half to even

PyTorch's AVX2 path computes `v` with `_mm256_fmadd_ps` and its scalar tail for leftover channels
(`lrintf(alpha * d + beta)`) is contracted to an FMA by the compiler too. Rounding the product to
float32 first (no FMA), dividing by `y_scale` in float32, or computing the ratio
`x_scale / y_scale` in float32 each disagree with torch on a few percent of near-tie elements;
the formula above gave 0 mismatches on 13 million tie-hunting elements (quint8 and qint8, 1d/2d/3d,
C = 1..70 so that both the vector and the scalar channel paths run). A per-channel `x_scale` and
`x_zero_point` (after a Concat) use the same formula with that channel's values.

One deliberate difference: where `|v| >= 2**31 - 128` (an output 2 billion steps past the range,
only reachable with absurd scales or a near-zero variance), PyTorch's int32 conversion overflows
and it returns the zero point or 255 depending on the channel's position and the zero point;
bnq saturates (255 for large positive `v`, the zero point for large negative `v`).

Why a table is exact: for 8-bit input, `y_q` depends only on the channel and the input code, so a
C x 256 table built once with the formula reproduces the op bit for bit. The table is computed in
float64 with an exact float32 FMA: `alpha * d` is exact in float64 (24 x 9 bits), the sum with
`beta` is exact up to an error `e` that TwoSum recovers, and rounding the float64 sum to float32
can only go wrong (double rounding) when that sum lands exactly halfway between two float32
values while `e != 0`; then the sign of `e` decides.

The fast apply path (`bnq.fastpath`) replaces the gather by arithmetic that provably
equals the table, channel by channel.

Channels are independent, so `threads` > 1 splits them over a thread pool; numpy releases the
GIL inside each pass (measured 1.06-1.23x on 2 cores: the passes are bound by memory bandwidth).
"""

from __future__ import annotations

import functools

import numpy as np

from bnq.errors import ArgumentError
from bnq.fastpath import FastPath
from bnq.machine import spread

_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
_RANK_NAMES = {3: "1d", 4: "2d", 5: "3d"}
_SMALL = 1 << 12            # below this many elements per channel, one flat gather is faster


def _dtype(value, name: str) -> np.dtype:
    dtype = np.dtype(value)
    if dtype not in _RANGES:
        raise ArgumentError(f"{name}: expected uint8 or int8, got {dtype}")
    return dtype


def _finite_vector(value, name: str, channels: int | None) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise ArgumentError(f"{name}: expected a 1-D array of per-channel values, got shape "
                            f"{array.shape}")
    if channels is not None and array.shape[0] != channels:
        raise ArgumentError(f"{name}: has {array.shape[0]} values but the input has {channels} "
                            "channels")
    if not np.isfinite(array).all():
        raise ArgumentError(f"{name}: contains NaN or infinite values")
    return array


def _scale(value, name: str, channels: int, per_channel: bool) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 1 and per_channel:
        array = _finite_vector(array, name, channels)
    elif array.ndim != 0:
        raise ArgumentError(f"{name}: expected a scalar{' or one value per channel' if per_channel else ''}, "
                            f"got shape {array.shape}")
    if not (np.isfinite(array).all() and (array > 0).all()):
        raise ArgumentError(f"{name}: scales must be finite and > 0, got {array.tolist()}")
    return np.broadcast_to(array, (channels,))


def _zero_point(value, name: str, channels: int, dtype: np.dtype, per_channel: bool) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim > (1 if per_channel else 0):
        raise ArgumentError(f"{name}: expected a scalar{' or one value per channel' if per_channel else ''}, "
                            f"got shape {array.shape}")
    if array.ndim == 1 and array.shape[0] != channels:
        raise ArgumentError(f"{name}: has {array.shape[0]} values but the input has {channels} "
                            "channels")
    if array.dtype.kind == "f":
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise ArgumentError(f"{name}: zero points must be integers, got {array.tolist()}")
    elif array.dtype.kind not in "iu":
        raise ArgumentError(f"{name}: zero points must be integers, got dtype {array.dtype}")
    lo, hi = _RANGES[dtype]
    if ((array < lo) | (array > hi)).any():
        raise ArgumentError(f"{name}: zero points must lie in [{lo}, {hi}] for {dtype}, got "
                            f"{array.tolist()}")
    return np.broadcast_to(array.astype(np.int64), (channels,))


def fused_params(weight, bias, running_mean, running_var, eps, x_scale, y_scale):
    """PyTorch's per-channel `(alpha, beta)` in float32 (see the module docstring).

    `x_scale` may be a scalar or one value per channel; all inputs are assumed validated."""
    f32, f64 = np.float32, np.float64
    weight, bias, mean, var = (np.asarray(a, dtype=f32) for a in (weight, bias, running_mean,
                                                                    running_var))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv_sigma = (1.0 / np.sqrt(var + f32(eps)).astype(f64)).astype(f32)
        alpha = ((inv_sigma * weight).astype(f64)
                 * (np.asarray(x_scale, f64) / f64(y_scale))).astype(f32)
        beta = ((bias - mean * inv_sigma * weight).astype(f64) / f64(y_scale)).astype(f32)
    return alpha, beta


def fma_float32(a: np.ndarray, d: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`fma(a, d, b)` rounded once to float32, for float32 `a`, `b` and integer `|d| < 2**29`."""
    f32, f64 = np.float32, np.float64
    p = np.asarray(a, f32).astype(f64) * d                      # exact
    b = np.broadcast_to(np.asarray(b, f32).astype(f64), p.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        s = p + b
        t = s - p
        e = (p - (s - t)) + (b - t)                           # TwoSum: s + e == p + b exactly
        f = s.astype(f32)
        g = f.astype(f64)
        r = s - g                                             # exact: g is s's float32 neighbour
        h = g + 2 * r                                         # the other neighbour if s is halfway
        halfway = (r != 0) & (h.astype(f32).astype(f64) == h)
        up = halfway & (np.sign(e) == np.sign(r)) & (e != 0)
    return np.where(up, h.astype(f32), f)


def _codes(dtype: np.dtype) -> np.ndarray:
    """The code of every byte pattern 0..255 of `dtype`."""
    return np.arange(256, dtype=np.uint8).view(dtype).astype(np.int64)


def input_offsets(x_zero_point, in_dtype) -> np.ndarray:
    """d = code - x_zero_point, C x 256, for every channel and input byte pattern."""
    return _codes(np.dtype(in_dtype))[None, :] - np.asarray(x_zero_point, np.int64)[:, None]


def output_codes(v: np.ndarray, y_zero_point, out_dtype) -> np.ndarray:
    """clip(max(rint(v) + y_zero_point, y_zero_point)) in `out_dtype`, for float32 values `v`."""
    lo, hi = _RANGES[np.dtype(out_dtype)]
    rounded = np.rint(np.clip(v.astype(np.float64), -2.0**40, 2.0**40)).astype(np.int64)
    return np.clip(np.maximum(rounded + y_zero_point, y_zero_point), lo, hi).astype(out_dtype)


def build_table(alpha, beta, x_zero_point, y_zero_point, in_dtype, out_dtype) -> np.ndarray:
    """C x 256 output codes (`out_dtype`) indexed by channel and input byte pattern."""
    d = input_offsets(x_zero_point, in_dtype)
    v = fma_float32(np.asarray(alpha)[:, None], d, np.asarray(beta)[:, None])
    return output_codes(v, y_zero_point, out_dtype)


class BnReluPlan:
    """Everything derived from one parameter set: the exact table and a per-channel strategy.

    Build once per model (parameters are constants), then call on arrays of shape (N, C, ...)."""

    def __init__(self, x_scale, x_zero_point, weight, bias, running_mean, running_var, eps,
                 y_scale, y_zero_point, *, in_dtype=np.uint8, out_dtype=None):
        self.in_dtype = _dtype(in_dtype, "x")
        self.out_dtype = _dtype(self.in_dtype if out_dtype is None else out_dtype, "out_dtype")
        weight = _finite_vector(weight, "weight", None)
        channels = weight.shape[0]
        bias = _finite_vector(bias, "bias", channels)
        mean = _finite_vector(running_mean, "running_mean", channels)
        var = _finite_vector(running_var, "running_var", channels)
        if (var < 0).any():
            raise ArgumentError(f"running_var: variances must be >= 0, got {var[var < 0][:4].tolist()}")
        if not (np.isfinite(eps) and eps >= 0):
            raise ArgumentError(f"eps: expected a finite value >= 0, got {eps}")
        x_scale = _scale(x_scale, "x_scale", channels, per_channel=True)
        y_scale = float(_scale(y_scale, "y_scale", channels, per_channel=False)[0])
        x_zero_point = _zero_point(x_zero_point, "x_zero_point", channels, self.in_dtype, True)
        y_zero_point = int(_zero_point(y_zero_point, "y_zero_point", channels, self.out_dtype,
                                       False)[0])
        alpha, beta = fused_params(weight, bias, mean, var, eps, x_scale, y_scale)
        if not np.isfinite(alpha).all():
            bad = int(np.flatnonzero(~np.isfinite(alpha))[0])
            raise ArgumentError(f"running_var, eps: channel {bad} has a non-finite multiplier "
                                "(running_var + eps is 0, or weight * x_scale / y_scale overflows "
                                "float32)")
        if not np.isfinite(beta).all():
            bad = int(np.flatnonzero(~np.isfinite(beta))[0])
            raise ArgumentError(f"bias, y_scale: channel {bad} has a non-finite offset "
                                "((bias - mean * weight / sigma) / y_scale overflows float32)")
        self.channels = channels
        self.alpha, self.beta = alpha, beta
        self.table = build_table(alpha, beta, x_zero_point, y_zero_point, self.in_dtype,
                                 self.out_dtype)
        self._byte_table = self.table.view(np.uint8)
        self._flat_table = np.ascontiguousarray(self._byte_table).ravel()
        self._seen_large = False

    @functools.cached_property
    def fast_path(self) -> FastPath:
        """The per-channel arithmetic, planned on first use (calibration checks need only the
        table)."""
        return FastPath(self.table, self.alpha, self.in_dtype, self.out_dtype)

    @property
    def strategies(self) -> dict[str, int]:
        """How many channels use each apply path."""
        return self.fast_path.strategies

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """The output codes of `x`; `threads` > 1 splits the channels over that many threads
        (numpy releases the GIL inside each pass)."""
        x = np.asarray(x)
        if x.ndim not in _RANK_NAMES:
            raise ArgumentError(f"x: expected 3D, 4D or 5D input (got {x.ndim}D input)")
        if x.dtype != self.in_dtype:
            raise ArgumentError(f"x: expected {self.in_dtype} input (the plan's in_dtype), got "
                                f"{x.dtype}")
        if x.shape[1] != self.channels:
            raise ArgumentError(f"x: has {x.shape[1]} channels (axis 1) but the parameters have "
                                f"{self.channels}")
        out = np.empty(x.shape, self.out_dtype)
        if x.size == 0:
            return out
        n, c = x.shape[:2]
        xb = np.ascontiguousarray(x).view(np.uint8).reshape(n, c, -1)
        ob = out.view(np.uint8).reshape(n, c, -1)
        if n * xb.shape[2] < _SMALL:
            offsets = (np.arange(c, dtype=np.intp) * 256)[:, None]
            np.take(self._flat_table, xb + offsets, out=ob)
        elif "fast_path" not in self.__dict__ and not self._seen_large:
            # the first large input: a gather per channel, about PyTorch's speed, rather than
            # planning the fast path (several times the apply time), which a plan used once
            # would never earn back; a second large input plans it
            self._seen_large = True
            for ch in range(c):
                np.take(self._byte_table[ch], xb[:, ch], out=ob[:, ch])
        else:
            fast = self.fast_path
            parts = min(threads, c)
            if parts > 1:
                bounds = np.linspace(0, c, parts + 1).astype(int)
                ranges = [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
                spread(lambda r: fast.apply(xb, ob, r), ranges, parts)
            else:
                fast.apply(xb, ob)
        return out


def quantized_batch_norm_relu(x, x_scale, x_zero_point, weight, bias, running_mean, running_var,
                              eps, y_scale, y_zero_point, *, out_dtype=None,
                              threads: int = 1) -> np.ndarray:
    """Quantized `Relu(BatchNormalization(x))` of an 8-bit tensor (N, C, ...), rank 3, 4 or 5,
    bit-exact with `torch.ops.quantized.batch_norm{1,2,3}d_relu`.

    `x_scale` and `x_zero_point` are scalars (per tensor, as PyTorch) or one value per channel;
    the output has the input's dtype unless `out_dtype` (uint8 or int8) is given; `threads`
    splits large inputs' channels over that many threads."""
    x = np.asarray(x)
    if x.ndim not in _RANK_NAMES:
        raise ArgumentError(f"x: expected 3D, 4D or 5D input (got {x.ndim}D input)")
    in_dtype = _dtype(x.dtype, "x")
    channels = x.shape[1]
    for name, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
        _finite_vector(value, name, channels)
    params = (x_scale, x_zero_point, weight, bias, running_mean, running_var, eps, y_scale,
              y_zero_point)
    key = (in_dtype.str, None if out_dtype is None else np.dtype(out_dtype).str) + tuple(
        (np.asarray(p).dtype.str, np.shape(p), np.asarray(p).tobytes()) for p in params)
    plan = _PLANS.pop(key, None)
    if plan is None:
        plan = BnReluPlan(*params, in_dtype=in_dtype, out_dtype=out_dtype)
        while len(_PLANS) >= _PLANS_KEPT:
            _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = plan                                  # most recently used last
    return plan(x, threads)


# Plans of the latest parameter sets: a layer called again with the same parameters (the usual
# case) skips the table and the fast path's planning.
_PLANS: dict[tuple, BnReluPlan] = {}
_PLANS_KEPT = 8
