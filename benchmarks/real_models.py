"""bnq against the float model and onnxruntime's quantize_static on real-size CNNs: torchvision's
DenseNet-121, ResNet-50 and MobileNetV2 (`benchmarks/models.py` builds them).

    python benchmarks/real_models.py [--models densenet121,resnet50,mobilenet_v2] [--cache DIR]
                                     [--rounds 15] [--json OUT] [--variants 'bnq*,ort*'] [--nncf]

For each model, in one run: quantize it with bnq (`calibrate()`, default formats; its default,
`auto`, every other `--method`, without bias correction, with weight rounding and with
equalization), with quantize_static (after `quant_pre_process`, as onnxruntime recommends; QDQ,
per-channel weights; MinMax with every type variant, Percentile and Entropy with its default
types) and, with `--nncf`, NNCF's
post-training quantization of the ONNX model (`nncf.quantize`, its defaults: a benchmark-only
package, pip-installed when missing), all on the same 64 natural-image crops; then

- accuracy: SQNR of the logits against the float model and top-1 agreement with it, on 64 other
  crops (SQNR = 10 log10(sum(ref^2) / sum((ref - q)^2)));
- speed: onnxruntime, one intra-op thread, batch 1, every model of the row interleaved round by
  round (median of `--rounds`; 0 skips the timing), as float time / quantized time (> 1:
  faster than float);
- what onnxruntime runs: its optimized graph's DequantizeLinear, QuantizeLinear, Transpose and
  float BatchNormalization / Concat / AveragePool counts.

The models and data go to `--cache` (built when missing; a temporary directory by default).
Benchmark-only packages (torch, torchvision, scikit-image) are installed by `models.py` when
missing. The machine is shared and noisy: compare the ratios inside one run, and name the CPU
(the header prints it: VNNI or not changes bnq's formats and every figure).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

import models as builders
from common import ORT_TYPES, interleaved, median, ort_quantize, print_machine, session, sqnr, table

import bnq
from bnq.calibrate import calibrate
from bnq.data import SampleData, model_inputs
from bnq.machine import default_formats

CALIBRATION_BATCH = 8  # bounds bnq's calibration memory on these models (all tensors of a batch)


def build(names: list[str], cache: Path) -> None:
    """The models and crops in `cache`, built where missing."""
    builders.ensure_installed()
    cache.mkdir(parents=True, exist_ok=True)
    for name, seed in (("calib", 100), ("eval", 200)):
        if not (cache / f"{name}.npz").exists():
            np.savez(cache / f"{name}.npz", input=builders.crops(64, seed))
    for name in names:
        if not (cache / f"{name}.onnx").exists():
            builders.build(name, cache / f"{name}.onnx")


def bnq_quantize(model_path: Path, calib: Path, output: Path, **options) -> None:
    model = bnq.load_model(model_path)
    quantized, _ = calibrate(model, SampleData(calib, model_inputs(model)),
                             formats=default_formats(), batch_size=CALIBRATION_BATCH, **options)
    bnq.save_model(quantized, output)


def nncf_quantize(model_path: Path, calib: Path, output: Path) -> None:
    """NNCF's post-training quantization of the ONNX model, its defaults (MinMax ranges, fast
    bias correction), on the same crops, one per calibration sample."""
    import nncf

    x = np.load(calib)["input"]
    model = onnx.load(model_path)
    name = model.graph.input[0].name
    dataset = nncf.Dataset([{name: x[i:i + 1]} for i in range(len(x))])
    quantized = nncf.quantize(model, dataset, subset_size=len(x))
    onnx.save(quantized, output)


BNQ = {"bnq": {}} | {f"bnq {method}": {"method": method}
                     for method in ("auto", "percentile", "entropy", "mse")} | {
    "bnq no bias correction": {"bias_correction": False},
    "bnq weight rounding": {"weight_rounding": True},
    "bnq equalize": {"equalize": True}}
QUANTIZERS = {label: functools.partial(bnq_quantize, **options)
              for label, options in BNQ.items()} | {
    f"ort {types}": (lambda model, calib, output, types=types:
                     ort_quantize(model, np.load(calib)["input"], output, types=types,
                                  preprocess=True))
    for types in ORT_TYPES} | {
    f"ort {method}": (lambda model, calib, output, method=method:
                      ort_quantize(model, np.load(calib)["input"], output, method=method,
                                   preprocess=True))
    for method in ("Percentile", "Entropy")} | {"nncf": nncf_quantize}
WATCHED = ("DequantizeLinear", "QuantizeLinear", "Transpose", "BatchNormalization", "Concat",
           "AveragePool")


def compare(name: str, cache: Path, work: Path, rounds: int, quantizers: dict) -> list[dict]:
    """One row per model variant: speed vs float, SQNR, agreement, op counts, calibration time."""
    paths = {"float": cache / f"{name}.onnx"}
    seconds = {}
    for label, quantize in quantizers.items():
        paths[label] = work / f"{name}_{label.replace(' ', '_').replace('/', '_')}.onnx"
        start = time.perf_counter()
        quantize(paths["float"], cache / "calib.npz", paths[label])
        seconds[label] = time.perf_counter() - start
    x = np.load(cache / "eval.npz")["input"]
    sessions = {label: session(path, optimized=work / f"{path.stem}.optimized.onnx")
                for label, path in paths.items()}
    logits = {label: s.run(None, {"input": x})[0] for label, s in sessions.items()}
    one = {"input": np.ascontiguousarray(x[:1])}
    times = interleaved({label: (lambda s=s: s.run(None, one)) for label, s in sessions.items()},
                        rounds, calls=5) if rounds else {label: [np.nan] for label in sessions}
    base = median(times["float"])
    rows = []
    for label, path in paths.items():
        optimized = onnx.load(work / f"{path.stem}.optimized.onnx", load_external_data=False)
        counts = Counter(node.op_type for node in optimized.graph.node)
        reference = logits["float"]
        rows.append({
            "model": name, "variant": label, "ms": median(times[label]),
            "calibration_s": seconds.get(label),
            "speed_vs_float": base / median(times[label]),
            "sqnr_db": None if label == "float" else sqnr(reference, logits[label]),
            "top1_agreement": float(np.mean(logits[label].argmax(1) == reference.argmax(1))),
            "ops": {op: counts.get(op, 0) for op in WATCHED}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(builders.MODELS))
    parser.add_argument("--cache", type=Path, help="where the models and crops are (or go)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--variants", default="bnq*,ort*",
                        help="which quantizers: comma-separated labels or shell patterns "
                             "('bnq' alone, 'bnq*' every bnq variant, 'ort Q*' quantize_static "
                             "with MinMax, 'nncf')")
    parser.add_argument("--nncf", action="store_true",
                        help="also NNCF (pip-installed when missing)")
    args = parser.parse_args()
    patterns = args.variants.split(",") + (["nncf"] if args.nncf else [])
    quantizers = {label: q for label, q in QUANTIZERS.items()
                  if any(fnmatch.fnmatchcase(label, pattern) for pattern in patterns)}
    if "nncf" in quantizers and importlib.util.find_spec("nncf") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "nncf"], check=True)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice
    print_machine()
    names = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="bnq-real-") as tmp:
        cache = args.cache or Path(tmp) / "models"
        build(names, cache)
        rows = []
        for name in names:
            model_rows = compare(name, cache, Path(tmp), args.rounds, quantizers)
            rows += model_rows
            table(f"{name}: onnxruntime, 1 thread, batch 1, median of {args.rounds} interleaved "
                  "rounds; logits on 64 crops against the float model",
                  ["variant", "calibration s", "ms", "speed vs float", "SQNR dB",
                   "top-1 agree %", *(op[:12] for op in WATCHED)],
                  [[r["variant"],
                    "-" if r["calibration_s"] is None else f"{r['calibration_s']:.1f}",
                    f"{r['ms']:.2f}", f"{r['speed_vs_float']:.2f}",
                    "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}",
                    f"{100 * r['top1_agreement']:.1f}", *r["ops"].values()] for r in model_rows])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
