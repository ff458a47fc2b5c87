"""Model files: ONNX (with external data) and the .npz format, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import make_model, random_feeds, run_ort
from onnx import helper

from bnq import BnqError, ModelError, fuse, load_model, save_model
from bnq.npz import GRAPH_KEY, to_npz_arrays

ROOT = Path(__file__).resolve().parent.parent
MODELS = [ROOT / "samples" / "digits_cnn.onnx", *sorted((ROOT / "tests" / "models").glob("*.onnx"))]


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_onnx_npz_onnx_round_trip_preserves_outputs_exactly(path, tmp_path):
    model = load_model(path)
    save_model(model, tmp_path / "m.npz")
    again = load_model(tmp_path / "m.npz")
    save_model(again, tmp_path / "m.onnx")
    final = load_model(tmp_path / "m.onnx")
    onnx.checker.check_model(final, full_check=True)
    feeds = random_feeds(model, np.random.default_rng(0))
    for reference, actual in zip(run_ort(model, feeds), run_ort(final, feeds), strict=True):
        assert np.array_equal(reference, actual)


def test_fused_model_round_trips_through_npz_with_its_function(tmp_path):
    fused, _ = fuse(load_model(ROOT / "samples" / "digits_cnn.onnx"))
    save_model(fused, tmp_path / "fused.npz")
    again = load_model(tmp_path / "fused.npz")
    assert [f.name for f in again.functions] == ["BatchNormRelu"]
    feeds = random_feeds(fused, np.random.default_rng(1))
    assert np.array_equal(run_ort(fused, feeds)[0], run_ort(again, feeds)[0])


def test_a_user_can_write_a_model_with_numpy(tmp_path):
    """The README's example: Conv -> BatchNormalization -> Relu from plain arrays."""
    rng = np.random.default_rng(0)
    graph = {
        "format": "bnq.npz", "version": 1, "opset": 17,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 4, 8, 8]}],
        "nodes": [
            {"op": "Conv", "inputs": ["x", "w"], "outputs": ["c"], "attrs": {"pads": [1, 1, 1, 1]}},
            {"op": "BatchNormalization", "inputs": ["c", "gamma", "beta", "mean", "var"],
             "outputs": ["b"], "attrs": {"epsilon": 1e-3}},
            {"op": "Relu", "inputs": ["b"], "outputs": ["y"]},
        ],
    }
    np.savez(tmp_path / "mine.npz", __graph__=json.dumps(graph),
             w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             gamma=np.ones(4, np.float32), beta=np.zeros(4, np.float32),
             mean=np.zeros(4, np.float32), var=np.ones(4, np.float32))
    model = load_model(tmp_path / "mine.npz")
    onnx.checker.check_model(model, full_check=True)
    _, report = fuse(model)
    assert report.count("folded") == 1


def test_models_with_external_data_load(tmp_path):
    model = load_model(ROOT / "samples" / "digits_cnn.onnx")
    onnx.save_model(load_model(ROOT / "samples" / "digits_cnn.onnx"), tmp_path / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").stat().st_size > 0
    loaded = load_model(tmp_path / "ext.onnx")
    feeds = random_feeds(model, np.random.default_rng(2))
    assert np.array_equal(run_ort(model, feeds)[0], run_ort(loaded, feeds)[0])


def test_pickled_arrays_are_refused_not_loaded(tmp_path):
    np.savez(tmp_path / "evil.npz", __graph__=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ModelError, match="pickled"):
        load_model(tmp_path / "evil.npz")


@pytest.mark.parametrize(("change", "message"), [
    (lambda g: g["nodes"][0].update(op="NoSuchOp"), "unknown operator"),
    (lambda g: g["nodes"][0].update(inputs=["x", "missing"]), "reads 'missing'"),
    (lambda g: g.update(version=99), "version 1"),
    (lambda g: g["nodes"][0].update(attrs={"alpha": {"array": "nope"}}), "array 'nope'"),
    (lambda g: g.pop("nodes"), "malformed"),
])
def test_bad_npz_descriptions_name_the_problem(tmp_path, change, message):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2])], [("y", [2])],
                       opset=13)
    arrays = to_npz_arrays(model)
    graph = json.loads(str(arrays[GRAPH_KEY]))
    change(graph)
    arrays[GRAPH_KEY] = np.array(json.dumps(graph))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ModelError, match=message):
        load_model(tmp_path / "bad.npz")


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 10])
def test_files_that_are_not_models(tmp_path, content):
    for suffix in (".onnx", ".npz"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(ModelError, match="bad"):
            load_model(path)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    model = load_model(ROOT / "samples" / "digits_cnn.onnx")
    target = tmp_path / "out.onnx"
    target.write_bytes(b"precious")
    with pytest.raises(BnqError, match="already exists"):
        save_model(model, target)
    assert target.read_bytes() == b"precious"

    class Boom(Exception):
        pass

    def explode(*_args, **_kwargs):
        raise Boom

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", explode)
        with pytest.raises(Boom):
            save_model(model, tmp_path / "half.npz")
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no partial or temporary file left
    save_model(model, target, overwrite=True)
    assert load_model(target).graph.node
