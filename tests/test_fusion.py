"""Fusion: structure (op counts), the full ONNX checker, and outputs against the original model in
onnxruntime, on torch-exported models and on graphs in the forms other converters emit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import bn_params, make_model, max_relative_error, random_feeds, run_ort
from onnx import helper

from bnq import ModelError, fuse, load_model
from bnq.graph import op_counts

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "models"


def fuse_and_compare(model: onnx.ModelProto, seed: int = 0, feeds: dict | None = None):
    """Fuse `model`, run the full checker on the result, and compare outputs in onnxruntime."""
    fused, report = fuse(model)
    onnx.checker.check_model(fused, full_check=True)
    feeds = feeds if feeds is not None else random_feeds(model, np.random.default_rng(seed))
    for reference, actual in zip(run_ort(model, feeds), run_ort(fused, feeds), strict=True):
        assert reference.shape == actual.shape
        assert max_relative_error(reference, actual) <= 1e-5
    return fused, report


def outcomes(report) -> dict[str, int]:
    return {kind: report.count(kind) for kind in ("folded", "fused", "kept")}


def test_sample_model_every_batch_norm_is_folded_or_fused():
    model = load_model(ROOT / "samples" / "digits_cnn.onnx")
    with np.load(ROOT / "samples" / "eval.npz", allow_pickle=False) as data:
        feeds = {"input": data["input"][:64]}
    fused, report = fuse_and_compare(model, feeds=feeds)
    batch_norms = op_counts(model)["BatchNormalization"]
    assert report.count("kept") == 0
    assert report.count("folded") + report.count("fused") == batch_norms
    assert "BatchNormalization" not in op_counts(fused)
    assert op_counts(fused)["BatchNormRelu"] == report.count("fused")
    assert op_counts(fused)["Relu"] == op_counts(model)["Relu"] - report.count("fused")


def test_sample_npz_fuses_like_the_onnx():
    onnx_report = fuse(load_model(ROOT / "samples" / "digits_cnn.onnx"))[1]
    npz_report = fuse(load_model(ROOT / "samples" / "digits_cnn.npz"))[1]
    assert npz_report.actions == onnx_report.actions


TORCH_EXPORTS = sorted(MODELS.glob("*.onnx"))


@pytest.mark.parametrize("path", TORCH_EXPORTS, ids=lambda p: p.stem)
def test_torch_exported_models_fuse_exactly(path):
    model = load_model(path)
    fused, report = fuse_and_compare(model)
    before, after = op_counts(model), op_counts(fused)
    assert len(report.actions) == before["BatchNormalization"]
    assert after.get("BatchNormalization", 0) == report.count("kept")
    assert after.get("BatchNormRelu", 0) == report.count("fused")
    assert after.get("Relu", 0) == before.get("Relu", 0) - report.count("fused")
    if path.stem != "bn_shared":
        assert report.count("kept") == 0, report.actions


def test_shared_batch_norm_outputs_are_folded_but_not_fused():
    """Folding renames the Conv output to the BN output, so other readers and a graph output
    still see the same values (fuse_and_compare checks them); fusing with Relu would not."""
    model = load_model(MODELS / "bn_shared.onnx")
    fused, report = fuse_and_compare(model)
    assert outcomes(report) == {"folded": 2, "fused": 0, "kept": 2}
    kept = [action.detail for action in report.actions if action.outcome == "kept"]
    assert any("graph output" in detail for detail in kept)
    assert any("2 readers" in detail for detail in kept)
    assert [v.name for v in fused.graph.output] == [v.name for v in model.graph.output]


# --- graphs as other converters write them ---------------------------------------------------

def paddle_style(opset: int, epsilon: float = 1e-3) -> onnx.ModelProto:
    """Conv -> BN -> Relu, then Relu -> BN -> Relu, every parameter in a Constant node, dynamic
    batch and spatial dimensions."""
    rng = np.random.default_rng(1)
    constants = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                 "b": rng.standard_normal(4).astype(np.float32)}
    constants |= bn_params(rng, 4, "bn1") | bn_params(rng, 4, "bn2")
    bn_attrs = {"epsilon": epsilon} | ({"spatial": 1} if opset < 9 else {})
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"],
                         ["n1"], name="bn1", **bn_attrs),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("BatchNormalization", ["r1", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"],
                         ["n2"], name="bn2", **bn_attrs),
        helper.make_node("Relu", ["n2"], ["y"]),
    ]
    return make_model(nodes, [("x", ["N", 3, "H", "W"])], [("y", ["N", 4, "H", "W"])],
                      opset=opset, constants=constants)


@pytest.mark.parametrize("opset", [7, 9, 13, 15])
def test_constant_node_parameters_and_old_opsets(opset):
    model = paddle_style(opset)
    fused, report = fuse_and_compare(model)
    assert outcomes(report) == {"folded": 1, "fused": 1, "kept": 0}
    assert op_counts(fused) == {"BatchNormRelu": 1, "Constant": 4, "Conv": 1, "Relu": 1}
    function = fused.functions[0]
    assert function.opset_import[0].version == opset  # the checker wants the model's version


def test_epsilon_is_carried_into_the_fused_node():
    fused, _ = fuse_and_compare(paddle_style(13, epsilon=1e-3))
    node = next(n for n in fused.graph.node if n.op_type == "BatchNormRelu")
    assert helper.get_attribute_value(node.attribute[0]) == pytest.approx(1e-3)


def standalone(opset: int, attrs: dict | None = None, params_as_inputs: bool = False,
               extra_output: bool = False, second_reader: bool = False) -> onnx.ModelProto:
    """Relu -> BN -> Relu on a rank-4 tensor with the given variations."""
    params = bn_params(np.random.default_rng(2), 3, "bn")
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("BatchNormalization", ["r", *params],
                              ["n", "m", "v"] if (attrs or {}).get("training_mode") else ["n"],
                              name="bn", **(attrs or {})),
             helper.make_node("Relu", ["n"], ["y"])]
    outputs = [("y", ["N", 3, 5, 5])]
    if extra_output:
        outputs.append(("n", ["N", 3, 5, 5]))
    if second_reader:
        nodes.append(helper.make_node("Add", ["n", "y"], ["z"]))
        outputs.append(("z", ["N", 3, 5, 5]))
    inputs = [("x", ["N", 3, 5, 5])] + ([(name, [3]) for name in params] if params_as_inputs else [])
    return make_model(nodes, inputs, outputs, opset=opset,
                      initializers={} if params_as_inputs else params)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"opset": 14, "attrs": {"training_mode": 1}}, "training_mode=1"),
    ({"opset": 7, "attrs": {"spatial": 0}}, "spatial=0"),
    ({"opset": 13, "params_as_inputs": True}, "computed at run time"),
    ({"opset": 13, "extra_output": True}, "graph output"),
    ({"opset": 13, "second_reader": True}, "2 readers"),
])
def test_inexact_fusions_are_kept_with_a_reason(kwargs, reason):
    model = standalone(**kwargs)
    fused, report = fuse(model)
    onnx.checker.check_model(fused, full_check=True)
    assert op_counts(fused) == op_counts(model)
    [action] = report.actions
    assert action.outcome == "kept" and reason in action.detail


def test_standalone_batch_norm_on_a_graph_input_is_fused():
    params = bn_params(np.random.default_rng(3), 2, "bn")
    nodes = [helper.make_node("BatchNormalization", ["x", *params], ["n"]),
             helper.make_node("Relu", ["n"], ["y"])]
    for shape in (["N", 2, "L"], ["N", 2, 4, 4], ["N", 2, 3, 3, 3]):  # 1d, 2d, 3d batch norm
        model = make_model(nodes, [("x", shape)], [("y", shape)], opset=17, initializers=params)
        _, report = fuse_and_compare(model)
        assert outcomes(report) == {"folded": 0, "fused": 1, "kept": 0}


def test_folding_keeps_a_weight_shared_with_another_conv():
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((3, 3, 1, 1)).astype(np.float32)
    params = bn_params(rng, 3, "bn")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]),
             helper.make_node("BatchNormalization", ["a", *params], ["n"]),
             helper.make_node("Conv", ["x", "w"], ["b"]),
             helper.make_node("Add", ["n", "b"], ["y"])]
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", ["N", 3, 4, 4])], opset=13,
                       initializers={"w": weight} | params)
    fused, report = fuse_and_compare(model)
    assert outcomes(report) == {"folded": 1, "fused": 0, "kept": 0}
    names = {tensor.name for tensor in fused.graph.initializer}
    assert "w" in names and not names & set(params)


@pytest.mark.parametrize(("param", "value"), [("bn_var", -1.0), ("bn_var", np.nan),
                                              ("bn_scale", np.inf)])
def test_broken_statistics_are_an_error(param, value):
    model = standalone(13)
    for tensor in model.graph.initializer:
        if tensor.name == param:
            tensor.float_data[:] = []
            tensor.raw_data = np.full(3, value, np.float32).tobytes()
    with pytest.raises(ModelError, match=param.replace("bn_", "").replace("var", "input_var")):
        fuse(model)


def test_model_without_batch_norm_is_unchanged():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 2])], [("y", [1, 2])],
                       opset=13)
    fused, report = fuse(model)
    assert report.actions == () and op_counts(fused) == op_counts(model)
