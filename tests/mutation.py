"""Mutation testing by hand: does the test suite notice when bnq's code is wrong?

Each mutant below is one small, meaningful change to bnq (a wrong rounding, a dropped check, a
swapped axis), given as (file, exact original text, replacement) with the test files that
should notice it. The script copies the repository to a temporary directory once, then for each
mutant writes the mutated file into the copy (never into the working tree), runs pytest on the
mutant's test files (stopping at the first failure, hypothesis derandomized as in CI), restores
the file, and reports the mutant:

* killed: a test failed; the report names the first one;
* survived: every test passed, so no test checks what the mutant breaks: write one;
* not applicable: the original text is no longer in the file (or not exactly once), because
  the code changed since the mutant was written: update the mutant. Never counted as killed;
* flaky: the killing test fails on the unmutated code too (re-run after each kill).

The unmutated copy runs first; if its tests fail, nothing is reported. Run on demand (it is not
collected by pytest: the file name does not start with `test_`):

    python tests/mutation.py                 # all mutants, a markdown table on stdout
    python tests/mutation.py --only qops     # the mutants whose id contains "qops"
    python tests/mutation.py --full          # the whole suite for every mutant (slower)
    python tests/mutation.py --list          # the mutants, without running anything

It exits 1 when a mutant survives, is not applicable or is only killed by a flaky test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 900  # seconds per mutant; a hang counts as killed (by the timeout)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str  # what the mutant breaks


MUTANTS = [
    # kernels: the exact formula and its table
    Mutant("kernels-ratio-float32", "bnq/kernels.py",
           "* (np.asarray(x_scale, f64) / f64(y_scale))).astype(f32)",
           "* (np.asarray(x_scale, f32) / f32(y_scale)).astype(f64)).astype(f32)",
           ("tests/test_kernels.py",), "x_scale / y_scale in float32, not double as PyTorch"),
    Mutant("kernels-no-fma-tie-fix", "bnq/kernels.py",
           "return np.where(up, h.astype(f32), f)", "return f",
           ("tests/test_kernels.py",), "double rounding instead of one FMA rounding"),
    Mutant("kernels-no-relu", "bnq/kernels.py",
           "np.maximum(rounded + y_zero_point, y_zero_point)", "(rounded + y_zero_point)",
           ("tests/test_kernels.py",), "the ReLU clamp at the output zero point dropped"),
    Mutant("kernels-small-gather-offsets", "bnq/kernels.py",
           "offsets = (np.arange(c, dtype=np.intp) * 256)[:, None]",
           "offsets = (np.arange(c, dtype=np.intp) * 255)[:, None]",
           ("tests/test_kernels.py",), "small inputs read the wrong table row"),
    Mutant("kernels-thread-split", "bnq/kernels.py",
           "bounds = np.linspace(0, c, parts + 1).astype(int)",
           "bounds = np.linspace(0, c - 1, parts + 1).astype(int)",
           ("tests/test_kernels.py",), "threads leave the last channel unwritten"),
    # fastpath: the arithmetic that replaces the table
    Mutant("fastpath-no-recheck", "bnq/fastpath.py",
           "exact = (got[0] == self._byte_table).all(axis=1)",
           "exact = np.ones(channels, bool)",
           ("tests/test_kernels.py",), "strategies trusted without the re-check on all 256 codes"),
    Mutant("fastpath-float-no-clamp", "bnq/fastpath.py",
           "clip(src, lo, hi, c)", "copyto(c, src)",
           ("tests/test_kernels.py",), "the float path's input clamp to the plateau ends dropped"),
    Mutant("fastpath-int32-shift", "bnq/fastpath.py",
           "np.right_shift(w32, s, w32)", "np.right_shift(w32, s + 1, w32)",
           ("tests/test_kernels.py",), "the int32 path shifts one bit too far"),
    # qops: the ONNX bodies and the choice between them
    Mutant("qops-body-for-double-as-float", "bnq/qops.py",
           "            return precision", '            return "float"',
           ("tests/test_qops.py",), "the double body checked, the float body chosen"),
    Mutant("qops-no-saturation-check", "bnq/qops.py",
           "np.all(np.abs(v) < _SATURATED) and ", "",
           ("tests/test_qops.py",), "direct bodies allowed where QuantizeLinear wraps"),
    Mutant("qops-table-body-no-tie-fix", "bnq/qops.py",
           'n("And", ["halfway", "toward_h"], ["up"])', 'n("And", ["halfway", "halfway"], ["up"])',
           ("tests/test_qops.py",), "the table body's halfway correction ignores the error sign"),
    Mutant("qops-beta-sign", "bnq/qops.py",
           'n("Sub", ["B", "mean_gain"], ["shift"])', 'n("Add", ["B", "mean_gain"], ["shift"])',
           ("tests/test_qops.py",), "the bodies' beta adds mean * gain"),
    Mutant("qops-integer-check-always-exact", "bnq/qops.py",
           "return np.array_equal(y + y_zp, plan.table.astype(np.int64))", "return True",
           ("tests/test_qops.py", "tests/test_integer.py"),
           "integer-body parameters accepted without the check on every code"),
    # observers
    Mutant("observers-percentile-low-end", "bnq/observers.py",
           "return (np.maximum(quantile(1 - q), self.min_val),",
           "return (self.min_val,",
           ("tests/test_observers.py",), "percentile keeps the minimum instead of the low percentile"),
    Mutant("observers-entropy-zeros-kept", "bnq/observers.py",
           "hist[:, 0] -= self.zeros[rows]", "hist[:, 0] -= 0 * self.zeros[rows]",
           ("tests/test_observers.py",), "entropy counts the ReLU's exact zeros"),
    Mutant("observers-merge-min", "bnq/observers.py",
           "lo = np.minimum(self.min_val, other.min_val)", "lo = self.min_val.copy()",
           ("tests/test_observers.py",), "merging ignores the other observer's minimum"),
    Mutant("observers-mse-symmetric-span", "bnq/observers.py",
           "span = 2 * np.minimum(i, np.maximum(-lo, hi)[:, None])",
           "span = np.minimum(i, np.maximum(-lo, hi)[:, None])",
           ("tests/test_observers.py",), "mse's symmetric range counted half as wide"),
    # quantization
    Mutant("quantization-zero-not-in-range", "bnq/quantization.py",
           "rmin = np.minimum(np.asarray(rmin, dtype=np.float32), np.float32(0))",
           "rmin = np.asarray(rmin, dtype=np.float32)",
           ("tests/test_observers.py",), "zero no longer exactly representable"),
    Mutant("quantization-qmid", "bnq/quantization.py",
           "        qmid = (qmin + qmax + 1) // 2", "        qmid = (qmin + qmax) // 2",
           ("tests/test_observers.py",), "symmetric zero point 127 for uint8, -1 for int8"),
    Mutant("quantization-reduce-range", "bnq/quantization.py",
           "return info.min // 2, info.max // 2", "return int(info.min), int(info.max)",
           ("tests/test_observers.py", "tests/test_calibrate.py"), "reduce_range ignored"),
    Mutant("quantization-round-half-up", "bnq/quantization.py",
           "q = np.asarray(np.rint(x / scale))", "q = np.asarray(np.floor(x / scale + 0.5))",
           ("tests/test_observers.py",), "QuantizeLinear rounds ties up, not to even"),
    Mutant("quantization-dequantize-last-axis", "bnq/quantization.py",
           "    shape[axis] = -1\n    return [array.reshape(shape) for array in arrays]",
           "    shape[-1] = -1\n    return [array.reshape(shape) for array in arrays]",
           ("tests/test_evaluate.py", "tests/test_bias_correction.py"),
           "per-channel codes dequantized along the last axis, not the channel axis"),
    # calibrate
    Mutant("calibrate-bn-input-per-tensor", "bnq/calibrate.py",
           "{name: True for name in plan.bn_inputs}", "{name: False for name in plan.bn_inputs}",
           ("tests/test_calibrate.py",), "BN inputs after pooling quantized per tensor"),
    Mutant("calibrate-gemm-axis", "bnq/rounding.py",
           "return 0 if trans_b else 1", "return 1 if trans_b else 0",
           ("tests/test_calibrate.py",), "Gemm weights quantized along the input axis"),
    Mutant("calibrate-no-float-nudge", "bnq/emit.py",
           "(float_output_scale(*params), None)", "(np.float32(q.scale), None)",
           ("tests/test_calibrate.py",), "no output-scale nudge for the float body"),
    Mutant("calibrate-bias-scale", "bnq/emit.py",
           "scale = (source[1] * q.scale).astype(np.float32)",
           "scale = q.scale.astype(np.float32)",
           ("tests/test_calibrate.py",), "int32 bias at w_scale instead of x_scale * w_scale"),
    Mutant("calibrate-weights-ignore-reduce-range", "bnq/emit.py",
           "reduce_range=formats.reduce_range)", "reduce_range=False)",
           ("tests/test_calibrate.py", "tests/test_calibrate_options.py"),
           "--reduce-range ignored for weights"),
    Mutant("calibrate-activation-type-ignored", "bnq/calibrate.py",
           "activation = np.dtype(formats.activation)", 'activation = np.dtype("uint8")',
           ("tests/test_calibrate_options.py",), "--activation-type int8 ignored"),
    # fusion
    Mutant("fusion-fold-without-epsilon", "bnq/fusion.py",
           "np.sqrt(self.var.astype(np.float64) + self.epsilon)",
           "np.sqrt(self.var.astype(np.float64))",
           ("tests/test_fusion.py",), "folding forgets epsilon"),
    Mutant("fusion-shared-output", "bnq/fusion.py",
           "if len(nodes) != 1 or name in outputs:", "if len(nodes) < 1 or name in outputs:",
           ("tests/test_fusion.py",), "a tensor with several readers folded or fused"),
    Mutant("fusion-training-mode", "bnq/fusion.py",
           'if attributes.get("training_mode", 0):', "if False:",
           ("tests/test_fusion.py",), "training-mode BN fused"),
    # equalization
    Mutant("equalization-across-clip", "bnq/equalization.py",
           'HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "MaxPool")',
           'HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "MaxPool", "Clip")',
           ("tests/test_equalization.py",), "pairs equalized across ReLU6 (Clip), not exact"),
    Mutant("equalization-graph-output", "bnq/equalization.py",
           "if tensor in outputs or len(after) != 1:", "if len(after) != 1:",
           ("tests/test_equalization.py",), "an intermediate graph output rescaled"),
    Mutant("equalization-groups-ignored", "bnq/equalization.py",
           "grouped *= s.reshape(self.groups, 1, -1, 1)",
           "grouped *= np.resize(s, grouped.shape[2]).reshape(1, 1, -1, 1)",
           ("tests/test_equalization.py",),
           "a grouped or depthwise Conv's inputs scaled as one group"),
    Mutant("equalization-bias-unscaled", "bnq/equalization.py",
           "self.bias = self.bias / s", "self.bias = self.bias",
           ("tests/test_equalization.py",), "the first layer's bias not rescaled with its weights"),
    Mutant("equalization-one-sweep", "bnq/equalization.py",
           "if moved < TOLERANCE:", "if True:",
           ("tests/test_equalization.py",), "chains stop after one sweep, ranges not matched"),
    # bias correction
    Mutant("bias-correction-pads-ignored", "bnq/bias_correction.py",
           '"VALID": 0}.get(auto_pad, pads[axis])', '"VALID": 0}.get(auto_pad, 0)',
           ("tests/test_bias_correction.py",), "a Conv's explicit padding left out of its taps"),
    Mutant("bias-correction-tap-order", "bnq/bias_correction.py",
           "return [*range(first, len(taps)), *range(first - 1, -1, -1)]",
           "return [*range(len(taps))]",
           ("tests/test_bias_correction.py",),
           "taps of axes contracted apart matched to the wrong weights"),
    Mutant("bias-correction-sign", "bnq/bias_correction.py",
           "codes = -np.rint(shift / layer.bias_scale)", "codes = np.rint(shift / layer.bias_scale)",
           ("tests/test_bias_correction.py",), "the shift added to the bias instead of removed"),
    # data
    Mutant("data-no-dtype-cast", "bnq/data.py",
           "array = batch[name].astype(dtype, copy=False)", "array = batch[name]",
           ("tests/test_data.py",), "float64 samples not cast to the model's float32"),
    Mutant("data-num-samples-ignored", "bnq/data.py",
           "remaining = self.num_samples if num_samples is None else "
           "min(num_samples, self.num_samples)\n        remaining = min(remaining, self.num_samples"
           " - first)", "remaining = self.num_samples - first",
           ("tests/test_data.py", "tests/test_calibrate_options.py"), "--num-samples ignored"),
    Mutant("data-fingerprint-sizes-only", "bnq/data.py",
           "digest.update(handle.read(take))", "handle.read(take)",
           ("tests/test_data.py", "tests/test_cluster.py"),
           "the data's fingerprint ignores its content (a stale copy of the same size trusted)"),
    # cluster
    Mutant("cluster-trust-a-stale-copy", "bnq/cluster.py",
           "streamed = any(value != fingerprint for value in seen.values())",
           "streamed = any(value is None for value in seen.values())",
           ("tests/test_cluster.py",), "workers that see other data at the path read it"),
    Mutant("cluster-stream-unbounded", "bnq/cluster.py",
           "IN_FLIGHT * threads if streamed else len(units)", "len(units)",
           ("tests/test_cluster.py",), "every batch read and sent at once: memory grows with the data"),
    # machine and command line
    Mutant("machine-avx2-full-range", "bnq/machine.py",
           'return IntegerFormats("uint8", "int8", True,',
           'return IntegerFormats("uint8", "int8", False,',
           ("tests/test_calibrate_options.py",), "AVX2 without VNNI gets 8-bit weights"),
    Mutant("cli-percentile-ignored", "bnq/cli.py",
           'options = {"percentile": percentile} if method in ("percentile", "auto") else {}',
           "options = {}", ("tests/test_calibrate_options.py",), "--percentile ignored"),
]


def copy_repository(target: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis",
                                    "*.egg-info", "out")
    for name in ("bnq", "tests", "samples"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[bool, str, float]:
    """(passed, the first failing test or "", seconds) of pytest on `tests` in `copy`."""
    env = {**os.environ, "PYTHONPATH": str(copy), "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o",
             "addopts=-rfE", *tests], cwd=copy, env=env, capture_output=True, text=True,
            timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, f"(timeout after {TIMEOUT} s)", time.monotonic() - start
    seconds = time.monotonic() - start
    if result.returncode == 0:
        return True, "", seconds
    failed = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", result.stdout, re.MULTILINE)
    return False, failed.group(1) if failed else f"(pytest exit {result.returncode})", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[],
                        help="run the mutants whose id contains this text (repeatable)")
    parser.add_argument("--full", action="store_true",
                        help="run the whole test suite for every mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or any(text in m.id for text in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.id:40} {m.file:22} {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bnq-mutation-") as directory:
        copy = Path(directory)
        copy_repository(copy)
        every = tuple(sorted({test for m in mutants for test in m.tests}))
        ok, failed, seconds = run_tests(copy, ("tests",) if args.full else every)
        if not ok:
            print(f"the unmutated code fails {failed}: fix that first", file=sys.stderr)
            return 2
        print(f"unmutated: {len(every)} test files pass ({seconds:.0f} s)", file=sys.stderr)
        print("| mutant | file | what it breaks | result | killed by |")
        print("|---|---|---|---|---|")
        bad = 0
        for m in mutants:
            path = copy / m.file
            source = path.read_text()
            if source.count(m.original) != 1:
                result, killer = "not applicable", f"original text found {source.count(m.original)} times"
                bad += 1
            else:
                path.write_text(source.replace(m.original, m.replacement))
                try:
                    ok, killer, seconds = run_tests(copy, ("tests",) if args.full else m.tests)
                finally:
                    path.write_text(source)
                result = "survived" if ok else "killed"
                if not ok and killer.startswith("tests/") and not run_tests(copy, (killer,))[0]:
                    result = "flaky"  # the killing test fails on the unmutated code too
                bad += result != "killed"
            print(f"| `{m.id}` | `{m.file}` | {m.why} | {result} | {killer and f'`{killer}`'} |",
                  flush=True)
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
