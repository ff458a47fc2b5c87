"""bnq against the float model and onnxruntime's quantize_static on real-size CNNs: torchvision's
DenseNet-121, ResNet-50 and MobileNetV2 (`benchmarks/models.py` builds them).

    python benchmarks/real_models.py [--models densenet121,resnet50,mobilenet_v2] [--cache DIR]
                                     [--rounds 15] [--json OUT]

For each model, in one run: quantize it with bnq (`calibrate()`, default formats and method) and
with quantize_static (after `quant_pre_process`, as onnxruntime recommends; QDQ, per-channel
weights, MinMax; every type variant), all on the same 64 natural-image crops; then

- accuracy: SQNR of the logits against the float model and top-1 agreement with it, on 64 other
  crops (SQNR = 10 log10(sum(ref^2) / sum((ref - q)^2)));
- speed: onnxruntime, one intra-op thread, batch 1, every model of the row interleaved round by
  round (median of `--rounds`), as float time / quantized time (> 1: faster than float);
- what onnxruntime runs: its optimized graph's DequantizeLinear, QuantizeLinear, Transpose and
  float BatchNormalization / Concat / AveragePool counts.

The models and data go to `--cache` (built when missing; a temporary directory by default).
Benchmark-only packages (torch, torchvision, scikit-image) are installed by `models.py` when
missing. The machine is shared and noisy: compare the ratios inside one run, and name the CPU
(the header prints it: VNNI or not changes bnq's formats and every figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
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


def bnq_quantize(model_path: Path, calib: Path, output: Path) -> None:
    model = bnq.load_model(model_path)
    quantized, _ = calibrate(model, SampleData(calib, model_inputs(model)),
                             formats=default_formats(), batch_size=CALIBRATION_BATCH)
    bnq.save_model(quantized, output)


QUANTIZERS = {"bnq": bnq_quantize} | {
    f"ort {types}": (lambda model, calib, output, types=types:
                     ort_quantize(model, np.load(calib)["input"], output, types=types,
                                  preprocess=True))
    for types in ORT_TYPES}
WATCHED = ("DequantizeLinear", "QuantizeLinear", "Transpose", "BatchNormalization", "Concat",
           "AveragePool")


def compare(name: str, cache: Path, work: Path, rounds: int) -> list[dict]:
    """One row per model variant: speed vs float, SQNR, agreement, op counts."""
    paths = {"float": cache / f"{name}.onnx"}
    for label, quantize in QUANTIZERS.items():
        paths[label] = work / f"{name}_{label.replace(' ', '_').replace('/', '_')}.onnx"
        quantize(paths["float"], cache / "calib.npz", paths[label])
    x = np.load(cache / "eval.npz")["input"]
    sessions = {label: session(path, optimized=work / f"{path.stem}.optimized.onnx")
                for label, path in paths.items()}
    logits = {label: s.run(None, {"input": x})[0] for label, s in sessions.items()}
    one = {"input": np.ascontiguousarray(x[:1])}
    times = interleaved({label: (lambda s=s: s.run(None, one)) for label, s in sessions.items()},
                        rounds, calls=5)
    base = median(times["float"])
    rows = []
    for label, path in paths.items():
        optimized = onnx.load(work / f"{path.stem}.optimized.onnx", load_external_data=False)
        counts = Counter(node.op_type for node in optimized.graph.node)
        reference = logits["float"]
        rows.append({
            "model": name, "variant": label, "ms": median(times[label]),
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
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice
    print_machine()
    names = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="bnq-real-") as tmp:
        cache = args.cache or Path(tmp) / "models"
        build(names, cache)
        rows = []
        for name in names:
            model_rows = compare(name, cache, Path(tmp), args.rounds)
            rows += model_rows
            table(f"{name}: onnxruntime, 1 thread, batch 1, median of {args.rounds} interleaved "
                  "rounds; logits on 64 crops against the float model",
                  ["variant", "ms", "speed vs float", "SQNR dB", "top-1 agree %",
                   *(op[:12] for op in WATCHED)],
                  [[r["variant"], f"{r['ms']:.2f}", f"{r['speed_vs_float']:.2f}",
                    "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}",
                    f"{100 * r['top1_agreement']:.1f}", *r["ops"].values()] for r in model_rows])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
