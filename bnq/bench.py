"""Timings returned as frozen dataclasses (the CLI renders them).

`bench_models` times whole models per backend and thread count: warm-up rounds, then rounds in
which every model runs once, alternately, so that drift of the machine hits all alike; it
reports the median and 90th percentile latency, throughput, and speed-ups against the first model.

`bench_kernel` times bnq's quantized BN+ReLU kernel against the ways one can run the same op
elsewhere, on the same random data: a naive NumPy float formula, onnxruntime's
DequantizeLinear -> BatchNormalization -> Relu -> QuantizeLinear subgraph, onnxruntime running
bnq's `QLinearBatchNormRelu` function body, and PyTorch's `quantized::batch_norm2d_relu` when
torch is importable. It first checks that they agree: the largest output-code difference of
each path against codes computed apart from every timed path (PyTorch's when torch is
importable, else a lookup in the exact C x 256 table of `bnq.kernels.build_table`, which bnq's
kernel replaces by arithmetic on large inputs); then it times them interleaved round by round
so that machine noise hits every path alike.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnq import ops
from bnq.errors import ArgumentError
from bnq.kernels import BnReluPlan, quantized_batch_norm_relu
from bnq.limits import check_size
from bnq.machine import Machine, describe
from bnq.ops import DOMAIN
from bnq.qops import MIN_OPSET, OP_TYPE
from bnq.runtime import make_runner, ort_session


@dataclass(frozen=True)
class PathTiming:
    name: str
    median_ms: float
    p90_ms: float
    speedup: float          # reference median / this median: > 1 is faster than the reference
    max_code_diff: int      # largest |output code - exact code| (torch's, else the table's)


@dataclass(frozen=True)
class KernelBench:
    shape: tuple[int, ...]
    threads: int
    repeats: int
    reference: str          # "torch", or "numpy-float" when torch is not importable
    paths: tuple[PathTiming, ...]


def _random_case(shape, rng):
    channels = shape[1]
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    params = dict(
        x_scale=float(np.float32(rng.uniform(0.01, 0.05))), x_zero_point=int(rng.integers(0, 256)),
        weight=rng.normal(1.0, 0.3, channels).astype(np.float32),
        bias=rng.normal(0.0, 0.5, channels).astype(np.float32),
        running_mean=rng.normal(0.0, 0.5, channels).astype(np.float32),
        running_var=rng.uniform(0.2, 2.0, channels).astype(np.float32),
        eps=1e-5,
        y_scale=float(np.float32(rng.uniform(0.01, 0.05))), y_zero_point=int(rng.integers(0, 64)))
    return x, params


def _numpy_float(x, p):
    """The textbook float32 formula, five passes over the data (the naive baseline)."""
    view = (1, -1) + (1,) * (x.ndim - 2)
    alpha = p["weight"] / np.sqrt(p["running_var"] + np.float32(p["eps"]))
    beta = p["bias"] - p["running_mean"] * alpha
    xf = (x.astype(np.float32) - np.float32(p["x_zero_point"])) * np.float32(p["x_scale"])
    y = np.rint((xf * alpha.reshape(view) + beta.reshape(view)) / np.float32(p["y_scale"]))
    return np.clip(y + p["y_zero_point"], p["y_zero_point"], 255).astype(np.uint8)


def _ort_model(p, rank, fused: bool) -> onnx.ModelProto:
    u8 = TensorProto.UINT8
    inits = [numpy_helper.from_array(np.asarray(value, dtype), name) for name, value, dtype in (
        ("x_scale", p["x_scale"], np.float32), ("x_zero_point", p["x_zero_point"], np.uint8),
        ("weight", p["weight"], np.float32), ("bias", p["bias"], np.float32),
        ("mean", p["running_mean"], np.float32), ("var", p["running_var"], np.float32),
        ("y_scale", p["y_scale"], np.float32), ("y_zero_point", p["y_zero_point"], np.uint8))]
    if fused:
        nodes = [helper.make_node(OP_TYPE, ["X", "x_scale", "x_zero_point", "weight", "bias",
                                            "mean", "var", "y_scale", "y_zero_point"], ["Y"],
                                  domain=DOMAIN, epsilon=p["eps"])]
    else:
        nodes = [
            helper.make_node("DequantizeLinear", ["X", "x_scale", "x_zero_point"], ["xf"]),
            helper.make_node("BatchNormalization", ["xf", "weight", "bias", "mean", "var"],
                             ["bn"], epsilon=p["eps"]),
            helper.make_node("Relu", ["bn"], ["relu"]),
            helper.make_node("QuantizeLinear", ["relu", "y_scale", "y_zero_point"], ["Y"]),
        ]
    dims = [f"d{i}" for i in range(rank)]
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("X", u8, dims)],
                              [helper.make_tensor_value_info("Y", u8, dims)], inits)
    imports = [helper.make_opsetid("", MIN_OPSET)] + ([helper.make_opsetid(DOMAIN, 1)] if fused
                                                      else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 9
    return ops.attach_functions(model)  # the body bnq writes into models for these parameters


def _ort_runner(model: onnx.ModelProto, threads: int):
    session = ort_session(model, threads, spin=False)  # its idle threads would slow the others
    return lambda x: session.run(None, {"X": x})[0]


def _torch_runner(p, rank, threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    op = {3: torch.ops.quantized.batch_norm1d_relu, 4: torch.ops.quantized.batch_norm2d_relu,
          5: torch.ops.quantized.batch_norm3d_relu}[rank]
    tensors = [torch.from_numpy(np.asarray(p[k], np.float32))
               for k in ("weight", "bias", "running_mean", "running_var")]

    def run(x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), p["x_scale"],
                                                         p["x_zero_point"])
            return op(qx, *tensors, p["eps"], p["y_scale"], p["y_zero_point"])
    return run, lambda y: y.int_repr().contiguous().numpy()


KERNEL_BYTES_PER_ELEMENT = 16  # uint8 input, three float32 temporaries, five uint8 outputs


def bench_kernel(shape=(32, 64, 56, 56), threads=1, repeats=15, seed=0) -> KernelBench:
    """Median and p90 wall time of each path on one random uint8 tensor of `shape`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4, 5) or min(shape) < 1:
        raise ArgumentError(f"shape: expected 3 to 5 positive dimensions (N, C, ...), got {shape}")
    if threads < 1 or repeats < 1:
        raise ArgumentError(f"threads, repeats: expected >= 1, got {threads}, {repeats}")
    # the input, the float32 temporaries of the naive formula and every path's output
    check_size(math.prod(shape) * KERNEL_BYTES_PER_ELEMENT, f"bench --kernel on shape {list(shape)}",
               ArgumentError, "use a smaller shape")
    rng = np.random.default_rng(seed)
    x, p = _random_case(shape, rng)
    params = [p[k] for k in ("x_scale", "x_zero_point", "weight", "bias", "running_mean",
                             "running_var", "eps", "y_scale", "y_zero_point")]
    plan = BnReluPlan(*params)
    plan(x), plan(x)  # a plan's second large input plans its fast path
    paths = {"bnq": (lambda a: plan(a, threads), None),
             # the one-call function, parameters seen before (its plan cache) and never seen
             "bnq-one-call": (lambda a: quantized_batch_norm_relu(a, *params, threads=threads),
                              None),
             "bnq-first-call": (lambda a: BnReluPlan(*params)(a, threads), None),
             "numpy-float": (lambda a: _numpy_float(a, p), None),
             "onnxruntime-qdq": (_ort_runner(_ort_model(p, len(shape), fused=False), threads), None),
             "onnxruntime-bnq-function": (_ort_runner(_ort_model(p, len(shape), fused=True),
                                                      threads), None)}
    torch_path = _torch_runner(p, len(shape), threads)
    if torch_path is not None:
        paths["torch"] = torch_path
    reference = "torch" if torch_path is not None else "numpy-float"

    outputs = {name: to_numpy(run(x)) if to_numpy else run(x)
               for name, (run, to_numpy) in paths.items()}
    channels = np.arange(shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    expected = outputs["torch"] if torch_path is not None else plan.table[channels, x]
    diffs = {name: int(np.abs(y.astype(np.int16) - expected.astype(np.int16)).max())
             for name, y in outputs.items()}

    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name, (run, _) in paths.items():
            start = time.perf_counter()
            run(x)
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return KernelBench(shape, threads, repeats, reference, tuple(
        PathTiming(name, medians[name], float(np.percentile(times[name], 90)),
                   medians[reference] / medians[name], diffs[name]) for name in paths))


@dataclass(frozen=True)
class ModelTiming:
    model: str
    backend: str
    batch_size: int
    threads: int
    median_ms: float
    p90_ms: float
    throughput: float       # samples per second at the median
    speedup: float          # the first model's median / this median, same backend and threads


@dataclass(frozen=True)
class ModelBench:
    machine: Machine
    warmup: int
    repeats: int
    results: tuple[ModelTiming, ...]


def bench_models(models: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], *,
                 backends=("onnxruntime",), threads=(1,), warmup: int = 5,
                 repeats: int = 30) -> ModelBench:
    """Latency of each model on each backend and thread count, on the same `feeds`.

    The models run alternately, round by round, so that drift of the machine hits all alike;
    speed-ups are against the first model."""
    if warmup < 0 or repeats < 1:
        raise ArgumentError(f"warmup, repeats: expected >= 0 and >= 1, got {warmup}, {repeats}")
    batch_size = len(next(iter(feeds.values())))
    results = []
    for backend in backends:
        for count in threads:
            runners = {label: make_runner(model, backend, count) for label, model in models.items()}
            times = {label: [] for label in runners}
            for round_index in range(warmup + repeats):
                for label, run in runners.items():
                    start = time.perf_counter()
                    run(feeds)
                    if round_index >= warmup:
                        times[label].append((time.perf_counter() - start) * 1e3)
            first = float(np.median(times[next(iter(times))]))
            for label, samples in times.items():
                median = float(np.median(samples))
                results.append(ModelTiming(label, backend, batch_size, count, median,
                                           float(np.percentile(samples, 90)),
                                           batch_size / median * 1e3, first / median))
    return ModelBench(describe(), warmup, repeats, tuple(results))
