"""Streaming comparison metrics: accumulators fed one batch at a time (`update`) that can be
combined (`merge`), so that batches, subsets of tensors or workers may be measured apart and
summed. Every sum is taken per sample (a row reduction of that sample's values alone) and the
samples' sums are added exactly (`ExactSum`), so the figures are the same, bit for bit, however
the samples are split into batches, micro-batches, passes or workers, and in whatever order the
parts are merged.

For a float tensor y and its quantized counterpart y_q, over all samples:

    SQNR   = 10 log10( sum y^2 / sum (y - y_q)^2 )  dB       (inf when they are equal)
    cosine = sum y y_q / sqrt( sum y^2  sum y_q^2 )
    IoU    = |{y > 0.5} and {y_q > 0.5}| / |{y > 0.5} or {y_q > 0.5}|
             reported only when every value of both lies in [0, 1] (probability maps)

For classification outputs (N x K scores):

    top-k agreement = mean( argmax y is among the k largest of y_q )
    top-k accuracy  = mean( label is among the k largest scores ), for each model

The sums use elementwise products and reductions, never `@`/`np.dot`: those go through BLAS,
whose threads made `bnq evaluate` 3-4 times slower on a busy 2-core machine (small float64
products through threaded OpenBLAS), for sums that need no BLAS. Tensors are walked in chunks
of CHUNK elements converted to float64 there: on a 6 M-element tensor that was 20 times faster
than converting it whole (0.075 against 1.6 s, AMD EPYC, 2 cores), as the chunks stay in cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

HISTOGRAM_BINS = 64
CHUNK = 1 << 16


class ExactSum:
    """A sum of float64 values kept exactly (every finite float64 is an integer multiple of
    2**-1074), so that adding in any grouping or order and merging give the same bits: the
    float is rounded once, at the end. Non-finite values are summed apart, as floats."""

    _UNIT = 1074

    def __init__(self) -> None:
        self.total = 0  # in units of 2**-1074
        self.special = 0.0  # the sum of the infinities and NaNs seen

    def add(self, values: np.ndarray | float) -> None:
        for value in np.asarray(values, np.float64).ravel().tolist():
            if math.isfinite(value):
                numerator, denominator = value.as_integer_ratio()
                self.total += numerator << (self._UNIT - denominator.bit_length() + 1)
            else:
                self.special += value

    def merge(self, other: ExactSum) -> None:
        self.total += other.total
        self.special += other.special

    def value(self) -> float:
        if self.special != 0 or math.isnan(self.special):
            return self.special
        return self.total / (1 << self._UNIT)  # int / int rounds correctly


def _per_sample(values: np.ndarray) -> np.ndarray:
    """The sum of each row: numpy's pairwise summation along the contiguous axis, whose grouping
    depends only on the row's length, so a row's sum does not depend on the rows beside it."""
    return np.add.reduce(values, axis=1)


def _sample_chunks(*arrays: np.ndarray):
    """float64 blocks of about CHUNK elements of `arrays` (batch first), as rows that each hold
    one sample's values or a CHUNK-long piece of them: whole samples when they fit, else each
    sample cut at the same offsets. A row's sums therefore depend on its sample alone, never on
    the batch it came in."""
    rows = [np.atleast_1d(array).reshape(len(np.atleast_1d(array)), -1)  # a scalar: one row
            for array in arrays]
    samples, size = rows[0].shape
    if size == 0:
        return
    if size <= CHUNK:
        step = max(1, CHUNK // size)
        for start in range(0, samples, step):
            yield [part[start:start + step].astype(np.float64) for part in rows]
        return
    for sample in range(samples):
        for start in range(0, size, CHUNK):
            yield [part[sample:sample + 1, start:start + CHUNK].astype(np.float64)
                   for part in rows]


@dataclass
class NoiseSums:
    """Sums for SQNR and the mean absolute error: what a quantized tensor inside the model needs."""

    signal: ExactSum = field(default_factory=ExactSum)   # sum y^2
    noise: ExactSum = field(default_factory=ExactSum)    # sum (y - y_q)^2
    abs_sum: ExactSum = field(default_factory=ExactSum)
    count: int = 0

    def update(self, reference: np.ndarray, actual: np.ndarray,
               histogram: Histogram | None = None) -> None:
        """Add a batch; with `histogram`, count the reference's values into it too (from the same
        float64 chunks)."""
        for reference_part, actual_part in _sample_chunks(reference, actual):
            self.add(reference_part, actual_part)
            if histogram is not None:
                histogram.add(reference_part.reshape(-1))

    def add(self, reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
        """Add float64 rows of one sample each (or of a piece of one); returns |y - y_q|."""
        error = reference - actual
        self.signal.add(_per_sample(reference * reference))
        self.noise.add(_per_sample(error * error))
        np.abs(error, out=error)
        self.abs_sum.add(_per_sample(error))
        self.count += reference.size
        return error

    def merge(self, other: NoiseSums) -> None:
        for name in ("signal", "noise", "abs_sum"):
            getattr(self, name).merge(getattr(other, name))
        self.count += other.count

    def sqnr_db(self) -> float:
        signal, noise = self.signal.value(), self.noise.value()
        if noise == 0:
            return math.inf
        return 10 * math.log10(signal / noise) if signal else -math.inf

    def mean_abs_error(self) -> float:
        return self.abs_sum.value() / self.count if self.count else 0.0


@dataclass
class ErrorSums(NoiseSums):
    """Sums for SQNR, cosine, absolute errors and the IoU of maps thresholded at 0.5: what a
    model's output needs."""

    cross: ExactSum = field(default_factory=ExactSum)    # sum y y_q
    power: ExactSum = field(default_factory=ExactSum)    # sum y_q^2
    abs_max: float = 0.0
    low: float = math.inf      # smallest value of y or y_q
    high: float = -math.inf    # largest value of y or y_q
    intersection: int = 0      # y > 0.5 and y_q > 0.5
    union: int = 0             # y > 0.5 or y_q > 0.5

    def add(self, reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
        error = super().add(reference, actual)
        self.cross.add(_per_sample(reference * actual))
        self.power.add(_per_sample(actual * actual))
        self.abs_max = max(self.abs_max, float(error.max()))
        self.low = min(self.low, float(reference.min()), float(actual.min()))
        self.high = max(self.high, float(reference.max()), float(actual.max()))
        above, above_q = reference > 0.5, actual > 0.5
        self.intersection += int(np.count_nonzero(above & above_q))
        self.union += int(np.count_nonzero(above | above_q))
        return error

    def merge(self, other: ErrorSums) -> None:
        super().merge(other)
        for name in ("cross", "power"):
            getattr(self, name).merge(getattr(other, name))
        for name in ("intersection", "union"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.abs_max = max(self.abs_max, other.abs_max)
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)

    def cosine(self) -> float:
        """1 for outputs that are both all zeros; 0 when only one of them is (no direction)."""
        signal, power = self.signal.value(), self.power.value()
        denominator = math.sqrt(signal * power)
        if denominator:
            return self.cross.value() / denominator
        return 1.0 if signal == power == 0 else 0.0

    def iou(self) -> float | None:
        """The IoU at 0.5, for maps whose values all lie in [0, 1]; None for anything else."""
        if not (0.0 <= self.low and self.high <= 1.0):
            return None
        return self.intersection / self.union if self.union else 1.0


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest scores of each row (in no particular order)."""
    k = min(k, scores.shape[1])
    return np.argpartition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k:]


@dataclass
class ClassAgreement:
    """Counts for top-1/top-5 agreement between two models and their accuracy on labels."""

    samples: int = 0
    classes: int = 0
    agree: dict[int, int] = field(default_factory=lambda: {1: 0, 5: 0})
    labelled: int = 0
    correct: dict[str, dict[int, int]] = field(
        default_factory=lambda: {"reference": {1: 0, 5: 0}, "quantized": {1: 0, 5: 0}})

    def update(self, reference: np.ndarray, actual: np.ndarray,
               labels: np.ndarray | None = None) -> None:
        reference = reference.reshape(len(reference), -1)
        actual = actual.reshape(len(actual), -1)
        self.classes = reference.shape[1]
        best = reference.argmax(axis=1)
        for k in self.agree:
            self.agree[k] += int(np.any(top_k(actual, k) == best[:, None], axis=1).sum())
        self.samples += len(reference)
        if labels is None:
            return
        labels = labels.reshape(-1)
        for name, scores in (("reference", reference), ("quantized", actual)):
            for k in self.agree:
                self.correct[name][k] += int(np.any(top_k(scores, k) == labels[:, None],
                                                    axis=1).sum())
        self.labelled += len(labels)

    def merge(self, other: ClassAgreement) -> None:
        self.samples += other.samples
        self.classes = max(self.classes, other.classes)
        self.labelled += other.labelled
        for k in self.agree:
            self.agree[k] += other.agree[k]
            for name in self.correct:
                self.correct[name][k] += other.correct[name][k]

    def agreement(self, k: int) -> float:
        return self.agree[k] / self.samples if self.samples else math.nan

    def accuracy(self, k: int) -> dict[str, float] | None:
        if not self.labelled:
            return None
        return {name: counts[k] / self.labelled for name, counts in self.correct.items()}


@dataclass
class Histogram:
    """Counts of values in HISTOGRAM_BINS equal bins over the fixed interval [start, stop) (fixed
    in advance, so histograms of different batches add up), the values below and above it, and
    `outside`: the values outside a marked interval [low, high] (a calibrated range)."""

    start: float
    stop: float
    low: float = -math.inf
    high: float = math.inf
    counts: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, np.int64))
    below: int = 0
    above: int = 0
    outside: int = 0

    def add(self, part: np.ndarray) -> None:
        """Count a float64 vector (fed by `NoiseSums.update`), which is overwritten."""
        bins = len(self.counts)
        self.outside += int(np.count_nonzero((part < self.low) | (part > self.high)))
        part -= self.start
        part *= bins / (self.stop - self.start)
        np.floor(part, out=part)
        np.clip(part, -1, bins, out=part)  # -1: below, bins: above
        counts = np.bincount(part.astype(np.int64) + 1, minlength=bins + 2)
        self.below += int(counts[0])
        self.above += int(counts[-1])
        self.counts += counts[1:-1]

    def merge(self, other: Histogram) -> None:
        self.counts += other.counts
        self.below += other.below
        self.above += other.above
        self.outside += other.outside
