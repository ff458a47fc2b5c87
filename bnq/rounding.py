"""Weight rounding chosen by its effect on the layer's output (GPTQ, Frantar et al. 2022: the
Optimal Brain Quantizer update of Hassibi and Stork's Optimal Brain Surgeon, one column at a
time).

A Conv / Gemm / MatMul computes, for each output channel, y = w . x over the layer's input
vectors x (for a Conv, the receptive fields: im2col patches, one per output position). Given
the calibration data's inputs X, rounding w to the codes q (scale s per output channel, kept as
round-to-nearest chooses it: max|w| / 127) costs the output error

    || (w - s q) X ||^2 = (w - s q)^T H (w - s q),      H = X X^T   (one H per group)

GPTQ minimises it greedily, column j = 0, 1, ... of the inputs in order: q_j = the nearest code
of the current w_j; its error e_j = (w_j - s q_j) / U_jj is then spread over the columns not yet
rounded, w_k -= e_j U_jk (k > j), with U the upper Cholesky factor of H^-1 (H dampened by 1% of
its mean diagonal). The spread keeps the output close where round-to-nearest lets the column
errors add up. Codes stay in the format's range; only which code each weight takes changes, so
the integer formats and the model's graph are those of round to nearest.

H is accumulated over the calibration batches from the float model's layer inputs (one more
run over the data, split by ``bnq.execution`` under its memory limit); 2-D Conv (any stride, padding, dilation and group count), Gemm and
MatMul with constant weights. Other layers keep round to nearest. H is summed per micro-batch
in float64, so, unlike the ranges, the codes can differ in rare near-ties between splits of the
work (micro-batches, workers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from bnq.execution import Job, RunResult
from bnq.graph import constant_values
from bnq.machine import IntegerFormats
from bnq.quantization import quant_range, weight_qparams

DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default)
BLOCK = 128  # columns rounded before the rest of the weight is updated in one product
# A Conv's H sums over at most this many output positions per input of a group, per sample,
# evenly spaced: early layers have 10-100x more positions than inputs, and the sum's cost
# (positions x inputs**2) made rounding ResNet-50 take 40x its calibration time.
POSITIONS_PER_INPUT = 1


def weight_axis(node: onnx.NodeProto, ndim: int) -> int:
    """The output-channel axis of a Conv / Gemm / MatMul weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute
                        if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return ndim - 1


def round_weights(model: onnx.ModelProto, formats: IntegerFormats,
                  execute: Callable[[Job], RunResult]) -> dict[str, np.ndarray]:
    """Integer codes of the weights of ``model``'s Conv / Gemm / MatMul layers (weight name ->
    codes, the weight's shape), rounded by GPTQ on the layers' inputs; ``execute`` runs a job
    over the calibration data (``bnq.execution.run`` with the data and its options). Layers it
    does not cover are left out (round to nearest applies)."""
    constants = constant_values(model)
    layers = tuple(node for node in model.graph.node if _covered(node, constants))
    if not layers:
        return {}
    shapes = tuple(constants[node.input[1]].shape for node in layers)
    job = Job((model,), ("onnxruntime",), tuple(((node.input[0],),) for node in layers),
              functools.partial(_Hessians, layers, shapes))
    hessians = execute(job).accumulator.sums
    dtype = np.dtype(formats.weight)
    qmin, qmax = quant_range(dtype, formats.reduce_range)
    rounded = {}
    for index, node in enumerate(layers):
        weight = constants[node.input[1]]
        q = weight_qparams(weight, axis=weight_axis(node, weight.ndim), dtype=dtype,
                           reduce_range=formats.reduce_range)
        rows = _rows(node, weight)  # (groups, outputs per group, inputs per group)
        codes = gptq(rows, hessians[index], q.scale.reshape(rows.shape[:2]).astype(np.float64),
                     qmin, qmax)
        rounded[node.input[1]] = _unrows(node, codes, weight.shape).astype(dtype)
    return rounded


class _Hessians:
    """Accumulator of ``bnq.execution``: H of each layer, summed over the micro-batches."""

    def __init__(self, layers: tuple[onnx.NodeProto, ...], shapes: tuple[tuple[int, ...], ...]):
        self.layers, self.shapes = layers, shapes
        self.sums: dict[int, np.ndarray] = {}

    def update(self, batch, fetched, groups) -> None:
        for index in groups:
            node = self.layers[index]
            h = _hessian(node, fetched[0][node.input[0]], self.shapes[index])
            self.sums[index] = self.sums[index] + h if index in self.sums else h

    def merge(self, other: _Hessians) -> None:
        for index, h in other.sums.items():
            self.sums[index] = self.sums[index] + h if index in self.sums else h


def gptq(rows: np.ndarray, hessian: np.ndarray, scale: np.ndarray, qmin: int,
         qmax: int) -> np.ndarray:
    """Codes of ``rows`` (groups, R, D) for input Hessians ``hessian`` (groups, D, D) and
    per-row scales ``scale`` (groups, R), by the column-wise update of the module docstring."""
    w = rows.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    d = h.shape[-1]
    diagonal = np.einsum("gii->gi", h)
    dead = diagonal <= 0  # inputs that were always 0: any code gives the same output
    diagonal[dead] = 1.0
    diagonal += DAMPING * diagonal.mean(axis=1, keepdims=True)
    np.einsum("gii->gi", h)[...] = diagonal
    # upper Cholesky factor of H^-1: H^-1 = U^T U
    u = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    codes = np.empty(w.shape, dtype=np.int64)
    for start in range(0, d, BLOCK):
        stop = min(start + BLOCK, d)
        errors = np.empty((w.shape[0], w.shape[1], stop - start))
        for j in range(start, stop):
            c = np.clip(np.rint(w[:, :, j] / scale), qmin, qmax)
            codes[:, :, j] = c
            e = (w[:, :, j] - c * scale) / u[:, j, j][:, None]
            w[:, :, j + 1:stop] -= e[:, :, None] * u[:, None, j, j + 1:stop]
            errors[:, :, j - start] = e
        w[:, :, stop:] -= errors @ u[:, start:stop, stop:]
    return codes


def _covered(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
        return False
    weight = constants.get(node.input[1])
    if weight is None or node.input[0] in constants:
        return False
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return weight.ndim == 4 and attributes.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    if node.op_type == "Gemm":
        return weight.ndim == 2 and not attributes.get("transA", 0)
    return weight.ndim == 2


def _rows(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """The weight as (groups, outputs per group, inputs per group), inputs in H's order."""
    if node.op_type == "Conv":
        groups = _attribute(node, "group", 1)
        return weight.reshape(groups, weight.shape[0] // groups, -1)
    return np.moveaxis(weight, weight_axis(node, weight.ndim), 0)[None]


def _unrows(node: onnx.NodeProto, codes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv":
        return codes.reshape(shape)
    return np.moveaxis(codes[0], 0, weight_axis(node, len(shape)))


def _hessian(node: onnx.NodeProto, x: np.ndarray, shape: tuple[int, ...],
             sparse: bool = True) -> np.ndarray:
    """sum x x^T over the batch's input vectors, per group: (groups, D, D) float64 for a weight
    of ``shape``. With ``sparse``, a Conv's sum runs over at most ``POSITIONS_PER_INPUT`` times D
    output positions per sample, evenly spaced, scaled to all positions."""
    if node.op_type != "Conv":
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        return (x.T @ x).astype(np.float64)[None]
    groups = _attribute(node, "group", 1)
    d = math.prod(shape[1:])
    patches, share = _patches(node, x, shape[2:], POSITIONS_PER_INPUT * d if sparse else None)
    patches = patches.reshape(len(patches), groups, d)
    if d > 32:  # few large groups: one matrix product each
        patches = patches.transpose(1, 0, 2)
        return np.matmul(patches.transpose(0, 2, 1), patches).astype(np.float64) / share
    # many small groups (depthwise: 9 inputs per group): one product of columns per entry
    h = np.empty((groups, d, d))
    for i in range(d):
        for j in range(i + 1):
            h[:, i, j] = h[:, j, i] = np.einsum("pg,pg->g", patches[:, :, i], patches[:, :, j])
    return h / share


def _patches(node: onnx.NodeProto, x: np.ndarray, kernel: tuple[int, int],
             limit: int | None = None) -> tuple[np.ndarray, float]:
    """im2col: the receptive fields of the output positions of each sample, (P, C, kh, kw),
    and the share of all positions they are: all of them, or at most ``limit`` per sample
    evenly spaced in row-major order (the same positions whatever the batch)."""
    pads = _attribute(node, "pads", [0, 0, 0, 0])
    strides = _attribute(node, "strides", [1, 1])
    dilations = _attribute(node, "dilations", [1, 1])
    x = np.pad(x.astype(np.float32), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    n, c, ho, wo, kh, kw = windows.shape
    if limit is not None and limit < ho * wo:
        pick = np.unique(np.linspace(0, ho * wo - 1, limit).round().astype(np.intp))
        chosen = windows[:, :, pick // wo, pick % wo]  # (n, c, picked, kh, kw)
        return (np.ascontiguousarray(chosen.transpose(0, 2, 1, 3, 4)).reshape(-1, c, kh, kw),
                pick.size / (ho * wo))
    return (np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(n * ho * wo, c, kh, kw),
            1.0)


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                default)
