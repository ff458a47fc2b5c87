"""Arithmetic that equals a quantized BN-ReLU table, channel by channel.

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

_clip = np._core.umath.clip     # the ufunc behind np.clip, without its ~3 us Python wrapper

_BLOCK = 1 << 17            # elements per block: fewer Python calls; int32 buffer 512 KB (L2)
# per-channel strategies
_TABLE, _CONST, _FLOAT, _FLOAT_I16, _I32 = 0, 1, 2, 3, 4
_I16_BOUND = 30000.0        # |line value| below this for every code: its int16 cast is exact
_GOLDEN = (np.sqrt(5.0) - 1) / 2


def _put(full: np.ndarray, rows: np.ndarray, part: np.ndarray) -> np.ndarray:
    """A copy of `full` with `part` at `rows`."""
    full = full.astype(np.result_type(full, part), copy=True)
    full[rows] = part
    return full


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


_ARITH_DTYPES = (np.int64,) * 5 + (bool, np.int64, np.int64, bool)   # _Arith's fields, in order


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
    # golden-section search: one margin evaluation per step, the bracket shrinking by 0.618
    x1, x2 = right - _GOLDEN * (right - left), left + _GOLDEN * (right - left)
    f1, f2 = margin(x1)[0], margin(x2)[0]
    for _ in range(70):
        up = f1 < f2                                            # the maximum is right of x1
        left, right = np.where(up, x1, left), np.where(up, right, x2)
        new = np.where(up, left + _GOLDEN * (right - left), right - _GOLDEN * (right - left))
        f_new = margin(new)[0]
        x1, f1, x2, f2 = (np.where(up, x2, new), np.where(up, f2, f_new),
                          np.where(up, new, x1), np.where(up, f_new, f1))
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


class FastPath:
    """Per-channel strategies for a C x 256 table, each re-checked against it on all 256 codes,
    applied to (N, C, L) byte views in cache-sized blocks."""

    def __init__(self, table: np.ndarray, alpha: np.ndarray, in_dtype: np.dtype,
                 out_dtype: np.dtype) -> None:
        """Plan every channel of `table` (C x 256 output codes by input byte pattern); `alpha`,
        the real slope per input code, guides the search for constants."""
        self.table, self.alpha = table, alpha
        self.in_dtype, self.out_dtype = np.dtype(in_dtype), np.dtype(out_dtype)
        self.channels = channels = table.shape[0]
        self._byte_table = table.view(np.uint8)
        self._steps_cache = None
        codes_by_byte = np.arange(256, dtype=np.uint8).view(self.in_dtype).astype(np.int64)
        codes = np.sort(codes_by_byte)                             # code order
        order = np.argsort(codes_by_byte, kind="stable")           # byte pattern of each code
        y = self.table.astype(np.int64)[:, order]                  # output values, code order
        diffs = np.diff(y, axis=1)
        monotone = (diffs >= 0).all(axis=1) | (diffs <= 0).all(axis=1)
        constant = (diffs == 0).all(axis=1)
        arith = monotone & ~constant
        self._const = self._byte_table[:, 0].copy()
        lo, hi = _plateaus(y, codes)
        self._y, self._codes, self._plateau_lo, self._plateau_hi = y, codes, lo, hi
        self._lo = lo.astype(self.in_dtype)
        self._hi = hi.astype(self.in_dtype)
        # Each strategy's constants are searched only for the channels that the faster ones
        # before it left (most channels take the first), then re-checked on all 256 codes.
        self._kind = np.where(constant, _CONST, _TABLE)
        self._a = self._b = self._a16 = self._b16 = np.zeros(channels, np.float32)
        self._zlo = (y.min(axis=1) + 256).astype(np.int16)
        self._zhi = (y.max(axis=1) + 256).astype(np.int16)
        self._arith = _Arith(*(np.zeros(channels, dtype) for dtype in _ARITH_DTYPES))
        probe = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, channels, 256)).copy()
        got = np.empty_like(probe)
        pending = arith.copy()
        for kind in (_FLOAT, _FLOAT_I16, _I32):
            rows = np.flatnonzero(pending)
            if rows.size == 0:
                break
            usable = np.zeros(channels, bool)
            usable[rows] = self._plan_rows(kind, rows)
            trial = pending & usable
            self._kind = np.where(trial, kind, self._kind)
            self._steps_cache = None
            self.apply(probe, got)
            exact = (got[0] == self._byte_table).all(axis=1)
            self._kind = np.where(trial & ~exact, _TABLE, self._kind)
            pending &= ~(trial & exact)
        self._steps_cache = None

    def _plan_rows(self, kind: int, rows: np.ndarray) -> np.ndarray:
        """Constants of strategy `kind` for channels `rows`, stored in place; returns where they
        exist (before the re-check)."""
        codes, alpha = self._codes, self.alpha[rows]
        y, lo, hi = self._y[rows], self._plateau_lo[rows], self._plateau_hi[rows]
        if kind == _FLOAT:
            # clamp the code to [lo, hi], L = a * c + b in float32, cast to uint8 (= floor, as
            # 0 <= L < 256); only for uint8 output, whose byte is y itself.
            a, b, width = _float_lines(y, codes, alpha, exact_ends=True)
            clamped = np.clip(codes[None, :], lo[:, None], hi[:, None]).astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                values = clamped * a[:, None] + b[:, None]
            self._a, self._b = _put(self._a, rows, a), _put(self._b, rows, b)
            fits = ((values >= 0) & (values < 256)).all(axis=1) & (width > 0)
            return fits & (self.out_dtype == np.uint8)
        if kind == _FLOAT_I16:
            # L over every code (no clamp), cast to int16, clipped to the output range, narrowed
            # to its low byte; z = y + 256 is positive and has y's byte.
            a16, b16, width16 = _float_lines(y + 256, codes, alpha, exact_ends=False)
            self._a16, self._b16 = _put(self._a16, rows, a16), _put(self._b16, rows, b16)
            bound = np.abs(a16.astype(np.float64)) * 255 + np.abs(b16)   # |c| <= 255
            return (width16 > 0) & (bound < _I16_BOUND)
        # I32 (the fallback when no float line has a safe margin): integer constants
        out_lo = int(np.iinfo(self.out_dtype).min)
        offset = 256 + out_lo % 256                    # output byte = (y - out_lo + offset) % 256
        found, arith = _search_constants(y - out_lo + offset, alpha, 1 << 31, range(30, 7, -1))
        self._arith = _Arith(*(_put(full, rows, part) for full, part in
                               zip(dataclasses.astuple(self._arith), dataclasses.astuple(arith))))
        return found

    @property
    def strategies(self) -> dict[str, int]:
        """How many channels use each apply path."""
        names = {_TABLE: "table", _CONST: "constant", _FLOAT: "float", _FLOAT_I16: "float_int16",
                 _I32: "int32"}
        return {name: int((self._kind == k).sum()) for k, name in names.items()}

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

    def apply(self, xb: np.ndarray, ob: np.ndarray, channels: range | None = None) -> None:
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
