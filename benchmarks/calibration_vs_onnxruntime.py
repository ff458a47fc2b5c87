"""bnq calibrate vs onnxruntime's quantize_static on the sample model (samples/digits_cnn.onnx).

    python benchmarks/calibration_vs_onnxruntime.py [--quick]

Prints plain tables to stdout and writes nothing into the repository (models and data go to a
temporary directory). A development tool: it needs scikit-learn (the 1000 throughput and memory
samples are sklearn's digits / 16, repeated as needed), which bnq itself does not.

1. Accuracy: top-1 on samples/eval.npz and SQNR of the logits against the float model,
   SQNR = 10 log10(sum(ref**2) / sum((ref - q)**2)), for bnq (default formats, every method,
   and minmax with cross-layer equalization) and quantize_static (QDQ, per-channel weights,
   MinMax, the same 256 calibration images); also
   with onnxruntime's graph optimizations off (QDQ run in float: the ranges' error alone, without
   the integer kernels').
2. Calibration throughput (minmax, 1000 samples, batch 32): bnq `calibrate()` and
   `quantize_static`, end to end, alternated, median of the repetitions.
3. Peak memory with 100 and 1000 samples, each calibration in a fresh subprocess that reports
   its own peak RSS (VmHWM: a child's `ru_maxrss` counts the parent it was forked from), and
   whether a short last batch crashes the calibrator.
4. Latency in onnxruntime, one intra-op thread: float vs the quantized models, batch 1 and 32,
   warm-up, then the models interleaved round by round (median ms).
5. The operators onnxruntime runs after its graph optimizations (`optimized_model_filepath`).

The machine is shared and noisy: compare the ratios measured inside one run, not across runs.
It measures the bnq that Python imports (the header says which); for the committed code of a
dirty checkout: `git archive HEAD bnq | tar -x -C DIR` and run with `PYTHONPATH=DIR` from
outside the checkout.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

import common
from common import ORT_METHODS, ORT_TYPES, interleaved, session, sqnr, table

import bnq
from bnq.calibrate import calibrate
from bnq.data import SampleData, model_inputs
from bnq.machine import IntegerFormats, default_formats

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "samples" / "digits_cnn.onnx"
CALIB = ROOT / "samples" / "calib.npz"
EVAL = ROOT / "samples" / "eval.npz"
INPUT = "input"
BNQ_METHODS = ("minmax", "percentile", "entropy", "mse")
MEMORY_BATCH = 25  # divides 100 and 1000: no short last batch, which crashes some calibrators


# --- data and the two quantizers -------------------------------------------------------------

def digits(count: int) -> np.ndarray:
    """`count` sklearn digits as float32 (N, 1, 8, 8) in [0, 1], repeated as needed."""
    from sklearn.datasets import load_digits  # a dev tool's dependency, not bnq's

    images = (load_digits().images / 16).astype(np.float32)[:, None]
    return np.resize(images, (count, *images.shape[1:]))


def ort_quantize(x: np.ndarray, output: Path, *, batch: int = 32, method: str = "MinMax",
                 types: str = "QInt8/QInt8") -> None:
    common.ort_quantize(MODEL, x, output, batch=batch, method=method, types=types)


def bnq_quantize(data: Path, *, batch: int = 32, method: str = "minmax",
                 formats: IntegerFormats | None = None, **options) -> onnx.ModelProto:
    model = bnq.load_model(MODEL)
    quantized, _ = calibrate(model, SampleData(data, model_inputs(model)),
                             formats=formats or default_formats(), method=method,
                             batch_size=batch, **options)
    return quantized


def print_machine() -> None:
    import sklearn

    common.print_machine(**{"scikit-learn": sklearn.__version__})


# --- 1. accuracy and SQNR --------------------------------------------------------------------

def accuracy(tmp: Path) -> dict[str, onnx.ModelProto | Path]:
    """Print top-1 and SQNR of every quantized variant; return the models for later sections."""
    evaluation = np.load(EVAL)
    x, labels = evaluation["input"], evaluation["labels"]
    calib = np.load(CALIB)["input"]
    models: dict[str, onnx.ModelProto | Path] = {"float": MODEL}
    for method in BNQ_METHODS:
        models[f"bnq {method}"] = bnq_quantize(CALIB, method=method)
    models["bnq minmax equalize"] = bnq_quantize(CALIB, equalize=True)
    models["bnq minmax int8/int8"] = bnq_quantize(
        CALIB, formats=IntegerFormats("int8", "int8", False, "as quantize_static's default"))
    for types in ORT_TYPES:
        path = tmp / f"ort_{types.replace('/', '_').replace(' ', '_')}.onnx"
        ort_quantize(calib, path, types=types)
        models[f"ort {types}"] = path
    reference = session(MODEL).run(None, {INPUT: x})[0]
    float_top1 = np.mean(reference.argmax(1) == labels) * 100
    rows = []
    for name, model in models.items():
        logits = session(model).run(None, {INPUT: x})[0]
        top1 = np.mean(logits.argmax(1) == labels) * 100
        emulated = session(model, optimize=False).run(None, {INPUT: x})[0]
        rows.append([name, f"{top1:.1f}", f"{top1 - float_top1:+.1f}",
                     "-" if name == "float" else f"{sqnr(reference, logits):.1f}",
                     "-" if name == "float" else f"{sqnr(reference, emulated):.1f}",
                     f"{np.mean(logits.argmax(1) == reference.argmax(1)) * 100:.1f}"])
    table(f"1. Accuracy on eval.npz ({len(x)} images), calibrated on calib.npz ({len(calib)} images; "
          "bnq: default formats unless named; ort = quantize_static QDQ, per-channel, MinMax)",
          ["model", "top-1 %", "vs float", "SQNR dB", "SQNR, no graph opt.", "agrees w/ float %"],
          rows)
    return models


# --- 2. calibration throughput ---------------------------------------------------------------

def throughput(tmp: Path, repetitions: int) -> None:
    x = digits(1000)
    data = tmp / "digits1000.npz"
    np.savez(data, input=x)
    times: dict[str, list[float]] = {"bnq calibrate()": [], "ort quantize_static": []}
    for repetition in range(repetitions):
        order = list(times) if repetition % 2 == 0 else list(times)[::-1]
        for name in order:
            if name.startswith("bnq"):
                start = time.perf_counter()
                bnq_quantize(data)
            else:
                start = time.perf_counter()
                ort_quantize(x, tmp / "throughput.onnx")
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["ort quantize_static"])
    rows = [[name, f"{statistics.median(t):.3f}", " ".join(f"{v:.3f}" for v in t),
             f"{len(x) / statistics.median(t):.0f}", f"{base / statistics.median(t):.2f}"]
            for name, t in times.items()]
    table(f"2. Calibration throughput, minmax, {len(x)} samples, batch 32, end to end "
          f"(median of {repetitions}, alternated)",
          ["calibrator", "median s", "runs s", "samples/s", "speed vs ort"], rows)


# --- 3. peak memory (each calibration in a fresh process) ------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


def child(spec: dict) -> None:
    """Runs in the subprocess: one calibration. Prints (KiB) the process's peak RSS, its RSS just
    before calibrating and its peak while calibrating, all from /proc/self/status: `ru_maxrss`
    of a child counts the RSS of the parent it was forked from (Linux keeps the larger of the
    pre-exec image and the new one), so it says more about the parent than the child."""
    data = Path(spec["data"])
    x = np.load(data)[INPUT]  # onnxruntime's reader takes arrays; bnq streams the file
    setup, before = _status_kib("VmHWM"), _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # reset the high-water mark to the current RSS
    error = None
    try:
        if spec["tool"] == "bnq":
            bnq_quantize(data, batch=spec["batch"], method=spec["method"])
        else:
            ort_quantize(x, data.with_suffix(f".{spec['method']}.onnx"), batch=spec["batch"],
                         method=spec["method"])
    except Exception as exception:  # report it: a crash is a result here
        error = f"{type(exception).__name__}: {str(exception).splitlines()[0][:100]}"
    during = _status_kib("VmHWM")
    print(json.dumps({"peak": max(setup, during), "before": before, "during": during,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "error": error}))


def run_child(tool: str, method: str, data: Path, batch: int) -> dict:
    spec = {"tool": tool, "method": method, "data": str(data), "batch": batch}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"error": f"exit {done.returncode}: {tail[:100]}"}
    return result | {"seconds": seconds}


def memory(tmp: Path) -> None:
    x = digits(1000)
    data = {count: tmp / f"digits{count}.npz" for count in (100, 1000)}
    for count, path in data.items():
        np.savez(path, input=x[:count])
    runs = [("bnq", m) for m in BNQ_METHODS] + [("ort", m) for m in ORT_METHODS]
    rows, crashes, seen = [], [], []
    for tool, method in runs:
        small, large = (run_child(tool, method, data[count], MEMORY_BATCH) for count in data)
        seen += [r["ru_maxrss"] for r in (small, large) if "ru_maxrss" in r]
        if small["error"] or large["error"]:
            rows.append([f"{tool} {method}"] + ["-"] * 7)
            crashes.append(f"   {tool} {method} crashed: {small['error'] or large['error']}")
            continue
        growth = [r["during"] - r["before"] for r in (small, large)]
        rows.append([f"{tool} {method}", f"{small['peak'] / 1024:.0f}",
                     f"{large['peak'] / 1024:.0f}", f"{large['peak'] / small['peak']:.2f}",
                     f"{growth[0] / 1024:.1f}", f"{growth[1] / 1024:.1f}",
                     f"{growth[1] / max(growth[0], 1):.2f}",
                     f"{small['seconds']:.1f} / {large['seconds']:.1f}"])
    table(f"3. Peak RSS of one calibration in a fresh process, 100 vs 1000 samples, batch "
          f"{MEMORY_BATCH} (MiB; peak = the process's VmHWM; growth = the peak while "
          "calibrating minus the RSS just before)",
          ["calibrator", "peak 100", "peak 1000", "ratio", "growth 100", "growth 1000",
           "growth ratio", "process s 100/1000"], rows)
    ru_maxrss = min(seen), max(seen)
    if crashes:
        print("\n".join(crashes))
    print(f"   (the children's own ru_maxrss read {ru_maxrss[0] / 1024:.0f}-{ru_maxrss[1] / 1024:.0f}"
          f" MiB: the peak RSS of this parent process, {_status_kib('VmHWM') / 1024:.0f} MiB, "
          "which they were forked from)")
    rows = []
    for tool, method in runs:
        result = run_child(tool, method, data[100], 32)
        rows.append([f"{tool} {method}", result["error"] or "ok"])
    table("   Short last batch: 100 samples at batch 32 (3 x 32 + 4)", ["calibrator", "result"],
          rows)


# --- 4. latency and 5. operators after onnxruntime's optimizations ---------------------------

LATENCY_MODELS = ("float", "bnq minmax", "bnq minmax int8/int8", "ort QInt8/QInt8",
                  "ort QUInt8/QInt8 reduce_range")


def latency(models: dict, rounds: int) -> None:
    x = np.load(EVAL)["input"]
    sessions = {name: session(models[name]) for name in LATENCY_MODELS}
    rows = []
    for batch, calls in ((1, 200), (32, 20)):
        feeds = {INPUT: np.ascontiguousarray(x[:batch])}
        times = interleaved({name: (lambda s=s: s.run(None, feeds))
                             for name, s in sessions.items()}, rounds, calls)
        base = statistics.median(times["float"])
        for name, t in times.items():
            median = statistics.median(t)
            rows.append([name, batch, f"{median:.4f}", f"{min(t):.4f}", f"{base / median:.2f}"])
    table(f"4. Latency in onnxruntime, 1 intra-op thread, median of {rounds} interleaved rounds "
          "(speed vs float > 1: faster)",
          ["model", "batch", "median ms", "min ms", "speed vs float"], rows)


def operators(models: dict, tmp: Path) -> None:
    counts = {}
    for name in LATENCY_MODELS:
        path = tmp / f"optimized_{len(counts)}.onnx"
        session(models[name], optimized=path)
        optimized = onnx.load(path)
        counts[name] = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}"
                               for n in optimized.graph.node)
    ops = sorted(set().union(*counts.values()))
    short = {name: name.replace("bnq minmax", "bnq").replace("reduce_range", "rr")
             for name in counts}
    table("5. Operators onnxruntime runs (optimized graph, ORT_ENABLE_ALL, 1 thread)",
          ["op", *short.values()], [[op, *(counts[n].get(op, 0) for n in counts)] for op in ops])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice
    if args.child:
        child(json.loads(args.child))
        return
    print_machine()
    with tempfile.TemporaryDirectory(prefix="bnq-bench-") as tmp:
        models = accuracy(Path(tmp))
        throughput(Path(tmp), 1 if args.quick else 3)
        memory(Path(tmp))
        latency(models, 3 if args.quick else 15)
        operators(models, Path(tmp))


if __name__ == "__main__":
    main()
