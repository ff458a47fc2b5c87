"""Write the sample's digits as PNG files, for `-d` with a folder of images (needs Pillow):

    samples/digits/calib/NNN.png           the first 64 images of calib.npz (no labels)
    samples/digits/eval/<class>/NNN.png    the first 20 images of each class of eval.npz

The arrays hold values in [0, 1] (sklearn's 0-16 digits / 16); the PNGs hold round(255 x) as
8-bit grayscale, which bnq's default image preprocessing (pixels / 255) reads back to within
half a step of 1/255.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8), mode="L").save(path)


def main() -> None:
    root = HERE / "digits"
    shutil.rmtree(root, ignore_errors=True)
    with np.load(HERE / "calib.npz", allow_pickle=False) as data:
        for index, image in enumerate(data["input"][:64]):
            write(root / "calib" / f"{index:03d}.png", image)
    with np.load(HERE / "eval.npz", allow_pickle=False) as data:
        images, labels = data["input"], data["labels"]
        for label in range(10):
            for index in np.flatnonzero(labels == label)[:20]:
                write(root / "eval" / str(label) / f"{index:03d}.png", images[index])


if __name__ == "__main__":
    main()
