"""Choosing the calibration method by the error it causes at the model's outputs (`auto`).

Each method of `bnq.observers` sets a tensor's range from that tensor's values alone, and which
one serves a model best depends on how the tensors' errors reach its outputs: on torchvision's
DenseNet-121 min/max beat every clipping method by 0.5 dB or more of logit SQNR on held-out
crops, on MobileNetV2 the clipping methods beat min/max by 0.2-0.3 dB (AVX-512 VNNI machine, 64
crops). Choosing per tensor by the tensor's own squared error is the `mse` method, which loses
on DenseNet-121.

So `auto` measures each method's output error, cross-validated on the calibration data. The
samples fall in `FOLDS` folds by index (sample i in fold i mod 2, so both folds see every part
of the data); one pass observes both folds with every method's observer
(`bnq.observers.CandidateObserver`, one histogram for all), the quantized model of each method
is built from each fold's observations (and bias-corrected on that fold's samples, when the
calibration corrects biases), and one more pass runs them all beside the float model, each
scored on the samples it was not calibrated on:

    SQNR(method) = 10 log10( sum y^2 / sum (y - y_q)^2 )

over every output value of every sample, y the float model's outputs and y_q those of the
method's model of the other fold. The method of the highest SQNR is kept (the first of
`bnq.observers.CANDIDATES` on a tie: min/max) and the model is calibrated with it on all the
samples. Min/max is kept unscored where the folds cannot be told apart: a single sample, or a
quantized tensor whose first axis is not the samples' (`bnq.calibrate`). Scoring on the calibration samples themselves misleads: on DenseNet-121 percentile
scored 0.65 dB above min/max on them and 0.5 dB below on held-out crops (its ranges, and the
bias correction, fit the samples they came from); cross-validated, min/max led by 1.9 dB.

The sums are exact (`bnq.metrics`) and the folds depend on the sample indices alone, so the
choice is the same however the work is split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from bnq.execution import Job, RunResult
from bnq.metrics import NoiseSums

FOLDS = 2


def fold(samples: np.ndarray) -> np.ndarray:
    """The fold of each sample index."""
    return samples % FOLDS


def in_fold(index: int, samples: np.ndarray) -> np.ndarray:
    return fold(samples) == index


def outside_fold(index: int, samples: np.ndarray) -> np.ndarray:
    return fold(samples) != index


@dataclass(frozen=True)
class MethodChoice:
    """What `auto` measured and kept."""

    chosen: str  # the method kept
    sqnr_db: dict[str, float]  # method -> cross-validated output SQNR on the calibration data
    unscored: str | None = None  # why the methods could not be scored (min/max is kept then)


def choose(reference: onnx.ModelProto, candidates: dict[str, list[onnx.ModelProto]],
           execute: Callable[[Job], RunResult]) -> MethodChoice:
    """The method whose models come closest to `reference` on the samples they were not
    calibrated on (`candidates[method][f]` calibrated on fold f); `execute` runs a job over the
    calibration data (`bnq.execution.run` with its data and options)."""
    runs: dict[tuple[int, bytes], int] = {}  # identical models of a fold run once
    models, folds, slots = [], [], {}
    for method, per_fold in candidates.items():
        slots[method] = []
        for index, model in enumerate(per_fold):
            key = (index, model.SerializeToString())
            if key not in runs:
                runs[key] = len(models)
                models.append(model)
                folds.append(index)
            slots[method].append(runs[key])
    # the float model once per fold, on the samples outside it, as the models of that fold:
    # outputs compare whole, whatever their shapes (a scalar output has no samples to pick)
    outputs = tuple(value.name for value in reference.graph.output)
    job = Job((reference,) * FOLDS + tuple(models), ("onnxruntime",) * (FOLDS + len(models)),
              ((outputs,) * (FOLDS + len(models)),),
              functools.partial(_OutputErrors, outputs, tuple(folds)), (),
              tuple(functools.partial(outside_fold, index) for index in [*range(FOLDS), *folds]))
    sums = execute(job).accumulator.sums
    scores = {}
    for method, indices in slots.items():
        total = NoiseSums()
        for index in indices:
            total.merge(sums[index])
        scores[method] = total.sqnr_db()
    best = max(scores.values())
    return MethodChoice(next(method for method, score in scores.items() if score == best), scores)


class _OutputErrors:
    """Accumulator of `bnq.execution`: per model, the error sums of its outputs against the
    float model's on the samples outside its fold, the only ones both run on (models 0 .. FOLDS
    - 1: the float model, for each fold)."""

    def __init__(self, outputs: tuple[str, ...], folds: tuple[int, ...]) -> None:
        self.outputs, self.folds = outputs, folds
        self.sums = [NoiseSums() for _ in folds]

    def update(self, batch: dict[str, np.ndarray], fetched: list[dict[str, np.ndarray]],
               groups: tuple[int, ...]) -> None:
        for sums, index, values in zip(self.sums, self.folds, fetched[FOLDS:]):
            if values:  # none of this micro-batch's samples lie outside its fold
                for name in self.outputs:
                    sums.update(fetched[index][name], values[name])

    def merge(self, other: _OutputErrors) -> None:
        for mine, theirs in zip(self.sums, other.sums):
            mine.merge(theirs)
