"""bnq on a real local Dask cluster (scheduler and worker processes, no mocks): the same bytes
as one process, with the workers reading the data or, when they cannot read it or see other data
at its path, the data streamed to them a few batches at a time; a killed worker's batch rerun
(never a smaller sample count), and one-line errors for an unreachable scheduler, a task that
keeps killing its workers, data gone and a missing package."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

distributed = pytest.importorskip("distributed")  # in the test extra: CI runs these
import dask  # noqa: E402 (installed with distributed)

from bnq import cluster, load_model  # noqa: E402
from bnq.calibrate import calibrate  # noqa: E402
from bnq.cli import cli  # noqa: E402
from bnq.data import SampleData, model_inputs  # noqa: E402
from bnq.errors import ArgumentError, DataError  # noqa: E402
from bnq.evaluate import evaluate  # noqa: E402
from bnq.execution import ExecutionError, Job, run  # noqa: E402
from bnq.metrics import ExactSum  # noqa: E402
from test_execution import CALIB, EVAL, FORMATS, ROOT, SAMPLE  # noqa: E402

WORKERS = 2


@pytest.fixture(scope="module")
def local_cluster():
    """Two worker processes of one thread each, behind nannies that restart a killed worker.
    A result fetched from a worker that has just been killed is fetched again elsewhere once
    connecting to it fails, which Dask retries for `timeouts.connect` (30 s by default)."""
    with dask.config.set({"distributed.comm.timeouts.connect": "5s"}), distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=40) as local:
        yield local


@pytest.fixture
def scheduler(local_cluster):
    """The cluster's address once all its workers are up: a test before may have killed some,
    which their nannies restart (in seconds on a loaded machine)."""
    local_cluster.wait_for_workers(WORKERS, timeout=120)
    return local_cluster.scheduler_address


@pytest.mark.parametrize("method", ["minmax", "auto"])
def test_calibrate_and_evaluate_give_the_same_bytes_on_the_cluster(scheduler, tmp_path, method):
    runner = CliRunner()
    output = tmp_path / "q.onnx"
    results = []
    for split in ([], ["--scheduler", scheduler]):
        result = runner.invoke(cli, ["calibrate", str(SAMPLE), "-d", str(CALIB), "-o", str(output),
                                     "--num-samples", "96", "--batch-size", "16", "--json",
                                     "--force", "--method", method, *split])
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
    with the sample `marker` (if any) kills the process: every time, or with a `flag` file only
    while the file does not exist (the kill creates it)."""

    def __init__(self, marker: np.ndarray | None, flag: str | None, parent: int) -> None:
        self.marker, self.flag, self.parent = marker, flag, parent
        self.total, self.samples = ExactSum(), 0

    def update(self, batch, fetched, groups) -> None:
        x = batch["input"]
        if (self.marker is not None and os.getpid() != self.parent
                and np.array_equal(x[0], self.marker)):
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


class _Chdir(distributed.WorkerPlugin):
    """Moves each worker process into `directory`, where a relative path names what is there."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def setup(self, worker) -> None:
        self.previous = os.getcwd()
        os.chdir(self.directory)

    def teardown(self, worker) -> None:
        os.chdir(self.previous)


@pytest.fixture
def apart(scheduler, tmp_path, monkeypatch):
    """(the test's directory, the workers'): the test runs in one and the cluster's worker
    processes in the other, so that a relative data path names a file the workers do not have,
    or another file."""
    here, there = tmp_path / "client", tmp_path / "workers"
    here.mkdir()
    there.mkdir()
    monkeypatch.chdir(here)
    with distributed.Client(scheduler) as client:
        client.register_plugin(_Chdir(str(there)), name="chdir")
        try:
            yield here, there
        finally:
            client.unregister_worker_plugin("chdir")


@pytest.mark.parametrize("workers_see", ["nothing", "a stale copy", "no images"])
def test_data_the_workers_cannot_read_is_streamed_with_the_same_bytes(apart, scheduler,
                                                                      workers_see):
    here, there = apart
    if workers_see == "no images":
        shutil.copytree(ROOT / "samples" / "digits" / "calib", here / "digits")
        data = "digits"
    else:
        data = "calib.npz"
        with np.load(CALIB) as arrays:
            np.savez(here / data, input=arrays["input"])
            if workers_see == "a stale copy":  # the same size, other values
                np.savez(there / data, input=arrays["input"] * 0.5)
                assert (there / data).stat().st_size == (here / data).stat().st_size
    runner = CliRunner()
    results = []
    for split in ([], ["--scheduler", scheduler]):
        result = runner.invoke(cli, ["calibrate", str(SAMPLE), "-d", data, "-o", "q.onnx",
                                     "--num-samples", "96", "--batch-size", "16", "--json",
                                     "--force", *split])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        results.append((Path("q.onnx").read_bytes(), report.pop("plan"), report))
    (model, plan, report), (cluster_model, cluster_plan, cluster_report) = results
    assert cluster_model == model and cluster_report == report
    assert plan["data"] == "path" and cluster_plan == {**plan, "data": "streamed"}


def test_streamed_evaluation_reads_labels_in_every_pass_s_batches(apart, scheduler):
    here, _ = apart
    shutil.copy(EVAL, here / "eval.npz")
    reference = load_model(SAMPLE)
    quantized = calibrate(reference, SampleData(CALIB, model_inputs(reference)), formats=FORMATS,
                          num_samples=64)[0]
    data = SampleData("eval.npz", model_inputs(reference), extra_keys=("labels",))
    local, streamed = (evaluate(quantized, reference, data, batch_size=20, num_samples=40,
                                memory_limit=100_000, **split)
                       for split in ({}, {"scheduler": scheduler}))
    assert streamed.plan.passes > 1 and streamed.plan.data == "streamed"
    assert streamed == dataclasses.replace(local, plan=streamed.plan)
    assert local.top1_accuracy is not None and local.samples == 40


class _Counted(SampleData):
    """Counts the batches read in this process."""

    reads = 0

    def batches(self, *args, **kwargs):
        self.reads += 1
        return super().batches(*args, **kwargs)


def test_streaming_keeps_a_few_batches_in_flight(apart, scheduler):
    here, _ = apart
    shutil.copy(CALIB, here / "calib.npz")
    reference = load_model(SAMPLE)
    data = _Counted("calib.npz", model_inputs(reference))
    job = Job((reference,), ("onnxruntime",), (((),),),
              functools.partial(_Sum, None, None, os.getpid()))
    in_flight = []  # when a batch is done: those read and sent, not done
    result = run(job, data, batch_size=4, num_samples=64, scheduler=scheduler,
                 progress=lambda n: in_flight.append(data.reads - len(in_flight) - 1))
    assert result.plan.data == "streamed" and result.accumulator.samples == 64
    assert data.reads == 16  # every batch read once, by the client
    assert max(in_flight) == in_flight[0] == cluster.IN_FLIGHT * WORKERS - 1


def test_a_worker_that_missed_the_check_checks_before_its_first_task(apart, scheduler):
    here, _ = apart
    shutil.copy(CALIB, here / "calib.npz")
    reference = load_model(SAMPLE)
    data = SampleData("calib.npz", model_inputs(reference))
    with distributed.Client(scheduler) as client:
        future = client.submit(cluster._run_from_path, SimpleNamespace(data=data), (0, 0, 32),
                               "a run whose check this worker missed", data.fingerprint(),
                               pure=False)
        with pytest.raises(DataError, match="joined the cluster after bnq checked the data "
                                            "cannot read calib.npz or sees different data"):
            future.result()


def test_data_gone_before_the_run_fails_in_one_line(scheduler, tmp_path):
    moved = tmp_path / "calib.npz"
    moved.write_bytes(CALIB.read_bytes())
    reference = load_model(SAMPLE)
    data = SampleData(moved, model_inputs(reference))
    moved.unlink()  # opened and checked, then gone: from the client and the workers
    with pytest.raises(DataError, match=f"cannot read the data at {moved}: "):
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
