"""bnq bench: the shape of its reports and the agreement check, never its timings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_kernels import reference

from bnq import bench, load_model
from bnq.bench import _random_case, bench_kernel, bench_models
from bnq.cli import cli
from bnq.kernels import BnReluPlan

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
    medians = {(r.model, r.backend, r.threads): r.median_ms for r in report.results}
    for result in report.results:
        first = medians["a", result.backend, result.threads]
        assert result.speedup == pytest.approx(first / result.median_ms)


SHAPE = (2, 5, 48, 48)  # 4608 elements per channel: bnq's kernel takes its arithmetic path


def test_kernel_paths_agree_with_the_exact_codes():
    """Every path is compared with exact codes computed apart from it: the exact paths give
    them, the float formulas differ at most by one code (near rounding ties)."""
    report = bench_kernel(SHAPE, threads=1, repeats=1)
    diffs = {path.name: path.max_code_diff for path in report.paths}
    assert {"bnq", "numpy-float", "onnxruntime-qdq", "onnxruntime-bnq-function"} <= set(diffs)
    assert diffs["bnq"] == diffs["onnxruntime-bnq-function"] == 0
    assert diffs["numpy-float"] <= 1 and diffs["onnxruntime-qdq"] <= 1
    # the codes without torch, the exact table, against the slow rational reference
    x, p = _random_case(SHAPE, np.random.default_rng(0))
    plan = BnReluPlan(p["x_scale"], p["x_zero_point"], p["weight"], p["bias"],
                      p["running_mean"], p["running_var"], p["eps"], p["y_scale"],
                      p["y_zero_point"])
    corner = x[:1, :, :1, :8]
    np.testing.assert_array_equal(plan.table[np.arange(SHAPE[1])[None, :, None, None], corner],
                                  reference(corner, *(p[k] for k in (
                                      "x_scale", "x_zero_point", "weight", "bias",
                                      "running_mean", "running_var", "eps", "y_scale",
                                      "y_zero_point"))))


def test_a_wrong_path_shows_in_its_code_diff(monkeypatch):
    """bnq's kernel and the float formula, each off by a few codes: the report says so (the
    kernel is not compared with itself)."""
    real_call, real_float = BnReluPlan.__call__, bench._numpy_float
    monkeypatch.setattr(BnReluPlan, "__call__", lambda self, x, threads=1: np.minimum(
        real_call(self, x, threads), 250) + 2)
    monkeypatch.setattr(bench, "_numpy_float", lambda x, p: np.minimum(real_float(x, p), 250) + 5)
    report = bench_kernel(SHAPE, threads=1, repeats=1)
    diffs = {path.name: path.max_code_diff for path in report.paths}
    assert diffs["bnq"] == 2 and diffs["numpy-float"] >= 4
    assert diffs["onnxruntime-bnq-function"] == 0


def test_kernel_bench_checks_against_torch(torch):
    report = bench_kernel(SHAPE, threads=1, repeats=1)
    assert report.reference == "torch"
    diffs = {path.name: path.max_code_diff for path in report.paths}
    assert diffs["torch"] == diffs["bnq"] == diffs["onnxruntime-bnq-function"] == 0


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
