"""bnq bench: the shape of its reports and the agreement check, never its timings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnq import load_model
from bnq.bench import bench_kernel, bench_models
from bnq.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits_cnn.onnx"


def test_models_are_timed_per_backend_and_thread_count():
    model = load_model(SAMPLE)
    feeds = {"input": np.zeros((3, 1, 8, 8), np.float32)}
    report = bench_models({"a": model, "b": model}, feeds, backends=("onnxruntime", "numpy"),
                          threads=(1, 2), warmup=0, repeats=2)
    keys = [(r.model, r.backend, r.threads) for r in report.results]
    assert keys == [(m, b, t) for b in ("onnxruntime", "numpy") for t in (1, 2) for m in "ab"]
    for result in report.results:
        assert result.batch_size == 3 and 0 < result.median_ms <= result.p90_ms
        assert result.throughput == pytest.approx(3 / result.median_ms * 1e3)
        if result.model == "a":
            assert result.speedup == 1.0


def test_kernel_paths_agree_before_they_are_timed():
    report = bench_kernel((2, 5, 7, 3), threads=1, repeats=2)
    names = {path.name for path in report.paths}
    assert {"bnq", "numpy-float", "onnxruntime-qdq", "onnxruntime-bnq-function"} <= names
    exact = {path.name: path.max_code_diff for path in report.paths}
    assert exact["bnq"] == exact["onnxruntime-bnq-function"] == 0
    if "torch" in names:
        assert exact["torch"] == 0 and report.reference == "torch"


def test_cli_json_shapes(tmp_path):
    result = CliRunner().invoke(cli, ["bench", str(SAMPLE), str(SAMPLE), "--threads", "1",
                                      "--warmup", "0", "--repeats", "2", "--batch-size", "4",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"cpu", "features", "cores", "versions"} <= set(report["machine"])
    assert len(report["results"]) == 2
    for row in report["results"]:
        assert {"model", "backend", "batch_size", "threads", "median_ms", "p90_ms",
                "throughput"} <= set(row)
    result = CliRunner().invoke(cli, ["bench", "--kernel", "--shape", "1,3,4,4", "--threads", "1",
                                      "--repeats", "2", "--json"])
    assert result.exit_code == 0, result.output
    [kernel] = json.loads(result.stdout)["kernel"]
    assert kernel["shape"] == [1, 3, 4, 4] and kernel["paths"]


def test_cli_usage_errors():
    assert CliRunner().invoke(cli, ["bench"]).exit_code == 2
    assert CliRunner().invoke(cli, ["bench", "--kernel", "--shape", "a,b"]).exit_code == 2
