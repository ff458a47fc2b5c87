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

import sys
from importlib import import_module
from types import ModuleType

# Where each public name lives; imported on first use, so that `import bnq` (and `bnq --help`)
# does not pay for numpy, onnx and onnxruntime (0.4 s) before a command needs them.
_API = {
    "bench_kernel": "bnq.bench", "bench_models": "bnq.bench",
    "CalibrationReport": "bnq.calibrate", "calibrate": "bnq.calibrate",
    "SampleData": "bnq.data", "model_inputs": "bnq.data",
    "ArgumentError": "bnq.errors", "BnqError": "bnq.errors", "DataError": "bnq.errors",
    "ModelError": "bnq.errors",
    "EvaluationReport": "bnq.evaluate", "evaluate": "bnq.evaluate",
    "FuseReport": "bnq.fusion", "fuse": "bnq.fusion",
    "load_model": "bnq.io", "save_model": "bnq.io",
    "BnReluPlan": "bnq.kernels", "quantized_batch_norm_relu": "bnq.kernels",
    "IntegerFormats": "bnq.machine", "default_formats": "bnq.machine",
    "make_runner": "bnq.runtime", "run_model": "bnq.runtime",
}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'bnq' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value
    return value


class _Package(ModuleType):
    """`bnq.calibrate` and `bnq.evaluate` stay the functions: importing the submodules of the
    same names (the CLI does, and `from bnq.calibrate import ...`) makes Python bind each
    submodule on its parent package, over the function."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, ModuleType) and _API.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = [
    "ArgumentError", "BnReluPlan", "BnqError", "CalibrationReport", "DataError",
    "EvaluationReport", "FuseReport", "IntegerFormats", "ModelError", "SampleData",
    "bench_kernel", "bench_models", "calibrate", "default_formats", "evaluate", "fuse",
    "load_model", "make_runner", "model_inputs", "quantized_batch_norm_relu", "run_model",
    "save_model",
]
