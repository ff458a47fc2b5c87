"""`bnq calibrate` end to end with each option the README documents: every method (and
`--percentile`), `--activation-type int8`, `--reduce-range/--no-reduce-range`, the CPU-dependent
default formats (with the CPU's features mocked), and the `--json` report's keys. Each written
model passes the full checker and is run in onnxruntime against the float model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from graphs import make_model, run_ort
from onnx import helper, numpy_helper

from bnq import machine
from bnq.cli import cli
from bnq.machine import Machine
from bnq.qops import BODIES

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits_cnn.onnx"
CALIB = ROOT / "samples" / "calib.npz"
EVAL = ROOT / "samples" / "eval.npz"
# SQNR of the logits on eval.npz's first 200 samples after calibrating on 64 samples, uint8
# activations and 7-bit weights (numpy 2.4.6, onnxruntime 1.32.0, AMD EPYC); the tests ask for
# the measured value less 3 dB.
MEASURED_SQNR_DB = {("minmax",): 31.66, ("percentile",): 29.99,
                    ("percentile", "--percentile", "99.9"): 25.35, ("entropy",): 26.29,
                    ("mse",): 31.70}
MARGIN_DB = 3.0
FIXED = ("--activation-type", "uint8", "--reduce-range")  # the same formats on every CPU


@pytest.fixture(scope="module")
def evaluation():
    with np.load(EVAL, allow_pickle=False) as data:
        x = data["input"][:200]
    return x, run_ort(onnx.load(SAMPLE), {"input": x})[0]


def calibrate(tmp_path: Path, *options: str) -> tuple[dict, onnx.ModelProto]:
    """Run `bnq calibrate` on the sample (64 samples) with `options`; the JSON report and the
    checked model."""
    output = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["calibrate", str(SAMPLE), "-d", str(CALIB), "-o",
                                      str(output), "--num-samples", "64", "--json", "--force",
                                      *options])
    assert result.exit_code == 0, result.output
    model = onnx.load(output)
    onnx.checker.check_model(model, full_check=True)
    return json.loads(result.stdout), model


def sqnr_db(model: onnx.ModelProto, evaluation) -> float:
    x, reference = evaluation
    error = reference - run_ort(model, {"input": x})[0]
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum(error ** 2)))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_codes(model: onnx.ModelProto) -> list[np.ndarray]:
    """The int8 codes of every Conv/Gemm weight, one row per output channel."""
    values = initializers(model)
    made_by = {out: node for node in model.graph.node for out in node.output}
    codes = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            array = values[made_by[node.input[1]].input[0]]
            codes.append(array.reshape(len(array), -1))
    return codes


@pytest.mark.parametrize("options", sorted(MEASURED_SQNR_DB), ids="-".join)
def test_every_method_calibrates_end_to_end(tmp_path, evaluation, options):
    report, model = calibrate(tmp_path, "--method", *options, *FIXED)
    assert report["method"] == options[0] and report["samples"] == 64
    assert sqnr_db(model, evaluation) > MEASURED_SQNR_DB[options] - MARGIN_DB


def test_percentile_100_is_minmax_and_a_lower_percentile_narrows_the_ranges(tmp_path):
    minmax = calibrate(tmp_path, "--method", "minmax", *FIXED)
    whole = calibrate(tmp_path, "--method", "percentile", "--percentile", "100", *FIXED)
    assert whole[1].SerializeToString() == minmax[1].SerializeToString()
    narrow = calibrate(tmp_path, "--method", "percentile", "--percentile", "99", *FIXED)
    wide = {t["name"]: t for t in minmax[0]["tensors"] if t["role"] != "weight"}
    shrunk, kept = 0, 0
    for tensor in narrow[0]["tensors"]:
        if tensor["role"] == "weight":
            continue
        assert tensor["rmax"] <= wide[tensor["name"]]["rmax"]
        assert tensor["rmin"] >= wide[tensor["name"]]["rmin"]
        if tensor["observer"] == "minmax":  # the classifier's input: its min/max, always
            assert (tensor["rmin"], tensor["rmax"]) == (wide[tensor["name"]]["rmin"],
                                                        wide[tensor["name"]]["rmax"])
            kept += 1
        else:
            shrunk += tensor["rmax"] < wide[tensor["name"]]["rmax"]
    assert kept == 2  # the head's Relu output and its Flatten before the Gemm
    assert shrunk >= len(wide) - kept - 1  # and all but the input (1% of its pixels at the top)


def test_int8_activations(tmp_path, evaluation):
    """Every activation and fused-node code is int8; a Relu output uses the full range from
    zero (zero point -128); the fused nodes' two kernel paths agree on int8 codes."""
    report, model = calibrate(tmp_path, "--activation-type", "int8", "--reduce-range")
    assert report["formats"]["activation"] == "int8"
    values = initializers(model)
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers and all(values[n.input[2]].dtype == np.int8 for n in quantizers)
    fused = [n for n in model.graph.node if n.op_type == "QLinearBatchNormRelu"]
    assert len(fused) == 6
    for node in fused:
        assert values[node.input[2]].dtype == values[node.input[8]].dtype == np.int8
        assert values[node.input[8]] == -128
    assert sqnr_db(model, evaluation) > MEASURED_SQNR_DB[("minmax",)] - MARGIN_DB
    onnx.save(model, tmp_path / "int8.onnx")
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "int8.onnx"), "-r", str(SAMPLE),
                                      "-d", str(EVAL), "--num-samples", "64", "--backend",
                                      "both", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["backend_max_lsb_diff"] == 0


@pytest.mark.parametrize("flag, top", [("--reduce-range", 63), ("--no-reduce-range", 127)])
def test_reduce_range_flags(tmp_path, evaluation, flag, top):
    """7-bit weights reach code 63 per output channel, 8-bit ones 127 (symmetric: max|w[c]|)."""
    report, model = calibrate(tmp_path, "--activation-type", "uint8", flag)
    assert report["formats"]["reduce_range"] == (flag == "--reduce-range")
    for codes in weight_codes(model):
        assert np.abs(codes).max(axis=1).tolist() == [top] * len(codes)
    x, reference = evaluation
    assert np.mean(run_ort(model, {"input": x})[0].argmax(1) == reference.argmax(1)) >= 0.98


AVX2 = Machine("an AVX2 CPU", ("avx2", "fma"), 2, {})
VNNI = Machine("an AVX-512 VNNI CPU", ("avx2", "fma", "avx512f", "avx512_vnni"), 2, {})


@pytest.mark.parametrize("cpu, options, reduce_range, reason", [
    (AVX2, (), True, "AVX2 without VNNI"),
    (VNNI, (), False, "avx512_vnni"),
    (VNNI, ("--reduce-range",), True, "chosen on the command line"),
    (AVX2, ("--no-reduce-range",), False, "chosen on the command line"),
    (AVX2, ("--activation-type", "int8"), True, "chosen on the command line"),
])
def test_default_formats_follow_the_cpu_unless_told(tmp_path, monkeypatch, cpu, options,
                                                    reduce_range, reason):
    monkeypatch.setattr(machine, "describe", lambda: cpu)
    report, model = calibrate(tmp_path, *options)
    formats = report["formats"]
    activation = "int8" if "int8" in options else "uint8"
    assert formats == {"activation": activation, "weight": "int8", "reduce_range": reduce_range,
                       "reason": formats["reason"]}
    assert reason in formats["reason"]
    top = 63 if reduce_range else 127
    assert all(np.abs(codes).max() == top for codes in weight_codes(model))


def test_json_report_keys(tmp_path):
    report, model = calibrate(tmp_path, *FIXED)
    assert set(report) == {"model", "output", "samples", "batches", "method", "formats",
                           "fusion", "folded_pools", "weights_rounded", "bias_correction",
                           "equalization", "tensors", "ops_after", "body", "plan", "choice"}
    assert report["method"] == "minmax" and report["choice"] is None  # auto's: test_choice.py
    assert report["batches"] == 2 and report["body"] in BODIES
    assert report["ops_after"]["QLinearBatchNormRelu"] == 6
    roles = {t["role"] for t in report["tensors"]}
    assert {"activation", "bn output", "weight"} <= roles <= {"activation", "bn input",
                                                               "bn output", "weight"}
    for tensor in report["tensors"]:
        assert set(tensor) == {"name", "role", "granularity", "observer", "rmin", "rmax",
                               "scale_min", "scale_max", "zero_point"}
        assert tensor["rmin"] <= 0 <= tensor["rmax"] and 0 < tensor["scale_min"]


def test_equalize_flag_reports_the_pairs(tmp_path):
    """The sample's one exact pair (the residual block's Conv -> Relu -> Conv), in the JSON
    report and the text one; off (the default) the report says null."""
    report, _ = calibrate(tmp_path, *FIXED, "--equalize")
    assert report["equalization"] == {
        "pairs": [["/residual/conv1/Conv", "/residual/conv2/Conv"]], "sweeps": 2}
    result = CliRunner().invoke(cli, ["calibrate", str(SAMPLE), "-d", str(CALIB), "-o",
                                      str(tmp_path / "e.onnx"), "--num-samples", "64",
                                      "--equalize", *FIXED])
    assert result.exit_code == 0, result.output
    assert "equalization: 1 pairs of consecutive layers rescaled" in result.stdout
    assert calibrate(tmp_path, *FIXED)[0]["equalization"] is None


def test_non_finite_figures_are_null_in_strict_json(tmp_path):
    """A quantized model whose output is exactly the float one (a BN-ReLU that is 0 for every
    input): the SQNR is infinite, written as null."""
    params = {"g": np.ones(2, np.float32), "b": np.full(2, -100.0, np.float32),
              "m": np.zeros(2, np.float32), "v": np.ones(2, np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("BatchNormalization", ["r", *params], ["n"]),
             helper.make_node("Relu", ["n"], ["y"])]
    onnx.save(make_model(nodes, [("x", ["N", 2, 4, 4])], [("y", ["N", 2, 4, 4])], opset=17,
                         initializers=params), tmp_path / "zero.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((8, 2, 4, 4),
                                                                         dtype=np.float32))
    for args in (["calibrate", "zero.onnx", "-d", "x.npy", "-o", "q.onnx"],
                 ["evaluate", "q.onnx", "-r", "zero.onnx", "-d", "x.npy", "--json"]):
        result = CliRunner().invoke(cli, [args[0], *(a if a.startswith("-") else
                                                     str(tmp_path / a) for a in args[1:])])
        assert result.exit_code == 0, result.output

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    report = json.loads(result.stdout, parse_constant=refuse)
    assert report["sqnr_db"] is None and report["outputs"][0]["sqnr_db"] is None
    assert report["max_abs_error"] == 0
