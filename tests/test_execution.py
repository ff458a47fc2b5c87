"""bnq.execution: however the work is split (memory limit, micro-batches, passes, batch size,
worker processes), calibration writes the same bytes and evaluation reports the same figures;
failing and dying workers stop the run with one clear error and nothing written."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from bnq import load_model
from bnq.calibrate import calibrate
from bnq.cli import cli
from bnq.data import SampleData, model_inputs
from bnq.errors import ArgumentError, DataError
from bnq.evaluate import evaluate
from bnq.execution import DEFAULT_MEMORY_LIMIT, ExecutionError, Job, plan_passes, run
from bnq.machine import IntegerFormats
from bnq.metrics import ErrorSums, ExactSum

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits_cnn.onnx"
CALIB = ROOT / "samples" / "calib.npz"
EVAL = ROOT / "samples" / "eval.npz"
FORMATS = IntegerFormats("uint8", "int8", True, "tests")


@pytest.fixture(scope="module")
def reference():
    return load_model(SAMPLE)


@pytest.fixture(scope="module")
def quantized(reference):
    return calibrate(reference, SampleData(CALIB, model_inputs(reference)), formats=FORMATS)[0]


def calibrated(reference, method="minmax", **split):
    data = SampleData(CALIB, model_inputs(reference))
    model, report = calibrate(reference, data, formats=FORMATS, method=method, num_samples=96,
                              **split)
    return model.SerializeToString(), dataclasses.replace(report, plan=None, batches=0), report.plan


def evaluated(reference, quantized, **split):
    data = SampleData(EVAL, model_inputs(reference), extra_keys=("labels",))
    report = evaluate(quantized, reference, data, backend="both", num_samples=100, **split)
    return json.dumps(dataclasses.asdict(dataclasses.replace(report, plan=None))), report.plan


# Calibrating the sample model takes ~140 KB per sample: these limits give micro-batches of the
# whole batch, of a few samples, of two, and single samples in two passes.
LIMITS = [1 << 30, 1_000_000, 300_000, 100_000]


@pytest.mark.parametrize("method", ["minmax", "entropy", "auto"])
def test_calibration_is_the_same_for_any_split(reference, method):
    model, report, plan = calibrated(reference, method)
    assert plan.passes == 1 and plan.micro_batch == 32
    seen = set()
    for limit in LIMITS[1:]:
        for batch_size in (7, 32):
            other_model, other_report, other_plan = calibrated(
                reference, method, memory_limit=limit, batch_size=batch_size)
            assert other_model == model and other_report == report
            seen.add((other_plan.micro_batch, other_plan.passes))
    assert {passes for _, passes in seen} > {1} and {micro for micro, _ in seen} > {1}


def test_evaluation_is_the_same_for_any_split(reference, quantized):
    report, plan = evaluated(reference, quantized)
    assert plan.passes == 1 and '"samples": 100' in report and '"backend_max_lsb_diff": 0' in report
    plans = []
    for limit, batch_size in ((1_000_000, 1), (300_000, 13), (100_000, 13)):
        other, other_plan = evaluated(reference, quantized, memory_limit=limit,
                                      batch_size=batch_size)
        assert other == report
        plans.append(other_plan)
    assert max(p.passes for p in plans) > 1 and min(p.micro_batch for p in plans) == 1


def test_plan_stays_under_the_limit(reference):
    data = SampleData(CALIB, model_inputs(reference))
    job = Job((reference,), ("onnxruntime",), (((reference.graph.node[3].output[0],),),
                                                ((reference.graph.node[5].output[0],),)),
              lambda: None)
    for limit in (10**9, 1_000_000, 300_000):
        micro, passes, estimate = plan_passes(job, data, 32, limit)
        assert 1 <= micro <= 32 and estimate <= limit and passes == [(0, 1)]
    # below what one sample takes: single samples, one group per pass, the estimate as it is
    micro, passes, estimate = plan_passes(job, data, 32, 1000)
    assert micro == 1 and passes == [(0,), (1,)] and estimate > 1000


@pytest.mark.parametrize("method", ["entropy", "auto"])
def test_workers_give_the_same_bytes(reference, quantized, method):
    model, report, _ = calibrated(reference, method, batch_size=16)
    model2, report2, _ = calibrated(reference, method, batch_size=16, workers=2)
    assert model2 == model and report2 == report
    assert evaluated(reference, quantized, workers=3, batch_size=16)[0] == evaluated(
        reference, quantized)[0]


def _on_threads(monkeypatch, module_name: str, owner, method: str, produce):
    """`produce()` with 1 thread per worker, then 3, in the module's eyes; both results, and
    how many threads ran `owner.method` (the work spread over them)."""
    module, original, seen = sys.modules[module_name], getattr(owner, method), set()

    def recorded(*args):
        seen.add(threading.get_ident())
        time.sleep(0.002)  # items are handed to whichever thread is free: let the pool's take some
        original(*args)

    monkeypatch.setattr(owner, method, recorded)
    monkeypatch.setattr(module, "worker_threads", lambda workers, scheduler: 1)
    alone = produce()
    assert len(seen) == 1
    monkeypatch.setattr(module, "worker_threads", lambda workers, scheduler: 3)
    return alone, produce(), len(seen)


def test_evaluation_spreads_the_tensors_over_threads_with_the_same_figures(
        reference, quantized, monkeypatch):
    from bnq.evaluate import _Layer
    alone, spread, threads = _on_threads(monkeypatch, "bnq.evaluate", _Layer, "update",
                                         lambda: evaluated(reference, quantized)[0])
    assert spread == alone and threads > 1  # the main thread and the pool's


@pytest.mark.parametrize("method", ["entropy", "auto"])
def test_calibration_spreads_the_tensors_over_threads_with_the_same_bytes(
        reference, method, monkeypatch):
    from bnq.calibrate import _Observation
    alone, spread, threads = _on_threads(monkeypatch, "bnq.calibrate", _Observation, "_observe",
                                         lambda: calibrated(reference, method)[:2])
    assert spread == alone and threads > 1


def test_zero_workers_is_an_argument_error(reference, quantized):
    data = SampleData(CALIB, model_inputs(reference))
    with pytest.raises(ArgumentError, match="workers must be at least 1, got 0"):
        calibrate(reference, data, formats=FORMATS, workers=0)
    with pytest.raises(ArgumentError, match="workers must be at least 1, got 0"):
        evaluate(quantized, reference, data, workers=0)


def test_cli_default_memory_limit_is_the_library_s():
    option = next(p for p in cli.commands["calibrate"].params if p.name == "memory_limit")
    assert option.type.convert(option.default, option, None) == DEFAULT_MEMORY_LIMIT


def test_cli_output_is_byte_identical_for_any_number_of_workers(tmp_path):
    runner = CliRunner()
    outputs = []
    output = tmp_path / "q.onnx"
    for workers in (1, 2):
        result = runner.invoke(cli, ["calibrate", str(SAMPLE), "-d", str(CALIB), "-o", str(output),
                                     "--num-samples", "64", "--batch-size", "16", "--json", "--force",
                                     "--workers", str(workers), "--memory-limit", "100kB"])
        assert result.exit_code == 0, result.output
        outputs.append((output.read_bytes(), result.output))
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0][1])["plan"]["micro_batch"] < 16


class _Dying:
    """An accumulator whose process dies (as if killed) on the samples starting at `first`."""

    def __init__(self, first: int) -> None:
        self.first, self.seen = first, 0

    def update(self, batch, fetched, groups) -> None:
        if os.environ.get("BNQ_TEST_WORKER") and batch["input"][0, 0, 0, 0] == self.first:
            os.kill(os.getpid(), signal.SIGKILL)

    def merge(self, other) -> None:
        self.seen += 1


def test_a_dead_worker_stops_the_run(reference, monkeypatch):
    data = SampleData(CALIB, model_inputs(reference))
    with np.load(CALIB) as arrays:
        marker = float(arrays["input"][40, 0, 0, 0])
    job = Job((reference,), ("onnxruntime",), (((),),), functools.partial(_Dying, marker))
    monkeypatch.setenv("BNQ_TEST_WORKER", "1")  # spawned workers inherit it
    with pytest.raises(ExecutionError, match="died .*nothing was written"):
        run(job, data, batch_size=16, num_samples=64, workers=2)


def test_a_failing_worker_reports_the_error(tmp_path, reference):
    broken = tmp_path / "broken.npz"
    x = np.load(CALIB)["input"][:40].copy()
    x[33, 0, 0, 0] = np.nan
    np.savez(broken, input=x)
    output = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["calibrate", str(SAMPLE), "-d", str(broken), "-o",
                                      str(output), "--batch-size", "8", "--workers", "2"])
    assert result.exit_code == 1 and "NaN or infinite values in samples 32..39" in result.output
    assert not output.exists()
    with pytest.raises(DataError):
        calibrate(reference, SampleData(broken, model_inputs(reference)), formats=FORMATS,
                  batch_size=8, workers=2)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e300, 1e300), max_size=40),
       st.integers(0, 40))
def test_exact_sum_is_the_correctly_rounded_sum_for_any_split(values, cut):
    whole, left, right = ExactSum(), ExactSum(), ExactSum()
    whole.add(np.array(values))
    left.add(np.array(values[:cut]))
    right.add(np.array(values[cut:]))
    right.merge(left)
    assert whole.value() == right.value() == math.fsum(values)


@pytest.mark.parametrize("shape", [(7, 3, 5), (5, 70_000)])  # small samples; samples in pieces
def test_error_sums_do_not_depend_on_the_split(shape):
    rng = np.random.default_rng(3)
    reference = rng.standard_normal(shape).astype(np.float32)
    actual = reference + rng.normal(0, 0.1, shape).astype(np.float32)
    whole, first, second = ErrorSums(), ErrorSums(), ErrorSums()
    whole.update(reference, actual)
    first.update(reference[:2], actual[:2])
    second.update(reference[2:], actual[2:])
    second.merge(first)
    figures = [(s.sqnr_db(), s.cosine(), s.mean_abs_error(), s.abs_max) for s in (whole, second)]
    assert figures[0] == figures[1]
    expected = reference.astype(np.float64)
    assert whole.sqnr_db() == pytest.approx(
        10 * np.log10((expected ** 2).sum() / ((expected - actual) ** 2).sum()))


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.parametrize("group", [True, False])  # Ctrl-C in a terminal; kill -INT of bnq alone
def test_ctrl_c_stops_every_worker_and_writes_nothing(tmp_path, group):
    with np.load(CALIB) as arrays:
        np.save(tmp_path / "many.npy", np.tile(arrays["input"], (40, 1, 1, 1)))
    output = tmp_path / "q.onnx"
    process = subprocess.Popen(
        [sys.executable, "-m", "bnq", "calibrate", str(SAMPLE), "-d", str(tmp_path / "many.npy"),
         "-o", str(output), "--workers", "2", "--batch-size", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        # as in a terminal: a background job (CI, this test's runner) may ignore SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while len(_children(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _children(process.pid)
        assert len(workers) >= 2 and process.poll() is None
        time.sleep(1.0)  # the workers are at work
        if group:
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:  # a failing test leaves no process behind
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted: nothing was written" in stderr.decode()
    assert not output.exists() and not list(tmp_path.glob("*.onnx*"))
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in workers)


def _running(pid: int) -> bool:
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
