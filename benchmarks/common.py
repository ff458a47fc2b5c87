"""What the benchmark scripts share: onnxruntime's quantize_static as the peer quantizer, sessions
with one intra-op thread, interleaved timing, SQNR, plain tables and the machine header."""

from __future__ import annotations

import contextlib
import io
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

import bnq
from bnq.machine import default_formats, describe

ORT_METHODS = {"MinMax": CalibrationMethod.MinMax, "Percentile": CalibrationMethod.Percentile,
               "Entropy": CalibrationMethod.Entropy}
# quantize_static configurations: label -> (activation type, weight type, reduce_range)
ORT_TYPES = {"QInt8/QInt8": (QuantType.QInt8, QuantType.QInt8, False),
             "QUInt8/QInt8": (QuantType.QUInt8, QuantType.QInt8, False),
             "QUInt8/QInt8 reduce_range": (QuantType.QUInt8, QuantType.QInt8, True)}


class Reader(CalibrationDataReader):
    """onnxruntime's data reader over an array, `batch` samples per call (the last may be short)."""

    def __init__(self, name: str, x: np.ndarray, batch: int) -> None:
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def ort_quantize(model: Path, x: np.ndarray, output: Path, *, batch: int = 32,
                 method: str = "MinMax", types: str = "QInt8/QInt8",
                 preprocess: bool = False) -> None:
    """quantize_static: QDQ, per-channel weights, the calibration `method` and `types`; with
    `preprocess`, after onnxruntime's recommended `quant_pre_process` (shape inference and its
    graph optimizations, which fold BatchNormalization into the Conv before it)."""
    activation, weight, reduce_range = ORT_TYPES[types]
    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    if preprocess:
        prepared = output.with_suffix(".preprocessed.onnx")
        quant_pre_process(str(model), str(prepared))
        model = prepared
    with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print
        quantize_static(str(model), str(output), Reader(name, x, batch),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=activation, weight_type=weight,
                        calibrate_method=ORT_METHODS[method])


def session(model: onnx.ModelProto | Path, optimized: Path | None = None,
            optimize: bool = True, disabled_optimizers: tuple[str, ...] = ()
            ) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # QDQ pairs run as written, in float: the error of the ranges alone
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3  # not the warning that NCHWc layouts are CPU-specific
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


def interleaved(runs: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Milliseconds per call of each `runs[name]()`, after a warm-up, over `rounds` rounds in
    which every run takes its turn (the order rotating) for `calls` calls: the machine's drift
    and noise fall on all of them alike."""
    for run in runs.values():
        for _ in range(max(1, calls // 4)):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            for _ in range(calls):
                runs[name]()
            times[name].append((time.perf_counter() - start) / calls * 1000)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def sqnr(reference: np.ndarray, value: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - value) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(reference.astype(np.float64) ** 2)
                                                          / noise)


def table(title: str, header: list[str], rows: list[list]) -> None:
    """Numbers right-aligned, text left-aligned."""
    cells = [header] + [[f"{c}" for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  ".join(c.rjust(w) if right else c.ljust(w)
                        for c, w, right in zip(row, widths, numeric)).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))


def _is_number(text: str) -> bool:
    try:
        float(text.split(" / ")[0])
    except ValueError:
        return text == "-"
    return True


def print_machine(**extra_versions: str) -> None:
    machine = describe()
    versions = {"python": platform.python_version(), **machine.versions, **extra_versions}
    package = Path(bnq.__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."],
                           capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine.cpu}, {machine.cores} cores, features {', '.join(machine.features)}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"bnq from {package}" + (f", commit {commit}" if commit else ", not a git checkout")
          + (" with uncommitted changes in bnq/" if dirty else ""))
    formats = default_formats()
    print(f"bnq default formats: activations {formats.activation}, weights {formats.weight}"
          f"{' (7-bit)' if formats.reduce_range else ''}: {formats.reason}")
