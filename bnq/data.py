"""Sample data for calibration and evaluation, streamed in batches.

A data source is a `.npz` file keyed by the model's input names (a single-input model also takes a
single array under any key), a `.npy` file (single-input models), a directory of such files,
read in name order and concatenated along the batch axis (axis 0), or a folder of JPEG/PNG
images for a single-input model (`bnq.images`: decoded and preprocessed batch by batch, labels
from class subfolders under every extra key asked for). Arrays are read a batch at a
time, straight from the file (`.npy` through a memory map, `.npz` members as a stream), so memory
does not grow with the number of samples; nothing is unpickled.

`fingerprint()` tells whether another process (a cluster's worker) sees the same data at the
same path: a digest of the names and sizes of the files read, and of their content when it
totals at most FINGERPRINT_BYTES, else of FINGERPRINT_BYTES of it in 64 KiB blocks spread evenly
over the files, so that it costs the same for any size of data set (a stale copy of a data set
differs in sizes, or in content nearly everywhere, which the blocks sample).

Everything that can be checked without reading the data (keys, dtypes, shapes against the model's
inputs, equal sample counts, files as long as their headers declare) is checked when the source is
opened, before any work. Limits protect the machine from a mistyped shape: a sample larger than
MAX_SAMPLE_BYTES, or a batch of one input larger than bnq's memory limit (`bnq.limits`), is
refused unread.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bnq.errors import DataError, ModelError, one_line
from bnq.graph import constant_values, numpy_dtype
from bnq.images import Preprocessing, check_image, holds_images, image_files, load_image, plan
from bnq.io import regular_file
from bnq.limits import check_size
from bnq.npz import GRAPH_KEY, read_npy_header

DATA_SUFFIXES = (".npz", ".npy")
MAX_SAMPLE_BYTES = 1 << 30  # one sample larger than this is a mistake, not a tensor to read
FINGERPRINT_BYTES = 16 << 20  # the most of the data's content `fingerprint` reads
_FINGERPRINT_BLOCK = 64 << 10


@dataclass(frozen=True)
class InputSpec:
    """A model input: its name, dtype and shape (None for a dynamic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are neither constants nor initializers
    (an initializer listed as a graph input is a default the caller may override, not must)."""
    known = set(constant_values(model)) | {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in known:
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None
                      for d in tensor_type.shape.dim)
        dtype = numpy_dtype(tensor_type.elem_type)
        if dtype is None or dtype.kind not in "biuf":
            raise ModelError(f"model input {value.name!r} has element type "
                             f"{tensor_type.elem_type}, not a numeric tensor that samples can "
                             "feed; fix the model's input type")
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


# What zipfile raises for a damaged archive: a bad CRC at the end of a member, a bad header...
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError)


class _Member:
    """One array in a file, read front to back in row blocks without loading it whole."""

    def __init__(self, path: Path, key: str | None) -> None:
        self.path, self.key = path, key
        self.where = f"{path}" + (f"[{key!r}]" if key else "")
        try:
            with self._open() as handle:
                self.shape, self.dtype, self.offset = self._header(handle)
        except _CORRUPT as error:
            raise self._corrupt(error) from error

    def _corrupt(self, error: Exception) -> DataError:
        return DataError(f"{self.where}: the archive is corrupt ({one_line(error)})")

    def _open(self):
        if self.key is None:
            return open(self.path, "rb")
        archive = zipfile.ZipFile(self.path)
        return _ClosingMember(archive, archive.open(f"{self.key}.npy"))

    def _stored_bytes(self) -> int:
        if self.key is None:
            return self.path.stat().st_size
        with zipfile.ZipFile(self.path) as archive:
            return archive.getinfo(f"{self.key}.npy").file_size

    def _header(self, handle):
        shape, fortran, dtype = read_npy_header(handle, self.where, DataError)
        if fortran and len(shape) > 1:
            raise DataError(f"{self.where}: Fortran-ordered arrays are not supported; "
                            "save np.ascontiguousarray(x)")
        if not shape:
            raise DataError(f"{self.where}: a 0-d array holds no samples")
        declared = math.prod(shape) * dtype.itemsize
        if declared > self._stored_bytes() - handle.tell():  # before any work, not mid-way
            raise DataError(f"{self.where}: the file is truncated: its header declares shape "
                            f"{list(shape)} ({declared} bytes) but it holds fewer")
        return tuple(shape), dtype, handle.tell()

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        """The bytes of one sample."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def blocks(self, sizes: Iterator[int], skip: int = 0) -> Iterator[np.ndarray]:
        """Consecutive row blocks of the given sizes, from row `skip` on."""
        row_bytes = self.row_bytes
        with self._open() as handle:
            handle.seek(self.offset + skip * row_bytes)
            for size in sizes:
                try:
                    data = handle.read(size * row_bytes)
                except _CORRUPT as error:
                    raise self._corrupt(error) from error
                if len(data) != size * row_bytes:
                    raise DataError(f"{self.where}: the file is truncated")
                yield np.frombuffer(data, self.dtype).reshape((size,) + self.shape[1:])


class _ClosingMember:
    def __init__(self, archive: zipfile.ZipFile, member) -> None:
        self.archive, self.member = archive, member

    def __enter__(self):
        return self.member

    def __exit__(self, *exc) -> None:
        self.member.close()
        self.archive.close()


class _ImageFolder:
    """A folder of images for a single-input model (see `bnq.images`)."""

    def __init__(self, folder: Path, inputs: list[InputSpec], preprocessing: Preprocessing,
                 extra_keys: tuple[str, ...]) -> None:
        if len(inputs) != 1:
            raise DataError(f"{folder}: a folder of images feeds a single-input model; this "
                            f"model has inputs {', '.join(spec.name for spec in inputs)}")
        self.folder, self.spec = folder, inputs[0]
        if self.spec.dtype.kind != "f":
            raise DataError(f"{folder}: images feed a float input; model input "
                            f"{self.spec.name!r} takes {self.spec.dtype}")
        self.files, self.labels, self.classes = image_files(folder)
        self.plan = plan(preprocessing, self.spec.shape, str(folder))
        check_image(self.files[0])  # Pillow is installed and the first file is an image
        self.label_keys = extra_keys if self.labels is not None else ()

    def batches(self, batch_size: int, count: int, keys: tuple[str, ...],
                first: int = 0) -> Iterator[dict[str, np.ndarray]]:
        # the decoded images of a batch, then the batch they are stacked into
        check_size(2 * min(batch_size, count) * load_image(self.files[0], self.plan).nbytes,
                   f"{self.folder}: a batch of {batch_size} images", DataError,
                   "use a smaller batch size")
        for start in range(first, first + count, batch_size):
            files = self.files[start:min(start + batch_size, first + count)]
            batch = {self.spec.name: np.stack([load_image(f, self.plan) for f in files])
                     .astype(self.spec.dtype, copy=False)}
            for key in keys:
                batch[key] = np.asarray(self.labels[start:start + len(files)], np.int64)
            yield batch


class SampleData:
    """Samples for a model's inputs, opened and checked; `batches()` streams them. `images`
    says how a folder of images becomes input (default: resized to the model's input size,
    pixels / 255, RGB)."""

    def __init__(self, path: str | Path, inputs: list[InputSpec], *,
                 extra_keys: tuple[str, ...] = (), images: Preprocessing | None = None) -> None:
        self.path = Path(path)
        self.inputs = inputs
        if not inputs:
            raise DataError(f"{self.path}: the model takes no inputs, so there is nothing for "
                            "samples to feed; it computes the same outputs every time")
        self.images: _ImageFolder | None = None
        if self.path.is_dir() and holds_images(self.path) and not self._data_files():
            self.images = _ImageFolder(self.path, inputs, images or Preprocessing(), extra_keys)
            self.parts = []
            self.files = self.images.files
            self.num_samples = len(self.files)
            return
        if images is not None:
            raise DataError(f"{self.path}: image preprocessing was given, but this is not a "
                            "folder of JPEG/PNG images")
        self.files = self._files()
        self.parts: list[dict[str, _Member]] = [self._open_file(f, extra_keys) for f in self.files]
        self.num_samples = sum(next(iter(part.values())).rows for part in self.parts)
        if self.num_samples == 0:
            raise DataError(f"{self.path}: holds no samples")

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one sample of each model input (the batch axis left out)."""
        if self.images is not None:
            return {self.images.spec.name: self.images.plan.sample_shape}
        return {spec.name: self.parts[0][spec.name].shape[1:] for spec in self.inputs}

    def batch_bounds(self, batch_size: int,
                     num_samples: int | None = None) -> list[tuple[int, int]]:
        """(first sample, samples) of each batch `batches` yields: a batch ends with its file."""
        remaining = self.num_samples if num_samples is None else min(num_samples, self.num_samples)
        bounds, offset = [], 0
        for rows in ([self.num_samples] if self.images is not None else
                     [next(iter(part.values())).rows for part in self.parts]):
            take = min(rows, remaining)
            bounds += [(offset + start, min(batch_size, take - start))
                       for start in range(0, take, batch_size)]
            offset, remaining = offset + rows, remaining - take
        return bounds

    def fingerprint(self) -> str:
        """A digest of the data as this process sees it at its path (module docstring); raises
        OSError when a file cannot be read."""
        sizes = [path.stat().st_size for path in self.files]
        digest = hashlib.sha256()
        for path, size in zip(self.files, sizes):
            digest.update(f"{path.relative_to(self.path).as_posix()}\0{size}\0".encode())
        starts = list(itertools.accumulate(sizes, initial=0))
        total = starts[-1]
        if total <= FINGERPRINT_BYTES:
            spans = [(0, total)]
        else:
            count = FINGERPRINT_BYTES // _FINGERPRINT_BLOCK
            spans = [(k * (total - _FINGERPRINT_BLOCK) // (count - 1), _FINGERPRINT_BLOCK)
                     for k in range(count)]
        for start, length in spans:
            end = start + length
            index = bisect.bisect_right(starts, start) - 1  # the file that holds byte `start`
            while start < end:
                take = min(end, starts[index + 1]) - start
                with open(self.files[index], "rb") as handle:
                    handle.seek(start - starts[index])
                    digest.update(handle.read(take))
                start += take
                index += 1
        return digest.hexdigest()

    def has(self, key: str) -> bool:
        if self.images is not None:
            return key in self.images.label_keys
        return all(key in part for part in self.parts)

    def _data_files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            files = self._data_files()
            if not files:
                raise DataError(f"{self.path}: the directory holds no .npz, .npy or JPEG/PNG "
                                "files")
            for path in files:
                regular_file(path, "data file", DataError)
            return files
        regular_file(self.path, "data file or directory", DataError)
        if self.path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{self.path}: unknown data format; use .npz, .npy or a directory "
                            "of them")
        return [self.path]

    def _open_file(self, path: Path, extra_keys: tuple[str, ...]) -> dict[str, _Member]:
        names = [spec.name for spec in self.inputs]
        if path.suffix.lower() == ".npy":
            if len(names) != 1:
                raise DataError(f"{path}: a .npy file feeds a single-input model; this model has "
                                f"inputs {', '.join(names)}: use a .npz keyed by them")
            members = {names[0]: _Member(path, None)}
        else:
            try:
                with zipfile.ZipFile(path) as archive:
                    keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            except (zipfile.BadZipFile, OSError) as error:
                raise DataError(f"{path}: not a .npz file ({error})") from error
            if GRAPH_KEY in keys:
                raise DataError(f"{path}: a model in bnq's .npz format, not sample data; give "
                                "-d a data file, or a folder that holds only data")
            members = {}
            for spec in self.inputs:
                if spec.name in keys:
                    members[spec.name] = _Member(path, spec.name)
                elif len(names) == 1 and len(set(keys) - set(extra_keys)) == 1:
                    members[spec.name] = _Member(path, (set(keys) - set(extra_keys)).pop())
                else:
                    raise DataError(f"{path}: no array for model input {spec.name!r} "
                                    f"(keys: {', '.join(keys) or 'none'})")
            members.update({key: _Member(path, key) for key in extra_keys if key in keys})
        for spec in self.inputs:
            self._check(members[spec.name], spec)
        rows = {member.rows for member in members.values()}
        if len(rows) != 1:
            raise DataError(f"{path}: arrays hold different numbers of samples "
                            f"({', '.join(f'{k}: {m.rows}' for k, m in members.items())})")
        return members

    @staticmethod
    def _check(member: _Member, spec: InputSpec) -> None:
        if member.dtype != spec.dtype and not (member.dtype.kind == spec.dtype.kind == "f"):
            raise DataError(f"{member.where}: dtype {member.dtype}, but model input "
                            f"{spec.name!r} takes {spec.dtype}")
        expected = spec.shape[1:]
        actual = member.shape[1:]
        if len(actual) != len(expected) or any(
                e is not None and e != a for e, a in zip(expected, actual)):
            shown = ["?" if e is None else e for e in spec.shape]
            whole = tuple(actual) == spec.shape  # a tensor per sample where the model takes one
            raise DataError(f"{member.where}: samples of shape {list(actual)}, but model input "
                            f"{spec.name!r} takes {shown} (batch first)" + (
                                "; it has no batch axis (a parameter made a graph input?): "
                                "make it an initializer of the model" if whole else ""))
        if member.row_bytes > MAX_SAMPLE_BYTES:
            raise DataError(f"{member.where}: one sample of shape {list(actual)} takes "
                            f"{member.row_bytes} bytes, more than 1 GiB; refusing")

    def batches(self, batch_size: int, num_samples: int | None = None,
                keys: tuple[str, ...] = (), first: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Dicts of arrays, `batch_size` samples each (the last may be short), model inputs cast
        to their dtype and checked for NaN and infinity, plus the `keys` asked for; from sample
        `first` on (a worker's shard), `num_samples` of them at most."""
        remaining = self.num_samples if num_samples is None else min(num_samples, self.num_samples)
        remaining = min(remaining, self.num_samples - first)
        if self.images is not None:
            yield from self.images.batches(batch_size, remaining, keys, first)
            return
        dtypes = {spec.name: spec.dtype for spec in self.inputs}
        wanted = [*dtypes, *keys]
        for part in self.parts:
            for member in (part[key] for key in wanted):
                check_size(min(batch_size, member.rows, remaining) * member.row_bytes,
                           f"{member.where}: a batch of {batch_size} samples", DataError,
                           "use a smaller batch size")
        seen, skip = 0, first
        for part in self.parts:
            rows = next(iter(part.values())).rows
            if seen >= remaining:
                break
            if skip >= rows:  # before the first sample asked for (or a file without samples)
                skip -= rows
                continue
            take = min(rows - skip, remaining - seen)
            streams = {key: part[key].blocks(_batch_sizes(take, batch_size), skip)
                       for key in wanted}
            for start in range(skip, skip + take, batch_size):
                batch = {key: next(stream) for key, stream in streams.items()}
                for name, dtype in dtypes.items():
                    array = batch[name].astype(dtype, copy=False)
                    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                        bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
                        raise DataError(f"{part[name].where}: NaN or infinite values in samples "
                                        f"{start}..{start + len(array) - 1} (first: sample "
                                        f"{start + int(np.argmax(bad))}); drop or fix them")
                    batch[name] = array
                seen += len(batch[next(iter(dtypes))])
                yield batch
            skip = 0
            for stream in streams.values():
                stream.close()


def _batch_sizes(total: int, batch_size: int) -> Iterator[int]:
    """`batch_size` repeatedly, then what is left of `total`: made lazily, for any `total`."""
    for start in range(0, total, batch_size):
        yield min(batch_size, total - start)
