"""The command line as a user runs it: exit codes, reports, JSON, and files left behind."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from click.testing import CliRunner

from bnq.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits_cnn.onnx"


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_fuse_writes_a_checked_model_and_reports(tmp_path):
    result = invoke("fuse", SAMPLE, "-o", tmp_path / "fused.onnx")
    assert result.exit_code == 0, result.output
    assert "folded" in result.output and "fused" in result.output
    onnx.checker.check_model(onnx.load(tmp_path / "fused.onnx"), full_check=True)


def test_fuse_json_report(tmp_path):
    result = invoke("fuse", SAMPLE, "-o", tmp_path / "fused.npz", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["folded"] + report["fused"] == report["ops_before"]["BatchNormalization"]
    assert report["kept"] == 0
    assert {a["outcome"] for a in report["actions"]} == {"folded", "fused"}
    assert report["ops_after"]["BatchNormRelu"] == report["fused"]


def test_errors_are_one_line_with_exit_code_1_and_no_output(tmp_path):
    output = tmp_path / "out.onnx"
    for args in (["fuse", tmp_path / "missing.onnx", "-o", output],
                 ["fuse", SAMPLE, "-o", tmp_path / "out.txt"],
                 ["fuse", SAMPLE, "-o", tmp_path / "no" / "dir.onnx"]):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_output_is_never_the_input_and_never_overwritten_without_force(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(SAMPLE.read_bytes())
    result = invoke("fuse", model, "-o", model, "--force")
    assert result.exit_code == 1 and "overwrite the input" in result.stderr
    assert model.read_bytes() == SAMPLE.read_bytes()
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    assert invoke("fuse", model, "-o", existing).exit_code == 1
    assert existing.read_bytes() == b"keep me"
    assert invoke("fuse", model, "-o", existing, "--force").exit_code == 0
    assert onnx.load(existing).graph.node


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "fuse", str(tmp_path / "x.onnx"), "-o",
                                      str(tmp_path / "y.onnx")])
    assert result.exit_code != 0 and result.exception is not None
