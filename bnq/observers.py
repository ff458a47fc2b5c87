"""Calibration observers: stream activation batches in, get quantization parameters out.

An observer has the two methods of PyTorch's ``torch.ao.quantization`` observers: ``update(x)``
with one batch and ``qparams(dtype)`` for the scale and zero point, plus ``merge(other)`` so
calibration can be split across workers. Values are observed as float32, the type
QuantizeLinear computes in. Per channel means channel axis 1 (tensors of rank >= 2), one row of
state per channel; per tensor is the same code with a single row.

The parameters come from ``bnq.quantization``.

State is bounded: running min/max and, for the histogram methods, one fixed-size histogram
(``bins`` counts) per row, plus the count of exact zeros for ``entropy``. Bin edges are
multiples of a power of two ``w = 2**e`` anchored at 0::

    one-sided  (min >= 0, ReLU outputs):  [0, 2**s)        bins * w      = 2**s
    two-sided  (min <  0):                [-2**s, 2**s)    bins * w / 2  = 2**s

where ``2**s`` is the smallest power of two above max|x| seen so far. Both the layout and ``s``
are functions of the running (min, max) only, and only ever grow; growing ``s`` by k sums
aligned groups of 2**k adjacent bins, and turning one-sided into two-sided sums adjacent pairs
into the upper half. Each step is exact, and since ``x * 2**-e`` is exact in float32 so is the
binning: after any stream of batches, in any order or split over merged observers, the histogram
equals ``np.histogram`` of all values at the final edges.

The histogram methods choose a threshold ``t`` on the magnitude histogram (the two-sided one
folded around 0, |x| in bins [k w, (k+1) w)), then clip the range to [max(-t, min), min(t, max)]:

* ``percentile`` p: rmax = the p-th percentile, rmin = the (100 - p)-th (0 for a one-sided
  tensor); ``p = 100`` is exactly min/max. Each sample is placed as if the samples of its bin
  were evenly spread inside it, and the percentile interpolates linearly between the two samples
  around its rank, as ``np.percentile`` does: the result lies within one bin width of
  ``np.percentile``'s, also where the data is sparse (4 logits of 64 images: 256 values, so the
  99.99th percentile lies 97% of the way from the second largest value to the largest; taking
  the second largest's bin instead clipped the top logit by 14% and cost 12.9 dB of SQNR).
* ``entropy``: TensorRT's KL-divergence search, as NVIDIA's pytorch-quantization computes it
  (``_compute_amax_entropy``; onnxruntime's ``CalibrationMethod.Entropy`` is MXNet's variant).
  Let ``h`` be the magnitude histogram without the values exactly 0 (counted per row and taken
  out of bin 0). For each candidate of ``i`` bins, from ``L`` to the last non-empty bin:
  P = h[:i] with the clipped outliers sum(h[i:]) added to P[i-1]; Q = h[:i] (without outliers)
  merged into ``L`` levels, level g = bins [ceil(g i / L), ceil((g + 1) i / L)), each level's
  count spread evenly over its bins where P is non-zero; minimise KL(P || Q), P and Q each
  normalised to sum 1. ``L`` = number of codes (qmax - qmin + 1) for one-sided, half of that per
  side for two-sided tensors (for 8 bits pytorch-quantization's 256 unsigned, 128 signed).
  Zeros are left out because 0 is a code of every range (the zero point): they are quantized
  exactly whatever the threshold, so they say nothing about it. Kept in bin 0, Q would spread
  them evenly over level 0's ceil(i / L) bins at a cost of about (zeros / total) log ceil(i / L):
  for a ReLU output, often half zeros, that step outweighs any clipping, and the search would
  stop at i = 2L bins (t = 2.0 for a max of 6.3, with 2048 bins) whatever the data.
  pytorch-quantization sidesteps the same spike by overwriting bin 0 with bin 1; the count is
  exact, one integer per row, and merges by addition. As in pytorch-quantization (unlike
  onnxruntime and MXNet, which add 1e-4 to empty bins) there is no smoothing: a zero of Q where
  P has mass (all of the last level's mass clipped away) makes KL infinite. That lets the search
  run on prefix sums, O(L) per candidate and row, so per-channel is cheap.
* ``mse``: minimises the expected squared error over candidates ``t = i w``: each value inside
  the range costs the uniform quantization noise ``step**2 / 12`` with
  ``step = (rmax(t) - rmin(t)) / (qmax - qmin)``, each clipped value of bin j costs
  ``(c_j - t)**2 + w**2 / 12`` (c_j the bin's centre, the value uniform in its bin).
* ``auto``: ``CandidateObserver`` keeps the state the four methods above share (min/max, the
  histogram, the zeros) and gives each method's observer of it, so that ``bnq.choice`` can
  build every method's model from one pass over the data and keep the best.
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from bnq.errors import ArgumentError, DataError
from bnq.quantization import QuantParams, qparams_from_range, quant_range

DEFAULT_BINS = 2048
_MAX_BINS = 1 << 16
# Smallest top exponent s: keeps the bin width 2**e (e >= -126) and its inverse normal float32.
_E_MIN = -126
# Elements of the temporary arrays of the entropy search, per chunk of candidates.
_CHUNK = 1 << 16


class Observer:
    """Running min/max of a tensor, per tensor or per channel (axis 1).

    ``min_val`` / ``max_val`` are float32 arrays with one entry per row (1 per tensor, C per
    channel), allocated by the first ``update``; later updates keep their size. ``update``
    reads its input and changes its own state only, so calibrate observes different tensors
    on different threads.
    """

    def __init__(self, per_channel: bool = False):
        self.per_channel = bool(per_channel)
        self.min_val: np.ndarray | None = None
        self.max_val: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        """Observe one batch (any batch size; an empty batch is ignored)."""
        x3 = self._rows(x)
        if x3.size == 0:
            return
        lo = x3.min(axis=2).min(axis=0)
        hi = x3.max(axis=2).max(axis=0)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            nan = int(np.isnan(x3).sum())
            raise DataError(f"non-finite values seen in a batch of shape {np.shape(x)}: {nan} NaN "
                            f"and {int(np.isinf(x3).sum())} inf; calibration data must be finite")
        if self.min_val is None:
            self._start(x3.shape[1])
        else:
            lo, hi = np.minimum(self.min_val, lo), np.maximum(self.max_val, hi)
        self._observe(x3, lo, hi)
        self.min_val, self.max_val = lo, hi

    def merge(self, other: Observer) -> None:
        """Add ``other``'s observations to this one, as if this observer had seen both streams."""
        if type(other) is not type(self) or other._options() != self._options():
            raise ArgumentError(f"cannot merge {other!r} into {self!r}: kinds or options differ")
        if other.min_val is None:
            return
        if self.min_val is None:
            self._start(other.min_val.size)
            lo, hi = other.min_val.copy(), other.max_val.copy()
        elif other.min_val.size != self.min_val.size:
            raise ArgumentError(f"cannot merge observers of {other.min_val.size} and "
                                f"{self.min_val.size} channels")
        else:
            lo = np.minimum(self.min_val, other.min_val)
            hi = np.maximum(self.max_val, other.max_val)
        self._absorb(other, lo, hi)
        self.min_val, self.max_val = lo, hi

    def qparams(self, dtype=np.uint8, *, symmetric: bool = False,
                reduce_range: bool = False) -> QuantParams:
        """Quantization parameters of the calibrated range (formulas in the module docstring)."""
        qmin, qmax = quant_range(dtype, reduce_range)
        if self.min_val is None:
            raise DataError(f"{type(self).__name__} has seen no data: calibrate with at least "
                            "one sample")
        rmin, rmax = self._range(qmax - qmin + 1, symmetric)
        if not self.per_channel:
            rmin, rmax = rmin[0], rmax[0]
        return qparams_from_range(rmin, rmax, dtype, symmetric=symmetric,
                                  reduce_range=reduce_range)

    def full_range(self) -> Observer:
        """A min/max observer of the same observations (shared arrays: read, not updated)."""
        observer = MinMaxObserver(per_channel=self.per_channel)
        observer.min_val, observer.max_val = self.min_val, self.max_val
        return observer

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({options})"

    def _options(self) -> dict:
        return {"per_channel": self.per_channel}

    def _rows(self, x) -> np.ndarray:
        """The batch as float32 (N, R, M): R rows of state, reduce over axes 0 and 2."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not self.per_channel:
            return x.reshape(1, 1, -1)
        if x.ndim < 2:
            raise DataError(f"per-channel calibration needs a tensor of rank >= 2 (channels on "
                            f"axis 1), got shape {x.shape}")
        if self.min_val is not None and x.shape[1] != self.min_val.size:
            raise DataError(f"batch of shape {x.shape} has {x.shape[1]} channels, earlier "
                            f"batches had {self.min_val.size}")
        return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))

    def _start(self, rows: int) -> None:
        """Allocate the state beyond min/max for ``rows`` rows."""

    def _observe(self, x3: np.ndarray, new_lo: np.ndarray, new_hi: np.ndarray) -> None:
        """Add a batch; self.min_val/max_val still hold the old range (None on the first)."""

    def _absorb(self, other: Observer, new_lo: np.ndarray, new_hi: np.ndarray) -> None:
        """Add ``other``'s state beyond min/max; same convention as ``_observe``."""

    def _range(self, levels: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
        return self.min_val, self.max_val


class MinMaxObserver(Observer):
    """The range is the running [min, max] of everything seen (exact, order-independent)."""


class HistogramObserver(Observer):
    """Running min/max plus a ``bins``-count histogram per row (module docstring: the grid).

    ``histogram`` is an int64 (rows, bins) array; ``edges()`` gives its bin edges.
    Subclasses choose the range from it in ``_range``.
    """

    def __init__(self, per_channel: bool = False, bins: int = DEFAULT_BINS):
        super().__init__(per_channel)
        if (isinstance(bins, bool) or not isinstance(bins, (int, np.integer))
                or not 512 <= bins <= _MAX_BINS or bins & (bins - 1)):
            raise ArgumentError(f"bins must be a power of two from 512 to {_MAX_BINS}, got {bins!r}")
        self.bins = int(bins)
        self._log2_bins = self.bins.bit_length() - 1
        self.histogram: np.ndarray | None = None

    def edges(self) -> np.ndarray:
        """Bin edges, float64 (rows, bins + 1); exact multiples of the bin width."""
        if self.min_val is None:
            raise DataError(f"{type(self).__name__} has seen no data")
        e, offset = self._grid(self.min_val, self.max_val)
        j = np.arange(self.bins + 1)
        return np.ldexp((j[None, :] - offset[:, None]).astype(np.float64), e[:, None])

    def _options(self):
        return {"per_channel": self.per_channel, "bins": self.bins}

    def _grid(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: bin width exponent e (w = 2**e) and the index of the bin starting at 0."""
        two_sided = lo < 0
        s = np.frexp(np.maximum(hi, -lo))[1].astype(np.int64)  # smallest s with max|x| < 2**s
        s = np.maximum(s, _E_MIN + self._log2_bins)
        return s - self._log2_bins + two_sided, two_sided * (self.bins // 2)

    def _start(self, rows):
        self.histogram = np.zeros((rows, self.bins), dtype=np.int64)

    def _regrid(self, hist, lo, hi, new_lo, new_hi) -> np.ndarray:
        """``hist`` on the grid of (lo, hi) re-binned onto the grid of (new_lo, new_hi)."""
        e, offset = self._grid(lo, hi)
        new_e, new_offset = self._grid(new_lo, new_hi)
        rows = np.flatnonzero((new_e != e) | (new_offset != offset))
        if rows.size == 0:
            return hist
        hist = hist.copy()
        shift = np.minimum(new_e[rows] - e[rows], 62)[:, None]
        j = np.arange(self.bins)[None, :]
        # Old bin [(j - offset) w, ...) lies inside new bin floor((j - offset) w / w_new).
        target = ((j - offset[rows, None]) >> shift) + new_offset[rows, None]
        target += np.arange(rows.size)[:, None] * self.bins
        counts = np.bincount(target.ravel(), weights=hist[rows].ravel(),
                             minlength=rows.size * self.bins)
        hist[rows] = counts.reshape(rows.size, self.bins).astype(np.int64)
        return hist

    def _observe(self, x3, new_lo, new_hi):
        if self.min_val is not None:
            self.histogram = self._regrid(self.histogram, self.min_val, self.max_val,
                                          new_lo, new_hi)
        rows = x3.shape[1]
        e, offset = self._grid(new_lo, new_hi)
        # x * 2**-e is exact; float64 only where row offsets would not fit float32's mantissa.
        ftype = np.float32 if rows * self.bins <= 1 << 24 else np.float64
        t = np.multiply(x3, np.ldexp(ftype(1), -e)[None, :, None].astype(ftype), dtype=ftype)
        base = offset + np.arange(rows) * self.bins
        if (base != 0).any():
            np.floor(t, out=t)  # where base == 0, x >= 0 and the integer cast floors
            t += base[None, :, None].astype(ftype)  # integers below 2**24 (2**53): exact
        counts = np.bincount(t.astype(np.intp).ravel(), minlength=rows * self.bins)
        self.histogram += counts.reshape(rows, self.bins)

    def _absorb(self, other, new_lo, new_hi):
        theirs = self._regrid(other.histogram, other.min_val, other.max_val, new_lo, new_hi)
        if self.min_val is None:
            self.histogram = theirs.copy()
        else:
            self.histogram = theirs + self._regrid(self.histogram, self.min_val, self.max_val,
                                                   new_lo, new_hi)


class _PercentileOption:
    """The ``percentile`` option of a histogram observer: the share of values kept in range."""

    def __init__(self, per_channel: bool = False, percentile: float = 99.999,
                 bins: int = DEFAULT_BINS):
        super().__init__(per_channel, bins)
        if (isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.number))
                or not 50 <= percentile <= 100):
            raise ArgumentError(f"percentile must be a number from 50 to 100 (the share of values "
                                f"inside the range), got {percentile!r}")
        self.percentile = float(percentile)

    def _options(self):
        return {**super()._options(), "percentile": self.percentile}


class PercentileObserver(_PercentileOption, HistogramObserver):
    """Range from the (100 - p)-th to the p-th percentile of the histogram (module docstring)."""

    def _range(self, levels, symmetric):
        if self.percentile == 100:
            return self.min_val, self.max_val
        e, offset = self._grid(self.min_val, self.max_val)
        cum = np.cumsum(self.histogram, axis=1)
        total = cum[:, -1]
        rows = np.arange(cum.shape[0])

        def sample(k):  # position of the k-th smallest value, evenly spread in its bin
            b = (cum <= k[:, None]).sum(axis=1)
            count = self.histogram[rows, b]
            return np.ldexp(b - offset + (k - (cum[rows, b] - count) + 0.5) / count, e)

        def quantile(q):  # np.percentile's linear interpolation between neighbouring samples
            rank = q * (total - 1)
            k = np.floor(rank)
            upper = np.minimum(k + 1, total - 1)
            return sample(k) + (rank - k) * (sample(upper) - sample(k))

        q = self.percentile / 100
        return (np.maximum(quantile(1 - q), self.min_val),
                np.minimum(quantile(q), self.max_val))


class _ThresholdObserver(HistogramObserver):
    """Searches a threshold t on the magnitude histogram; range [max(-t, min), min(t, max)].

    ``zeros`` counts the values exactly 0 per row, which the searches leave out: 0 is a code of
    every range, so they are quantized exactly whatever the threshold.
    """

    def _start(self, rows):
        super()._start(rows)
        self.zeros = np.zeros(rows, dtype=np.int64)

    def _observe(self, x3, new_lo, new_hi):
        super()._observe(x3, new_lo, new_hi)
        self.zeros += np.count_nonzero(x3 == 0, axis=(0, 2))

    def _absorb(self, other, new_lo, new_hi):
        super()._absorb(other, new_lo, new_hi)
        self.zeros = self.zeros + other.zeros

    def _range(self, levels, symmetric):
        e, offset = self._grid(self.min_val, self.max_val)
        lo = np.minimum(self.min_val, 0).astype(np.float64)
        hi = np.maximum(self.max_val, 0).astype(np.float64)
        steps = 2 * (levels // 2 - 1) if symmetric else levels - 1  # codes across the range
        threshold = np.empty(offset.shape, dtype=np.float64)
        for rows in (np.flatnonzero(offset == 0), np.flatnonzero(offset != 0)):
            if rows.size == 0:
                continue
            two_sided = bool(offset[rows[0]])
            w = np.ldexp(1.0, e[rows])
            i = self._search(self._magnitudes(rows, two_sided), levels, lo[rows] / w,
                             hi[rows] / w, steps, symmetric)
            threshold[rows] = i * w
        return (np.maximum(-threshold, self.min_val).astype(np.float32),
                np.minimum(threshold, self.max_val).astype(np.float32))

    def _search(self, hist, levels, lo, hi, steps, symmetric) -> np.ndarray:
        """Per row, the number of bins i of the best threshold t = i w (all in units of w)."""
        raise NotImplementedError

    def _magnitudes(self, rows: np.ndarray, two_sided: bool) -> np.ndarray:
        """float64 histograms of the non-zero |x| of ``rows``, bin k = [k w, (k + 1) w)."""
        hist = self.histogram[rows]
        if two_sided:  # fold: |x| in [k w, (k + 1) w) for x in [-(k + 1) w, -k w)
            half = self.bins // 2
            hist = hist[:, half:] + hist[:, half - 1::-1]
        hist = hist.astype(np.float64)
        hist[:, 0] -= self.zeros[rows]  # 0 (and -0) falls in bin 0 of either layout
        return hist


class EntropyObserver(_ThresholdObserver):
    """Threshold minimising KL(P || Q), TensorRT's search (module docstring)."""

    def _search(self, hist, levels, lo, hi, steps, symmetric):
        rows, n = hist.shape
        levels = min(levels, n)
        zero = np.zeros((rows, 1))
        cum = np.hstack([zero, np.cumsum(hist, axis=1)])
        nonzero = np.hstack([zero, np.cumsum(hist > 0, axis=1)])
        xlogx = np.hstack([zero, np.cumsum(_xlogy(hist, hist), axis=1)])
        total = cum[:, n:]
        # as TensorRT, thresholds run up to the largest value (the last non-empty bin)
        empty = total[:, 0] == 0
        first = levels if (lo == 0).all() and not symmetric else levels // 2
        end = np.maximum(np.where(empty, 0, n - np.argmax(hist[:, ::-1] > 0, axis=1)), first)
        candidates = np.arange(first, end.max() + 1)
        codes = _codes_below(candidates, lo, hi, symmetric, levels)  # (rows, candidates)
        kl = np.empty((rows, candidates.size))
        top = int(codes.max())
        g = np.arange(top + 1)
        chunk = max(1, _CHUNK // (rows * (top + 1)))  # bounds the (rows, chunk, levels) arrays
        for k in range(0, candidates.size, chunk):
            i = candidates[k:k + chunk]
            count = codes[:, k:k + chunk]
            # level g: bins [edges[g], edges[g + 1]); levels past `count` are empty
            edges = np.minimum(-((-g * i[:, None]) // count[..., None]), i[:, None])
            groups = np.diff(np.take_along_axis(cum[:, None, :], edges, axis=2), axis=2)
            nz = np.diff(np.take_along_axis(nonzero[:, None, :], edges, axis=2), axis=2)
            last = (count - 1)[..., None]
            outliers = total - cum[:, i]
            p_last = hist[:, i - 1] + outliers
            last_group = np.take_along_axis(groups, last, axis=2)[..., 0]
            np.put_along_axis(nz, last, np.take_along_axis(nz, last, axis=2)
                              + ((hist[:, i - 1] == 0) & (outliers > 0))[..., None], axis=2)
            mass = groups.copy()
            np.put_along_axis(mass, last, (last_group + outliers)[..., None], axis=2)
            with np.errstate(divide="ignore", invalid="ignore"):
                cross = _xlogy(mass, groups / nz).sum(axis=2)
                kl[:, k:k + chunk] = ((xlogx[:, i - 1] + _xlogy(p_last, p_last) - cross) / total
                                      + np.log(cum[:, i] / total))
            # Q is 0 where P holds the clipped mass: not representable
            kl[:, k:k + chunk][(last_group == 0) & (outliers > 0)] = np.inf
        kl[candidates[None, :] > end[:, None]] = np.inf
        # Not worse than min/max in expected squared error (the mse method's cost): where the
        # values are few or sparse, KL sees no rounding error at i = L (one bin per level, Q = P)
        # and would clip 4 logits of 64 images at 0.87 of their maximum (-12.7 dB)
        error = _expected_error(hist, lo, hi, steps, symmetric)
        no_clip = np.take_along_axis(error, end[:, None] - 1, axis=1)
        kl[error[:, candidates - 1] > no_clip * (1 + 1e-9)] = np.inf
        kl[empty] = 0  # nothing but zeros: every threshold represents them exactly
        return candidates[np.argmin(kl, axis=1)]


def _codes_below(i, lo, hi, symmetric, levels):
    """Per row and candidate threshold of i bins, the number L of the ``levels`` codes that
    cover the magnitudes [0, i): all of them for a one-sided range, half for a symmetric one;
    for an affine two-sided range [max(-i, lo), min(i, hi)] the share of its width that [0, i)
    takes (a HardSwish output, [-0.375, 23.7], puts about 250 codes above zero, not 128)."""
    if symmetric:
        return np.broadcast_to(np.minimum(levels // 2, i), (lo.size, i.size))
    span = np.minimum(i, hi[:, None]) - np.maximum(-i, lo[:, None])
    inside = np.minimum(i, np.maximum(-lo, hi)[:, None])
    count = np.rint(levels * inside / np.maximum(span, 1))  # span < 1 bin: all zeros, any L
    return np.clip(count, levels // 2, np.minimum(levels, i)).astype(np.int64)


def _expected_error(hist, lo, hi, steps, symmetric):
    """(rows, n) expected squared error of the thresholds i = 1 .. n bins (module docstring)."""
    n = hist.shape[1]
    i = np.arange(1, n + 1, dtype=np.float64)
    centre = np.arange(n) + 0.5

    def beyond(v):  # sums over bins j >= i, for i = 1 .. n
        return np.hstack([np.cumsum(v[:, :0:-1], axis=1)[:, ::-1], np.zeros((len(v), 1))])

    s0, s1, s2 = (beyond(hist * centre**k) for k in range(3))
    if symmetric:
        span = 2 * np.minimum(i, np.maximum(-lo, hi)[:, None])
    else:
        span = np.minimum(i, hi[:, None]) - np.maximum(-i, lo[:, None])
    inside = hist.sum(axis=1, keepdims=True) - s0
    return (span / steps) ** 2 / 12 * inside + s2 - 2 * i * s1 + i**2 * s0 + s0 / 12


class MseObserver(_ThresholdObserver):
    """Threshold minimising the expected squared quantization error (module docstring)."""

    def _search(self, hist, levels, lo, hi, steps, symmetric):
        error = _expected_error(hist, lo, hi, steps, symmetric)
        return np.argmin(error, axis=1) + 1.0


def _xlogy(x, y):
    """x * log(y) with 0 where x == 0."""
    return np.where(x > 0, x * np.log(np.where(x > 0, y, 1)), 0.0)


class CandidateObserver(_PercentileOption, _ThresholdObserver):
    """The state of every method of ``CANDIDATES`` at once (min/max, one histogram, the count of
    zeros): ``candidate(method)`` is that method's observer as if it had seen the same batches,
    so that calibrating with every method (``auto``, ``bnq.choice``) observes the data once.
    Its own ``qparams`` are min/max's."""

    _range = Observer._range

    def candidate(self, method: str) -> Observer:
        """An observer of ``method`` over this one's state (shared arrays: read, not updated)."""
        cls = CANDIDATES[method]
        accepted = inspect.signature(cls).parameters
        observer = cls(**{key: value for key, value in self._options().items() if key in accepted})
        if self.min_val is not None:
            observer.min_val, observer.max_val = self.min_val, self.max_val
            if isinstance(observer, HistogramObserver):
                observer.histogram = self.histogram
            if isinstance(observer, _ThresholdObserver):
                observer.zeros = self.zeros
        return observer


# The methods `auto` chooses among (bnq.calibrate), in order of preference on equal error.
CANDIDATES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MseObserver,
}
OBSERVERS: dict[str, type[Observer]] = {**CANDIDATES, "auto": CandidateObserver}


def make_observer(method: str = "minmax", per_channel: bool = False, **options) -> Observer:
    """A new observer of ``method`` (a key of ``OBSERVERS``) with its ``options``."""
    if method not in OBSERVERS:
        raise ArgumentError(f"unknown calibration method {method!r}; choose one of "
                            f"{', '.join(OBSERVERS)}")
    cls = OBSERVERS[method]
    known = set(inspect.signature(cls).parameters) - {"per_channel"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ArgumentError(f"calibration method {method!r} has no option "
                            f"{', '.join(unknown)}; its options: {', '.join(sorted(known)) or 'none'}")
    return cls(per_channel=per_channel, **options)
