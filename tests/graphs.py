"""Builders for graphs in the forms other converters emit, and helpers to run and compare models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bnq.graph import constant_values


def bn_params(rng: np.random.Generator, channels: int, prefix: str) -> dict[str, np.ndarray]:
    """Non-trivial BatchNormalization parameters (some negative gammas), keyed by tensor name."""
    return {
        f"{prefix}_scale": rng.uniform(-1.5, 1.5, channels).astype(np.float32),
        f"{prefix}_bias": rng.uniform(-1, 1, channels).astype(np.float32),
        f"{prefix}_mean": rng.uniform(-1, 1, channels).astype(np.float32),
        f"{prefix}_var": rng.uniform(0.2, 3, channels).astype(np.float32),
    }


def constant_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def make_model(nodes, inputs, outputs, *, opset: int, initializers=(), constants=None):
    """A model whose `constants` (name -> array) are Constant nodes in front of the graph, as
    Paddle and TensorFlow converters write them, and `initializers` are initializers."""
    constant_nodes = [constant_node(name, array) for name, array in (constants or {}).items()]
    graph = helper.make_graph(
        constant_nodes + list(nodes), "converted",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [numpy_helper.from_array(array, name) for name, array in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8 if opset < 19 else 9)
    onnx.checker.check_model(model, full_check=True)
    return model


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, dynamic: int = 3) -> dict:
    """Standard-normal float32 data for every graph input, dynamic dims set to `dynamic`."""
    constants = constant_values(model)
    feeds = {}
    for value in model.graph.input:
        if value.name in constants:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else dynamic
                for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def max_relative_error(reference: np.ndarray, actual: np.ndarray) -> float:
    """max |reference - actual| relative to the largest magnitude of the reference."""
    scale = max(float(np.max(np.abs(reference))), 1e-12) if reference.size else 1.0
    return float(np.max(np.abs(reference - actual))) / scale if reference.size else 0.0
