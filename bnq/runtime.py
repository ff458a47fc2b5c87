"""Backends that run whole models: `numpy` and `onnxruntime`.

* `numpy` executes the graph with `onnx.reference.ReferenceEvaluator`, with bnq's NumPy kernels in
  place of the function bodies of bnq's ops (`new_ops`).
* `onnxruntime` runs an InferenceSession on the CPU provider; bnq's ops run through their bodies.

Both return the outputs as a list of arrays, in the order of the graph outputs. A runner feeds a
model whose inputs have a fixed batch dimension (batch 1, the default of many exports) in chunks
of that many samples, and checks before the first run of each batch shape, by shape inference,
that no tensor of the run exceeds bnq's memory limit (`bnq.limits`). onnxruntime's errors become
one-line `ModelError`s that keep its words (which name the node).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bnq import ops
from bnq.errors import ArgumentError, BnqError, DataError, ModelError, one_line
from bnq.graph import concrete_shapes, constant_values, node_label, producers
from bnq.io import load_model
from bnq.limits import check_size
from bnq.qops import QLinearBatchNormRelu

Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


class BatchNormRelu(OpRun):
    """bnq.BatchNormRelu for the reference evaluator: the spec's BatchNormalization, then Relu."""

    op_domain = ops.DOMAIN

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
        return (np.maximum(y * scale.reshape(shape) + bias.reshape(shape), 0).astype(x.dtype),)


def numpy_runner(model: onnx.ModelProto, threads: int | None = None) -> Runner:
    """Run `model` with onnx's reference evaluator and bnq's kernels (single-threaded)."""
    evaluator = ReferenceEvaluator(model, new_ops=[BatchNormRelu, QLinearBatchNormRelu])

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(evaluator.run(None, dict(feeds)))
        except BnqError:
            raise
        except Exception as error:  # the evaluator raises whatever numpy raises in an op
            raise ModelError(f"the numpy backend (onnx's reference evaluator) cannot run the "
                             f"model: {type(error).__name__}: {one_line(error)}; try the "
                             "onnxruntime backend") from error

    return run


# onnxruntime raises its own exception classes (Fail, InvalidArgument, ...), all plain Exceptions.
_ORT_ERRORS = tuple(value for value in vars(ort.capi.onnxruntime_pybind11_state).values()
                    if isinstance(value, type) and issubclass(value, Exception))


def _ort_error(doing: str, error: Exception) -> ModelError:
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", one_line(error, 400))
    return ModelError(f"onnxruntime cannot {doing}: {text}")


def ort_session(model: onnx.ModelProto, threads: int | None = None, *,
                spin: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` intra-op threads (None: all). onnxruntime's
    own warnings are silenced: they would go to stderr around bnq's one-line reports, and bnq
    checks what they are about itself."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: bnq reports the errors itself, in one line
    if not spin:  # idle workers sleep: they would take the cores of whatever runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as error:
        raise _ort_error("load the model", error) from error


def onnxruntime_runner(model: onnx.ModelProto, threads: int | None = None,
                       names: list[str] | None = None) -> Runner:
    """Run `model` in an onnxruntime CPU session with `threads` intra-op threads (None: all);
    the outputs `names` (None: all)."""
    session = ort_session(model, threads)

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return session.run(names, dict(feeds))
        except _ORT_ERRORS as error:
            raise _ort_error("run the model", error) from error

    return run


BACKENDS: dict[str, Callable[[onnx.ModelProto, int | None], Runner]] = {
    "numpy": numpy_runner,
    "onnxruntime": onnxruntime_runner,
}


def make_runner(model: onnx.ModelProto | str | os.PathLike, backend: str = "numpy",
                threads: int | None = None) -> Runner:
    """A function from feeds to outputs for `model` on `backend`, built once, called per batch."""
    if backend not in BACKENDS:
        raise ArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    run = batched(model, BACKENDS[backend](model, threads))
    inputs = {value.name: value for value in model.graph.input}
    initializers = {tensor.name for tensor in model.graph.initializer}
    required = [name for name in inputs if name not in initializers]

    def checked(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [name for name in required if name not in feeds]
        if missing:
            raise DataError(f"no data for model input {missing[0]!r}")
        unknown = [name for name in feeds if name not in inputs]
        if unknown:
            raise DataError(f"{unknown[0]!r} is not an input of the model "
                            f"(inputs: {', '.join(required)})")
        return [np.asarray(output) for output in run(feeds)]

    return checked


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size every data input of `model` fixes in its first dimension, if they all do."""
    known = set(constant_values(model)) | {tensor.name for tensor in model.graph.initializer}
    sizes = set()
    for value in model.graph.input:
        if value.name not in known:
            dims = value.type.tensor_type.shape.dim
            sizes.add(dims[0].dim_value if dims and dims[0].HasField("dim_value") else None)
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def batched(model: onnx.ModelProto, run: Runner) -> Runner:
    """`run`, fed the batches `model` accepts: with a fixed batch dimension B, a batch of N
    samples runs as N / B chunks of B, outputs concatenated along the batch axis. Before the
    first run of each batch shape, `check_run`."""
    fixed = fixed_batch(model)
    checked: set[tuple] = set()

    def run_batch(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        size = len(next(iter(feeds.values()))) if feeds else 0
        chunk = fixed if fixed and size != fixed else size
        shapes = {name: (chunk, *np.shape(array)[1:]) for name, array in feeds.items()}
        if tuple(shapes.items()) not in checked:
            check_run(model, shapes)
            checked.add(tuple(shapes.items()))
        if chunk == size:
            return run(feeds)
        if size % chunk:
            raise DataError(f"the model takes batches of exactly {fixed} samples (its inputs fix "
                            f"the batch dimension), and {size} samples do not split into them; "
                            f"use a number of samples that is a multiple of {fixed}")
        parts = [run({name: array[start:start + chunk] for name, array in feeds.items()})
                 for start in range(0, size, chunk)]
        return [np.concatenate(outputs) for outputs in zip(*parts)]

    return run_batch


# Ops that slide a window over the spatial axes: an input smaller than the window leaves none.
WINDOWED = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")


def check_run(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse to run `model` on inputs of `input_shapes`, naming the node, when shape inference
    shows a windowed op left with no output positions (samples smaller than its kernel), or a
    tensor, or the work buffer of a convolution, larger than bnq's memory limit (a Conv with
    huge pads, a batch too large for the model). A convolution's buffer (onnxruntime's im2col)
    holds, per sample, its input channels per group x kernel elements x output positions."""
    shapes = concrete_shapes(model, input_shapes)
    if not shapes:
        return
    writers = producers(model.graph)
    for node in model.graph.node:
        if node.op_type in WINDOWED and node.output[0] in shapes and node.input[0] in shapes:
            shape, source = shapes[node.output[0]][0], shapes[node.input[0]][0]
            if 0 in shape[2:] and 0 not in source[2:]:
                raise ModelError(f"{node.op_type} {node_label(node)}: samples of shape "
                                 f"{list(input_shapes[next(iter(input_shapes))][1:])} leave "
                                 f"its input {list(source)} smaller than its window (output "
                                 f"{list(shape)}); give samples of the size the model takes")

    def tensor(name: str) -> str:
        node = writers.get(name)
        return f"tensor {name!r}" + (f" (output of {node.op_type} {node_label(node)})"
                                     if node is not None else "")

    needs = [(math.prod(shape) * dtype.itemsize, f"{tensor(name)}, {dtype} of shape {list(shape)},")
             for name, (shape, dtype) in shapes.items()]
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        weight = weights.get(node.input[1]) if node.op_type in ("Conv", "ConvTranspose") else None
        if weight and node.output[0] in shapes:
            shape, dtype = shapes[node.output[0]]
            needs.append((math.prod(shape[2:]) * math.prod(weight[1:]) * dtype.itemsize,
                          f"{node.op_type} {node_label(node)}: its work buffer for "
                          f"{list(shape[2:])} output positions of a {list(weight)} kernel"))
    size, what = max(needs)
    batch = next(iter(input_shapes.values()))[0] if input_shapes else 0
    check_size(size, what, ModelError, "use a smaller batch size" if batch > 1 else "")


def run_model(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray],
              backend: str = "numpy", threads: int | None = None) -> list[np.ndarray]:
    """Run `model` (a ModelProto or a path) on `feeds` and return its outputs as arrays."""
    return make_runner(model, backend, threads)(feeds)
