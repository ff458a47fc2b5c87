"""Reading and writing model files, `.onnx` or `.npz` (bnq's format, bnq.npz), and writing any
file atomically: a reader never sees half of it, a failure leaves nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from bnq.errors import BnqError, ModelError, one_line
from bnq.graph import MIN_OPSET, default_opset
from bnq.limits import check_size
from bnq.npz import MAX_TENSOR_BYTES, read_npz, to_npz_arrays

MODEL_SUFFIXES = (".onnx", ".npz")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an `.onnx` or `.npz` model and check that it is a well-formed model bnq can work on."""
    path = Path(path)
    _model_suffix(path)
    regular_file(path, "model file", ModelError)
    model = _read_onnx(path) if path.suffix.lower() == ".onnx" else read_npz(path)
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(f"{path}: opset {opset} is older than {MIN_OPSET}, the oldest bnq reads; "
                         "upgrade it with onnx.version_converter")
    if opset > onnx.defs.onnx_opset_version():
        raise ModelError(f"{path}: opset {opset} is newer than {onnx.defs.onnx_opset_version()}, "
                         f"the newest that onnx {onnx.__version__} knows; no runtime runs it")
    # The full check (with shape inference) blames a broken input here, naming the file, rather
    # than as a failure of the model bnq writes from it. Above 2 GiB the checker wants the path.
    large = model.ByteSize() >= MAX_TENSOR_BYTES and path.suffix.lower() == ".onnx"
    try:
        onnx.checker.check_model(str(path) if large else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
        raise ModelError(f"{path}: not a valid ONNX model: {one_line(error)}") from error
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write `model` as `.onnx` or `.npz` (by extension), atomically: all of it or nothing."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        data = model.SerializeToString()
        write_atomic(path, lambda handle: handle.write(data), overwrite=overwrite)
    else:
        _model_suffix(path)
        arrays = to_npz_arrays(model)
        write_atomic(path, lambda handle: np.savez(handle, **arrays), overwrite=overwrite)


_FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def regular_file(path: Path, what: str, error: type[BnqError]) -> None:
    """Refuse, as `error`, a `path` that is not a regular file (symbolic links followed), before
    anything opens it: opening a FIFO blocks until a writer comes, a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{path}: a broken symbolic link (to {os.readlink(path)}, which does "
                        "not exist)") from None
        raise error(f"{path}: no such {what}") from None
    except OSError as cause:
        reason = ("a loop of symbolic links" if cause.errno == errno.ELOOP
                  else cause.strerror or one_line(cause))
        raise error(f"{path}: cannot read it ({reason})") from None
    if stat.S_ISDIR(mode):
        raise error(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
        raise error(f"{path} is {kind}, not a regular file; bnq reads a {what} only from a "
                    "regular file")


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any], *, overwrite: bool = False) -> None:
    """Write a file through a temporary sibling, so that readers never see half of it, and leave
    no temporary file whatever happens (an exception, Ctrl-C, a signal the CLI turns into one).

    With `overwrite` the temporary file is renamed over `path`. Without, it is hard-linked to
    `path`, which fails if anything is there: the existence check and the write are one step,
    so of two runs racing for one name, the second fails instead of replacing the first."""
    try:  # a short temporary name: a 250-character output name must leave room for it
        _check_directory(path)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name[:32]}.",
                                             delete=False)
    except OSError as error:
        raise BnqError(f"{path}: cannot write there ({error.strerror})") from error
    try:
        with handle:
            write(handle)
        os.chmod(handle.name, 0o666 & ~_umask())  # as open() would have made it, not 0600
        if overwrite:
            os.replace(handle.name, path)
        else:
            _link_new(handle.name, path)
    except FileExistsError as error:
        raise BnqError(f"{path} already exists (use --force to overwrite it)") from error
    except OSError as error:  # a full disk, a directory in the way: nothing written
        raise BnqError(f"{path}: cannot write it ({error.strerror or one_line(error)}); "
                       "nothing was written") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)


def _link_new(source: str, path: Path) -> None:
    """Give the file `source` the new name `path`; FileExistsError if `path` exists."""
    try:
        os.link(source, path)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # a file system without hard links: there the check and the rename are two steps
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from error
        os.replace(source, path)


def _check_directory(path: Path) -> None:
    if path.parent.exists() and not path.parent.is_dir():
        raise BnqError(f"{path}: {path.parent} is a file, not a directory")
    if not path.parent.is_dir():
        raise BnqError(f"{path}: the directory {path.parent} does not exist")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike], *,
                      overwrite: bool, suffixes: tuple[str, ...] | None = None) -> Path:
    """Refuse, before any work, an output that is one of the inputs (by any name: a symbolic or
    hard link), a directory, a file that exists when `overwrite` is off, or a name not ending
    in one of `suffixes` (default: a model's)."""
    output = Path(output)
    try:
        for source in inputs:
            if _same_file(output, source):
                raise BnqError(f"{output}: the output would overwrite the input; choose another "
                               "path")
        if output.is_dir():
            raise BnqError(f"{output} is a directory; give the output a file name ending in "
                           f"{' or '.join(suffixes or MODEL_SUFFIXES)}")
        if os.path.lexists(output) and not overwrite:
            raise BnqError(f"{output} already exists (use --force to overwrite it)")
        if suffixes is None:
            _model_suffix(output)
        elif output.suffix.lower() not in suffixes:
            raise BnqError(f"{output}: give a name ending in {' or '.join(suffixes)}")
        _check_directory(output)
    except OSError as error:  # a name longer than the system allows, ...
        raise BnqError(f"{output}: cannot write there ({error.strerror or one_line(error)})") \
            from error
    return output


def _same_file(path: Path, other: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:  # either does not exist (or is a loop of links): not the same file
        return False


def _model_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise ModelError(f"{path}: unknown model format {suffix or '(no extension)'!r}; "
                         "use .onnx or .npz")
    return suffix


def _read_onnx(path: Path) -> onnx.ModelProto:
    check_size(path.stat().st_size, f"{path}: the model file (read whole)", ModelError)
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError,
            onnx.checker.ValidationError) as error:  # the last: external data outside the folder
        raise ModelError(f"{path}: not an ONNX model ({one_line(error)})") from error
    if not model.HasField("graph") or not model.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph or no opset)")
    return model
