"""bnq evaluate: every figure against an independent computation, and a broken node found."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import run_ort
from onnx import numpy_helper

from bnq import load_model, save_model
from bnq.calibrate import calibrate
from bnq.cli import cli
from bnq.data import SampleData, model_inputs
from bnq.evaluate import evaluate, quantized_tensors
from bnq.graph import with_outputs
from bnq.machine import IntegerFormats

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits_cnn.onnx"
EVAL = ROOT / "samples" / "eval.npz"


@pytest.fixture(scope="module")
def models():
    reference = load_model(SAMPLE)
    data = SampleData(ROOT / "samples" / "calib.npz", model_inputs(reference))
    quantized, _ = calibrate(reference, data, formats=IntegerFormats("uint8", "int8", True, ""))
    return reference, quantized


def eval_data(model):
    return SampleData(EVAL, model_inputs(model), extra_keys=("labels",))


def test_figures_match_an_independent_computation(models):
    reference, quantized = models
    report = evaluate(quantized, reference, eval_data(reference), batch_size=64)
    with np.load(EVAL, allow_pickle=False) as data:
        x, labels = data["input"], data["labels"]
    expected = run_ort(reference, {"input": x})[0].astype(np.float64)
    actual = run_ort(quantized, {"input": x})[0].astype(np.float64)
    error = expected - actual
    assert report.samples == len(x)
    assert report.sqnr_db == pytest.approx(10 * np.log10((expected ** 2).sum() / (error ** 2).sum()))
    assert report.cosine == pytest.approx(
        (expected * actual).sum() / np.linalg.norm(expected) / np.linalg.norm(actual))
    assert report.max_abs_error == pytest.approx(np.abs(error).max())
    assert report.outputs[0].mean_abs_error == pytest.approx(np.abs(error).mean())
    assert report.top1_agreement == pytest.approx(np.mean(expected.argmax(1) == actual.argmax(1)))
    assert report.top1_accuracy == pytest.approx(
        {"reference": np.mean(expected.argmax(1) == labels),
         "quantized": np.mean(actual.argmax(1) == labels)})
    sqnrs = [layer.sqnr_db for layer in report.layers]
    assert sqnrs == sorted(sqnrs)
    assert sum(layer.op == "QLinearBatchNormRelu" for layer in report.layers) == 6
    quantize_inputs = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"
                       and n.input[0] not in {t.name for t in quantized.graph.initializer}}
    assert quantize_inputs <= {layer.tensor for layer in report.layers}


def test_a_broken_node_is_reported_worst(models):
    reference, quantized = models
    before = {layer.tensor: layer.sqnr_db
              for layer in evaluate(quantized, reference, eval_data(reference)).layers
              if layer.op == "QLinearBatchNormRelu"}
    broken = onnx.ModelProto()
    broken.CopyFrom(quantized)
    best = max(before, key=before.get)  # break the best fused node: its output becomes worst
    victim = next(n for n in broken.graph.node if n.op_type == "QLinearBatchNormRelu"
                  and any(d.input[0] == n.output[0] and d.output[0] == best
                          for d in broken.graph.node))
    # its input scale, 1.5 times too large (and the integer body's multiplier with it)
    scales = {victim.input[1]} | ({victim.input[10]} if len(victim.input) > 9 else set())
    for tensor in broken.graph.initializer:
        if tensor.name in scales:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.5,
                                                    tensor.name))
    report = evaluate(broken, reference, eval_data(reference))
    after = {layer.tensor: layer.sqnr_db for layer in report.layers}
    assert after[best] < before[best] - 10
    # where the error enters: the first tensor in graph order that got worse is the node's output
    order = [name for node in reference.graph.node for name in node.output]
    healthy = {layer.tensor: layer.sqnr_db
               for layer in evaluate(quantized, reference, eval_data(reference)).layers}
    worse = [name for name in order if name in after and after[name] < healthy[name] - 3]
    assert worse[0] == best and report.layers[0].sqnr_db < before[best] - 10


def test_both_backends_agree_code_for_code_on_every_fused_node(models):
    reference, quantized = models
    report = evaluate(quantized, reference, eval_data(reference), backend="both", num_samples=128)
    assert report.samples == 128
    assert report.backend_max_lsb_diff == 0
    checked = [layer for layer in report.layers if layer.backend_max_lsb_diff is not None]
    assert len(checked) == 6 and all(layer.backend_max_lsb_diff == 0 for layer in checked)


def test_the_numpy_backend_gives_the_same_figures(models, tmp_path):
    """`evaluate --backend numpy` runs the quantized model with onnx's reference evaluator and
    bnq's kernels: the same figures as onnxruntime, to float rounding."""
    reference, quantized = models
    save_model(quantized, tmp_path / "q.onnx")
    reports = {}
    for backend in ("numpy", "onnxruntime"):
        result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "q.onnx"), "-r", str(SAMPLE),
                                          "-d", str(EVAL), "--num-samples", "64", "--backend",
                                          backend, "--json"])
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads(result.stdout)
    numpy_report, ort_report = reports["numpy"], reports["onnxruntime"]
    assert numpy_report["backend"] == "numpy" and numpy_report["samples"] == 64
    assert numpy_report["top1_accuracy"] == ort_report["top1_accuracy"]
    assert numpy_report["sqnr_db"] == pytest.approx(ort_report["sqnr_db"], abs=0.01)
    assert [n["tensor"] for n in numpy_report["layers"]] == \
        [n["tensor"] for n in ort_report["layers"]]
    assert [n["sqnr_db"] for n in numpy_report["layers"]] == \
        pytest.approx([n["sqnr_db"] for n in ort_report["layers"]], abs=0.01)


def test_cli_json_has_the_documented_keys(models, tmp_path):
    reference, quantized = models
    save_model(quantized, tmp_path / "q.onnx")
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "q.onnx"), "-r", str(SAMPLE),
                                      "-d", str(EVAL), "--backend", "both", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"samples", "top1_accuracy", "top1_agreement", "sqnr_db", "cosine", "max_abs_error",
            "outputs", "layers", "backend_max_lsb_diff"} <= set(report)
    assert set(report["top1_accuracy"]) == {"reference", "quantized"}
    assert all({"tensor", "op", "sqnr_db", "range", "clipped", "histogram"} <= set(layer)
               for layer in report["layers"])
    assert report["outputs"][0]["kind"] == "classification"
    assert report["backend_max_lsb_diff"] == 0


def test_without_labels_accuracy_is_null(models, tmp_path):
    reference, quantized = models
    with np.load(EVAL, allow_pickle=False) as data:
        np.save(tmp_path / "x.npy", data["input"][:40])
    report = evaluate(quantized, reference, SampleData(tmp_path / "x.npy", model_inputs(reference),
                                                       extra_keys=("labels",)))
    assert report.top1_accuracy is None and report.samples == 40


def test_codes_made_from_codes_are_measured_too(models):
    """A Concat of quantized branches (integer codes, read per channel by a fused node) is
    matched to the float model's Concat over the same branches and measured: its SQNR against
    an independent dequantization of the codes onnxruntime gives."""
    reference, quantized = models
    report = evaluate(quantized, reference, eval_data(reference), num_samples=64)
    found = next(q for q in quantized_tensors(quantized, reference) if q.op == "Concat")
    concat = next(layer for layer in report.layers if layer.tensor == found.tensor)
    assert next(n for n in reference.graph.node if found.tensor in n.output).op_type == "Concat"
    node = next(n for n in quantized.graph.node if found.codes in n.output)
    fused = next(c for c in quantized.graph.node if c.op_type == "QLinearBatchNormRelu"
                 and c.input[0] == node.output[0])
    constants = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    with np.load(EVAL, allow_pickle=False) as data:
        x = data["input"][:64]
    codes = run_ort(with_outputs(quantized, [node.output[0]]), {"input": x})[-1]
    expected = run_ort(with_outputs(reference, [concat.tensor]), {"input": x})[-1]
    scale, zero_point = constants[fused.input[1]], constants[fused.input[2]]
    actual = (codes.astype(np.float32) - zero_point.astype(np.float32)[:, None, None]) \
        * scale[:, None, None]
    error = expected.astype(np.float64) - actual
    assert concat.sqnr_db == pytest.approx(10 * np.log10((expected.astype(np.float64) ** 2).sum()
                                                         / (error ** 2).sum()), rel=1e-6)
