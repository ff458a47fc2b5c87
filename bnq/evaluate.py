"""How good a quantized model is: its outputs, and every quantized tensor inside it, against the
float model, on the user's data (the formulas are in `bnq.metrics`).

Each output gets the figures that fit it. A classification output (N x K scores, K > 1) gets
top-1 and top-5 agreement between the models and, with labels, each model's top-1 and top-5
accuracy; every output gets SQNR, cosine and absolute errors, and an output whose values all
lie in [0, 1] (a probability map) the IoU of both maps thresholded at 0.5.

Per layer: every quantized activation of the quantized model against the float model's tensor
at the same place, found from the graph's quantization nodes, not from names: the codes written
by a QuantizeLinear of a float tensor x (compared with x), and the codes of an integer op (bnq's
QLinearBatchNormRelu, an integer Concat, ...) read by a DequantizeLinear that writes y (compared
with y; fusion and calibration keep the float tensor's name). The codes are fetched, not their
dequantized copies: asking onnxruntime for a DequantizeLinear's output would stop it from fusing
that node into its integer kernels and measure another model. Each layer also gets the
histogram of its float values over its calibrated range (the codes' range dequantized) and the
fraction of values outside that range (clipped).

With both backends, each fused BN-ReLU node is also run by the numpy kernel on the very input
codes onnxruntime gave it, and the largest difference between the two output codes is reported
in quantization steps: the two kernel paths of the operator, compared on real activations.

All figures are accumulated batch by batch in mergeable accumulators (`bnq.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from bnq import ops
from bnq.data import SampleData
from bnq.errors import ArgumentError, DataError
from bnq.graph import constant_values, producers, with_outputs
from bnq.kernels import BnReluPlan
from bnq.metrics import ClassAgreement, ErrorSums, Histogram
from bnq.qops import node_plan
from bnq.runtime import BACKENDS, make_runner

BACKEND_CHOICES = (*BACKENDS, "both")


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    kind: str  # "classification" (N x K scores) or "dense"
    sqnr_db: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float
    iou: float | None = None  # maps in [0, 1], thresholded at 0.5
    top1_agreement: float | None = None
    top5_agreement: float | None = None  # classification with more than 5 classes
    accuracy: dict[str, dict[str, float]] | None = None  # {"reference"|"quantized": {"top1", "top5"}}


@dataclass(frozen=True)
class LayerMetrics:
    tensor: str
    op: str  # what writes the codes: an integer op (QLinearBatchNormRelu...), or the float op
    #          (or "input") whose output a QuantizeLinear quantizes
    sqnr_db: float
    mean_abs_error: float
    range: tuple[float, float]  # the calibrated range: the codes' range, dequantized
    clipped: float  # fraction of the float values outside `range`
    histogram: tuple[int, ...]  # float values in equal bins over `histogram_range`
    histogram_range: tuple[float, float]
    position: int  # order of the tensor in the quantized graph
    backend_max_lsb_diff: int | None = None


@dataclass(frozen=True)
class EvaluationReport:
    samples: int
    backend: str
    top1_accuracy: dict[str, float] | None  # of the first classification output, with labels
    top1_agreement: float | None  # of the first classification output
    sqnr_db: float  # of the first output, as the next two
    cosine: float
    max_abs_error: float
    outputs: tuple[OutputMetrics, ...]
    layers: tuple[LayerMetrics, ...]  # every quantized activation, worst SQNR first
    backend_max_lsb_diff: int | None


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized activation: integer `codes` in the quantized model that stand for the float
    `tensor` of the reference model, as codes * scale - zero_point * scale (per `axis`)."""

    tensor: str
    codes: str
    op: str  # what writes the codes: the integer op, or for a QuantizeLinear what writes its input
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """DequantizeLinear's float32 arithmetic: (codes - zero_point) * scale."""
        shape = [1] * codes.ndim
        if self.scale.size > 1:
            shape[self.axis % codes.ndim] = -1
        return ((codes.astype(np.float32) - self.zero_point.astype(np.float32).reshape(shape))
                * self.scale.reshape(shape))

    def calibrated_range(self) -> tuple[float, float]:
        info = np.iinfo(self.zero_point.dtype)
        zero_point = self.zero_point.astype(np.float64)
        low = (info.min - zero_point) * self.scale
        high = (info.max - zero_point) * self.scale
        return float(low.min()), float(high.max())


def quantized_tensors(quantized: onnx.ModelProto,
                      reference_names: set[str]) -> list[QuantizedTensor]:
    """Every quantized activation of `quantized` whose float counterpart is in
    `reference_names` (see the module docstring), once per float tensor, in graph order."""
    constants = constant_values(quantized)
    writers = producers(quantized.graph)
    found: dict[str, QuantizedTensor] = {}
    for node in quantized.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in (
                "", "ai.onnx") or node.input[0] in constants:
            continue
        if node.op_type == "QuantizeLinear":
            tensor, codes = node.input[0], node.output[0]
            op = writers[tensor].op_type if tensor in writers else "input"
        elif getattr(writers.get(node.input[0]), "op_type", None) not in ("QuantizeLinear", None):
            tensor, codes = node.output[0], node.input[0]
            op = writers[codes].op_type
        else:
            continue  # the QuantizeLinear writing these codes is the place measured
        scale = constants.get(node.input[1])
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 else None
        if (tensor in found or tensor not in reference_names or scale is None
                or zero_point is None or zero_point.dtype.kind not in "iu"):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        found[tensor] = QuantizedTensor(tensor, codes, op, scale.astype(np.float32), zero_point,
                                        axis)
    return list(found.values())


class _Layer:
    """The accumulators of one quantized tensor."""

    def __init__(self, quantized: QuantizedTensor, position: int) -> None:
        self.quantized, self.position = quantized, position
        self.range = quantized.calibrated_range()
        margin = 0.25 * (self.range[1] - self.range[0]) or 1.0
        self.errors = ErrorSums()
        self.histogram = Histogram(self.range[0] - margin, self.range[1] + margin, *self.range)
        self.lsb: int | None = None

    def update(self, reference: np.ndarray, codes: np.ndarray) -> None:
        self.errors.update(reference, self.quantized.dequantize(codes))
        self.histogram.update(reference)

    def result(self) -> LayerMetrics:
        return LayerMetrics(
            self.quantized.tensor, self.quantized.op, self.errors.sqnr_db(), self.errors.mean_abs_error(),
            self.range, self.histogram.outside / max(self.errors.count, 1),
            tuple(int(c) for c in self.histogram.counts),
            (self.histogram.start, self.histogram.stop), self.position, self.lsb)


def _is_classification(shape: tuple[int, ...]) -> bool:
    """N x K scores (trailing 1s allowed, as N x K x 1 x 1), K > 1."""
    dims = [d for d in shape[1:] if d != 1]
    return len(shape) >= 2 and len(dims) == 1 and dims[0] == shape[1]


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
    reference_names = set(producers(reference.graph)) | {v.name for v in reference.graph.input}
    layers = [_Layer(q, position)
              for position, q in enumerate(quantized_tensors(quantized, reference_names))]
    fused = _fused_nodes(quantized) if backend == "both" else []
    inputs = {value.name for value in reference.graph.input}
    reference_probe = with_outputs(reference, [layer.quantized.tensor for layer in layers
                                               if layer.quantized.tensor not in inputs])
    run_reference = _by_name(make_runner(reference_probe, "onnxruntime"), reference_probe)
    primary = "onnxruntime" if backend == "both" else backend
    quantized_probe = with_outputs(
        quantized, [layer.quantized.codes for layer in layers]
        + [name for node in fused for name in (node.input[0], node.output[0])])
    run_quantized = _by_name(make_runner(quantized_probe, primary), quantized_probe)
    kernels = {node.output[0]: kernel
               for node, kernel in zip(fused, _node_kernels(quantized, fused))}
    lsb = {codes: 0 for codes in kernels}
    labelled = labels is not None and data.has(labels)
    output_sums = {name: ErrorSums() for name in outputs}
    classes: dict[str, ClassAgreement] = {}
    samples = 0
    for batch in data.batches(batch_size, num_samples, keys=(labels,) if labelled else ()):
        truth = batch.pop(labels) if labelled else None
        expected = {**batch, **run_reference(batch)}
        actual = run_quantized(batch)
        for name in outputs:
            if expected[name].shape != actual[name].shape:
                raise DataError(f"output {name!r} has shape {list(actual[name].shape)} in the "
                                f"quantized model but {list(expected[name].shape)} in the "
                                "reference: is it the quantized version of it?")
            output_sums[name].update(expected[name], actual[name])
            if samples == 0 and _is_classification(expected[name].shape):
                classes[name] = ClassAgreement()
        for layer in layers:
            layer.update(expected[layer.quantized.tensor], actual[layer.quantized.codes])
        for node in fused:
            diff = np.abs(kernels[node.output[0]](actual[node.input[0]]).astype(np.int32)
                          - actual[node.output[0]].astype(np.int32))
            lsb[node.output[0]] = max(lsb[node.output[0]], int(diff.max(initial=0)))
        for index, (name, agreement) in enumerate(classes.items()):
            agreement.update(expected[name], actual[name],
                             _labels(truth, len(expected[name]), data, labels) if index == 0
                             and truth is not None else None)
        count = len(expected[outputs[0]])
        samples += count
        if progress is not None:
            progress(count)
    fused_codes = {node.output[0]: lsb[node.output[0]] for node in fused}
    for layer in layers:  # a fused node's output codes are read by the DequantizeLinear after it
        layer.lsb = fused_codes.get(layer.quantized.codes)
    metrics = tuple(_output_metrics(name, output_sums[name], classes.get(name))
                    for name in outputs)
    first_class = next(iter(classes.values()), None)
    top1 = first_class.accuracy(1) if first_class is not None else None
    return EvaluationReport(
        samples=samples, backend=backend, top1_accuracy=top1,
        top1_agreement=first_class.agreement(1) if first_class is not None else None,
        sqnr_db=metrics[0].sqnr_db, cosine=metrics[0].cosine,
        max_abs_error=metrics[0].max_abs_error, outputs=metrics,
        layers=tuple(sorted((layer.result() for layer in layers), key=lambda m: m.sqnr_db)),
        backend_max_lsb_diff=max(lsb.values(), default=0) if backend == "both" else None)


def _labels(truth: np.ndarray, count: int, data: SampleData, key: str) -> np.ndarray:
    if truth.dtype.kind not in "iu":
        raise DataError(f"{data.path}: {key!r} holds {truth.dtype} values; labels must be "
                        "integer class indices")
    truth = truth.reshape(-1)
    if truth.size != count:
        raise DataError(f"{key!r} holds {truth.size} labels for a batch of {count} samples")
    return truth


def _output_metrics(name: str, sums: ErrorSums, classes: ClassAgreement | None) -> OutputMetrics:
    common = dict(name=name, sqnr_db=sums.sqnr_db(), cosine=sums.cosine(),
                  max_abs_error=sums.abs_max, mean_abs_error=sums.mean_abs_error(),
                  iou=sums.iou())
    if classes is None:
        return OutputMetrics(kind="dense", **common)
    ks = (1, 5) if classes.classes > 5 else (1,)  # top-5 of 5 classes or fewer is always right
    accuracy = None
    if classes.labelled:
        by_k = {k: classes.accuracy(k) for k in ks}
        accuracy = {model: {f"top{k}": by_k[k][model] for k in ks} for model in by_k[1]}
    return OutputMetrics(kind="classification", **common, top1_agreement=classes.agreement(1),
                         top5_agreement=classes.agreement(5) if 5 in ks else None,
                         accuracy=accuracy)


def _fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node
            if node.domain == ops.DOMAIN and node.op_type == "QLinearBatchNormRelu"]


def _by_name(run: Callable, model: onnx.ModelProto) -> Callable[[dict], dict[str, np.ndarray]]:
    """`run`, returning its outputs by tensor name."""
    names = [value.name for value in model.graph.output]
    return lambda feeds: dict(zip(names, run(feeds)))


def _node_kernels(model: onnx.ModelProto, fused: list[onnx.NodeProto]) -> list[BnReluPlan]:
    """For each fused node, bnq's numpy kernel built with the node's constant parameters."""
    constants = constant_values(model)
    return [node_plan(node, constants) for node in fused]
