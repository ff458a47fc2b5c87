"""bnq: fuse, calibrate and run quantized BatchNorm + ReLU CNNs, bit-exact with PyTorch.

The Python API is what the `bnq` command runs:

    model = bnq.load_model("model.onnx")
    fused, report = bnq.fuse(model)
    quantized, report = bnq.calibrate(model, bnq.SampleData("calib.npz", bnq.model_inputs(model)),
                                      formats=bnq.default_formats())
    outputs = bnq.run_model(quantized, {"input": x}, backend="numpy")
    y = bnq.quantized_batch_norm_relu(x_q, x_scale, x_zero_point, weight, bias, mean, var, eps,
                                      y_scale, y_zero_point)
"""

from bnq.bench import bench_kernel, bench_models
from bnq.calibrate import CalibrationReport, calibrate
from bnq.data import SampleData, model_inputs
from bnq.errors import ArgumentError, BnqError, DataError, ModelError
from bnq.evaluate import EvaluationReport, evaluate
from bnq.fusion import FuseReport, fuse
from bnq.io import load_model, save_model
from bnq.kernels import BnReluPlan, quantized_batch_norm_relu
from bnq.machine import IntegerFormats, default_formats
from bnq.runtime import make_runner, run_model

__all__ = [
    "ArgumentError", "BnReluPlan", "BnqError", "CalibrationReport", "DataError",
    "EvaluationReport", "FuseReport", "IntegerFormats", "ModelError", "SampleData",
    "bench_kernel", "bench_models", "calibrate", "default_formats", "evaluate", "fuse",
    "load_model", "make_runner", "model_inputs", "quantized_batch_norm_relu", "run_model",
    "save_model",
]
