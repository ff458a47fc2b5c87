"""How much memory bnq lets one thing take, checked from shapes and dtypes before anything is
allocated: a tensor computed while folding constants, a tensor of a model run on a batch, a
batch of samples, the arrays of an `.npz` model, a model file, the tensor of `bench --kernel`.

A mistyped shape, or a hostile file of a few hundred bytes (a `ConstantOfShape` of [3, 2**29],
a Conv with pads of 5000), would otherwise take the machine's memory before failing. The limit
is `BNQ_MAX_BYTES` from the environment (bytes, or with a binary suffix: 512M, 8G), 2 GiB by
default: what protobuf allows a whole ONNX model, and far above any tensor of the CNNs bnq is
for (DenseNet-121's largest activation at batch 32 takes 103 MB).
"""

from __future__ import annotations

import os
import re

from bnq.errors import ArgumentError, BnqError

ENVIRONMENT = "BNQ_MAX_BYTES"
DEFAULT = 2 << 30
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def max_bytes() -> int:
    """The limit: `BNQ_MAX_BYTES` if set, else 2 GiB."""
    text = os.environ.get(ENVIRONMENT, "").strip()
    if not text:
        return DEFAULT
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?", text.upper())
    if match is None or float(match[1]) * _SUFFIXES[match[2]] < 1:
        raise ArgumentError(f"{ENVIRONMENT}={text!r} is not a size in bytes such as 8G, 512M "
                            "or 4294967296")
    return int(float(match[1]) * _SUFFIXES[match[2]])


def human(size: float) -> str:
    """1610612736 -> '1.5 GiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_size(size: int, what: str, error: type[BnqError], remedy: str = "") -> None:
    """Refuse, as `error`, `what` if its estimated `size` in bytes exceeds the limit; `remedy`
    says what else the user can do (use a smaller batch size, ...)."""
    limit = max_bytes()
    if size > limit:
        raise error(f"{what} would take {human(size)}, more than bnq's limit of {human(limit)}; "
                    f"{remedy + ' or ' if remedy else ''}raise the limit with "
                    f"{ENVIRONMENT}={-(-size // (1 << 30))}G")
