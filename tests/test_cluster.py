"""bnq on a real local Dask cluster (scheduler and worker processes, no mocks): the same bytes
as one process, a killed worker's batch rerun (never a smaller sample count), and one-line
errors for an unreachable scheduler, workers that cannot read the data and a missing package."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

distributed = pytest.importorskip("distributed")  # in the test extra: CI runs these

from bnq import cluster, load_model  # noqa: E402
from bnq.calibrate import calibrate  # noqa: E402
from bnq.cli import cli  # noqa: E402
from bnq.data import SampleData, model_inputs  # noqa: E402
from bnq.errors import ArgumentError, DataError  # noqa: E402
from bnq.evaluate import evaluate  # noqa: E402
from bnq.execution import ExecutionError, Job, run  # noqa: E402
from bnq.metrics import ExactSum  # noqa: E402
from test_execution import CALIB, EVAL, FORMATS, SAMPLE  # noqa: E402


@pytest.fixture(scope="module")
def scheduler():
    """Two worker processes of one thread each, behind nannies that restart a killed worker."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=40) as local:
        yield local.scheduler_address


def test_calibrate_and_evaluate_give_the_same_bytes_on_the_cluster(scheduler, tmp_path):
    runner = CliRunner()
    output = tmp_path / "q.onnx"
    results = []
    for split in ([], ["--scheduler", scheduler]):
        result = runner.invoke(cli, ["calibrate", str(SAMPLE), "-d", str(CALIB), "-o", str(output),
                                     "--num-samples", "96", "--batch-size", "16", "--json",
                                     "--force", *split])
        assert result.exit_code == 0, result.output
        results.append((output.read_bytes(), result.output))
    assert results[0] == results[1]
    reference = load_model(SAMPLE)
    quantized = load_model(output)
    data = SampleData(EVAL, model_inputs(reference), extra_keys=("labels",))
    reports = [evaluate(quantized, reference, data, backend="both", batch_size=25, **split)
               for split in ({}, {"scheduler": scheduler})]
    assert reports[0] == dataclasses.replace(reports[1], plan=reports[0].plan)
    assert reports[1].samples == data.num_samples


class _Sum:
    """Sums every input value exactly. In a worker process (not the test's), the batch starting
    with the sample `marker` kills the process: every time, or with a `flag` file only while
    the file does not exist (the kill creates it)."""

    def __init__(self, marker: np.ndarray, flag: str | None, parent: int) -> None:
        self.marker, self.flag, self.parent = marker, flag, parent
        self.total, self.samples = ExactSum(), 0

    def update(self, batch, fetched, groups) -> None:
        x = batch["input"]
        if os.getpid() != self.parent and np.array_equal(x[0], self.marker):
            if self.flag is None or not os.path.exists(self.flag):
                if self.flag is not None:
                    Path(self.flag).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        self.total.add(x.astype(np.float64).reshape(-1))
        self.samples += len(x)

    def merge(self, other) -> None:
        self.total.merge(other.total)
        self.samples += other.samples


def test_a_killed_worker_has_its_batch_rerun(scheduler, tmp_path):
    reference = load_model(SAMPLE)
    data = SampleData(CALIB, model_inputs(reference))
    with np.load(CALIB) as arrays:
        x = arrays["input"][:128]
    flag = tmp_path / "killed"
    job = Job((reference,), ("onnxruntime",), (((),),),
              functools.partial(_Sum, x[64], str(flag), os.getpid()))
    result = run(job, data, batch_size=32, num_samples=128, scheduler=scheduler)
    assert flag.exists()  # a worker did die on the batch from sample 64
    assert result.accumulator.samples == 128
    expected = ExactSum()
    expected.add(x.astype(np.float64).reshape(-1))
    assert result.accumulator.total.value() == expected.value()


def test_workers_without_the_data_fail_in_one_line(scheduler, tmp_path):
    moved = tmp_path / "calib.npz"
    moved.write_bytes(CALIB.read_bytes())
    reference = load_model(SAMPLE)
    data = SampleData(moved, model_inputs(reference))
    moved.unlink()  # the client opened it; the workers will not find it
    with pytest.raises(DataError, match=str(moved)):
        calibrate(reference, data, formats=FORMATS, scheduler=scheduler)


def test_unreachable_scheduler_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 1)
    output = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["calibrate", str(SAMPLE), "-d", str(CALIB), "-o",
                                      str(output), "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot reach the Dask scheduler at "
                                                   "tcp://127.0.0.1:9"), result.output
    assert not output.exists()


def test_without_distributed_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    reference = load_model(SAMPLE)
    with pytest.raises(ArgumentError, match=r"pip install 'bnq\[distributed\]'"):
        calibrate(reference, SampleData(CALIB, model_inputs(reference)), formats=FORMATS,
                  scheduler="tcp://127.0.0.1:9")


def test_a_task_that_keeps_killing_its_workers_fails_the_run(scheduler):
    reference = load_model(SAMPLE)
    data = SampleData(CALIB, model_inputs(reference))
    with np.load(CALIB) as arrays:
        marker = arrays["input"][32]
    job = Job((reference,), ("onnxruntime",), (((),),),
              functools.partial(_Sum, marker, None, os.getpid()))
    with pytest.raises(ExecutionError, match=r"failed to run samples \d+\.\.\d+: .*nothing was written"):
        run(job, data, batch_size=32, num_samples=64, scheduler=scheduler)
