"""Calibration: run sample data through a float model, observe its activations, and write a
quantized model that onnxruntime runs with integer kernels.

The quantized model has three kinds of quantized tensors:

* weights of Conv, Gemm and MatMul: int8, symmetric, per output channel
  (`W = W_q * scale[c]`), held as initializers behind DequantizeLinear; biases int32 with
  `scale = x_scale * w_scale[c]` and zero point 0. onnxruntime turns DequantizeLinear -> Conv ->
  QuantizeLinear into QLinearConv (and likewise for Gemm, MatMul, Add, pooling).
* activations read or written by those ops, by Add and by pooling: per tensor, QuantizeLinear ->
  DequantizeLinear pairs (QDQ) right after the producer, with ranges from the observers. A Relu
  or Clip (min <= 0 <= max) that is its producer's only reader is quantized instead of the
  producer's output, inside the Clip's bounds: onnxruntime drops it and clamps in the integer op.
  A 1x1 Conv + AveragePool (DenseNet's transitions) is first folded into one strided Conv
  (`bnq.rewrites`), so what follows stays integer.
* every fused BatchNormRelu becomes `bnq.QLinearBatchNormRelu`, PyTorch's quantized `BNReLU2d`:
  integer codes in, integer codes out (per tensor, for its consumers). A Concat of
  already-quantized branches is concatenated as integer codes with each branch's own scale, read
  per channel (no requantization, and the branch ranges stay apart, which is where a per-tensor
  scale loses most); an input that no integer op writes gets a per-channel QuantizeLinear with
  its own observer. Each node's output scale is the observed one, or the nearest for which the
  integer body (one depthwise QLinearConv, `bnq.integer`) is exact, else the float body.

Method `auto` builds the model of every other method and keeps the one whose outputs come
closest to the float model's, cross-validated on the calibration samples (`bnq.choice`).

The observers see one micro-batch at a time and merge exactly (`bnq.observers`), so
`bnq.execution` can run the model in bounded memory, in worker processes or on a cluster and the
quantized model is the same, byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
from onnx import version_converter

from bnq import ops
from bnq.bias_correction import BiasCorrection, correct_biases
from bnq.choice import FOLDS, MethodChoice, choose, fold
from bnq.data import SampleData, model_inputs
from bnq.emit import quantized_model
from bnq.equalization import Equalization, equalize_layers
from bnq.errors import ArgumentError, DataError, ModelError
from bnq.execution import DEFAULT_MEMORY_LIMIT, SAMPLE, ExecutionPlan, Job, run, worker_threads
from bnq.fusion import FuseReport, fuse
from bnq.graph import (
    check,
    constant_values,
    default_opset,
    node_label,
    op_counts,
    producers,
    quantized_nodes,
)
from bnq.machine import IntegerFormats, spread
from bnq.observers import CANDIDATES, CandidateObserver, Observer, make_observer
from bnq.planning import WEIGHTED, Plan, plan_quantization
from bnq.quantization import QuantParams, quant_range
from bnq.rewrites import fold_average_pool
from bnq.rounding import round_weights

QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear of onnx's reference evaluator start here


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized tensor of the report."""

    name: str
    role: str  # "activation", "bn input", "bn output", "weight"
    granularity: str  # "per tensor" or "per channel"
    observer: str
    rmin: float
    rmax: float
    scale_min: float
    scale_max: float
    zero_point: int | None  # None when it varies per channel


@dataclass(frozen=True)
class CalibrationReport:
    samples: int
    batches: int
    method: str
    formats: IntegerFormats
    fusion: FuseReport
    tensors: tuple[QuantizedTensor, ...]
    ops_after: dict[str, int]
    body: str  # the QLinearBatchNormRelu body onnxruntime runs: "integer", "float", "double", "table"
    folded_pools: tuple[str, ...]  # AveragePool nodes folded into the 1x1 Conv before them
    plan: ExecutionPlan  # how the observation was split (the result does not depend on it)
    weights_rounded: int  # weights whose codes GPTQ chose (bnq.rounding); the rest: nearest
    bias_correction: BiasCorrection | None  # None when turned off
    equalization: Equalization | None  # cross-layer equalization; None when turned off
    choice: MethodChoice | None  # what method "auto" measured and kept; None for the others


def calibrate(model: onnx.ModelProto, data: SampleData, *, formats: IntegerFormats,
              method: str = "minmax", method_options: dict | None = None, batch_size: int = 32,
              num_samples: int | None = None, memory_limit: int = DEFAULT_MEMORY_LIMIT,
              workers: int = 1, scheduler: str | None = None, weight_rounding: bool = False,
              bias_correction: bool = True, equalize: bool = False,
              progress: Callable[[float], None] | None = None
              ) -> tuple[onnx.ModelProto, CalibrationReport]:
    """Quantize `model` with ranges observed on `data`; `progress(n)` is told of the samples
    done, in each pass over the data (`weight_rounding`, GPTQ in bnq.rounding, and
    `bias_correction`, bnq.bias_correction, make one more each; method `auto`, bnq.choice, one
    more, and one more again with bias correction). `equalize` rescales consecutive layers
    first (bnq.equalization: exact in float). `memory_limit` (bytes of
    activations per process), `workers` (local processes) and `scheduler` (a Dask scheduler's
    address) split the work (`bnq.execution`), never the result."""
    if batch_size < 1:
        raise ArgumentError(f"batch size must be at least 1, got {batch_size}")
    if num_samples is not None and num_samples < 1:
        raise ArgumentError(f"the number of samples must be at least 1, got {num_samples}")
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and (any(node.output[1:]) or any(
                a.name == "training_mode" and a.i for a in node.attribute)):
            raise ModelError(f"BatchNormalization {node_label(node)} is in training mode (its "
                             "output depends on the batch); export the model in eval mode")
    _check_model(model)
    fused, fusion, folded_pools = prepare(model)
    equalization = None
    if equalize:
        fused, equalization = equalize_layers(fused)
    plan = plan_quantization(fused)
    if not (plan.activations or plan.batch_norms or plan.bn_inputs):
        raise ModelError("nothing to quantize: the model has no Conv, Gemm or MatMul with "
                         "constant weights, no BatchNormalization + Relu that fuses (bnq fuse "
                         "says why) and no Relu or pooling; the output would be a float copy")
    activation = np.dtype(formats.activation)
    per_channel = {name: False for name in plan.activations} | {
        node.output[0]: False for node in plan.batch_norms} | {name: True for name in plan.bn_inputs}
    writers = producers(fused.graph)
    where = {name: f"tensor {name!r}" + (f" (output of {writers[name].op_type} "
                                         f"{node_label(writers[name])})" if name in writers else "")
             for name in per_channel}
    auto = method == "auto"
    make_observers = functools.partial(_Observation, per_channel, where, method,
                                       method_options or {}, FOLDS if auto else 1,
                                       worker_threads(workers, scheduler))
    make_observers()  # bad options fail here, before any work
    job = Job((fused,), ("onnxruntime",), tuple(((name,),) for name in per_channel),
              make_observers, (SAMPLE,) if auto else ())
    execute = functools.partial(run, data=data, batch_size=batch_size, num_samples=num_samples,
                                memory_limit=memory_limit, workers=workers, scheduler=scheduler,
                                progress=progress)
    observed = execute(job)
    observers = observed.accumulator.merged()
    correct = functools.partial(correct_biases, reference=fused, sample_shapes=data.sample_shapes(),
                                execute=execute) if bias_correction else None
    rounded = round_weights(fused, formats, execute) if weight_rounding else {}
    choice = None
    if auto:
        unsplit = sorted(observed.accumulator.unsplit)
        if observed.samples < FOLDS:
            choice = MethodChoice("minmax", {}, f"{observed.samples} sample: none left to "
                                                "score the methods on")
        elif unsplit:
            choice = MethodChoice("minmax", {}, f"{where[unsplit[0]]} does not have the samples "
                                                "on its first axis: its folds cannot be told apart")
        else:
            choice = _choose(fused, plan, observed.accumulator.folds, activation, formats,
                             rounded, execute, correct)
        observers = {name: observer.candidate(choice.chosen)
                     for name, observer in observers.items()}
    chosen = choice.chosen if choice else method
    qparams = _qparams(plan, observers, activation)
    quantized, weights, body = quantized_model(fused, plan, qparams, formats, rounded)
    check(quantized, "the quantized model")
    corrected = None
    if correct:
        [(quantized, corrected)] = correct([quantized])
    def observer(name: str) -> str:
        return "minmax" if name in plan.full_range else chosen

    tensors = [_describe(name, "activation", observer(name), qparams[name])
               for name in plan.activations]
    tensors += [_describe(name, "bn input", observer(name), qparams[name])
                for name in plan.bn_inputs]
    tensors += [_describe(node.output[0], "bn output", observer(node.output[0]),
                          qparams[node.output[0]]) for node in plan.batch_norms]
    tensors += [_describe(name, "weight", "symmetric", q) for name, q in weights.items()]
    return quantized, CalibrationReport(observed.samples, observed.batches, method, formats,
                                        fusion, tuple(tensors), op_counts(quantized),
                                        body, folded_pools, observed.plan,
                                        len(rounded), corrected, equalization, choice)


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseReport, tuple[str, ...]]:
    """The float model `calibrate` quantizes, its fusion report and the AveragePool nodes folded:
    `model` at opset 19 or later, fused (`bnq.fuse`), with DenseNet's Conv 1x1 + AveragePool
    transitions folded (`bnq.rewrites`). Node and tensor names carry over to the quantized
    model, whose layers this float model is the reference of."""
    fused, fusion = fuse(_upgrade(model))
    fused, folded_pools = fold_average_pool(fused)
    return fused, fusion, folded_pools


def _choose(fused: onnx.ModelProto, plan: Plan, folds: list[dict[str, CandidateObserver]],
            activation: np.dtype, formats: IntegerFormats, rounded: dict[str, np.ndarray],
            execute: Callable, correct: Callable | None) -> MethodChoice:
    """Method auto: every method's model of each fold, bias-corrected (`correct`, when given) on
    that fold's samples (as calibration would), scored on the other fold (`bnq.choice`)."""
    candidates = {}
    for method in CANDIDATES:
        candidates[method] = []
        for observers in folds:
            qparams = _qparams(plan, {name: observer.candidate(method)
                                      for name, observer in observers.items()}, activation)
            model = quantized_model(fused, plan, qparams, formats, rounded)[0]
            check(model, f"the quantized model of method {method}")
            candidates[method].append(model)
    if correct:
        models = [model for per_fold in candidates.values() for model in per_fold]
        corrected = iter(correct(models, folds=[f for _ in candidates for f in range(len(folds))]))
        candidates = {method: [next(corrected)[0] for _ in per_fold]
                      for method, per_fold in candidates.items()}
    return choose(fused, candidates, execute)


def _qparams(plan: Plan, observers: dict[str, Observer], activation: np.dtype
             ) -> dict[str, QuantParams]:
    """Each planned tensor's parameters from its observer (its observed min/max for the
    classifier's input, `_final_inputs`), inside a Clip's bounds after it; a pass-through
    output takes its input's."""
    qparams = {name: (observer.full_range() if name in plan.full_range else observer)
               .qparams(activation) for name, observer in observers.items()}
    for name, bounds in plan.clips.items():
        qparams[name] = _inside(qparams[name], *bounds)
    for alias, source in plan.aliases.items():
        qparams[alias] = qparams[source]
    return qparams


def _check_model(model: onnx.ModelProto) -> None:
    """Refuse what bnq cannot quantize, saying why: a model that is quantized already (a second
    quantization would compound the rounding), float inputs other than float32 (QuantizeLinear
    and bnq's kernels take float32), and NaN or infinite weights, blamed on the weights before
    they turn up in the activations."""
    quantized = quantized_nodes(model)
    if quantized:
        raise ModelError(f"the model is quantized already ({quantized[0].op_type} "
                         f"{node_label(quantized[0])}, {len(quantized)} such nodes): calibrate "
                         "the float model it was made from")
    for spec in model_inputs(model):
        if spec.dtype.kind == "f" and spec.dtype != np.float32:
            raise ModelError(f"model input {spec.name!r} is {spec.dtype}: bnq quantizes float32 "
                             "models; convert the model to float32 first")
    constants = constant_values(model)
    for node in model.graph.node:
        if node.op_type in WEIGHTED:
            for name in node.input[1:]:
                value = constants.get(name)
                if value is not None and value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise ModelError(f"{node.op_type} {node_label(node)}: its parameter {name!r} "
                                     "holds NaN or infinity; fix the model's weights")


def _upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 19 or later, where every runtime bnq uses has QuantizeLinear. The
    converter drops model-local functions, so the model's own (other domains than bnq's, whose
    bodies bnq writes for any opset) are inlined first: their bodies are then converted too."""
    if default_opset(model) >= QDQ_OPSET:
        return model
    foreign = [(f.domain, f.name) for f in model.functions if f.domain != ops.DOMAIN]
    if foreign:
        model = onnx.inliner.inline_selected_functions(model, foreign)
    try:
        upgraded = version_converter.convert_version(model, QDQ_OPSET)
    except Exception as error:  # the converter raises bare RuntimeErrors and more
        raise ModelError(f"cannot convert the model from opset {default_opset(model)} to "
                         f"{QDQ_OPSET}: {str(error).strip().splitlines()[0]}") from error
    return ops.attach_functions(upgraded)


def _inside(q: QuantParams, low: float, high: float) -> QuantParams:
    """`q` with its scale lowered by ulps until its whole range, as onnxruntime computes it in
    float32 (`scale * (qmax - zero_point)`), lies inside [low, high]: then a Clip of those bounds
    before the quantizer changes no code, and onnxruntime drops it."""
    qmin, qmax = quant_range(q.dtype)
    scale, zero_point = np.float32(q.scale), np.float32(q.zero_point)
    while (scale * (np.float32(qmax) - zero_point) > high
           or scale * (np.float32(qmin) - zero_point) < low):
        scale = np.nextafter(scale, np.float32(0))
    return dataclasses.replace(q, scale=np.asarray(scale))


class _Observation:
    """The observers of a calibration, one per tensor and fold (`bnq.choice`; one fold but for
    method auto), fed by `bnq.execution`; `where` names each tensor for the user. The tensors
    are spread over `threads` threads (`machine.spread`: each tensor's observers on one)."""

    def __init__(self, per_channel: dict[str, bool], where: dict[str, str], method: str,
                 options: dict, folds: int = 1, threads: int = 1) -> None:
        self.where, self.threads = where, threads
        self.make = functools.partial(make_observer, method, **options)
        self.per_channel = per_channel
        self.folds: list[dict[str, Observer]] = [
            {name: self.make(per_channel=channels) for name, channels in per_channel.items()}
            for _ in range(folds)]
        self.unsplit: set[str] = set()  # tensors seen without the samples on axis 0: in fold 0

    def update(self, batch: dict[str, np.ndarray], fetched: list[dict[str, np.ndarray]],
               groups: tuple[int, ...]) -> None:
        count = len(next(iter(batch.values())))
        sample_folds = fold(batch[SAMPLE]) if len(self.folds) > 1 else np.zeros(count, int)
        spread(functools.partial(self._observe, count, sample_folds), list(fetched[0].items()),
               self.threads)

    def _observe(self, count: int, sample_folds: np.ndarray,
                 tensor: tuple[str, np.ndarray]) -> None:
        name, value = tensor
        if value.size == 0:
            raise ModelError(f"{self.where[name]} is empty (shape {list(value.shape)} for "
                             f"{count} samples): there is nothing to calibrate; fix the model")
        unsplit = len(self.folds) > 1 and (value.ndim == 0 or value.shape[0] != count)
        if unsplit:
            self.unsplit.add(name)
        for index, observers in enumerate(self.folds):
            rows = np.full(count, index == 0) if unsplit else sample_folds == index
            if not rows.any():
                continue
            try:
                observers[name].update(value if rows.all() else value[rows])
            except DataError as error:  # non-finite values: the samples are finite, checked
                raise ModelError(f"{self.where[name]} holds NaN or infinity, although the "
                                 "samples are finite: the model's arithmetic overflows "
                                 "there; check the weights that produce it") from error

    def merge(self, other: _Observation) -> None:
        for mine, theirs in zip(self.folds, other.folds):
            for name, observer in theirs.items():
                mine[name].merge(observer)
        self.unsplit |= other.unsplit

    def merged(self) -> dict[str, Observer]:
        """One observer per tensor, of all the folds' samples."""
        if len(self.folds) == 1:
            return self.folds[0]
        merged = {}
        for name, channels in self.per_channel.items():
            merged[name] = self.make(per_channel=channels)
            for observers in self.folds:
                merged[name].merge(observers[name])
        return merged


def _describe(name: str, role: str, observer: str, q: QuantParams) -> QuantizedTensor:
    per_channel = q.scale.ndim > 0
    return QuantizedTensor(
        name=name, role=role, granularity="per channel" if per_channel else "per tensor",
        observer=observer, rmin=float(np.min(q.rmin)), rmax=float(np.max(q.rmax)),
        scale_min=float(np.min(q.scale)), scale_max=float(np.max(q.scale)),
        zero_point=None if per_channel and np.unique(q.zero_point).size > 1
        else int(q.zero_point.flat[0]))
