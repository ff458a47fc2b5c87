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

The fast apply path replaces the gather, channel by channel, by arithmetic on cache-sized blocks
where it is provably equal to the table: each channel's table is a monotone staircase that only
changes between `lo`, the last code of its first plateau, and `hi`, the first code of its last
plateau. Every strategy below is re-checked against the table over all 256 codes when the plan
is made, fastest first; a channel takes the first one that is exact, else keeps the gather.

- constant: a channel with one output value is filled.
- float (uint8 output): `y = floor(a * clip(c, lo, hi) + b)` in float32 (one multiply and one
  add, each rounded), the floor being the float -> uint8 cast (truncation; `0 <= value < 256`
  is checked for every code). The line `(a, b)` is chosen inside every window
  `y(c) <= a * c + b < y(c) + 1`, `lo <= c <= hi`, with the largest smallest margin: that margin
  is concave in `a`, so a ternary search near the real slope `alpha` finds it and `b` is centred.
  The margin is ~1e-3 of a step for ordinary parameters, against float32 errors ~3e-5. Five
  numpy passes (clip uint8, widen, multiply, add, cast), against five int32 passes plus a shift
  for integer constants; about 1.5x faster on (32, 64, 56, 56).
  The clamp forces the plateau ends into their windows too, which fails when a step skips
  output values next to a plateau (|alpha| > 1 and an unlucky ReLU or 255 cut); then:
- float_int16: `z = clip(int16(a * c + b), zlo, zhi)` over all codes (no input clamp), with
  `z = y + 256 >= 128` so that the int16 -> uint8 cast keeps `y`'s byte (uint8 or int8 output;
  the float -> int16 cast truncates, which is the floor wherever the value is not clipped);
  the plateau ends only have to be on the right side (`a * lo + b < zlo + 1`,
  `a * hi + b >= zhi`), and `|a * c + b| < 30000` keeps the int16 cast exact.
- int32: `y = clip((clip(u, lo, hi) * M + B) >> s, zlo, zhi)` (`B - u * M` for a negative
  slope; output clip only where needed) for integer constants `M, B, s` found by an exact search
  over all 256 codes, for the rare channels where no float32 line has a safe margin.

Channels are independent, so `threads` > 1 splits them over a thread pool; numpy releases the
GIL inside each pass (measured 1.06-1.23x on 2 cores: the passes are bound by memory bandwidth).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bnq.errors import ArgumentError

_clip = np._core.umath.clip     # the ufunc behind np.clip, without its ~3 us Python wrapper

_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
_RANK_NAMES = {3: "1d", 4: "2d", 5: "3d"}
_BLOCK = 1 << 17            # elements per block: fewer Python calls; int32 buffer 512 KB (L2)
_SMALL = 1 << 12            # below this many elements per channel, one flat gather is faster

# per-channel strategies of a plan, in the order they are tried (fastest first)
_TABLE, _CONST, _FLOAT, _FLOAT_I16, _I32 = 0, 1, 2, 3, 4
_I16_BOUND = 30000.0        # |line value| below this for every code: its int16 cast is exact


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


@dataclass(frozen=True)
class _Arith:
    """Per channel constants of `clip((clip(u, lo, hi) * M + B) >> s, zlo, zhi)` (`B - u * M` for
    a negative slope); `clip_out` False when the output clip is not needed."""
    lo: np.ndarray
    hi: np.ndarray
    m: np.ndarray
    b: np.ndarray
    s: np.ndarray
    negative: np.ndarray
    zlo: np.ndarray
    zhi: np.ndarray
    clip_out: np.ndarray


def _search_constants(z: np.ndarray, slope: np.ndarray, limit: int, shifts
                      ) -> tuple[np.ndarray, _Arith]:
    """For monotone rows `z` (C x 256, values >= 0, in input-code order) whose real slope per code
    is close to `|slope|`, exact integer constants (see `_Arith`) with every intermediate value in
    [0, limit), or `found[c] = False`. Tries exact plateau ends first, then an output clip."""
    channels = z.shape[0]
    u = np.arange(256, dtype=np.int64)
    negative = z[:, 0] > z[:, -1]
    zz = np.where(negative[:, None], z[:, ::-1], z)                # nondecreasing in u' = u or 255-u
    lo = (zz == zz[:, :1]).sum(axis=1) - 1                          # last u' of the bottom plateau
    hi = 256 - (zz == zz[:, -1:]).sum(axis=1)                       # first u' of the top plateau
    inside = (u[None, :] >= lo[:, None]) & (u[None, :] <= hi[:, None])
    at_lo, at_hi = u[None, :] == lo[:, None], u[None, :] == hi[:, None]
    slope = np.abs(np.asarray(slope, np.float64))
    found = np.zeros(channels, bool)
    clip_out = np.zeros(channels, bool)
    best = {k: np.zeros(channels, np.int64) for k in "mbs"}
    big = np.int64(1) << 62
    for clipped in (False, True):
        for s in shifts:
            rows = np.flatnonzero(~found)
            if rows.size == 0:
                break
            one = np.int64(1) << s
            zr, inr = zz[rows], inside[rows]
            # with the output clip, the plateau ends only need to reach past zlo / zhi
            lower = np.where(clipped & at_lo[rows], 0, zr * one)
            upper = np.where(clipped & at_hi[rows], limit - 1, (zr + 1) * one - 1)
            for delta in (0, 1, -1, 2, -2, 3, -3):
                m = np.floor(np.minimum(slope[rows] * one, 2.0**40)).astype(np.int64) + delta
                um = u[None, :] * m[:, None]
                b_lo = np.where(inr, lower - um, -big).max(axis=1)
                b_hi = np.where(inr, upper - um, big).min(axis=1)
                ok = ~found[rows] & (m >= 0) & (b_lo <= b_hi) & (hi[rows] * m + b_lo < limit)
                hit = rows[ok]
                best["m"][hit], best["b"][hit], best["s"][hit] = m[ok], b_lo[ok], s
                found[hit] = True
                clip_out[hit] = clipped
    # (B - u * M) for a negative slope: u' = 255 - u, B' = B + 255 M
    b_signed = np.where(negative, best["b"] + 255 * best["m"], best["b"])
    lo_u = np.where(negative, 255 - hi, lo)
    hi_u = np.where(negative, 255 - lo, hi)
    return found, _Arith(lo_u, hi_u, best["m"], b_signed, best["s"], negative, zz[:, 0],
                         zz[:, -1], clip_out)


def _float_lines(z: np.ndarray, codes: np.ndarray, slope: np.ndarray, exact_ends: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For monotone rows `z` (C x 256, in code order `codes`), float32 `(a, b)` of the line
    `L(c) = a * c + b` that is as far as possible inside every window `z(c) <= L(c) < z(c) + 1`
    for the codes strictly between the two plateaus (see `_plateaus`), and at the plateau ends
    either inside the window too (`exact_ends`, for a kernel that clamps its input to
    `[lo, hi]`) or only on the correct side (`L(lo) < z(lo) + 1`, `L(hi) >= z(hi)`, for a kernel
    that clips its output). The slope maximising the smallest margin is found by ternary search
    (that margin is concave in the slope) near the real slope `slope`; `b` is then centred.
    Returns `a`, `b` and the margin (negative: no such line); callers still verify in float32."""
    c = codes.astype(np.float64)[None, :]
    lo, hi = _plateaus(z, codes)
    rising = z[:, -1] >= z[:, 0]
    lo_c, hi_c = np.where(rising, lo, hi), np.where(rising, hi, lo)   # codes of z[lo], z[hi]
    inside = (c >= np.minimum(lo, hi)[:, None]) & (c <= np.maximum(lo, hi)[:, None])
    zf = z.astype(np.float64)
    lower = np.where(inside, zf, -np.inf)
    upper = np.where(inside, zf + 1, np.inf)
    if not exact_ends:
        bottom, top = c == lo_c[:, None], c == hi_c[:, None]
        lower = np.where(bottom, -np.inf, lower)
        upper = np.where(top, np.inf, upper)

    def margin(a):
        b_lo = (lower - a[:, None] * c).max(axis=1)
        b_hi = (upper - a[:, None] * c).min(axis=1)
        return b_hi - b_lo, (b_lo + b_hi) / 2

    slope = np.asarray(slope, np.float64)
    left, right = slope - np.abs(slope) / 16 - 1e-3, slope + np.abs(slope) / 16 + 1e-3
    for _ in range(80):
        m1, m2 = left + (right - left) / 3, right - (right - left) / 3
        up = margin(m1)[0] < margin(m2)[0]
        left, right = np.where(up, m1, left), np.where(up, right, m2)
    a = ((left + right) / 2).astype(np.float32)
    width, b = margin(a.astype(np.float64))
    with np.errstate(invalid="ignore"):
        return a, b.astype(np.float32), np.nan_to_num(width, nan=-1.0, posinf=-1.0)


def _plateaus(z: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes `lo`, `hi` (in code order) of the last code of the first plateau and the first code
    of the last plateau of each monotone row `z`: the output changes only between them."""
    first = np.argmax(z != z[:, :1], axis=1)                   # first code off the first plateau
    last = 255 - np.argmax((z != z[:, -1:])[:, ::-1], axis=1)  # last code off the last plateau
    return codes[np.maximum(first - 1, 0)], codes[np.minimum(last + 1, 255)]


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
        self._kind = None  # the per-channel fast path is planned on the first large input
        self._steps_cache = None


    def _plan_channels(self) -> None:
        channels = self.channels
        codes = np.sort(_codes(self.in_dtype))                    # code order
        order = np.argsort(_codes(self.in_dtype), kind="stable")   # byte pattern of each code
        y = self.table.astype(np.int64)[:, order]                  # output values, code order
        diffs = np.diff(y, axis=1)
        monotone = (diffs >= 0).all(axis=1) | (diffs <= 0).all(axis=1)
        constant = (diffs == 0).all(axis=1)
        arith = monotone & ~constant
        self._const = self._byte_table[:, 0].copy()
        lo, hi = _plateaus(y, codes)
        self._lo = lo.astype(self.in_dtype)
        self._hi = hi.astype(self.in_dtype)
        # FLOAT: clamp the code to [lo, hi], L = a * c + b in float32, cast to uint8 (= floor,
        # as 0 <= L < 256); only for uint8 output, whose byte is y itself.
        a, b, width = _float_lines(y, codes, self.alpha, exact_ends=True)
        clamped = np.clip(codes[None, :], lo[:, None], hi[:, None]).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            values = clamped * a[:, None] + b[:, None]
        fits = ((values >= 0) & (values < 256)).all(axis=1) & (width > 0)
        use_float = arith & fits & (self.out_dtype == np.uint8)
        # FLOAT_I16: L over every code (no clamp), cast to int16, clipped to the output range,
        # narrowed to its low byte; z = y + 256 is positive and has y's byte.
        a16, b16, width16 = _float_lines(y + 256, codes, self.alpha, exact_ends=False)
        bound = np.abs(a16.astype(np.float64)) * 255 + np.abs(b16)   # |c| <= 255
        use_float_i16 = arith & (width16 > 0) & (bound < _I16_BOUND)
        self._a, self._b, self._a16, self._b16 = a, b, a16, b16
        self._zlo = (y.min(axis=1) + 256).astype(np.int16)
        self._zhi = (y.max(axis=1) + 256).astype(np.int16)
        # I32 (the fallback when no float line has a safe margin): integer constants
        out_lo = _RANGES[self.out_dtype][0]
        offset = 256 + out_lo % 256                    # output byte = (y - out_lo + offset) % 256
        z = y - out_lo + offset
        found32, self._arith = _search_constants(z, self.alpha, 1 << 31, range(30, 7, -1))
        candidates = [(_FLOAT, use_float), (_FLOAT_I16, use_float_i16), (_I32, arith & found32)]
        self._usable = dict(candidates)                # constants exist (before the re-check)
        self._kind = np.where(constant, _CONST, _TABLE)
        # try the strategies fastest first; re-check each on all 256 codes, keep what is exact
        probe = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, channels, 256)).copy()
        got = np.empty_like(probe)
        pending = arith.copy()
        for kind, usable in candidates:
            trial = pending & usable
            if not trial.any():
                continue
            self._kind = np.where(trial, kind, self._kind)
            self._steps_cache = None
            self._apply_blocked(probe, got)
            exact = (got[0] == self._byte_table).all(axis=1)
            self._kind = np.where(trial & ~exact, _TABLE, self._kind)
            pending &= ~(trial & exact)
        self._steps_cache = None

    @property
    def strategies(self) -> dict[str, int]:
        """How many channels use each apply path."""
        names = {_TABLE: "table", _CONST: "constant", _FLOAT: "float", _FLOAT_I16: "float_int16",
                 _I32: "int32"}
        if self._kind is None:
            self._plan_channels()
        return {name: int((self._kind == k).sum()) for k, name in names.items()}

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
        else:
            if self._kind is None:
                self._plan_channels()
            if self._steps_cache is None:
                self._steps_cache = self._steps()
            parts = min(threads, c)
            if parts > 1:
                bounds = np.linspace(0, c, parts + 1).astype(int)
                ranges = [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
                list(_pool().map(lambda r: self._apply_blocked(xb, ob, r), ranges))
            else:
                self._apply_blocked(xb, ob)
        return out

    def _steps(self) -> list[tuple]:
        """Per channel, its strategy and the numpy scalars its apply path needs."""
        steps = []
        a = self._arith
        for ch, kind in enumerate(self._kind.tolist()):
            if kind == _CONST:
                args = (self._const[ch],)
            elif kind == _TABLE:
                args = (self._byte_table[ch],)
            elif kind == _FLOAT:
                args = (self._lo[ch], self._hi[ch], self._a[ch], self._b[ch])
            elif kind == _FLOAT_I16:
                args = (self._a16[ch], self._b16[ch], self._zlo[ch], self._zhi[ch])
            else:
                args = (np.uint8(a.lo[ch]), np.uint8(a.hi[ch]), bool(a.negative[ch]),
                        *(np.int32(v) for v in (a.m[ch], a.b[ch], a.s[ch], a.zlo[ch], a.zhi[ch])),
                        bool(a.clip_out[ch]))
            steps.append((kind, args))
        return steps

    def _apply_blocked(self, xb: np.ndarray, ob: np.ndarray, channels: range | None = None) -> None:
        """Channel by channel (`channels`, default all), in blocks of at most `_BLOCK` elements
        (byte views in and out); scratch buffers are local, so ranges can run in threads."""
        n, _, length = xb.shape
        cols = min(length, _BLOCK)
        rows = max(1, min(n, _BLOCK // cols))
        blocks = [(slice(r0, r0 + rows), slice(c0, c0 + cols))
                  for r0 in range(0, n, rows) for c0 in range(0, length, cols)]
        whole = len(blocks) == 1
        size = rows * cols
        flat = (np.empty(size, self.in_dtype), np.empty(size, np.float32),
                np.empty(size, np.int16), np.empty(size, np.uint8), np.empty(size, np.int32))
        views = {}                                     # block shape -> scratch buffers
        xc = xb.view(self.in_dtype)                    # the codes
        flip = self.in_dtype == np.int8                # byte ^ 0x80 = code - qmin, monotone
        clip, multiply, add, copyto = _clip, np.multiply, np.add, np.copyto
        if self._steps_cache is None:
            self._steps_cache = self._steps()
        steps = self._steps_cache
        for ch in channels or range(len(steps)):
            kind, args = steps[ch]
            if kind == _CONST:
                ob[:, ch] = args[0]
                continue
            xch, xbch, och = xc[:, ch], xb[:, ch], ob[:, ch]
            for rs, cs in blocks:
                if whole:
                    src, dst = xch, och
                else:
                    src, dst = xch[rs, cs], och[rs, cs]
                if kind == _TABLE:
                    np.take(args[0], xbch if whole else xbch[rs, cs], out=dst)
                    continue
                shape = src.shape
                buffers = views.get(shape)
                if buffers is None:
                    buffers = views[shape] = tuple(b[:src.size].reshape(shape) for b in flat)
                c, w, v, u8, w32 = buffers
                if kind == _FLOAT:                     # clamp, a * c + b, cast (floor)
                    lo, hi, fa, fb = args
                    clip(src, lo, hi, c)
                    copyto(w, c)
                    multiply(w, fa, w)
                    add(w, fb, w)
                    copyto(dst, w, casting="unsafe")
                elif kind == _FLOAT_I16:               # a * c + b, cast, clip, low byte
                    fa, fb, zlo, zhi = args
                    copyto(w, src)
                    multiply(w, fa, w)
                    add(w, fb, w)
                    copyto(v, w, casting="unsafe")
                    clip(v, zlo, zhi, v)
                    copyto(dst, v, casting="unsafe")
                else:                                  # _I32
                    lo, hi, neg, m, b, s, zlo, zhi, clip_out = args
                    if flip:
                        np.bitwise_xor(xbch if whole else xbch[rs, cs], np.uint8(0x80), u8)
                        clip(u8, lo, hi, u8)
                    else:
                        clip(src, lo, hi, u8)
                    multiply(u8, m, out=w32, dtype=np.int32)
                    if neg:
                        np.subtract(b, w32, w32)
                    else:
                        add(w32, b, w32)
                    np.right_shift(w32, s, w32)
                    if clip_out:
                        clip(w32, zlo, zhi, w32)
                    copyto(dst, w32, casting="unsafe")


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bnq")


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
    plan = BnReluPlan(x_scale, x_zero_point, weight, bias, running_mean, running_var, eps,
                      y_scale, y_zero_point, in_dtype=in_dtype, out_dtype=out_dtype)
    return plan(x, threads)
