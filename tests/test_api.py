"""The package's Python API as the README shows it: `bnq.NAME` is the function, whatever was
imported before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_functions_named_like_their_modules_stay_functions():
    """`bnq.calibrate` and `bnq.evaluate` after their submodules were imported (a fresh
    interpreter: this one has imported everything already)."""
    code = ("import bnq.calibrate, bnq.evaluate\nfrom bnq.cli import cli\nimport bnq\n"
            "from bnq.calibrate import calibrate\nfrom bnq.evaluate import evaluate\n"
            "assert bnq.calibrate is calibrate and bnq.evaluate is evaluate, "
            "(bnq.calibrate, bnq.evaluate)\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
