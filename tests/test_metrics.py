"""Metrics on constructed outputs whose values are known, merging, and evaluate choosing the
metrics that fit each output (classification scores, probability maps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from graphs import bn_params, make_model, run_ort
from onnx import helper

from bnq.calibrate import calibrate
from bnq.data import SampleData, model_inputs
from bnq.evaluate import evaluate
from bnq.machine import IntegerFormats
from bnq.metrics import ClassAgreement, ErrorSums, Histogram, NoiseSums


def test_error_sums_known_values():
    sums = ErrorSums()
    reference = np.full(100, 2.0, np.float32)
    sums.update(reference, reference + 0.2)  # noise power 1% of the signal's: 20 dB
    assert sums.sqnr_db() == pytest.approx(20.0)
    assert sums.cosine() == pytest.approx(1.0)
    assert sums.mean_abs_error() == pytest.approx(0.2) and sums.abs_max == pytest.approx(0.2)
    assert sums.iou() is None  # values beyond [0, 1]: not a map
    orthogonal = ErrorSums()
    orthogonal.update(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert orthogonal.cosine() == pytest.approx(0.0) and orthogonal.sqnr_db() == pytest.approx(
        10 * math.log10(1 / 2))
    same = ErrorSums()
    same.update(np.ones(3), np.ones(3))
    assert same.sqnr_db() == math.inf


def test_iou_of_maps_thresholded_at_half():
    sums = ErrorSums()
    sums.update(np.array([[0.2, 0.8], [0.9, 0.1]]), np.array([[0.6, 0.8], [0.3, 0.1]]))
    assert sums.iou() == pytest.approx(1 / 3)  # above 0.5: {1, 2} and {0, 1}
    empty = ErrorSums()
    empty.update(np.zeros(4), np.full(4, 0.4))
    assert empty.iou() == 1.0  # both maps empty: they agree


def test_class_agreement_known_values():
    reference = np.array([[9, 1, 2, 3, 4, 5, 0], [0, 9, 1, 2, 3, 4, 5], [0, 1, 9, 2, 3, 4, 5]],
                         np.float32)
    actual = reference.copy()
    actual[1] = [9, 5, 0, 1, 2, 3, 4]  # top-1 differs, the float top-1 (1) is its 2nd largest
    actual[2] = [9, 8, 0, 7, 6, 5, 1]  # the float top-1 (2) is among its smallest: not in top-5
    agreement = ClassAgreement()
    agreement.update(reference, actual, labels=np.array([0, 1, 3]))
    assert agreement.agreement(1) == pytest.approx(1 / 3)
    assert agreement.agreement(5) == pytest.approx(2 / 3)
    assert agreement.accuracy(1) == pytest.approx({"reference": 2 / 3, "quantized": 1 / 3})
    assert agreement.accuracy(5) == pytest.approx({"reference": 1.0, "quantized": 1.0})


def test_accumulators_merge_like_one_pass():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((40, 12)).astype(np.float32)
    actual = reference + rng.normal(0, 0.3, reference.shape).astype(np.float32)
    labels = rng.integers(0, 12, 40)
    whole, halves = (ErrorSums(), ClassAgreement(), Histogram(-3, 3)), []
    whole[0].update(reference, actual)
    whole[1].update(reference, actual, labels)
    whole[2].add(reference.astype(np.float64).ravel())
    for part in (slice(0, 17), slice(17, 40)):
        acc = (ErrorSums(), ClassAgreement(), Histogram(-3, 3))
        acc[0].update(reference[part], actual[part])
        acc[1].update(reference[part], actual[part], labels[part])
        acc[2].add(reference[part].astype(np.float64).ravel())
        halves.append(acc)
    for first, second in zip(*halves):
        first.merge(second)
    merged = halves[0]
    assert merged[0].sqnr_db() == pytest.approx(whole[0].sqnr_db())
    assert merged[0].count == whole[0].count and merged[0].abs_max == whole[0].abs_max
    assert merged[1].agree == whole[1].agree and merged[1].correct == whole[1].correct
    assert np.array_equal(merged[2].counts, whole[2].counts)
    counts, _ = np.histogram(reference, bins=64, range=(-3, 3))
    assert np.array_equal(whole[2].counts, counts)
    assert whole[2].below + whole[2].above + counts.sum() == reference.size


@pytest.mark.parametrize("shape", [(5, 3, 4), (2, 3, 200, 200)])  # samples under and over CHUNK
def test_layer_sums_with_their_histogram_match_the_separate_accumulators(shape):
    rng = np.random.default_rng(3)
    reference = rng.normal(0, 2, shape).astype(np.float32)
    actual = reference + rng.normal(0, 0.1, shape).astype(np.float32)
    together, histogram = NoiseSums(), Histogram(-4, 4, -3, 3)
    together.update(reference, actual, histogram)
    errors, alone = ErrorSums(), Histogram(-4, 4, -3, 3)
    errors.update(reference, actual)
    alone.add(reference.astype(np.float64).ravel())
    sums = ("signal", "noise", "abs_sum")
    assert [getattr(together, name).total for name in sums] == [
        getattr(errors, name).total for name in sums]
    assert together.count == errors.count and together.sqnr_db() == errors.sqnr_db()
    assert np.array_equal(histogram.counts, alone.counts)
    assert (histogram.below, histogram.above, histogram.outside) == (
        alone.below, alone.above, alone.outside)
    assert histogram.below and histogram.above and histogram.outside


def _probability_map_model():
    """Conv -> BN -> Relu -> Conv -> Sigmoid: a 1-channel map in [0, 1], as text detectors give."""
    rng = np.random.default_rng(1)
    params = {"w1": rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32),
              "w2": rng.normal(0, 0.5, (1, 4, 1, 1)).astype(np.float32), **bn_params(rng, 4, "bn")}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r0"]),
             helper.make_node("BatchNormalization", ["r0", "bn_scale", "bn_bias", "bn_mean",
                                                     "bn_var"], ["b1"]),
             helper.make_node("Relu", ["b1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"]),
             helper.make_node("Sigmoid", ["c2"], ["map"])]
    return make_model(nodes, [("x", [None, 3, 8, 8])], [("map", [None, 1, 8, 8])], opset=17,
                      initializers=params)


def test_a_dense_output_gets_map_metrics_and_no_top1(tmp_path):
    model = _probability_map_model()
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    data = SampleData(tmp_path / "x.npy", model_inputs(model))
    quantized, _ = calibrate(model, data, formats=IntegerFormats("uint8", "int8", True, ""))
    report = evaluate(quantized, model, data, batch_size=8)
    output = report.outputs[0]
    assert output.kind == "dense" and report.top1_agreement is None
    assert output.top1_agreement is None and output.accuracy is None
    x = np.load(tmp_path / "x.npy")
    expected, actual = run_ort(model, {"x": x})[0] > 0.5, run_ort(quantized, {"x": x})[0] > 0.5
    assert output.iou == pytest.approx((expected & actual).sum() / (expected | actual).sum())
    assert 0.5 < output.iou < 1.0
    assert report.layers and {"QLinearBatchNormRelu"} <= {layer.op for layer in report.layers}
