"""How good a quantized model is: its outputs and every fused node's output against the float
model, on the user's data.

For outputs y (float model) and y_q (quantized model), accumulated over all samples:

    SQNR   = 10 log10( sum y^2 / sum (y - y_q)^2 )  dB     (inf when they are equal)
    cosine = sum y y_q / sqrt( sum y^2  sum y_q^2 )
    top-1 agreement = mean( argmax y == argmax y_q ),  top-1 accuracy against the labels

Per fused node: the dequantized output of each `bnq.QLinearBatchNormRelu` against the float model's
tensor of the same name (fusion and calibration keep the Relu's output name), so the table shows
where quantization error enters. With both backends, each fused node is also run by the numpy
kernel on the very input codes onnxruntime gave it, and the largest difference between the two
output codes is reported in quantization steps: the two kernel paths of the operator, compared
on real activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from bnq import ops
from bnq.data import SampleData
from bnq.errors import ArgumentError, DataError
from bnq.graph import constant_values, consumers, with_outputs
from bnq.kernels import BnReluPlan
from bnq.runtime import BACKENDS, make_runner

BACKEND_CHOICES = (*BACKENDS, "both")


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float


@dataclass(frozen=True)
class NodeMetrics:
    node: str
    tensor: str
    sqnr_db: float
    backend_max_lsb_diff: int | None = None


@dataclass(frozen=True)
class EvaluationReport:
    samples: int
    backend: str
    top1_accuracy: dict[str, float] | None
    top1_agreement: float
    sqnr_db: float
    cosine: float
    max_abs_error: float
    outputs: tuple[OutputMetrics, ...]
    per_node: tuple[NodeMetrics, ...]
    backend_max_lsb_diff: int | None


class _Sums:
    """Streaming sums for SQNR, cosine and absolute errors."""

    def __init__(self) -> None:
        self.signal = self.noise = self.cross = self.power = self.abs_sum = 0.0
        self.abs_max = 0.0
        self.count = 0

    def add(self, reference: np.ndarray, actual: np.ndarray) -> None:
        reference = reference.astype(np.float64).ravel()
        actual = actual.astype(np.float64).ravel()
        error = reference - actual
        self.signal += float(reference @ reference)
        self.noise += float(error @ error)
        self.cross += float(reference @ actual)
        self.power += float(actual @ actual)
        self.abs_sum += float(np.abs(error).sum())
        self.abs_max = max(self.abs_max, float(np.abs(error).max(initial=0.0)))
        self.count += reference.size

    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        return float(10 * np.log10(self.signal / self.noise)) if self.signal else float("-inf")

    def cosine(self) -> float:
        denominator = np.sqrt(self.signal * self.power)
        return float(self.cross / denominator) if denominator else 1.0


@dataclass(frozen=True)
class _FusedNode:
    node: onnx.NodeProto
    tensor: str  # the float (dequantized) output name, shared with the reference model


def _fused_nodes(model: onnx.ModelProto) -> list[_FusedNode]:
    readers = consumers(model.graph)
    found = []
    for node in model.graph.node:
        if node.domain == ops.DOMAIN and node.op_type == "QLinearBatchNormRelu":
            dequantize = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
            if dequantize:
                found.append(_FusedNode(node, dequantize[0].output[0]))
    return found


def evaluate(quantized: onnx.ModelProto, reference: onnx.ModelProto, data: SampleData, *,
             backend: str = "onnxruntime", batch_size: int = 32, num_samples: int | None = None,
             labels: str | None = "labels",
             progress: Callable[[int], None] | None = None) -> EvaluationReport:
    """Compare `quantized` with its float `reference` on `data` (see the module docstring)."""
    if backend not in BACKEND_CHOICES:
        raise ArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    outputs = [value.name for value in reference.graph.output]
    if [value.name for value in quantized.graph.output] != outputs:
        raise ArgumentError("the quantized model's outputs differ from the reference model's "
                            f"({', '.join(outputs)}): is it the quantized version of it?")
    reference_names = {name for node in reference.graph.node for name in node.output}
    fused = [f for f in _fused_nodes(quantized) if f.tensor in reference_names]
    probes = [f.tensor for f in fused]
    reference_probe = with_outputs(reference, probes)
    run_reference = _by_name(make_runner(reference_probe, "onnxruntime"), reference_probe)
    primary = "onnxruntime" if backend == "both" else backend
    codes = [name for f in fused for name in (f.node.input[0], f.node.output[0])]
    quantized_probe = with_outputs(quantized, probes + (codes if backend == "both" else []))
    run_quantized = _by_name(make_runner(quantized_probe, primary), quantized_probe)
    kernels = _node_kernels(quantized, fused) if backend == "both" else None
    labelled = labels is not None and data.has(labels)
    output_sums = [_Sums() for _ in outputs]
    node_sums = [_Sums() for _ in fused]
    lsb = [0] * len(fused)
    correct = {"reference": 0, "quantized": 0}
    agree = samples = 0
    for batch in data.batches(batch_size, num_samples, keys=(labels,) if labelled else ()):
        truth = batch.pop(labels) if labelled else None
        expected = run_reference(batch)
        actual = run_quantized(batch)
        for name, sums in zip(outputs, output_sums):
            if expected[name].shape != actual[name].shape:
                raise DataError(f"output {name!r} has shape {list(actual[name].shape)} in the "
                                f"quantized model but {list(expected[name].shape)} in the "
                                "reference: is it the quantized version of it?")
            sums.add(expected[name], actual[name])
        for f, sums in zip(fused, node_sums):
            sums.add(expected[f.tensor], actual[f.tensor])
        if kernels is not None:
            for index, (f, kernel) in enumerate(zip(fused, kernels)):
                diff = np.abs(kernel(actual[f.node.input[0]]).astype(np.int32)
                              - actual[f.node.output[0]].astype(np.int32))
                lsb[index] = max(lsb[index], int(diff.max(initial=0)))
        top_expected, top_actual = _top1(expected[outputs[0]]), _top1(actual[outputs[0]])
        agree += int(np.sum(top_expected == top_actual))
        if truth is not None:
            if truth.dtype.kind not in "iu":
                raise DataError(f"{data.path}: {labels!r} holds {truth.dtype} values; labels "
                                "must be integer class indices")
            truth = truth.reshape(-1)
            if truth.shape != top_expected.shape:
                raise DataError(f"{labels!r} holds {truth.size} labels for a batch of "
                                f"{top_expected.size} samples")
            correct["reference"] += int(np.sum(top_expected == truth))
            correct["quantized"] += int(np.sum(top_actual == truth))
        samples += len(top_expected)
        if progress is not None:
            progress(len(top_expected))
    metrics = tuple(OutputMetrics(name, s.sqnr_db(), s.cosine(), s.abs_max,
                                  s.abs_sum / max(s.count, 1))
                    for name, s in zip(outputs, output_sums))
    per_node = tuple(sorted(
        (NodeMetrics(f.node.name or f.tensor, f.tensor, s.sqnr_db(),
                     lsb[i] if kernels is not None else None)
         for i, (f, s) in enumerate(zip(fused, node_sums))),
        key=lambda m: m.sqnr_db))
    return EvaluationReport(
        samples=samples, backend=backend,
        top1_accuracy={k: v / samples for k, v in correct.items()} if labelled else None,
        top1_agreement=agree / samples, sqnr_db=metrics[0].sqnr_db, cosine=metrics[0].cosine,
        max_abs_error=metrics[0].max_abs_error, outputs=metrics, per_node=per_node,
        backend_max_lsb_diff=max(lsb, default=0) if kernels is not None else None)


def _by_name(run: Callable, model: onnx.ModelProto) -> Callable[[dict], dict[str, np.ndarray]]:
    """`run`, returning its outputs by tensor name."""
    names = [value.name for value in model.graph.output]
    return lambda feeds: dict(zip(names, run(feeds)))


def _top1(output: np.ndarray) -> np.ndarray:
    """The predicted class of each sample: argmax over everything but the batch axis."""
    return output.reshape(len(output), -1).argmax(axis=1)


def _node_kernels(model: onnx.ModelProto, fused: list[_FusedNode]) -> list[BnReluPlan]:
    """For each fused node, bnq's numpy kernel built with the node's constant parameters."""
    constants = constant_values(model)
    kernels = []
    for f in fused:
        x_scale, x_zero_point, weight, bias, mean, var, y_scale, y_zero_point = (
            constants[name] for name in f.node.input[1:])
        epsilon = next((helper.get_attribute_value(a) for a in f.node.attribute
                        if a.name == "epsilon"), 1e-5)
        kernels.append(BnReluPlan(x_scale, x_zero_point, weight, bias, mean, var, epsilon,
                                  y_scale, y_zero_point, in_dtype=x_zero_point.dtype,
                                  out_dtype=y_zero_point.dtype))
    return kernels
