"""How good a quantized model is: its outputs, and every quantized tensor inside it, against the
float model, on the user's data (the formulas are in `bnq.metrics`).

Each output gets the figures that fit it. A classification output (N x K scores, K > 1) gets
top-1 and top-5 agreement between the models and, with labels, each model's top-1 and top-5
accuracy; every output gets SQNR, cosine and absolute errors, and an output whose values all
lie in [0, 1] (a probability map) the IoU of both maps thresholded at 0.5.

Per layer: every quantized activation of the quantized model against the float model's tensor
at the same place, found from the graph's structure, not from names (`quantized_tensors`): the
codes written by a QuantizeLinear of a float tensor x (compared with x), the codes of an integer
op (bnq's QLinearBatchNormRelu, ...) read by a DequantizeLinear that writes y (compared with y;
fusion and calibration keep the float tensor's name), and codes made from codes (a Concat of
quantized branches), compared with the float model's node of the same type over the same
tensors. The codes are fetched, not their
dequantized copies: asking onnxruntime for a DequantizeLinear's output would stop it from fusing
that node into its integer kernels and measure another model. Each layer also gets the
histogram of its float values over its calibrated range (the codes' range dequantized) and the
fraction of values outside that range (clipped).

With both backends, each fused BN-ReLU node is also run by the numpy kernel on the very input
codes onnxruntime gave it, and the largest difference between the two output codes is reported
in quantization steps: the two kernel paths of the operator, compared on real activations.

All figures are accumulated batch by batch in accumulators (`bnq.metrics`) whose merges are
exact, so `bnq.execution` can split the run into micro-batches, passes and workers and the
report stays the same, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from bnq import ops
from bnq.data import SampleData
from bnq.errors import ArgumentError, DataError
from bnq.execution import DEFAULT_MEMORY_LIMIT, ExecutionPlan, Job, run, worker_threads
from bnq.graph import constant_values, producers, quantized_nodes
from bnq.kernels import BnReluPlan
from bnq.machine import spread
from bnq.metrics import ClassAgreement, ErrorSums, Histogram, NoiseSums
from bnq.qops import any_rank, node_plan
from bnq.quantization import dequantize_linear
from bnq.runtime import BACKENDS

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
    plan: ExecutionPlan | None = None  # how the run was split (the figures do not depend on it)


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
        """The float values `codes` stand for, as DequantizeLinear computes them."""
        return dequantize_linear(codes, self.scale, self.zero_point, self.axis)

    def calibrated_range(self) -> tuple[float, float]:
        info = np.iinfo(self.zero_point.dtype)
        zero_point = self.zero_point.astype(np.float64)
        low = (info.min - zero_point) * self.scale
        high = (info.max - zero_point) * self.scale
        return float(low.min()), float(high.max())


_STANDARD = ("", "ai.onnx")


def quantized_tensors(quantized: onnx.ModelProto,
                      reference: onnx.ModelProto) -> list[QuantizedTensor]:
    """Every quantized activation of `quantized` with a float counterpart in `reference` (see
    the module docstring), once per float tensor, in graph order.

    Integer codes and their float counterparts are found in three steps. A QuantizeLinear's
    codes stand for its float input. An integer op's codes read by a DequantizeLinear stand for
    that node's float output (same name in both models). Codes made from codes by another op
    (a Concat of quantized branches, a MaxPool) stand for the output of the reference node of
    the same type over the counterparts of its inputs. Codes are dequantized with the scale and
    zero point of the node that made them (QuantizeLinear) or reads them: a DequantizeLinear,
    or an op taking codes, scale and zero point as inputs 0, 1, 2 (ONNX's QLinear ops, bnq's
    QLinearBatchNormRelu; per channel on axis 1)."""
    constants = constant_values(quantized)
    writers = producers(quantized.graph)
    reference_names = set(producers(reference.graph)) | {v.name for v in reference.graph.input}
    float_of: dict[str, str] = {}  # codes -> the reference's float tensor
    params: dict[str, tuple[str, str, int]] = {}  # codes -> scale, zero point, axis
    nodes = [node for node in quantized.graph.node if node.input and node.input[0]
             and node.input[0] not in constants]
    for node in nodes:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.domain in _STANDARD and node.op_type == "QuantizeLinear":
            float_of[node.output[0]] = node.input[0]
            params[node.output[0]] = (node.input[1], node.input[2], axis)
        elif node.domain in _STANDARD and node.op_type == "DequantizeLinear":
            params.setdefault(node.input[0], (node.input[1], node.input[2], axis))
            if node.input[0] not in float_of and node.output[0] in reference_names:
                float_of[node.input[0]] = node.output[0]
        elif node.op_type.startswith("QLinear") and len(node.input) > 2:
            params.setdefault(node.input[0], (node.input[1], node.input[2], 1))
    def key(node: onnx.NodeProto, inputs: tuple[str, ...]) -> tuple:
        return (node.op_type, inputs, tuple(a.SerializeToString() for a in node.attribute))

    by_inputs = {key(node, tuple(node.input)): node for node in reference.graph.node}
    for node in nodes:
        if node.output[0] in float_of or not all(name in float_of or name in constants
                                                 for name in node.input if name):
            continue
        match = by_inputs.get(key(node, tuple(float_of.get(name, name) for name in node.input)))
        if match is not None and match.output[0] in reference_names:
            float_of[node.output[0]] = match.output[0]
    found: dict[str, QuantizedTensor] = {}
    for node in quantized.graph.node:
        for codes in node.output:
            tensor = float_of.get(codes)
            if tensor not in reference_names or tensor in found or codes not in params:
                continue
            scale_name, zero_point_name, axis = params[codes]
            scale, zero_point = constants.get(scale_name), constants.get(zero_point_name)
            if scale is None or zero_point is None or zero_point.dtype.kind not in "iu":
                continue
            op = node.op_type
            if op == "QuantizeLinear":
                op = writers[tensor].op_type if tensor in writers else "input"
            found[tensor] = QuantizedTensor(tensor, codes, op, scale.astype(np.float32),
                                            zero_point, axis)
    return list(found.values())


class _Layer:
    """The accumulators of one quantized tensor."""

    def __init__(self, quantized: QuantizedTensor, position: int) -> None:
        self.quantized, self.position = quantized, position
        self.range = quantized.calibrated_range()
        margin = 0.25 * (self.range[1] - self.range[0]) or 1.0
        self.errors = NoiseSums()
        self.histogram = Histogram(self.range[0] - margin, self.range[1] + margin, *self.range)

    def update(self, reference: np.ndarray, codes: np.ndarray) -> None:
        self.errors.update(reference, self.quantized.dequantize(codes), self.histogram)

    def merge(self, other: _Layer) -> None:
        self.errors.merge(other.errors)
        self.histogram.merge(other.histogram)

    def result(self, lsb: int | None) -> LayerMetrics:
        return LayerMetrics(
            self.quantized.tensor, self.quantized.op, self.errors.sqnr_db(), self.errors.mean_abs_error(),
            self.range, self.histogram.outside / max(self.errors.count, 1),
            tuple(int(c) for c in self.histogram.counts),
            (self.histogram.start, self.histogram.stop), self.position, lsb)


def _is_classification(shape: tuple[int, ...]) -> bool:
    """N x K scores (trailing 1s allowed, as N x K x 1 x 1), K > 1."""
    dims = [d for d in shape[1:] if d != 1]
    return len(shape) >= 2 and len(dims) == 1 and dims[0] == shape[1] and dims[0] > 1


def evaluate(quantized: onnx.ModelProto, reference: onnx.ModelProto, data: SampleData, *,
             backend: str = "onnxruntime", batch_size: int = 32, num_samples: int | None = None,
             labels: str | None = "labels", memory_limit: int = DEFAULT_MEMORY_LIMIT,
             workers: int = 1, scheduler: str | None = None,
             progress: Callable[[float], None] | None = None,
             names: tuple[str, str] = ("the quantized model", "the reference model"),
             ) -> EvaluationReport:
    """Compare `quantized` with its float `reference` on `data` (see the module docstring).
    `memory_limit` (bytes of activations per process), `workers` (local processes) and
    `scheduler` (a Dask scheduler's address) split the work (`bnq.execution`), never the
    figures. `names` name the two models in messages (their files, for the CLI)."""
    if backend not in BACKEND_CHOICES:
        raise ArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if quantized_nodes(reference):  # first: the two swapped are two mistakes, this one shows
        raise ArgumentError(f"{names[1]} is quantized (it has "
                            f"{quantized_nodes(reference)[0].op_type} nodes): the reference is "
                            "the float model, the quantized one comes first")
    if not quantized_nodes(quantized):
        raise ArgumentError(f"{names[0]} has no quantized nodes (QuantizeLinear, "
                            "QLinearBatchNormRelu, ...): it is a float model; pass the model "
                            "bnq calibrate wrote, with its float model as the reference")
    outputs = tuple(value.name for value in reference.graph.output)
    if tuple(value.name for value in quantized.graph.output) != outputs:
        raise ArgumentError("the quantized model's outputs differ from the reference model's "
                            f"({', '.join(outputs)}): is it the quantized version of it?")
    tensors = tuple(quantized_tensors(quantized, reference))
    fused = tuple(_fused_nodes(quantized)) if backend == "both" else ()
    inputs = {value.name for value in reference.graph.input}
    labelled = labels is not None and labels not in inputs and data.has(labels)
    groups = [(outputs, outputs)]
    groups += [((() if q.tensor in inputs else (q.tensor,)), (q.codes,)) for q in tensors]
    groups += [((), (node.input[0], node.output[0])) for node in fused]
    metrics = _MetricsFactory(outputs, tensors, fused, quantized if fused else None,
                              labels if labelled else None, str(data.path),
                              worker_threads(workers, scheduler))
    job = Job((reference, quantized),
              ("onnxruntime", "onnxruntime" if backend == "both" else backend),
              tuple(groups), metrics, (labels,) if labelled else ())
    result = run(job, data, batch_size=batch_size, num_samples=num_samples,
                 memory_limit=memory_limit, workers=workers, scheduler=scheduler,
                 progress=progress)
    totals: _Metrics = result.accumulator
    fused_codes = {node.output[0]: lsb for node, lsb in zip(fused, totals.lsb)}
    # a fused node's output codes are read by the DequantizeLinear after it
    layers = [layer.result(fused_codes.get(layer.quantized.codes)) for layer in totals.layers]
    classes = [totals.classes.get(name) for name in outputs]
    metrics_out = tuple(_output_metrics(name, sums, agreement)
                        for name, sums, agreement in zip(outputs, totals.output_sums, classes))
    first_class = next((c for c in classes if c is not None), None)
    return EvaluationReport(
        samples=totals.samples, backend=backend,
        top1_accuracy=first_class.accuracy(1) if first_class is not None else None,
        top1_agreement=first_class.agreement(1) if first_class is not None else None,
        sqnr_db=metrics_out[0].sqnr_db, cosine=metrics_out[0].cosine,
        max_abs_error=metrics_out[0].max_abs_error, outputs=metrics_out,
        layers=tuple(sorted(layers, key=lambda m: m.sqnr_db)),
        backend_max_lsb_diff=max(totals.lsb, default=0) if fused else None, plan=result.plan)


class _MetricsFactory:
    """Makes the `_Metrics` of each unit of work; builds the numpy kernels once per process.
    `threads`: how many threads the tensors' sums are spread over (`machine.spread`): those
    onnxruntime got in the worker, idle while the sums are taken."""

    def __init__(self, outputs: tuple[str, ...], tensors: tuple[QuantizedTensor, ...],
                 fused: tuple[onnx.NodeProto, ...], quantized: onnx.ModelProto | None,
                 labels: str | None, where: str, threads: int) -> None:
        self.outputs, self.tensors, self.fused, self.quantized = outputs, tensors, fused, quantized
        self.labels, self.where, self.threads = labels, where, threads
        self._kernels: list[BnReluPlan] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_kernels": None}

    def __call__(self) -> _Metrics:
        if self.quantized is not None and self._kernels is None:
            self._kernels = _node_kernels(self.quantized, list(self.fused))
        return _Metrics(self, self._kernels or [])


class _Metrics:
    """Everything `evaluate` sums, fed by `bnq.execution` with the tensors of the reference
    (fetched[0]) and of the quantized model (fetched[1]); the outputs come in the first pass."""

    def __init__(self, spec: _MetricsFactory, kernels: list[BnReluPlan]) -> None:
        self.spec, self.kernels = spec, kernels
        self.output_sums = [ErrorSums() for _ in spec.outputs]
        self.classes: dict[str, ClassAgreement] = {}
        self.layers = [_Layer(q, position) for position, q in enumerate(spec.tensors)]
        self.lsb = [0] * len(spec.fused)
        self.samples = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "kernels": []}  # only the sums travel back

    def update(self, batch: dict[str, np.ndarray], fetched: list[dict[str, np.ndarray]],
               groups: tuple[int, ...]) -> None:
        """Groups: 0 the outputs, then one per layer, then one per fused node (`evaluate`)."""
        expected, actual = {**batch, **fetched[0]}, fetched[1]
        layers = len(self.layers)
        if 0 in groups:  # first: a model that is not the reference's quantized version fails here
            self._update_outputs(batch, expected, actual)
        spread(lambda layer: layer.update(expected[layer.quantized.tensor],
                                          actual[layer.quantized.codes]),
               [self.layers[group - 1] for group in groups if 0 < group <= layers],
               self.spec.threads)
        for group in groups:
            if group > layers:
                index = group - 1 - layers
                node = self.spec.fused[index]
                diff = np.abs(any_rank(self.kernels[index], actual[node.input[0]]).astype(np.int32)
                              - actual[node.output[0]].astype(np.int32))
                self.lsb[index] = max(self.lsb[index], int(diff.max(initial=0)))

    def _update_outputs(self, batch: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                        actual: dict[str, np.ndarray]) -> None:
        spec = self.spec
        for name, sums in zip(spec.outputs, self.output_sums):
            if expected[name].shape != actual[name].shape:
                raise DataError(f"output {name!r} has shape {list(actual[name].shape)} in the "
                                f"quantized model but {list(expected[name].shape)} in the "
                                "reference: is it the quantized version of it?")
            sums.update(expected[name], actual[name])
        classified = [name for name in spec.outputs if _is_classification(expected[name].shape)]
        for index, name in enumerate(classified):
            truth = batch.get(spec.labels) if index == 0 and spec.labels else None
            self.classes.setdefault(name, ClassAgreement()).update(
                expected[name], actual[name],
                None if truth is None else _labels(truth, len(expected[name]), spec.where,
                                                   spec.labels))
        self.samples += len(next(iter(batch.values())))

    def merge(self, other: _Metrics) -> None:
        for mine, theirs in zip(self.output_sums, other.output_sums):
            mine.merge(theirs)
        for name, agreement in other.classes.items():
            self.classes.setdefault(name, ClassAgreement()).merge(agreement)
        for mine, theirs in zip(self.layers, other.layers):
            mine.merge(theirs)
        self.lsb = [max(a, b) for a, b in zip(self.lsb, other.lsb)]
        self.samples += other.samples


def _labels(truth: np.ndarray, count: int, where: str, key: str) -> np.ndarray:
    if truth.dtype.kind not in "iu":
        raise DataError(f"{where}: {key!r} holds {truth.dtype} values; labels must be "
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


def _node_kernels(model: onnx.ModelProto, fused: list[onnx.NodeProto]) -> list[BnReluPlan]:
    """For each fused node, bnq's numpy kernel built with the node's constant parameters."""
    constants = constant_values(model)
    return [node_plan(node, constants) for node in fused]
