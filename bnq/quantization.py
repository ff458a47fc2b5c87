"""Quantization arithmetic: parameters from a range, and ONNX QuantizeLinear / DequantizeLinear.

Quantization parameters (``qparams_from_range``, computed in float32 like PyTorch)::

    rmin  = min(rmin, 0),  rmax = max(rmax, 0)          # zero is always in the range
    affine:     scale = (rmax - rmin) / (qmax - qmin)
                zero_point = clip(qmin - rint(rmin / scale), qmin, qmax)
    symmetric:  qmid = (qmin + qmax + 1) // 2             # 0 for int8, 128 for uint8
                scale = max(-rmin, rmax) / (qmax - qmid)  # max|x| / 127 for int8
                zero_point = qmid
    scale = max(scale, eps),  eps = 2**-23 (float32 machine epsilon, as PyTorch)

so an all-zero range gets scale 2**-23, never 0, NaN or inf, and a non-negative tensor (a ReLU
output) gets rmin = 0, zero_point = qmin: the full range of codes from zero up. (qmin, qmax) is
(0, 255) for uint8 and (-128, 127) for int8; ``reduce_range`` halves it to (0, 127) and
(-64, 63): bnq uses it for 7-bit weights, which keep AVX2's u8 x s8
multiply-adds from saturating.
``quantize`` and ``dequantize`` are ONNX QuantizeLinear / DequantizeLinear in float32::

    q = saturate(rint(x / scale) + zero_point)     # rint: round half to even
    x = (q - zero_point) * scale
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnq.errors import ArgumentError, DataError

EPS = np.float32(np.finfo(np.float32).eps)


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Scale and zero point of a tensor, per tensor (0-d arrays) or per channel (shape [C]).

    ``rmin`` / ``rmax`` are the float32 range the parameters were computed from, 0 included.
    Arrays are read-only. ``eq=False``: compare fields with numpy, not ``==``.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: np.dtype
    rmin: np.ndarray
    rmax: np.ndarray

    def __post_init__(self):
        for name in ("scale", "zero_point", "rmin", "rmax"):
            getattr(self, name).setflags(write=False)


def quant_range(dtype, reduce_range: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of an 8-bit dtype; ``reduce_range`` drops one bit (7-bit codes)."""
    dtype = _check_dtype(dtype)
    info = np.iinfo(dtype)
    if reduce_range:
        return info.min // 2, info.max // 2
    return int(info.min), int(info.max)


def qparams_from_range(rmin, rmax, dtype=np.uint8, *, symmetric: bool = False,
                       reduce_range: bool = False) -> QuantParams:
    """Quantization parameters for the range [rmin, rmax] (scalars or [C] arrays).

    See the module docstring for the formulas; all arithmetic is float32, as in PyTorch.
    """
    dtype = _check_dtype(dtype)
    qmin, qmax = quant_range(dtype, reduce_range)
    rmin = np.minimum(np.asarray(rmin, dtype=np.float32), np.float32(0))
    rmax = np.maximum(np.asarray(rmax, dtype=np.float32), np.float32(0))
    if rmin.shape != rmax.shape or rmin.ndim > 1:
        raise ArgumentError(f"rmin and rmax must be scalars or [C] arrays of one shape, "
                            f"got {rmin.shape} and {rmax.shape}")
    if not (np.isfinite(rmin).all() and np.isfinite(rmax).all()):
        raise ArgumentError("rmin and rmax must be finite")
    if symmetric:
        qmid = (qmin + qmax + 1) // 2
        amax = np.maximum(-rmin, rmax)
        rmin, rmax = -amax, amax
        scale = np.maximum(amax / np.float32(qmax - qmid), EPS)
        zero_point = np.full(scale.shape, qmid)
    else:
        scale = np.maximum((rmax - rmin) / np.float32(qmax - qmin), EPS)
        zero_point = np.clip(qmin - np.rint(rmin / scale), qmin, qmax)
    return QuantParams(scale=scale.astype(np.float32), zero_point=zero_point.astype(dtype),
                       dtype=dtype, rmin=rmin, rmax=rmax)


def weight_qparams(w: np.ndarray, axis: int = 0, dtype=np.int8, *,
                   reduce_range: bool = False) -> QuantParams:
    """Symmetric per-output-channel parameters of a weight: scale = max|w[c]| / 127 (int8)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1 or not -w.ndim <= axis < w.ndim:
        raise ArgumentError(f"axis {axis} is out of range for a weight of shape {w.shape}")
    if not np.isfinite(w).all():
        raise DataError(f"weight of shape {w.shape} has NaN or inf values")
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    if rows.shape[1] == 0:
        raise ArgumentError(f"weight of shape {w.shape} is empty")
    return qparams_from_range(rows.min(axis=1), rows.max(axis=1), dtype, symmetric=True,
                              reduce_range=reduce_range)


def quantize(x: np.ndarray, qparams: QuantParams, axis: int = 1) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(rint(x / scale) + zero_point) in float32.

    ``axis`` is the channel axis of per-channel parameters (ignored for per-tensor ones).
    """
    x = np.asarray(x, dtype=np.float32)
    scale, zero_point = _along(axis, x.ndim, qparams.scale, qparams.zero_point)
    info = np.iinfo(qparams.dtype)
    q = np.asarray(np.rint(x / scale))
    q += zero_point.astype(np.float32)
    np.clip(q, info.min, info.max, out=q)
    return q.astype(qparams.dtype)


def dequantize(q: np.ndarray, qparams: QuantParams, axis: int = 1) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale in float32."""
    return dequantize_linear(q, qparams.scale, qparams.zero_point, axis)


def dequantize_linear(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                      axis: int = 1) -> np.ndarray:
    """ONNX DequantizeLinear of `codes` with a scale and zero point per tensor (one value) or
    along `axis` (1-d): (codes - zero_point) * scale in float32, the subtraction exact in
    int32."""
    codes = np.asarray(codes)
    scale, zero_point = _along(axis, codes.ndim, scale, zero_point)
    return (codes.astype(np.int32) - zero_point.astype(np.int32)).astype(np.float32) * scale


def _along(axis: int, ndim: int, *arrays: np.ndarray) -> list[np.ndarray]:
    """Per-tensor `arrays` (one value each, 0-d or not: onnxruntime reads a 1-element scale as
    per tensor) as scalars; 1-d ones shaped to broadcast along `axis` of a tensor of rank
    `ndim`."""
    if all(array.size == 1 for array in arrays):
        return [array.reshape(()) for array in arrays]
    if not -ndim <= axis < ndim:
        raise ArgumentError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    shape = [1] * ndim
    shape[axis] = -1
    return [array.reshape(shape) for array in arrays]


def _check_dtype(dtype) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
        raise ArgumentError(f"quantized dtype must be uint8 or int8, got {dtype}")
    return dtype
