"""bnq.equalization: cross-layer equalization of consecutive Conv / Gemm layers, checked by the
full checker, onnxruntime's outputs against the original model, and the weight ranges it
matches; on torch-exported models and on hand-made graphs for the cases it must handle (grouped
and depthwise convolutions, no bias, shared weights, chains) and those it must leave."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import make_model, max_relative_error, random_feeds, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from bnq.calibrate import calibrate
from bnq.data import SampleData, model_inputs
from bnq.equalization import equalize_layers
from bnq.fusion import fuse
from bnq.graph import constant_values, op_counts
from bnq.machine import IntegerFormats
from bnq.rewrites import fold_average_pool

MODELS = Path(__file__).resolve().parent / "models"
FORMATS = IntegerFormats("uint8", "int8", True, "tests")


def assert_exact(model, equalized):
    """The equalized model passes the full checker, keeps every op and computes what the
    original does, to float rounding."""
    onnx.checker.check_model(equalized, full_check=True)
    assert op_counts(equalized) == op_counts(model)
    feeds = random_feeds(model, np.random.default_rng(1))
    for expected, actual in zip(run_ort(model, feeds), run_ort(equalized, feeds), strict=True):
        assert max_relative_error(expected, actual) < 1e-5


def weights_of(model):
    """Node label -> (weight, bias or None) of every Conv / Gemm, as arrays."""
    constants = constant_values(model)
    return {node.name or node.output[0]: (constants[node.input[1]],
                                          constants[node.input[2]] if len(node.input) > 2 else None)
            for node in model.graph.node if node.op_type in ("Conv", "Gemm")}


def output_ranges(weight, op="Conv", trans_b=1):
    rows = weight if op == "Conv" or trans_b else weight.T
    return np.abs(rows.reshape(len(rows), -1)).max(axis=1)


def input_ranges(weight, groups=1, op="Conv", trans_b=1):
    """max |W[:, c]| over the output channels that read input channel c."""
    if op == "Gemm":
        return np.abs(weight).max(axis=0 if trans_b else 1)
    per_group = weight.reshape(groups, len(weight) // groups, weight.shape[1], -1)
    return np.abs(per_group).max(axis=(1, 3)).reshape(-1)


@pytest.mark.parametrize("name, pairs", [
    ("conv_bn_relu_stem", 4), ("preact_residual", 2), ("tiny_densenet", 4), ("bn1d", 1),
    ("tiny_mobilenet", 0), ("densenet_block", 0)])
def test_torch_exported_models_equalize_exactly(name, pairs):
    """conv_bn_relu_stem: a chain Conv -> Relu -> Conv -> Relu -> Conv 1x1 -> grouped Conv ->
    depthwise Conv; preact_residual and tiny_densenet: Conv -> (BN folded) Relu -> Conv inside
    blocks; bn1d: Gemm -> Relu -> Gemm. tiny_mobilenet has ReLU6 (Clip) or a residual Add
    between its convolutions, densenet_block BN-ReLU nodes: nothing to equalize."""
    fused, _ = fuse(onnx.load(MODELS / f"{name}.onnx"))
    fused, _ = fold_average_pool(fused)
    equalized, report = equalize_layers(fused)
    assert len(report.pairs) == pairs
    assert_exact(fused, equalized)
    if not pairs:
        assert equalized.SerializeToString() == fused.SerializeToString()


def test_a_torch_chain_with_every_op_between_converges_to_equal_ranges(torch, tmp_path):
    """A model exported from PyTorch as NOTES section 4 says users have them (legacy exporter,
    opset 17, BatchNorm kept): Conv -> BN -> Relu -> Conv 1x1 -> BN -> LeakyRelu -> MaxPool ->
    depthwise Conv (2 outputs per channel) -> PReLU -> grouped Conv -> Relu -> pooling ->
    Linear -> Relu -> Linear, with channel scales spread over four decades. After equalization
    every pair's ranges match, r1[c] = r2[c] (the chain took more than one sweep), and the
    model computes what it did."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.PReLU(16),
        nn.Conv2d(16, 8, 3, padding=1, groups=4, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 5))
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                spread = 10.0 ** rng.uniform(-2, 2, module.weight.shape[0])
                module.weight.mul_(torch.from_numpy(spread.astype(np.float32)).reshape(
                    -1, *[1] * (module.weight.dim() - 1)))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), torch.randn(2, 3, 8, 8), buffer, opset_version=17,
                      dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "N"}})
    fused, _ = fuse(onnx.load_from_string(buffer.getvalue()))
    equalized, report = equalize_layers(fused)
    assert [pair[0].split("/")[-2:] for pair in report.pairs] == [
        ["0", "Conv"], ["3", "Conv"], ["7", "Conv"], ["13", "Gemm"]]
    assert report.sweeps > 2
    assert_exact(fused, equalized)
    groups = {"0": 1, "3": 1, "7": 8, "9": 4, "13": 1, "15": 1}
    before, after = weights_of(fused), weights_of(equalized)
    labels = list(after)
    for first, second in report.pairs:
        layer = second.split("/")[-2]
        op = "Gemm" if first.endswith("Gemm") else "Conv"
        r1 = output_ranges(after[first][0], op)
        r2 = input_ranges(after[second][0], groups[layer], op)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)
        r1, r2 = output_ranges(before[first][0], op), input_ranges(before[second][0],
                                                                    groups[layer], op)
        assert np.max(r1 / r2) / np.min(r1 / r2) > 100  # far from matched before
    assert labels == list(before)


def conv_pair(*, second=None, second_weight=(4, 6, 3, 3), between=("Relu",), bias=True,
              extra=(), outputs=(), first_weight=(6, 3, 3, 3), constants_as_inputs=()):
    """x (3 channels) -> Conv 3x3 -> `between` ops -> Conv 3x3 (`second` attributes) -> y, with
    weights whose rows are spread over three decades; `extra` nodes and `outputs` added."""
    rng = np.random.default_rng(0)
    spread = 10.0 ** rng.uniform(-1.5, 1.5, (first_weight[0], 1, 1, 1))
    w1 = rng.standard_normal(first_weight) * spread
    initializers = {"w1": w1.astype(np.float32),
                    "w2": rng.standard_normal(second_weight).astype(np.float32),
                    "b1": rng.standard_normal(first_weight[0]).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"] if bias else ["x", "w1"], ["c0"],
                              pads=[1, 1, 1, 1])]
    for index, op in enumerate(between):
        nodes.append(helper.make_node(op, [f"c{index}"], [f"c{index + 1}"]))
    nodes.append(helper.make_node("Conv", [f"c{len(between)}", "w2"], ["y"], pads=[1, 1, 1, 1],
                                  **(second or {})))
    nodes += list(extra)
    graph_inputs = [("x", ["N", 3, 8, 8])] + [(name, list(initializers[name].shape))
                                              for name in constants_as_inputs]
    model = make_model(nodes, graph_inputs,
                       [("y", ["N", second_weight[0], 8, 8])] + list(outputs), opset=19,
                       initializers={k: v for k, v in initializers.items() if bias or k != "b1"})
    return model


@pytest.mark.parametrize("groups, second_weight", [(1, (4, 6, 3, 3)), (2, (4, 3, 3, 3)),
                                                   (6, (12, 1, 3, 3))],
                         ids=["dense", "2 groups", "depthwise, 2 outputs per channel"])
def test_grouped_and_depthwise_second_layers_scale_the_inputs_of_their_groups(groups,
                                                                               second_weight):
    """A depthwise Conv's input channel c is its output channels 2c, 2c + 1 (multiplier 2); in a
    Conv of g groups, input c is column c mod (C / g) of group c div (C / g)."""
    model = conv_pair(second={"group": groups}, second_weight=second_weight)
    equalized, report = equalize_layers(model)
    assert report.pairs == (("Conv(c0)", "Conv(y)"),) and report.sweeps == 2
    assert_exact(model, equalized)
    after = weights_of(equalized)
    np.testing.assert_allclose(output_ranges(after["c0"][0]),
                               input_ranges(after["y"][0], groups), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(spatial=st.integers(1, 3), channels_per_group=st.integers(1, 3), groups=st.integers(1, 4),
       multiplier=st.integers(1, 3), between=st.lists(st.sampled_from(
           ["Relu", "LeakyRelu", "MaxPool"]), max_size=2), bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_any_pair_of_convolutions_stays_exact_and_matches_its_ranges(
        spatial, channels_per_group, groups, multiplier, between, bias, seed):
    """Conv 1-D, 2-D or 3-D (C = groups x channels_per_group outputs, rows spread over four
    decades) -> Relu / LeakyRelu / MaxPool -> Conv of `groups` groups, `multiplier` outputs per
    group input: exact, and r1[c] = r2[c] for every channel."""
    rng = np.random.default_rng(seed)
    c = groups * channels_per_group
    kernel = (3,) * spatial
    w1 = rng.standard_normal((c, 2, *kernel)) * 10.0 ** rng.uniform(-2, 2, (c,) + (1,) * (
        spatial + 1))
    initializers = {"w1": w1.astype(np.float32),
                    "w2": rng.standard_normal((groups * multiplier, channels_per_group, *kernel))
                    .astype(np.float32)}
    if bias:
        initializers["b1"] = rng.standard_normal(c).astype(np.float32)
    pads = [1] * (2 * spatial)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"] if bias else ["x", "w1"], ["t0"],
                              pads=pads)]
    for index, op in enumerate(between):
        options = ({"kernel_shape": [2] * spatial, "pads": [1] * (2 * spatial)}
                   if op == "MaxPool" else {})
        nodes.append(helper.make_node(op, [f"t{index}"], [f"t{index + 1}"], **options))
    nodes.append(helper.make_node("Conv", [f"t{len(between)}", "w2"], ["y"], pads=pads,
                                  group=groups))
    model = make_model(nodes, [("x", ["N", 2, *[5] * spatial])],
                       [("y", ["N", groups * multiplier, *["s"] * spatial])], opset=19,
                       initializers=initializers)
    equalized, report = equalize_layers(model)
    assert len(report.pairs) == 1
    assert_exact(model, equalized)
    after = weights_of(equalized)
    np.testing.assert_allclose(output_ranges(after["t0"][0]), input_ranges(after["y"][0], groups),
                               rtol=1e-6)


def test_a_first_layer_without_bias_is_equalized_and_gets_none():
    model = conv_pair(bias=False, between=())
    equalized, report = equalize_layers(model)
    assert len(report.pairs) == 1
    assert_exact(model, equalized)
    assert len(equalized.graph.node[0].input) == 2
    assert {t.name for t in equalized.graph.initializer} == {"w1_equalized", "w2_equalized"}


def test_a_shared_weight_is_copied_and_its_other_reader_keeps_it():
    """w1 is also the weight of a Conv on another branch: that Conv still reads w1, unchanged."""
    other = helper.make_node("Conv", ["x", "w1"], ["z"], pads=[1, 1, 1, 1])
    model = conv_pair(extra=[other], outputs=[("z", ["N", 6, 8, 8])])
    equalized, report = equalize_layers(model)
    assert len(report.pairs) == 1
    assert_exact(model, equalized)
    assert equalized.graph.node[-1].input[1] == "w1"
    np.testing.assert_array_equal(constant_values(equalized)["w1"], constant_values(model)["w1"])
    assert equalized.graph.node[0].input[1] == "w1_equalized"


def test_a_dead_channel_keeps_its_scale():
    """A first-layer row of zeros (r1 = 0) gives no scale to match: s = 1, nothing infinite."""
    model = conv_pair()
    w1 = constant_values(model)["w1"].copy()
    w1[2] = 0
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    equalized, report = equalize_layers(model)
    assert len(report.pairs) == 1
    assert_exact(model, equalized)
    after = weights_of(equalized)
    assert np.all(np.isfinite(after["y"][0])) and not after["c0"][0][2].any()
    np.testing.assert_array_equal(after["y"][0][:, 2], constant_values(model)["w2"][:, 2])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_pairs_scale_the_output_columns_and_input_rows(trans_b):
    """Gemm -> Relu -> Gemm with B stored [in, out] (transB=0) or [out, in], C of shape (1, O)."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((6, 8)) * 10.0 ** rng.uniform(-1.5, 1.5, 8)
    w2 = rng.standard_normal((8, 3))
    initializers = {"w1": (w1.T if trans_b else w1).astype(np.float32),
                    "b1": rng.standard_normal((1, 8)).astype(np.float32),
                    "w2": (w2.T if trans_b else w2).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], transB=trans_b, alpha=0.5),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=trans_b)]
    model = make_model(nodes, [("x", ["N", 6])], [("y", ["N", 3])], opset=19,
                       initializers=initializers)
    equalized, report = equalize_layers(model)
    assert len(report.pairs) == 1
    assert_exact(model, equalized)
    after = weights_of(equalized)
    np.testing.assert_allclose(output_ranges(after["g"][0], "Gemm", trans_b),
                               input_ranges(after["y"][0], op="Gemm", trans_b=trans_b),
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"extra": [helper.make_node("Sigmoid", ["c1"], ["s"])], "outputs": [("s", ["N", 6, 8, 8])]},
    {"outputs": [("c1", ["N", 6, 8, 8])]},
    {"between": ("Relu", "Sigmoid")},
    {"constants_as_inputs": ("w1",)},
], ids=["intermediate read twice", "intermediate is a graph output", "Sigmoid between",
        "first weight is a graph input"])
def test_pairs_that_are_not_exact_are_left(kwargs):
    model = conv_pair(**kwargs)
    equalized, report = equalize_layers(model)
    assert report.pairs == () and report.sweeps == 0
    assert equalized.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("op", ["Clip", "Add"])
def test_relu6_and_add_between_are_left(op):
    """Clip(0, 6) clips channel c at 6 s[c] once scaled; Add of a constant adds it unscaled."""
    rng = np.random.default_rng(3)
    initializers = {"w1": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
                    "w2": rng.standard_normal((4, 6, 3, 3)).astype(np.float32),
                    "low": np.array(0, np.float32), "high": np.array(6, np.float32),
                    "shift": rng.standard_normal((1, 6, 1, 1)).astype(np.float32)}
    inputs = ["c", "low", "high"] if op == "Clip" else ["c", "shift"]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node(op, inputs, ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4, 8, 8])], opset=19,
                       initializers=initializers)
    equalized, report = equalize_layers(model)
    assert report.pairs == ()
    assert equalized.SerializeToString() == model.SerializeToString()


def test_calibrate_equalizes_on_request_and_reports_the_pairs(tmp_path):
    model = onnx.load(MODELS / "conv_bn_relu_stem.onnx")
    [spec] = model_inputs(model)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal(
        [d or 16 for d in spec.shape]).astype(np.float32))
    data = SampleData(tmp_path / "calib.npy", [spec])
    plain, off = calibrate(model, data, formats=FORMATS)
    equalized, on = calibrate(model, data, formats=FORMATS, equalize=True)
    assert off.equalization is None
    assert len(on.equalization.pairs) == 4 and on.equalization.sweeps > 2
    assert op_counts(equalized) == op_counts(plain)
    onnx.checker.check_model(equalized, full_check=True)
    rescaled = [t.name for t in on.tensors if t.role == "weight" and "_equalized" in t.name]
    assert len(rescaled) == 5  # the chain's five Conv layers
