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
from onnx import helper, numpy_helper, version_converter

from bnq import ops
from bnq.bias_correction import BiasCorrection, correct_biases
from bnq.choice import FOLDS, MethodChoice, choose, fold
from bnq.data import SampleData, model_inputs
from bnq.equalization import Equalization, equalize_layers
from bnq.errors import ArgumentError, DataError, ModelError
from bnq.execution import DEFAULT_MEMORY_LIMIT, SAMPLE, ExecutionPlan, Job, run
from bnq.fusion import FuseReport, fuse
from bnq.graph import (
    NameScope,
    check,
    constant_values,
    consumers,
    default_opset,
    node_label,
    op_counts,
    output_names,
    producers,
    quantized_nodes,
    reads,
)
from bnq.machine import IntegerFormats
from bnq.observers import CANDIDATES, CandidateObserver, Observer, make_observer
from bnq.qops import INTEGER_INPUTS, INPUTS, body_for, float_output_scale, integer_output_scale
from bnq.rewrites import fold_average_pool
from bnq.quantization import QuantParams, quant_range, quantize, weight_qparams
from bnq.rounding import round_weights, weight_axis

QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear of onnx's reference evaluator start here
WEIGHTED = ("Conv", "Gemm", "MatMul")
# Ops whose integer kernels in onnxruntime beat float: their activation inputs and outputs are
# quantized. Add (QLinearAdd): the digits sample's residual Add, 1 thread, AVX-512 VNNI: the model
# 1.43x faster at batch 32 and 1.03 vs 0.85x float at batch 1 with it, same SQNR (37.9 dB). Left
# out, as measured slower than float (onnxruntime 1.32, AVX2): QLinearAveragePool, 13x slower than
# AveragePool on the sample (a 1x1 Conv + AveragePool is folded into one Conv instead:
# `bnq.rewrites`).
QUANTIZED_IO = ("GlobalAveragePool", "MaxPool", "Add")
# Ops that move or pick values without changing them: their output reuses their input's
# parameters. MaxPool too: onnxruntime then runs it on the codes with no requantization, which
# its own range, narrower for the histogram methods, cost (1 DequantizeLinear, 1 QuantizeLinear
# and 2 Transposes more in ResNet-50's optimized graph).
# What may stand between a classifier and the features it reads (`_final_inputs`).
_FINAL_CHAIN = ("Flatten", "Reshape", "Squeeze", "GlobalAveragePool", "GlobalMaxPool",
                "AveragePool", "MaxPool", "ReduceMean", "Relu", "Clip")
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool")


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


@dataclass
class _Plan:
    """What to quantize in a fused float model."""

    activations: list[str]  # per-tensor QDQ, in graph order
    aliases: dict[str, str]  # pass-through output -> the input whose parameters it reuses
    batch_norms: list[onnx.NodeProto]
    bn_inputs: list[str]  # BN inputs that get their own per-channel observer
    concat_sources: dict[str, onnx.NodeProto]  # BN input -> the Concat of quantized branches
    shapes: dict[str, tuple[int, int]]  # tensor -> (rank, channels), where shape inference knows
    clips: dict[str, tuple[float, float]]  # a Clip's output -> its bounds, which its range respects
    producers: dict[str, onnx.NodeProto]
    full_range: set[str]  # tensors that keep their observed min/max whatever the method


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
    plan = _plan(fused)
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
                                       method_options or {}, FOLDS if auto else 1)
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
    quantized, weights, body = _rewrite(fused, plan, qparams, formats, rounded)
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


def _choose(fused: onnx.ModelProto, plan: _Plan, folds: list[dict[str, CandidateObserver]],
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
            model = _rewrite(fused, plan, qparams, formats, rounded)[0]
            check(model, f"the quantized model of method {method}")
            candidates[method].append(model)
    if correct:
        models = [model for per_fold in candidates.values() for model in per_fold]
        corrected = iter(correct(models, folds=[f for _ in candidates for f in range(len(folds))]))
        candidates = {method: [next(corrected)[0] for _ in per_fold]
                      for method, per_fold in candidates.items()}
    return choose(fused, candidates, execute)


def _qparams(plan: _Plan, observers: dict[str, Observer], activation: np.dtype
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


def _plan(model: onnx.ModelProto) -> _Plan:
    graph = model.graph
    constants = constant_values(model)
    readers = consumers(graph)
    writers = producers(graph)
    outputs = output_names(graph)
    wanted: list[str] = []

    def want(name: str) -> None:
        if name and name not in constants and name not in outputs and name not in wanted:
            wanted.append(name)

    for value in graph.input:
        if any(r.op_type in WEIGHTED + QUANTIZED_IO for r in readers.get(value.name, [])):
            want(value.name)
    batch_norms = []
    clips = {}
    for node in graph.node:
        bounds = _activation_bounds(node, constants)
        if node.domain == ops.DOMAIN and node.op_type == "BatchNormRelu":
            batch_norms.append(node)
        elif bounds is not None:  # onnxruntime folds it into the quantizer after it
            want(node.output[0])
            if node.op_type == "Clip":
                clips[node.output[0]] = bounds
        elif (node.op_type in WEIGHTED and node.input[1] in constants
              or node.op_type in QUANTIZED_IO):
            for name in node.input[:1] if node.op_type in WEIGHTED else node.input:
                want(name)
            after = readers.get(node.output[0], [])
            if not (len(after) == 1 and _activation_bounds(after[0], constants)):
                want(node.output[0])  # else the activation's output: onnxruntime fuses it
    bn_outputs = {node.output[0] for node in batch_norms}
    activations = [name for name in wanted if name not in bn_outputs]
    aliases = {}
    for name in list(activations):
        node = writers.get(name)
        if node is not None and node.op_type in PASS_THROUGH and node.input[0] in activations:
            aliases[name] = node.input[0]
            activations.remove(name)
    sourced = set(activations) | bn_outputs | set(aliases)
    shapes = _channel_counts(model)
    concat_sources, bn_inputs = {}, []
    for node in batch_norms:
        x = node.input[0]
        if x in sourced:
            continue
        concat = writers.get(x)
        if concat is not None and _is_channel_concat(concat, shapes, sourced, writers):
            concat_sources[x] = concat
        elif x not in bn_inputs:
            bn_inputs.append(x)
    return _Plan(activations, aliases, batch_norms, bn_inputs, concat_sources, shapes, clips,
                 writers, _final_inputs(graph, constants, readers, writers, outputs))


def _final_inputs(graph: onnx.GraphProto, constants: dict[str, np.ndarray], readers: dict,
                  writers: dict, outputs: set[str]) -> set[str]:
    """The inputs of the layers that write model outputs (a classifier's Gemm) through pooling
    or reshaping, back through those ops (and activations) to the tensor they start from: the
    pooled features the logits are read from. Their largest values carry the classes, and no
    later layer averages a clipping error there: under every method they keep their observed
    min/max (on DenseNet-121, mse clipping that vector alone cost 0.75 dB of logit SQNR)."""
    found = set()
    for node in graph.node:
        if node.op_type in WEIGHTED and node.input[1] in constants and node.output[0] in outputs:
            chain, name = [], node.input[0]
            while (name in writers and writers[name].op_type in _FINAL_CHAIN
                   and len(readers.get(name, [])) == 1):
                chain.append(name)
                name = writers[name].input[0]
            if any(writers[link].op_type not in ("Relu", "Clip") for link in chain):
                found.update(chain, [name])  # features pooled or flattened for the classifier
    return found


def _activation_bounds(node: onnx.NodeProto, constants: dict[str, np.ndarray]
                       ) -> tuple[float, float] | None:
    """(min, max) of a Relu or of a Clip with constant bounds and min <= 0 <= max, else None.

    onnxruntime folds such an activation into the QuantizeLinear after it (ReluQuantFusion,
    ClipQuantFusion) when the quantized range lies inside its bounds, and then the op before it
    (Conv, Gemm, Add) into one integer op: so after such ops only the activation's output is
    quantized, and the integer op's clamp is the activation (ReLU6 in MobileNets)."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip" or not all(name in constants for name in node.input[1:] if name):
        return None
    names = list(node.input[1:]) + ["", ""]
    low = float(constants[names[0]]) if names[0] else -float("inf")
    high = float(constants[names[1]]) if names[1] else float("inf")
    return (low, high) if low <= 0 <= high else None


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


def _channel_counts(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Tensor name -> (rank, channels) where shape inference knows both."""
    inferred = onnx.shape_inference.infer_shapes(model)
    counts = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value"):
            counts[value.name] = (len(dims), dims[1].dim_value)
    return counts


def _is_channel_concat(node: onnx.NodeProto, shapes: dict, sourced: set[str],
                       writers: dict[str, onnx.NodeProto]) -> bool:
    """A Concat along the channel axis whose inputs all have integer codes (or are such Concats)."""
    if node.op_type != "Concat" or node.output[0] not in shapes:
        return False
    rank = shapes[node.output[0]][0]
    axis = helper.get_attribute_value(node.attribute[0])
    if axis % rank != 1:
        return False
    for name in node.input:
        if name not in shapes:
            return False
        if name not in sourced and not (
                name in writers and _is_channel_concat(writers[name], shapes, sourced, writers)):
            return False
    return True


class _Observation:
    """The observers of a calibration, one per tensor and fold (`bnq.choice`; one fold but for
    method auto), fed by `bnq.execution`; `where` names each tensor for the user."""

    def __init__(self, per_channel: dict[str, bool], where: dict[str, str], method: str,
                 options: dict, folds: int = 1) -> None:
        self.where = where
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
        for name, value in fetched[0].items():
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


class _Builder:
    """Emits the quantized graph node by node; `codes` maps a float tensor to the name of its
    integer codes and their scale and zero point (0-d per tensor, [C] per channel)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.scope = NameScope(model.graph)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.codes: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.scope.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output_base: str, **attrs) -> str:
        output = self.scope.fresh(output_base)
        self.nodes.append(helper.make_node(op, inputs, [output],
                                           name=self.scope.fresh(f"{output_base}_{op}"), **attrs))
        return output

    def quantize(self, name: str, q: QuantParams) -> str:
        """QuantizeLinear of float tensor `name` (per channel on axis 1 for [C] parameters)."""
        params = [self.constant(f"{name}_scale", q.scale),
                  self.constant(f"{name}_zero_point", q.zero_point)]
        codes = self.node("QuantizeLinear", [name, *params], f"{name}_quantized",
                          **({"axis": 1} if q.scale.ndim else {}))
        self.codes[name] = (codes, q.scale, q.zero_point)
        return codes

    def dequantize(self, codes: str, scale: np.ndarray, zero_point: np.ndarray, base: str,
                   axis: int = 1) -> str:
        params = [self.constant(f"{base}_scale", scale),
                  self.constant(f"{base}_zero_point", zero_point)]
        return self.node("DequantizeLinear", [codes, *params], f"{base}_dequantized",
                         **({"axis": axis} if np.ndim(scale) else {}))


def _rewrite(model: onnx.ModelProto, plan: _Plan, qparams: dict[str, QuantParams],
             formats: IntegerFormats, rounded: dict[str, np.ndarray]
             ) -> tuple[onnx.ModelProto, dict[str, QuantParams], str]:
    """The quantized model, its weights' parameters and the body of its fused BN-ReLU nodes
    (`bnq.qops.body_for`, chosen and checked once here; bias correction changes no BN-ReLU)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    constants = constant_values(result)
    build = _Builder(result)
    rename: dict[str, str] = {}  # float tensor -> its quantize-dequantized copy, for readers
    weights: dict[str, QuantParams] = {}
    qdq = set(plan.activations) | set(plan.aliases)

    def emit_qdq(name: str) -> None:
        q = qparams[name]
        rename[name] = build.dequantize(build.quantize(name, q), q.scale, q.zero_point, name)

    for value in graph.input:
        if value.name in qdq:
            emit_qdq(value.name)
    for node in graph.node:
        if node.domain == ops.DOMAIN and node.op_type == "BatchNormRelu":
            _emit_batch_norm(build, node, plan, qparams, constants)
            continue
        source = node.input[0] if node.input else ""
        # a per-channel BN input is computed from float tensors: onnxruntime would fuse
        # DequantizeLinear -> op -> its per-channel QuantizeLinear into a QLinear op (such as
        # QLinearAveragePool) that takes no per-channel scale, and refuse to load the model
        node = _copy_renamed(node, {} if node.output[0] in plan.bn_inputs else rename)
        if node.op_type in WEIGHTED and node.input[1] in constants:
            weights |= _quantize_weights(build, node, constants, build.codes.get(source), formats,
                                         rounded.get(node.input[1]))
        build.nodes.append(node)
        for name in node.output:
            if name in qdq:
                emit_qdq(name)

    fused = [node for node in build.nodes if node.domain == ops.DOMAIN]
    if not all(len(node.input) > len(INPUTS) for node in fused):
        for node in fused:  # one body serves every node: all integer, or none
            del node.input[len(INPUTS):]
            kept = [a for a in node.attribute if a.name != "channels"]
            del node.attribute[:]
            node.attribute.extend(kept)
    del graph.node[:]
    graph.node.extend(_live(build.nodes, output_names(graph)))
    graph.initializer.extend(build.initializers)
    used = {name for node in graph.node for name in reads(node)}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    body = body_for(result)
    return ops.attach_functions(result, body), weights, body


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes whose results are still read: a float Concat whose readers now take the
    integer Concat beside it is left with none (ONNX nodes have no side effects)."""
    live = list(nodes)
    while True:
        read = {name for node in live for name in reads(node)} | outputs
        kept = [node for node in live if any(name in read for name in node.output)]
        if len(kept) == len(live):
            return live
        live = kept


def _copy_renamed(node: onnx.NodeProto, rename: dict[str, str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for index, name in enumerate(copy.input):
        copy.input[index] = rename.get(name, name)
    return copy


def _emit_batch_norm(build: _Builder, node: onnx.NodeProto, plan: _Plan,
                     qparams: dict[str, QuantParams], constants: dict[str, np.ndarray]) -> None:
    """QLinearBatchNormRelu on integer codes of the input, then DequantizeLinear for readers."""
    x = node.input[0]
    if x in plan.concat_sources:
        _emit_concat(build, plan.concat_sources[x], plan)
    elif x not in build.codes:
        build.quantize(x, qparams[x])
    codes, x_scale, x_zero_point = build.codes[x]
    y, q = node.output[0], qparams[node.output[0]]
    epsilon = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"),
                   1e-5)
    params = (x_scale, x_zero_point, *(constants[name] for name in node.input[1:5]),
              float(np.float32(epsilon)), q.scale, q.zero_point)
    scale, affine = integer_output_scale(*params) or (float_output_scale(*params), None)
    q = qparams[y] = dataclasses.replace(q, scale=np.asarray(scale, np.float32))
    inputs = [codes, build.constant(f"{x}_scale", x_scale),
              build.constant(f"{x}_zero_point", x_zero_point), *node.input[1:5],
              build.constant(f"{y}_scale", q.scale), build.constant(f"{y}_zero_point", q.zero_point)]
    rank = plan.shapes.get(x, (0, 0))[0]
    if affine is not None and rank in (3, 4, 5):
        kernel = affine.weight.reshape((-1,) + (1,) * (rank - 1))
        inputs += [build.constant(f"{node.name}_{name}", value) for name, value in
                   zip(INTEGER_INPUTS, (kernel, affine.scale, affine.bias))]
    y_codes = build.scope.fresh(f"{y}_quantized")
    fused = helper.make_node("QLinearBatchNormRelu", inputs, [y_codes],
                             name=node.name, domain=ops.DOMAIN)
    fused.attribute.extend(a for a in node.attribute if a.name == "epsilon")
    if len(inputs) > len(INPUTS):
        fused.attribute.append(helper.make_attribute("channels", len(affine.scale)))
    build.nodes.append(fused)
    build.codes[y] = (y_codes, q.scale, q.zero_point)
    build.nodes.append(helper.make_node(
        "DequantizeLinear", [y_codes, build.constant(f"{y}_scale", q.scale),
                             build.constant(f"{y}_zero_point", q.zero_point)], [y],
        name=build.scope.fresh(f"{y}_DequantizeLinear")))


def _emit_concat(build: _Builder, concat: onnx.NodeProto, plan: _Plan) -> None:
    """Concatenate the integer codes of `concat`'s inputs, each branch keeping its own scale and
    zero point, repeated over its channels."""
    if concat.output[0] in build.codes:
        return
    names, scales, zero_points = [], [], []
    for name in concat.input:
        if name not in build.codes:
            _emit_concat(build, plan.producers[name], plan)
        codes, scale, zero_point = build.codes[name]
        channels = plan.shapes[name][1]
        names.append(codes)
        scales.append(np.broadcast_to(scale, (channels,)))
        zero_points.append(np.broadcast_to(zero_point, (channels,)))
    codes = build.node("Concat", names, f"{concat.output[0]}_quantized", axis=1)
    build.codes[concat.output[0]] = (codes, np.concatenate(scales), np.concatenate(zero_points))


def _quantize_weights(build: _Builder, node: onnx.NodeProto, constants: dict[str, np.ndarray],
                      source: tuple[str, np.ndarray, np.ndarray] | None,
                      formats: IntegerFormats, rounded: np.ndarray | None) -> dict[str, QuantParams]:
    """Replace the node's weight, and its bias when the input is quantized, by DequantizeLinear
    of integer initializers: int8 per output channel (the `rounded` codes, else the nearest),
    int32 bias at x_scale * w_scale."""
    weight_name = node.input[1]
    weight = constants[weight_name]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = weight_axis(node, weight.ndim)
    q = weight_qparams(weight, axis=axis, dtype=np.dtype(formats.weight),
                       reduce_range=formats.reduce_range)
    codes = build.constant(f"{weight_name}_quantized",
                           quantize(weight, q, axis=axis) if rounded is None else rounded)
    node.input[1] = build.dequantize(codes, q.scale, q.zero_point, weight_name, axis=axis)
    has_bias = len(node.input) > 2 and node.input[2] in constants
    plain_gemm = node.op_type != "Gemm" or (attributes.get("alpha", 1.0) == 1.0
                                             and attributes.get("beta", 1.0) == 1.0)
    if source is not None and has_bias and source[1].ndim == 0 and plain_gemm:
        bias = constants[node.input[2]]
        if bias.shape == q.scale.shape:
            scale = (source[1] * q.scale).astype(np.float32)
            info = np.iinfo(np.int32)
            bias_codes = np.clip(np.rint(bias / scale), info.min, info.max).astype(np.int32)
            name = build.constant(f"{node.input[2]}_quantized", bias_codes)
            node.input[2] = build.dequantize(name, scale, np.zeros(scale.shape, np.int32),
                                             node.input[2], axis=0)
    return {weight_name: q}


def _describe(name: str, role: str, observer: str, q: QuantParams) -> QuantizedTensor:
    per_channel = q.scale.ndim > 0
    return QuantizedTensor(
        name=name, role=role, granularity="per channel" if per_channel else "per tensor",
        observer=observer, rmin=float(np.min(q.rmin)), rmax=float(np.max(q.rmax)),
        scale_min=float(np.min(q.scale)), scale_max=float(np.max(q.scale)),
        zero_point=None if per_channel and np.unique(q.zero_point).size > 1
        else int(q.zero_point.flat[0]))
