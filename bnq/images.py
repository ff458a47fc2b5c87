"""Folders of JPEG/PNG images as model input, decoded with Pillow (the optional extra
`bnq[images]`) one batch at a time.

Labels follow torchvision's `ImageFolder`: the images of a folder with subfolders are sorted
into classes by subfolder name, classes numbered in sorted order (0, 1, ...), files sorted
within each; a folder of images alone has no labels.

Preprocessing, in this order, for each image (values as float32 from the decoded 8-bit pixels):

    decode      -> RGB (or L for a 1-channel input); alpha dropped, palettes expanded
    resize      -> `resize` = S: shorter side to S, longer side int(S * long / short) (aspect
                   kept, torchvision's Resize(S)); `resize` = (H, W): exactly H x W.
                   Pillow's bilinear filter (antialiased when shrinking), as torchvision on
                   PIL images.
    center crop -> `crop` = (H, W): top = round((h - H) / 2), left = round((w - W) / 2)
                   (torchvision's CenterCrop)
    channels    -> RGB, or BGR (OpenCV's order, PaddleOCR's models)
    normalize   -> (x * scale - mean[c]) / std[c]
    layout      -> NCHW or NHWC

Sizes not given come from the model's input shape where it is fixed: without --resize and
--crop, images are resized to the input's H x W; a shorter-side resize is followed by a crop to
H x W; ImageNet's preset resizes the shorter side to floor(H / 0.875) (timm's rule: 256 for 224)
and crops H x W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bnq.errors import DataError, MissingExtraError, one_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How decoded images become a model's input (see the module docstring). None: from the
    model's input shape."""

    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels: str = "RGB"  # or "BGR"
    layout: str | None = None  # "NCHW" or "NHWC"; None: from the model's input shape
    crop_ratio: float | None = None  # with no resize given: resize the shorter side to crop / this


PRESETS: dict[str, Preprocessing] = {
    # torchvision's ImageNet evaluation: Resize(256), CenterCrop(224), ToTensor, Normalize
    "imagenet": Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_ratio=0.875),
    # PaddleOCR's detection models: images read by OpenCV (BGR), NormalizeImage with ImageNet's
    # mean and std, HWC -> CHW; resized to the input size (aspect not kept)
    "paddleocr": Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, channels="BGR"),
    # pixels / 255, resized to the input size: for models trained on [0, 1] images
    "unit": Preprocessing(),
}


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise MissingExtraError("reading images needs Pillow: pip install 'bnq[images]'") from None
    return Image


def image_files(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """The images of `folder`, their labels (None without class subfolders) and the class names,
    in torchvision ImageFolder's order."""
    def images(directory: Path) -> list[Path]:
        return sorted(p for p in directory.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    top = images(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and images(p))
    if top and classes:
        raise DataError(f"{folder}: holds images both directly and in class subfolders "
                        f"({', '.join(classes[:3])}...); put every image in a class folder, or "
                        "none")
    if not classes:
        return top, None, []
    files, labels = [], []
    for index, name in enumerate(classes):
        found = images(folder / name)
        files += found
        labels += [index] * len(found)
    return files, labels, classes


def holds_images(folder: Path) -> bool:
    """Whether `folder` holds images, directly or in subfolders."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()) or any(
        q.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_dir()
        for q in p.iterdir() if q.is_file())


@dataclass(frozen=True)
class ImagePlan:
    """Preprocessing with every size settled, for one model input of `channels` channels."""

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    scale: float
    mean: np.ndarray
    std: np.ndarray
    bgr: bool
    nhwc: bool
    channels: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        height, width = self.crop or self.resize
        return (height, width, self.channels) if self.nhwc else (self.channels, height, width)


def plan(preprocessing: Preprocessing, input_shape: tuple[int | None, ...],
         where: str) -> ImagePlan:
    """Settle `preprocessing` against a model input of `input_shape` (batch first, rank 4)."""
    if len(input_shape) != 4:
        raise DataError(f"{where}: images feed a rank-4 input (N, C, H, W or N, H, W, C); this "
                        f"model's input has shape {_shown(input_shape)}")
    layout = preprocessing.layout
    if layout is None:
        layout = "NHWC" if input_shape[3] in (1, 3) and input_shape[1] not in (1, 3) else "NCHW"
    nhwc = layout == "NHWC"
    channels, height, width = ((input_shape[3], input_shape[1], input_shape[2]) if nhwc
                               else input_shape[1:])
    if channels is None:
        channels = 3
    if channels not in (1, 3):
        raise DataError(f"{where}: the model's input has {channels} channels; images give 1 "
                        "(grayscale) or 3 (color)")
    fixed = (height, width) if height is not None and width is not None else None
    crop, resize = preprocessing.crop, preprocessing.resize
    if crop is None and (preprocessing.crop_ratio or isinstance(resize, int)):
        crop = fixed  # a shorter-side resize needs a crop to give every image the same size
    if resize is None and preprocessing.crop_ratio and crop is not None:
        resize = math.floor(min(crop) / preprocessing.crop_ratio)  # timm's rule: 224 -> 256
    elif resize is None and crop is None:
        resize = fixed
    final = crop or resize
    if not isinstance(final, tuple):
        raise DataError(f"{where}: the model's input size is not fixed ({_shown(input_shape)}) "
                        "and each image would keep its own; give --resize HxW or --crop HxW")
    if fixed is not None and final != fixed:
        raise DataError(f"{where}: images would be {final[0]}x{final[1]} but the model takes "
                        f"{fixed[0]}x{fixed[1]}; change --resize / --crop")
    mean, std = (np.asarray(v, np.float32) for v in (preprocessing.mean, preprocessing.std))
    for name, values in (("mean", mean), ("std", std)):
        if values.size not in (1, channels):
            raise DataError(f"{where}: --{name} has {values.size} values for {channels} "
                            "channels")
    if np.any(std == 0):
        raise DataError(f"{where}: --std must not be 0")
    return ImagePlan(resize, crop, preprocessing.scale,
                     np.broadcast_to(mean, (channels,)), np.broadcast_to(std, (channels,)),
                     preprocessing.channels == "BGR", nhwc, channels)


def _shown(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_image(path: Path) -> None:
    """Read the header of `path` (cheap); a file that is not an image is an error naming it."""
    image_module = _pillow()
    try:
        with image_module.open(path) as image:
            image.size  # noqa: B018 - the header is parsed on open; size proves it
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        raise DataError(f"{path}: not a readable JPEG or PNG image ({one_line(error)})") from None


def load_image(path: Path, image_plan: ImagePlan) -> np.ndarray:
    """One image, decoded and preprocessed as `image_plan` says: float32, C x H x W or H x W x C."""
    image_module = _pillow()
    try:
        with image_module.open(path) as image:
            image = image.convert("L" if image_plan.channels == 1 else "RGB")
            if image_plan.resize is not None:
                image = _resize(image, image_plan.resize, image_module)
            if image_plan.crop is not None:
                image = _center_crop(image, image_plan.crop, path)
            pixels = np.asarray(image, dtype=np.float32)
    except DataError:
        raise
    except Exception as error:  # a truncated or corrupt file fails while decoding
        raise DataError(f"{path}: not a readable JPEG or PNG image ({one_line(error)})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if image_plan.bgr:
        pixels = pixels[:, :, ::-1]
    pixels = (pixels * np.float32(image_plan.scale) - image_plan.mean) / image_plan.std
    return np.ascontiguousarray(pixels if image_plan.nhwc else pixels.transpose(2, 0, 1))


def _resize(image, size: int | tuple[int, int], image_module):
    width, height = image.size
    if isinstance(size, tuple):
        new_height, new_width = size
    elif width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_height, new_width = size, int(size * width / height)
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), image_module.Resampling.BILINEAR)


def _center_crop(image, crop: tuple[int, int], path: Path):
    width, height = image.size
    crop_height, crop_width = crop
    if crop_height > height or crop_width > width:
        raise DataError(f"{path}: {width}x{height} after resizing, smaller than the crop "
                        f"{crop_width}x{crop_height}; resize to at least the crop size")
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return image.crop((left, top, left + crop_width, top + crop_height))


def with_options(preprocessing: Preprocessing, **options) -> Preprocessing:
    """`preprocessing` with the options that are not None replaced."""
    return replace(preprocessing, **{k: v for k, v in options.items() if v is not None})
