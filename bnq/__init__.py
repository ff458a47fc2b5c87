"""bnq: fuse, calibrate and run quantized BatchNorm + ReLU CNNs, bit-exact with PyTorch.

The Python API is what the `bnq` command runs:

    model = bnq.load_model("model.onnx")
    fused, report = bnq.fuse(model)
    bnq.save_model(fused, "fused.onnx")
"""

from bnq.errors import ArgumentError, BnqError, DataError, ModelError
from bnq.fusion import FuseReport, fuse
from bnq.io import load_model, save_model

__all__ = [
    "ArgumentError", "BnqError", "DataError", "FuseReport", "ModelError",
    "fuse", "load_model", "save_model",
]
