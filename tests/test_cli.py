"""The command line as a user runs it: exit codes, reports, JSON, and files left behind."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
from click.testing import CliRunner

from bnq.cli import cli
from bnq.errors import ModelError
from bnq.qops import BODIES

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
    """Without --debug a library error is a one-line exit 1 (SystemExit); with it, the error
    itself propagates (click's runner catches it: a real run prints its traceback)."""
    args = ["fuse", str(tmp_path / "x.onnx"), "-o", str(tmp_path / "y.onnx")]
    plain = CliRunner().invoke(cli, args)
    assert plain.exit_code == 1 and isinstance(plain.exception, SystemExit)
    debug = CliRunner().invoke(cli, ["--debug", *args])
    assert isinstance(debug.exception, ModelError), debug.exception
    assert debug.exc_info[2] is not None and "Error: " not in debug.output


def test_every_command_shows_an_example_in_its_help():
    for command in cli.commands:
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert "Example" in result.output and f"bnq {command} " in result.output, command


def test_help_loads_no_heavy_module():
    """`bnq --help` must stay fast: numpy, onnx and onnxruntime load when a command runs."""
    code = ("import sys\nfrom bnq.cli import main\nsys.argv = ['bnq', '--help']\ntry:\n main()\n"
            "except SystemExit:\n pass\nprint(sorted(m for m in ('numpy', 'onnx', 'onnxruntime')"
            " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert "Usage: bnq" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_choices_spelled_in_the_cli_match_the_registries():
    from bnq import cli as cli_module
    from bnq import render
    from bnq.calibrate import calibrate
    from bnq.evaluate import BACKEND_CHOICES
    from bnq.observers import OBSERVERS
    from bnq.runtime import BACKENDS

    assert cli_module.METHODS == tuple(OBSERVERS)
    assert cli_module.BACKENDS == tuple(BACKENDS)
    assert cli_module.BACKEND_CHOICES == tuple(BACKEND_CHOICES)
    assert set(render.BODY_WORDS) == set(BODIES)
    defaults = inspect.signature(calibrate).parameters
    assert cli_module.METHOD == defaults["method"].default
    assert cli_module.WEIGHT_ROUNDING == defaults["weight_rounding"].default
    assert cli_module.BIAS_CORRECTION == defaults["bias_correction"].default
    assert cli_module.EQUALIZE == defaults["equalize"].default


def test_arguments_of_the_other_mode_are_usage_errors():
    for args, named in ((["bench", "--kernel", SAMPLE], "MODELS"),
                        (["bench", "--kernel", "--backend", "numpy"], "--backend"),
                        (["bench", "--kernel", "--warmup", "1"], "--warmup"),
                        (["bench", SAMPLE, "--shape", "1,2,3"], "--shape")):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert named in result.stderr and "does not apply" in result.stderr


def test_tables_never_cut_names():
    from rich.console import Console

    from bnq.render import report_table

    name = "/residual/bn1/BatchNormalization_relu_with_a_very_long_name_output_0"
    table = report_table("t", "node", "SQNR (dB)", right=("SQNR (dB)",))
    table.add_row(name, "12.34")
    narrow = Console(width=40, record=True)
    narrow.print(table)
    text = narrow.export_text()
    assert "…" not in text
    assert name in "".join(line.strip("│ ").split("│")[0].strip() for line in text.splitlines())
    wide = Console(width=1 << 16, record=True)  # what bnq uses when piped
    wide.print(table)
    assert name in wide.export_text()
