"""bnq.rewrites: a 1x1 Conv + AveragePool folded into one strided Conv, checked by op counts, the
full checker and onnxruntime's outputs against the original model; the cases it must leave."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import make_model, max_relative_error, random_feeds, run_ort
from onnx import helper

from bnq.fusion import fuse
from bnq.graph import op_counts
from bnq.rewrites import fold_average_pool

MODELS = Path(__file__).resolve().parent / "models"


@pytest.mark.parametrize("name", ["densenet_block", "tiny_densenet"])
def test_densenet_transitions_fold_and_match_the_original(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    fused, _ = fuse(model)
    folded, pools = fold_average_pool(fused)
    assert len(pools) == op_counts(fused)["AveragePool"] == 1
    assert "AveragePool" not in op_counts(folded)
    assert op_counts(folded)["Conv"] == op_counts(fused)["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    feeds = random_feeds(model, np.random.default_rng(0))
    for expected, actual in zip(run_ort(model, feeds), run_ort(folded, feeds), strict=True):
        assert max_relative_error(expected, actual) < 1e-5


def conv_pool(*, conv=None, pool=None, extra_reader=False):
    """x -> Conv 1x1 (6 -> 4) -> AveragePool, with attributes overridden."""
    rng = np.random.default_rng(0)
    initializers = {"w": rng.normal(size=(4, 6, 1, 1)).astype(np.float32),
                    "b": rng.normal(size=4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **(conv or {})),
             helper.make_node("AveragePool", ["c"], ["y"],
                              **({"kernel_shape": [2, 2], "strides": [2, 2]} | (pool or {})))]
    outputs = [("y", ["N", 4, "h", "w"])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        outputs.append(("r", ["N", 4, 8, 8]))
    return make_model(nodes, [("x", ["N", 6, 8, 8])], outputs, opset=19,
                      initializers=initializers)


def test_a_plain_pair_folds_into_a_2x2_stride_2_conv():
    model = conv_pool()
    folded, pools = fold_average_pool(model)
    assert len(pools) == 1
    (conv,) = folded.graph.node
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attributes == {"kernel_shape": [2, 2], "strides": [2, 2]}
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 6, 8, 8)).astype(np.float32)}
    assert max_relative_error(run_ort(model, feeds)[0], run_ort(folded, feeds)[0]) < 1e-5


@pytest.mark.parametrize("kwargs", [
    {"pool": {"pads": [1, 1, 1, 1]}},
    {"pool": {"strides": [1, 1]}},
    {"pool": {"ceil_mode": 1}},
    {"pool": {"kernel_shape": [2, 3], "strides": [2, 3]}},
    {"conv": {"strides": [2, 2]}},
    {"conv": {"pads": [1, 1, 1, 1]}},
    {"extra_reader": True},
], ids=["pool pads", "pool stride", "ceil mode", "non-square", "conv stride", "conv pads",
        "conv output read twice"])
def test_pairs_that_are_not_one_conv_are_left(kwargs):
    model = conv_pool(**kwargs)
    folded, pools = fold_average_pool(model)
    assert pools == () and op_counts(folded) == op_counts(model)
