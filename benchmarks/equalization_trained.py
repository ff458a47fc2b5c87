"""Cross-layer equalization on a trained depthwise-separable CNN: bnq's default against
`--equalize`, for several training seeds.

    python benchmarks/equalization_trained.py [--seeds 0,1,2,3,4,5]

The benchmark models of `real_models.py` have random weights and BN statistics measured on
crops, so BN leaves every channel about as wide as the others and equalization finds little to
do. This trains, per seed, a small MobileNet-style CNN with ReLU (not ReLU6, so that every
depthwise and pointwise convolution forms an exact pair with the next: a chain of 6 pairs) on
sklearn's digits (1300 training images, 30 epochs of Adam; 497 test images), exports it as
users have it (legacy exporter, opset 17, BatchNormalization kept), and quantizes it with bnq
(default formats, minmax, 256 training images) with and without `equalize`, bias correction on
and off. SQNR of the logits against the float model on the test images.

A development tool: it needs torch and scikit-learn, which bnq itself does not.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
from common import print_machine, session, sqnr, table

from bnq.calibrate import calibrate
from bnq.data import SampleData, model_inputs
from bnq.machine import default_formats

TRAIN = 1300
EPOCHS = 30


def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits / 16 as float32 (N, 1, 8, 8), and their labels, in a fixed shuffle."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.images))
    return (data.images[order] / 16).astype(np.float32)[:, None], data.target[order]


def trained_model(seed: int, x: np.ndarray, labels: np.ndarray) -> tuple[onnx.ModelProto, float]:
    """The CNN trained with `seed`, exported with its BatchNormalization nodes, and its test
    accuracy."""
    import torch
    from torch import nn

    def separable(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, inputs, 3, padding=1, groups=inputs, bias=False),
                nn.BatchNorm2d(inputs), nn.ReLU(),
                nn.Conv2d(inputs, outputs, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        *separable(16, 32), *separable(32, 64), *separable(64, 64),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    images, targets = torch.from_numpy(x[:TRAIN]), torch.from_numpy(labels[:TRAIN])
    for _ in range(EPOCHS):
        order = torch.randperm(TRAIN)
        for start in range(0, TRAIN, 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(net(images[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(x[TRAIN:])).argmax(1).numpy()
                          == labels[TRAIN:]).mean())
    buffer = io.BytesIO()
    torch.onnx.export(net, torch.randn(2, 1, 8, 8), buffer, opset_version=17, dynamo=False,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue()), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    args = parser.parse_args()
    print_machine()
    x, labels = digits()
    test = x[TRAIN:]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnq-equalization-") as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, input=x[:256])
        for seed in map(int, args.seeds.split(",")):
            model, accuracy = trained_model(seed, x, labels)
            reference = session(model).run(None, {"input": test})[0]
            row = [str(seed), f"{100 * accuracy:.1f}"]
            for bias_correction in (True, False):
                for equalize in (False, True):
                    quantized, report = calibrate(
                        model, SampleData(calib, model_inputs(model)), formats=default_formats(),
                        bias_correction=bias_correction, equalize=equalize)
                    logits = session(quantized).run(None, {"input": test})[0]
                    row.append(f"{sqnr(reference, logits):.2f}")
            rows.append(row + [str(len(report.equalization.pairs))])
    table(f"SQNR of the logits, dB, {len(test)} test digits", [
        "seed", "float top-1 %", "default", "equalize", "no bias corr.",
        "no bias corr., equalize", "pairs"], rows)


if __name__ == "__main__":
    main()
