"""Bias correction: the mean output shift of the first Conv (whose quantized input is the float
input through its quantizer, so the shift measured is the shift the quantized model has) is
removed down to half a bias step per channel, whether the Conv had a bias or gets one; the model
passes the checker, keeps its formats, and onnxruntime still runs every layer as an integer op."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import pytest
from graphs import make_model, run_ort
from test_calibrate import optimized_graph
from onnx import helper, numpy_helper

from bnq import bias_correction
from bnq.bias_correction import correct_biases
from bnq.execution import run
from bnq.calibrate import calibrate
from bnq.data import SampleData, model_inputs
from bnq.graph import op_counts, producers, with_outputs
from bnq.machine import IntegerFormats

FORMATS = IntegerFormats("uint8", "int8", True, "tests")


def conv_relu_model(rng, first_bias=True):
    """Conv 3x3 (8 -> 16) -> Relu -> Conv 1x1 (16 -> 4): weights with a large mean, so that
    7-bit rounding shifts the output means; the first Conv without a bias if not `first_bias`."""
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2 + 0.05).astype(np.float32)
    w2 = (rng.standard_normal((4, 16, 1, 1)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"][:3 if first_bias else 2], ["c1"],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"])]
    return make_model(nodes, [("x", ["N", 8, 10, 10])], [("y", ["N", 4, 10, 10])], opset=19,
                      initializers={"w1": w1, "b1": np.zeros(16, np.float32), "w2": w2,
                                    "b2": np.zeros(4, np.float32)})


def first_conv_shift(model, reference, x):
    """Per-channel mean of the first Conv's output, quantized model minus float model."""
    quantized = run_ort(with_outputs(model, ["c1"]), {"x": x})[-1]
    expected = run_ort(with_outputs(reference, ["c1"]), {"x": x})[-1]
    return (quantized - expected).mean(axis=tuple(a for a in range(expected.ndim) if a != 1))


def plain_and_corrected(tmp_path, model, x):
    """`model` calibrated on `x` without bias correction, then bias-corrected; the report."""
    np.savez(tmp_path / "calib.npz", x=x)
    data = SampleData(tmp_path / "calib.npz", model_inputs(model))
    plain, _ = calibrate(model, data, formats=FORMATS, weight_rounding=False,
                         bias_correction=False)
    [(corrected, report)] = correct_biases([plain], model, data.sample_shapes(),
                                           functools.partial(run, data=data, batch_size=16))
    onnx.checker.check_model(corrected, full_check=True)
    return plain, corrected, report


def assert_first_layer_corrected(plain, corrected, model, x):
    """The first layer's int32 bias is its old one (0 if it had none) minus the shift measured
    by running the quantized layer (its input is the model's, so the quantized model computes it
    as is), in bias steps, and the shift left is under half a step."""
    writers = producers(corrected.graph)
    layer = next(node for node in corrected.graph.node if node.output[0] == "c1")
    bias_scale, codes, old = (
        {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}.get(name, 0)
        for m, name in ((corrected, writers[layer.input[2]].input[1]),
                        (corrected, writers[layer.input[2]].input[0]),
                        (plain, writers[layer.input[2]].input[0])))
    before = first_conv_shift(plain, model, x)
    assert np.abs(before).max() > 4 * bias_scale.max()  # the shift was there
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, old - np.rint(before / bias_scale))
    after = first_conv_shift(corrected, model, x)
    np.testing.assert_array_less(np.abs(after), bias_scale / 2 + 1e-6 * np.abs(before).max())


@pytest.mark.parametrize("first_bias", [True, False], ids=["bias", "no bias"])
def test_first_conv_mean_shift_removed(tmp_path, first_bias):
    rng = np.random.default_rng(0)
    model = conv_relu_model(rng, first_bias)
    x = (rng.standard_normal((64, 8, 10, 10)) + 0.5).astype(np.float32)
    plain, corrected, report = plain_and_corrected(tmp_path, model, x)
    added = Counter(op_counts(corrected)) - Counter(op_counts(plain))
    assert added == ({} if first_bias else {"DequantizeLinear": 1})  # the new bias's
    assert report.layers == 2
    # onnxruntime folds the new bias into the first Conv's QLinearConv, as an existing one
    assert Counter(node.op_type for node in optimized_graph(corrected, tmp_path).node) == \
        Counter(node.op_type for node in optimized_graph(plain, tmp_path).node)
    assert_first_layer_corrected(plain, corrected, model, x)


# The first layer's geometry: the mean shift comes from the tap means of its input (the module
# docstring), which every stride, padding, dilation, grouping and rank changes.
GEOMETRIES = {
    "strided, dilated, asymmetric pads": ((8, 11, 10), (16, 8, 3, 3), {
        "strides": [2, 2], "pads": [2, 1, 0, 2], "dilations": [2, 2]}),
    "SAME_UPPER": ((8, 9, 10), (16, 8, 4, 4), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "SAME_LOWER": ((8, 9, 10), (16, 8, 4, 4), {"auto_pad": "SAME_LOWER", "strides": [3, 2]}),
    "VALID": ((8, 9, 10), (16, 8, 3, 2), {"auto_pad": "VALID", "strides": [2, 3]}),
    "grouped": ((8, 10, 10), (16, 4, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "depthwise": ((8, 10, 10), (16, 1, 3, 3), {"group": 8, "strides": [2, 2], "pads": [1, 0, 1, 0]}),
    "1-D": ((8, 12), (16, 8, 5), {"strides": [2], "pads": [2, 1]}),
    "3-D": ((8, 4, 5, 6), (16, 8, 3, 3, 3), {"pads": [1, 0, 1, 1, 0, 1]}),
    "Gemm": ((8,), (16, 8), {"transB": 1}),
    "Gemm, B not transposed": ((8,), (8, 16), {}),
}


@pytest.mark.parametrize("apart", [False, True], ids=["axes at once", "axes apart"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_shift_removed_whatever_the_geometry(tmp_path, monkeypatch, geometry, apart):
    """Also with every spatial axis contracted apart, as for large images."""
    if apart:
        monkeypatch.setattr(bias_correction, "_JOINT_ENTRIES", 1)
    rng = np.random.default_rng(2)
    sample, weight_shape, attributes = GEOMETRIES[geometry]
    op = "Gemm" if len(sample) == 1 else "Conv"
    w1 = (rng.standard_normal(weight_shape) * 0.2 + 0.05).astype(np.float32)
    nodes = [helper.make_node(op, ["x", "w1", "b1"], ["c1"], **attributes),
             helper.make_node("Relu", ["c1"], ["y"])]
    spatial = [f"out{axis}" for axis in range(len(sample) - 1)]
    model = make_model(nodes, [("x", ["N", *sample])], [("y", ["N", 16, *spatial])], opset=19,
                       initializers={"w1": w1, "b1": np.zeros(16, np.float32)})
    x = (rng.standard_normal((64, *sample)) + 0.5).astype(np.float32)
    plain, corrected, report = plain_and_corrected(tmp_path, model, x)
    assert report.layers == 1
    assert_first_layer_corrected(plain, corrected, model, x)


def test_a_layer_with_too_long_an_axis_is_left_as_it_is(tmp_path, monkeypatch):
    """Its codes' int32 tap sums could overflow: no correction, rather than a wrong one."""
    monkeypatch.setattr(bias_correction, "_LONGEST_AXIS", 9)  # the 10 x 10 inputs exceed it
    rng = np.random.default_rng(3)
    model = conv_relu_model(rng)
    x = (rng.standard_normal((16, 8, 10, 10)) + 0.5).astype(np.float32)
    plain, corrected, report = plain_and_corrected(tmp_path, model, x)
    assert report.layers == 0
    assert corrected.SerializeToString() == plain.SerializeToString()


def test_calibrate_reports_bias_correction(tmp_path):
    rng = np.random.default_rng(1)
    model = conv_relu_model(rng)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8, 10, 10)).astype(np.float32))
    data = SampleData(tmp_path / "calib.npz", model_inputs(model))
    _, on = calibrate(model, data, formats=FORMATS)
    _, off = calibrate(model, data, formats=FORMATS, bias_correction=False)
    assert on.bias_correction.layers == 2 and on.bias_correction.max_abs_shift > 0
    assert off.bias_correction is None
