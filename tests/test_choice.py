"""Method auto (bnq.choice): on constructed models where the right method is known it picks it,
cross-validated on the calibration data; its model is the chosen method's, byte for byte; the
report says what it measured; the execution layer's per-model sample selection it relies on."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import make_model, run_ort
from onnx import helper

from bnq.calibrate import calibrate
from bnq.choice import FOLDS, in_fold
from bnq.cli import cli
from bnq.data import SampleData, model_inputs
from bnq.execution import SAMPLE, Job, run
from bnq.machine import IntegerFormats
from bnq.observers import CANDIDATES

FORMATS = IntegerFormats("uint8", "int8", False, "tests")
SIDE = 32


def conv_model(weight: np.ndarray, bias: float, relu: bool) -> onnx.ModelProto:
    """y = Conv1x1(x, weight) + bias, then Relu when asked: only x and the weight are quantized
    (the output stays float), so x's range alone sets the output error."""
    out, inputs = weight.shape
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if relu else "y"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    return make_model(nodes, [("x", ["N", inputs, SIDE, SIDE])], [("y", ["N", out, SIDE, SIDE])],
                      opset=17, initializers={"w": weight.astype(np.float32)[:, :, None, None],
                                              "b": np.full(out, bias, np.float32)})


def spikes(rng: np.random.Generator, samples: int) -> np.ndarray:
    """Values in [0, 1] and two spikes of 10-30 per sample: the output relu(x - 5) is the spikes."""
    x = rng.uniform(0, 1, (samples, 8, SIDE, SIDE)).astype(np.float32)
    for sample in x:
        for _ in range(2):
            sample[rng.integers(8), rng.integers(SIDE), rng.integers(SIDE)] = rng.uniform(10, 30)
    return x


def outliers(rng: np.random.Generator, samples: int) -> np.ndarray:
    """Values in [-1, 1] and, in 2 samples of 32, one value of +-6: a min/max range of +-6 spends
    6 times the step on every value to represent a handful."""
    x = rng.uniform(-1, 1, (samples, 16, SIDE, SIDE)).astype(np.float32)
    x[0::32, 0, 0, 0] = 6
    x[1::32, 0, 0, 0] = -6
    return x


def sqnr(reference: np.ndarray, actual: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - actual) ** 2)))


def calibrated(model, x, tmp_path, method, **options):
    np.save(tmp_path / "x.npy", x)
    return calibrate(model, SampleData(tmp_path / "x.npy", model_inputs(model)), formats=FORMATS,
                     method=method, **options)


def held_out_sqnr(model, quantized, x) -> float:
    return sqnr(run_ort(model, {"x": x})[0], run_ort(quantized, {"x": x})[0])


def test_auto_keeps_minmax_where_clipping_cuts_the_signal(tmp_path):
    """Percentile 99.9 clips the spikes, which are all the output carries: 0 dB."""
    model = conv_model(np.eye(8), -5.0, relu=True)
    options = {"method_options": {"percentile": 99.9}}
    quantized, report = calibrated(model, spikes(np.random.default_rng(0), 64), tmp_path, "auto",
                                   **options)
    scores = report.choice.sqnr_db
    assert list(scores) == list(CANDIDATES) and report.method == "auto"
    assert report.choice.chosen == "minmax"  # entropy keeps the range too: the tie goes first
    assert scores["percentile"] < 1 < 40 < scores["minmax"]
    minmax, _ = calibrated(model, spikes(np.random.default_rng(0), 64), tmp_path, "minmax")
    assert quantized.SerializeToString() == minmax.SerializeToString()
    assert {t.observer for t in report.tensors if t.role != "weight"} == {"minmax"}


def test_auto_clips_where_outliers_waste_the_range(tmp_path):
    model = conv_model(np.random.default_rng(1).standard_normal((4, 16)), 0.0, relu=False)
    x = outliers(np.random.default_rng(0), 64)
    quantized, report = calibrated(model, x, tmp_path, "auto")
    chosen, scores = report.choice.chosen, report.choice.sqnr_db
    assert chosen != "minmax" and scores[chosen] > scores["minmax"] + 1
    assert report.tensors[0].rmax < 2 and report.tensors[0].observer == chosen
    same, _ = calibrated(model, x, tmp_path, chosen)
    assert quantized.SerializeToString() == same.SerializeToString()
    minmax, _ = calibrated(model, x, tmp_path, "minmax")
    fresh = outliers(np.random.default_rng(5), 64)
    assert held_out_sqnr(model, quantized, fresh) > held_out_sqnr(model, minmax, fresh) + 1


@pytest.mark.parametrize("bias_correction", [True, False])
def test_scores_are_each_fold_s_model_on_the_other_fold(tmp_path, bias_correction):
    """The score of a method: its model calibrated on the even samples alone (bias correction
    included) run on the odd ones, and the other way round, as one SQNR."""
    model = conv_model(np.random.default_rng(1).standard_normal((4, 16)), 0.5, relu=False)
    x = outliers(np.random.default_rng(0), 64)
    _, report = calibrated(model, x, tmp_path, "auto", bias_correction=bias_correction)
    for method in CANDIDATES:
        signal = noise = 0.0
        for index in range(FOLDS):
            fold_model, _ = calibrated(model, x[index::FOLDS], tmp_path, method,
                                       bias_correction=bias_correction)
            others = np.delete(x, np.s_[index::FOLDS], axis=0)
            reference = run_ort(model, {"x": others})[0].astype(np.float64)
            signal += np.sum(reference**2)
            noise += np.sum((reference - run_ort(fold_model, {"x": others})[0]) ** 2)
        assert report.choice.sqnr_db[method] == pytest.approx(10 * np.log10(signal / noise),
                                                              abs=1e-6)


def test_one_sample_leaves_minmax_unscored(tmp_path):
    model = conv_model(np.eye(8), -5.0, relu=True)
    x = spikes(np.random.default_rng(0), 1)
    quantized, report = calibrated(model, x, tmp_path, "auto", method_options={"percentile": 90})
    assert report.choice.chosen == "minmax" and report.choice.sqnr_db == {}
    assert report.choice.unscored == "1 sample: none left to score the methods on"
    minmax, _ = calibrated(model, x, tmp_path, "minmax")
    assert quantized.SerializeToString() == minmax.SerializeToString()


def test_a_tensor_without_the_samples_first_leaves_minmax_unscored(tmp_path):
    """A MatMul reads x reshaped to (samples x 8) rows: its rows do not tell the folds apart."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["rows"]),
             helper.make_node("MatMul", ["rows", "w"], ["y"])]
    model = make_model(nodes, [("x", ["N", 8, 4, 4])], [("y", ["M", 3])], opset=17,
                       initializers={"shape": np.array([-1, 16]),
                                     "w": rng.standard_normal((16, 3)).astype(np.float32)})
    x = rng.standard_normal((8, 8, 4, 4)).astype(np.float32)
    quantized, report = calibrated(model, x, tmp_path, "auto")
    assert report.choice.chosen == "minmax" and report.choice.sqnr_db == {}
    assert "'rows'" in report.choice.unscored and "first axis" in report.choice.unscored
    minmax, _ = calibrated(model, x, tmp_path, "minmax")
    assert quantized.SerializeToString() == minmax.SerializeToString()


@pytest.mark.parametrize("batch", [4, "N"])
def test_fixed_batches_and_scalar_outputs_are_scored(tmp_path, batch):
    """A model of a fixed batch of 4 runs whole micro-batches (6 samples per fold do not split
    into 4s) and its outputs are cut to the fold's samples; a scalar output (a sum over the
    batch, here where the batch is free) is compared with the float model's over the same
    samples."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    outputs = [("y", [batch, 8, SIDE, SIDE])]
    if batch == "N":
        nodes.append(helper.make_node("ReduceSum", ["y"], ["total"], keepdims=0))
        outputs.append(("total", []))
    model = make_model(nodes, [("x", [batch, 8, SIDE, SIDE])], outputs, opset=17,
                       initializers={"w": np.eye(8, dtype=np.float32)[:, :, None, None]})
    x = np.random.default_rng(0).standard_normal((12, 8, SIDE, SIDE)).astype(np.float32)
    quantized, report = calibrated(model, x, tmp_path, "auto", batch_size=12)
    assert report.choice.unscored is None and set(report.choice.sqnr_db) == set(CANDIDATES)
    assert all(30 < score < 100 for score in report.choice.sqnr_db.values()), report.choice
    same, _ = calibrated(model, x, tmp_path, report.choice.chosen, batch_size=12)
    assert quantized.SerializeToString() == same.SerializeToString()


def test_cli_reports_the_choice(tmp_path):
    model = conv_model(np.eye(8), -5.0, relu=True)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", spikes(np.random.default_rng(0), 16))
    args = ["calibrate", str(tmp_path / "m.onnx"), "-d", str(tmp_path / "x.npy"), "-o",
            str(tmp_path / "q.onnx"), "--method", "auto", "--percentile", "99.9", "--force"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "method auto: chose minmax; output SQNR against the float model" in result.stdout
    assert "percentile 0.00 dB" in result.stdout
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "auto" and report["choice"]["chosen"] == "minmax"
    assert set(report["choice"]["sqnr_db"]) == set(CANDIDATES)
    assert report["choice"]["sqnr_db"]["percentile"] < 1


class _Seen:
    """Accumulator: the sample indices of every micro-batch, and the rows each model ran on."""

    def __init__(self):
        self.indices, self.rows = [], []

    def update(self, batch, fetched, groups):
        self.indices.append(batch[SAMPLE])
        self.rows.append([len(next(iter(values.values()))) if values else 0
                          for values in fetched])

    def merge(self, other):
        self.indices += other.indices
        self.rows += other.rows


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_a_job_runs_a_model_on_the_samples_it_selects(tmp_path, batch_size):
    model = conv_model(np.eye(8), 0.0, relu=True)
    np.save(tmp_path / "x.npy", spikes(np.random.default_rng(0), 11))
    data = SampleData(tmp_path / "x.npy", model_inputs(model))
    job = Job((model, model), ("onnxruntime",) * 2, ((("y",), ("y",)),), _Seen,
              samples=(None, functools.partial(in_fold, 1)))
    seen = run(job, data, batch_size=batch_size).accumulator
    indices = np.concatenate(seen.indices)
    np.testing.assert_array_equal(indices, np.arange(11))
    for micro, (everything, selected) in zip(seen.indices, seen.rows):
        assert everything == len(micro) and selected == np.count_nonzero(micro % 2 == 1)
