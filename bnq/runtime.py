"""Backends that run whole models: `numpy` and `onnxruntime`.

* `numpy` executes the graph with `onnx.reference.ReferenceEvaluator`, with bnq's NumPy kernels in
  place of the function bodies of bnq's ops (`new_ops`).
* `onnxruntime` runs an InferenceSession on the CPU provider; bnq's ops run through their bodies.

Both return the outputs as a list of arrays, in the order of the graph outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bnq import ops
from bnq.errors import ArgumentError, DataError
from bnq.io import load_model
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
    return lambda feeds: list(evaluator.run(None, dict(feeds)))


def ort_session(model: onnx.ModelProto, threads: int | None = None, *,
                spin: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` intra-op threads (None: all). onnxruntime's
    own warnings are silenced: they would go to stderr around bnq's one-line reports, and bnq
    checks what they are about itself."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    if not spin:  # idle workers sleep: they would take the cores of whatever runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def onnxruntime_runner(model: onnx.ModelProto, threads: int | None = None) -> Runner:
    """Run `model` in an onnxruntime CPU session with `threads` intra-op threads (None: all)."""
    session = ort_session(model, threads)
    return lambda feeds: session.run(None, dict(feeds))


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
    run = BACKENDS[backend](model, threads)
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


def run_model(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray],
              backend: str = "numpy", threads: int | None = None) -> list[np.ndarray]:
    """Run `model` (a ModelProto or a path) on `feeds` and return its outputs as arrays."""
    return make_runner(model, backend, threads)(feeds)
