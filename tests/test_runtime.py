"""The backends: the ONNX conformance node tests for the standard ops bnq's function bodies and
quantized models use, run through bnq's numpy backend; backend selection and feed checks."""

from __future__ import annotations

import glob
import os
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnq import ArgumentError, DataError, load_model, run_model

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")

with warnings.catch_warnings():  # generating the test list warns about overflowing casts
    warnings.simplefilter("ignore")
    from onnx.backend.test.loader import load_model_tests

    CASES = [case for case in load_model_tests(kind="node")
             if case.name.startswith(("test_batchnorm", "test_relu", "test_quantizelinear",
                                      "test_dequantizelinear"))]

# Every exclusion is a case outside what bnq quantizes to, which onnx's reference evaluator runs
# on its own terms (and numpy has no such dtypes): bnq's models use 8-bit integer codes only.
EXCLUDED = ("e4m3fn", "e5m2", "float4e2m1", "uint4", "int4", "uint2", "int2",  # non-numpy types
            "training_mode")  # training-mode BatchNormalization; bnq refuses to fuse it anyway


def read_tensors(folder: str, prefix: str) -> list[np.ndarray]:
    tensors = []
    for path in sorted(glob.glob(os.path.join(folder, f"{prefix}_*.pb"))):
        tensor = onnx.TensorProto()
        with open(path, "rb") as handle:
            tensor.ParseFromString(handle.read())
        tensors.append(numpy_helper.to_array(tensor))
    return tensors


def _array(value) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def model_and_data(case):
    """The case's model and its (inputs, expected outputs) sets, from memory or from disk."""
    if case.model is not None:
        return case.model, [([_array(x) for x in inputs], [_array(y) for y in outputs])
                            for inputs, outputs in case.data_sets]
    folders = sorted(glob.glob(os.path.join(case.model_dir, "test_data_set_*")))
    return (onnx.load(os.path.join(case.model_dir, "model.onnx")),
            [(read_tensors(f, "input"), read_tensors(f, "output")) for f in folders])


@pytest.mark.parametrize("case", [c for c in CASES if not any(x in c.name for x in EXCLUDED)],
                         ids=lambda c: c.name)
def test_onnx_conformance_through_the_numpy_backend(case):
    model, data_sets = model_and_data(case)
    names = [value.name for value in model.graph.input]
    assert data_sets
    for inputs, expected_outputs in data_sets:
        outputs = run_model(model, dict(zip(names, inputs, strict=True)), backend="numpy")
        for expected, actual in zip(expected_outputs, outputs, strict=True):
            assert actual.dtype == expected.dtype
            if expected.dtype.kind == "f":
                np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_array_equal(actual, expected)


def test_conformance_cases_were_found():
    kinds = {c.name.split("_")[1] for c in CASES}
    assert {"batchnorm", "relu", "quantizelinear", "dequantizelinear"} <= kinds


def test_backends_agree_on_the_fused_sample(tmp_path):
    from bnq import fuse, save_model

    fused, _ = fuse(load_model(os.path.join(SAMPLES, "digits_cnn.onnx")))
    save_model(fused, tmp_path / "fused.onnx")
    with np.load(os.path.join(SAMPLES, "eval.npz"), allow_pickle=False) as data:
        feeds = {"input": data["input"][:16]}
    a = run_model(tmp_path / "fused.onnx", feeds, backend="numpy")[0]
    b = run_model(fused, feeds, backend="onnxruntime", threads=1)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_backend_and_feeds():
    model = load_model(os.path.join(SAMPLES, "digits_cnn.onnx"))
    with pytest.raises(ArgumentError, match="unknown backend"):
        run_model(model, {}, backend="tensorflow")
    with pytest.raises(DataError, match="no data for model input 'input'"):
        run_model(model, {}, backend="onnxruntime")
    with pytest.raises(DataError, match="'x' is not an input"):
        run_model(model, {"input": np.zeros((1, 1, 8, 8), np.float32), "x": np.zeros(1)})


def test_numpy_backend_runs_a_quantized_model_code_for_code_like_onnxruntime():
    """The numpy backend (onnx's reference evaluator, bnq's kernel for the fused nodes) on a
    quantized model: every fused node's output codes equal onnxruntime's (its function body),
    and the logits agree to float rounding."""
    from bnq.calibrate import calibrate
    from bnq.data import SampleData, model_inputs
    from bnq.graph import with_outputs
    from bnq.machine import IntegerFormats

    model = load_model(os.path.join(SAMPLES, "digits_cnn.onnx"))
    data = SampleData(os.path.join(SAMPLES, "calib.npz"), model_inputs(model))
    quantized, _ = calibrate(model, data, formats=IntegerFormats("uint8", "int8", True, ""),
                             num_samples=64)
    codes = [n.output[0] for n in quantized.graph.node if n.op_type == "QLinearBatchNormRelu"]
    probe = with_outputs(quantized, codes)
    with np.load(os.path.join(SAMPLES, "eval.npz"), allow_pickle=False) as samples:
        feeds = {"input": samples["input"][:32]}
    numpy_out = run_model(probe, feeds, backend="numpy")
    ort_out = run_model(probe, feeds, backend="onnxruntime", threads=1)
    assert len(codes) == 6 and len(numpy_out) == 1 + len(codes)
    for got, expected in zip(numpy_out[1:], ort_out[1:], strict=True):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(numpy_out[0], ort_out[0], rtol=1e-5, atol=1e-5)
