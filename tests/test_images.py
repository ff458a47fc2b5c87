"""Folders of images as sample data: the pipeline against a NumPy reference of the same
preprocessing on images written here, torchvision's ImageNet transforms, labels from class
folders, sizes from the model, and every way a folder can be wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnq.cli import cli
from bnq.data import InputSpec, SampleData
from bnq.errors import DataError, MissingExtraError
from bnq.images import IMAGENET_MEAN, IMAGENET_STD, PRESETS, Preprocessing

Image = pytest.importorskip("PIL.Image")  # the images extra; .ci/run installs it

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits_cnn.onnx"


def spec(shape, dtype=np.float32):
    return [InputSpec("x", np.dtype(dtype), tuple(shape))]


def write_images(folder: Path, sizes, rng, classes=None, suffix=".png"):
    """Random RGB images of the given (height, width) sizes; returns their pixel arrays."""
    pixels = []
    for index, (height, width) in enumerate(sizes):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        target = folder / classes[index] if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(target / f"img{index:02d}{suffix}")
        pixels.append(array)
    return pixels


def reference(pixels, crop, scale, mean, std, bgr, nhwc):
    """The same preprocessing in plain NumPy, from the source pixels (no resize)."""
    out = []
    for array in pixels:
        height, width = array.shape[:2]
        top, left = int(round((height - crop[0]) / 2)), int(round((width - crop[1]) / 2))
        x = array[top:top + crop[0], left:left + crop[1]].astype(np.float32)
        if bgr:
            x = x[:, :, ::-1]
        x = (x * np.float32(scale) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        out.append(x if nhwc else x.transpose(2, 0, 1))
    return np.stack(out)


@pytest.mark.parametrize("bgr,nhwc", [(False, False), (True, False), (False, True), (True, True)])
def test_crop_normalize_channels_and_layout_match_numpy(tmp_path, bgr, nhwc):
    rng = np.random.default_rng(0)
    pixels = write_images(tmp_path, [(10, 12), (9, 8), (8, 8), (11, 13), (12, 9)], rng)
    shape = (None, 8, 8, 3) if nhwc else (None, 3, 8, 8)
    options = Preprocessing(crop=(8, 8), scale=1 / 255, mean=(0.2, 0.5, 0.7),
                            std=(0.3, 0.25, 0.5), channels="BGR" if bgr else "RGB")
    data = SampleData(tmp_path, spec(shape), images=options)
    got = np.concatenate([b["x"] for b in data.batches(2)])
    expected = reference(pixels, (8, 8), 1 / 255, options.mean, options.std, bgr, nhwc)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_resize_to_the_models_size_by_default(tmp_path):
    rng = np.random.default_rng(1)
    write_images(tmp_path, [(20, 30), (7, 5)], rng)
    constant = np.full((13, 17, 3), (10, 200, 90), np.uint8)
    Image.fromarray(constant).save(tmp_path / "zz_constant.png")
    data = SampleData(tmp_path, spec((None, 3, 6, 6)))
    batch = next(data.batches(8))["x"]
    assert batch.shape == (3, 3, 6, 6)
    # a resize of a constant image is that constant; pixels / 255 by default
    np.testing.assert_allclose(batch[2], np.broadcast_to(
        np.array([10, 200, 90], np.float32)[:, None, None] / 255, (3, 6, 6)), atol=1e-6)


def _torchvision_transforms():
    """torchvision's transforms, imported with its compiled ops stubbed (they do not load with
    the CPU build of torch); the transforms used here are plain Python and PIL."""
    torch = pytest.importorskip("torch")
    original = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda f: f)
    try:
        transforms = pytest.importorskip("torchvision.transforms")
    finally:
        torch.library.register_fake = original
    return torch, transforms


def test_imagenet_preset_matches_torchvision(tmp_path):
    torch, transforms = _torchvision_transforms()
    rng = np.random.default_rng(2)
    write_images(tmp_path, [(300, 400), (260, 250), (480, 320)], rng, suffix=".jpg")
    data = SampleData(tmp_path, spec((None, 3, 224, 224)), images=PRESETS["imagenet"])
    got = next(data.batches(8))["x"]
    pipeline = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                   transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    files = sorted(tmp_path.iterdir())
    expected = torch.stack([pipeline(Image.open(f).convert("RGB")) for f in files]).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_labels_from_sorted_class_folders(tmp_path):
    rng = np.random.default_rng(3)
    classes = ["zebra", "ant", "cat", "ant", "zebra"]
    write_images(tmp_path, [(8, 8)] * 5, rng, classes=classes)
    data = SampleData(tmp_path, spec((None, 3, 8, 8)), extra_keys=("labels",))
    assert data.has("labels") and data.num_samples == 5
    labels = np.concatenate([b["labels"] for b in data.batches(2, keys=("labels",))])
    assert labels.tolist() == [0, 0, 1, 2, 2]  # ant, ant, cat, zebra, zebra
    flat = tmp_path / "flat"
    write_images(flat, [(8, 8)] * 2, rng)
    assert not SampleData(flat, spec((None, 3, 8, 8)), extra_keys=("labels",)).has("labels")


def test_corrupt_images_are_errors_naming_the_file(tmp_path):
    rng = np.random.default_rng(4)
    write_images(tmp_path, [(8, 8)] * 4, rng)
    truncated = tmp_path / "img02.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    data = SampleData(tmp_path, spec((None, 3, 8, 8)))
    batches = data.batches(2)
    assert next(batches)["x"].shape == (2, 3, 8, 8)  # decoded batch by batch: the first is fine
    with pytest.raises(DataError, match="img02.png: not a readable"):
        next(batches)
    (tmp_path / "img00.png").write_text("not an image")
    with pytest.raises(DataError, match="img00.png: not a readable"):
        SampleData(tmp_path, spec((None, 3, 8, 8)))


def test_sizes_the_model_does_not_fix_must_be_given(tmp_path):
    rng = np.random.default_rng(5)
    write_images(tmp_path, [(10, 10)] * 2, rng)
    with pytest.raises(DataError, match="--resize HxW"):
        SampleData(tmp_path, spec((None, 3, None, None)))
    data = SampleData(tmp_path, spec((None, 3, None, None)), images=Preprocessing(resize=(6, 4)))
    assert next(data.batches(2))["x"].shape == (2, 3, 6, 4)
    with pytest.raises(DataError, match="model takes 8x8"):
        SampleData(tmp_path, spec((None, 3, 8, 8)), images=Preprocessing(crop=(6, 6)))
    with pytest.raises(DataError, match="single-input"):
        SampleData(tmp_path, spec((None, 3, 8, 8)) + [InputSpec("y", np.dtype("f4"), (None, 2))])
    with pytest.raises(DataError, match="not a folder of JPEG/PNG"):
        SampleData(ROOT / "samples" / "eval.npz", spec((None, 1, 8, 8)), images=Preprocessing())


def test_missing_pillow_is_one_clear_error(tmp_path, monkeypatch):
    write_images(tmp_path, [(8, 8)], np.random.default_rng(6))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'bnq\[images\]'"):
        SampleData(tmp_path, spec((None, 3, 8, 8)))


def test_shipped_digit_images_are_the_arrays_they_came_from():
    images = SampleData(ROOT / "samples" / "digits" / "eval", spec((None, 1, 8, 8)),
                        extra_keys=("labels",))
    batch = next(images.batches(500, keys=("labels",)))
    with np.load(ROOT / "samples" / "eval.npz", allow_pickle=False) as data:
        x, labels = data["input"], data["labels"]
    order = [int(p.stem) for p in sorted((ROOT / "samples" / "digits" / "eval").glob("*/*.png"),
                                         key=lambda p: (p.parent.name, p.name))]
    np.testing.assert_allclose(batch["x"], x[order], atol=0.5 / 255 + 1e-7)
    assert batch["labels"].tolist() == labels[order].tolist()


def test_cli_flow_on_a_folder_of_images(tmp_path):
    runner = CliRunner()
    quantized = tmp_path / "q.onnx"
    result = runner.invoke(cli, ["calibrate", str(SAMPLE), "-d", str(ROOT / "samples" / "digits"
                                                                     / "calib"),
                                 "-o", str(quantized), "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["evaluate", str(quantized), "-r", str(SAMPLE), "-d",
                                 str(ROOT / "samples" / "digits" / "eval"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"top1_accuracy": {' in result.output
    result = runner.invoke(cli, ["evaluate", str(quantized), "-r", str(SAMPLE), "-d",
                                 str(ROOT / "samples" / "eval.npz"), "--preset", "imagenet"])
    assert result.exit_code == 2 and "--preset does not apply" in result.stderr


def test_a_model_among_the_data_is_named():
    with pytest.raises(DataError, match="digits_cnn.npz: a model in bnq's .npz format"):
        SampleData(ROOT / "samples", spec((None, 1, 8, 8)))
