"""Where bnq's error comes from, and how far calibration can take a model: the logit SQNR of the
quantized model beside the same model with exact float weights (only its activations quantized)
and the float model with only its weights quantized.

    python benchmarks/error_budget.py [--models sample,mobilenet_v2,resnet50,densenet121]
                                      [--methods minmax,percentile] [--cache DIR] [--gptq]

Per model and activation `--method`, on the calibration and evaluation data of
`benchmarks/real_models.py` (64 + 64 natural-image crops; the sample's own calib.npz / eval.npz):

- "bnq": `calibrate()` with its defaults (bias correction on) and the method;
- "float weights": the same quantized model (bias correction off, as its biases are then the
  float ones) with every Conv / Gemm / MatMul reading the float model's exact weights and bias:
  the error of the activations alone, a ceiling for anything done to the weights (weight
  rounding, bias correction, equalization of weight ranges);
- "float activations": the float model with the quantized model's dequantized weights: the
  error of the weights alone (nearest rounding; with `--gptq` also bnq's `--weight-rounding`).

Every model runs in onnxruntime, optimized as usual except for one transformer,
WeightBiasQuantization: given DequantizeLinear -> Conv -> QuantizeLinear with float weights,
onnxruntime 1.32 quantizes those weights itself, per tensor, to run a QLinearConv, so "float
weights" would be int8 weights again (its first convolution differed from the exact result by
up to 5 codes on ResNet-50).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import models as builders
from common import print_machine, session, sqnr, table

import bnq
from bnq.calibrate import calibrate, prepare
from bnq.planning import WEIGHTED
from bnq.data import SampleData, model_inputs
from bnq.graph import constant_values, drop_unused, producers
from bnq.machine import default_formats

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
KEEP_FLOAT_WEIGHTS = ("WeightBiasQuantization",)


def data_paths(name: str, cache: Path) -> tuple[Path, Path, Path]:
    """The model, its calibration data and its evaluation data."""
    if name == "sample":
        return SAMPLES / "digits_cnn.onnx", SAMPLES / "calib.npz", SAMPLES / "eval.npz"
    return cache / f"{name}.onnx", cache / "calib.npz", cache / "eval.npz"


def dequantized_parameters(quantized: onnx.ModelProto) -> dict[str, dict[int, np.ndarray]]:
    """Layer name -> {input index: float value} of every weight and bias the quantized model
    reads through a DequantizeLinear of constants."""
    constants = constant_values(quantized)
    writers = producers(quantized.graph)
    found = {}
    for node in quantized.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        for index, name in enumerate(node.input[1:3], start=1):
            dequantize = writers.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear" or not all(
                    value in constants for value in dequantize.input):
                continue
            codes, scale, zero_point = (constants[value] for value in dequantize.input[:3])
            axis = next((helper.get_attribute_value(a) for a in dequantize.attribute
                         if a.name == "axis"), 1)
            shape = [1] * codes.ndim
            if scale.ndim:
                shape[axis] = -1
            value = (codes.astype(np.float64) - zero_point.reshape(shape)) * scale.reshape(shape)
            found.setdefault(node.name, {})[index] = value.astype(np.float32)
    return found


def with_parameters(model: onnx.ModelProto, values: dict[str, dict[int, np.ndarray]]
                    ) -> onnx.ModelProto:
    """`model` with the named layers reading `values` (layer name -> {input index: array})."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for node in result.graph.node:
        for index, value in values.get(node.name, {}).items():
            name = f"{node.name}_budget_input_{index}"
            result.graph.initializer.append(numpy_helper.from_array(value, name))
            node.input[index] = name
    drop_unused(result.graph, {tensor.name for tensor in model.graph.initializer}, set())
    return result


def float_parameters(fused: onnx.ModelProto, layers: set[str]) -> dict[str, dict[int, np.ndarray]]:
    """The float model's weight and bias of each named layer."""
    constants = constant_values(fused)
    return {node.name: {index: constants[name] for index, name in enumerate(node.input[1:3], 1)
                        if name in constants}
            for node in fused.graph.node if node.name in layers}


def budget(name: str, cache: Path, methods: list[str], gptq: bool) -> list[list[str]]:
    model_path, calib, evaluation = data_paths(name, cache)
    model = bnq.load_model(model_path)
    data = SampleData(calib, model_inputs(model))
    x = {spec.name: np.load(evaluation)[spec.name] for spec in model_inputs(model)}
    reference = session(model).run(None, x)[0]

    def score(candidate: onnx.ModelProto) -> str:
        logits = session(candidate, disabled_optimizers=KEEP_FLOAT_WEIGHTS).run(None, x)[0]
        return f"{sqnr(reference, logits):.2f}"

    fused = prepare(model)[0]
    options = {"formats": default_formats(), "batch_size": 8}
    rows = []
    for method in methods:
        full, _ = calibrate(model, data, method=method, **options)
        plain, _ = calibrate(model, data, method=method, bias_correction=False, **options)
        weights = dequantized_parameters(plain)
        row = [name, method, score(full), score(plain),
               score(with_parameters(plain, float_parameters(fused, set(weights)))),
               score(with_parameters(fused, weights))]
        if gptq:
            rounded, _ = calibrate(model, data, method=method, bias_correction=False,
                                   weight_rounding=True, **options)
            row.append(score(with_parameters(fused, dequantized_parameters(rounded))))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sample," + ",".join(builders.MODELS))
    parser.add_argument("--methods", default="minmax,percentile")
    parser.add_argument("--cache", type=Path, default=Path("benchmark-models"),
                        help="where the real models and crops are (built when missing)")
    parser.add_argument("--gptq", action="store_true",
                        help="also the weights alone with --weight-rounding (GPTQ; slow)")
    args = parser.parse_args()
    names = args.models.split(",")
    real = [name for name in names if name != "sample"]
    if real:
        from real_models import build
        build(real, args.cache)
    print_machine()
    rows = [row for name in names
            for row in budget(name, args.cache, args.methods.split(","), args.gptq)]
    table("logit SQNR against the float model, dB (evaluation data)",
          ["model", "method", "bnq", "bnq, no bias correction",
           "float weights (activations alone)", "float activations (weights alone)",
           *(["weights alone, GPTQ"] if args.gptq else [])], rows)


if __name__ == "__main__":
    main()
