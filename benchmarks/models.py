"""Real-size CNNs for the benchmarks: torchvision's DenseNet-121, ResNet-50 and MobileNetV2 as
ONNX, with their BatchNormalization nodes kept, and natural-image data to feed them.

    python benchmarks/models.py OUT_DIR [--models densenet121,resnet50,mobilenet_v2]

writes OUT_DIR/NAME.onnx, OUT_DIR/calib.npz (64 crops) and OUT_DIR/eval.npz (64 other crops).

No weights are downloaded (`weights=None`): the weights are torchvision's random initialisation,
and the BatchNormalization statistics are measured by running each model in train mode over
natural-image crops (cumulative averages, `momentum=None`), so activations have realistic
ranges. The crops come from scikit-image's bundled photographs (astronaut, coffee, chelsea,
rocket, ...), resized to 224 x 224 and normalised with ImageNet's mean and std.

Benchmark-only dependencies, installed by this script when missing: torch 2.13.0 (CPU build,
from the machine's disk), torchvision 0.28.0 and scikit-image. torchvision 0.28's compiled
operators do not load beside the CPU build of torch ("operator torchvision::nms does not
exist"); the model classes are plain Python, so `torch.library.register_fake` is stubbed while
torchvision is imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

MODELS = ("densenet121", "resnet50", "mobilenet_v2")
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "colorwheel", "retina", "cat", "logo")
REQUIREMENTS = {"torch": "torch==2.13.0", "torchvision": "torchvision==0.28.0",
                "skimage": "scikit-image"}


def ensure_installed() -> None:
    """pip-install the benchmark-only packages that are missing (never bnq's own dependencies)."""
    missing = [spec for module, spec in REQUIREMENTS.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)


def torchvision_models():
    """`torchvision.models`, imported beside the CPU build of torch."""
    import torch

    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *args, **kwargs: (lambda function: function)
    try:
        import torchvision.models
    finally:
        torch.library.register_fake = register_fake
    return torchvision.models


def photos() -> list[np.ndarray]:
    """scikit-image's bundled colour photographs as float32 H x W x 3 in [0, 1]."""
    import skimage.data

    images = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 3 and image.shape[2] >= 3:
            images.append(image[..., :3].astype(np.float32) / (255.0 if image.dtype == np.uint8
                                                                else max(1.0, image.max())))
    return images


def crops(count: int, seed: int) -> np.ndarray:
    """`count` random square crops of the photos, resized to 224 x 224, flipped at random and
    normalised: float32 (count, 3, 224, 224)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    images = photos()
    out = np.empty((count, 3, SIZE, SIZE), np.float32)
    for i in range(count):
        image = images[rng.integers(len(images))]
        h, w = image.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        top, left = rng.integers(h - side + 1), rng.integers(w - side + 1)
        crop = torch.from_numpy(np.ascontiguousarray(
            image[top:top + side, left:left + side].transpose(2, 0, 1)))[None]
        crop = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", antialias=True,
                             align_corners=False)[0].numpy()
        if rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        out[i] = (crop - MEAN[:, None, None]) / STD[:, None, None]
    return out


def build(name: str, path: Path, *, statistics_crops: int = 256, seed: int = 0) -> None:
    """Export torchvision model `name` with measured BN statistics to `path` (opset 17, dynamic
    batch, BatchNormalization kept)."""
    import torch

    torch.manual_seed(seed)
    model = getattr(torchvision_models(), name)(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over every batch
            module.reset_running_stats()
    model.train()
    data = crops(statistics_crops, seed + 1)
    with torch.no_grad():
        for start in range(0, len(data), 32):
            model(torch.from_numpy(data[start:start + 32]))
    model.eval()
    torch.onnx.export(model, torch.from_numpy(data[:1]), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False, do_constant_folding=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    ensure_installed()
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "calib.npz", input=crops(64, 100))
    np.savez(args.out / "eval.npz", input=crops(64, 200))
    for name in args.models.split(","):
        build(name, args.out / f"{name}.onnx")
        print(f"wrote {args.out / f'{name}.onnx'}")


if __name__ == "__main__":
    main()
