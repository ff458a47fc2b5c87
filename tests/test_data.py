"""Sample data: streamed in batches from .npz, .npy and directories, checked before any work."""

from __future__ import annotations

import numpy as np
import pytest

import bnq.data
from bnq import DataError
from bnq.data import InputSpec, SampleData

SPEC = [InputSpec("input", np.dtype(np.float32), (None, 1, 4, 4))]


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 4, 4)).astype(np.float32)


def collect(data: SampleData, batch_size: int, **kwargs) -> list[dict]:
    return list(data.batches(batch_size, **kwargs))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_in_batches_with_a_short_last_one(tmp_path, compressed):
    x = samples(50)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", input=x,
                                                      labels=np.arange(50))
    data = SampleData(tmp_path / "d.npz", SPEC, extra_keys=("labels",))
    batches = collect(data, 16, keys=("labels",))
    assert [len(b["input"]) for b in batches] == [16, 16, 16, 2]
    assert np.array_equal(np.concatenate([b["input"] for b in batches]), x)
    assert np.array_equal(np.concatenate([b["labels"] for b in batches]), np.arange(50))


def test_npy_and_directories_concatenate_in_name_order(tmp_path):
    np.save(tmp_path / "b.npy", samples(3, 1))
    np.savez(tmp_path / "a.npz", whatever=samples(4, 2))  # one array: any key feeds one input
    data = SampleData(tmp_path, SPEC)
    assert data.num_samples == 7
    got = np.concatenate([b["input"] for b in collect(data, 5)])
    assert np.array_equal(got, np.concatenate([samples(4, 2), samples(3, 1)]))
    assert [len(b["input"]) for b in collect(data, 5, num_samples=6)] == [4, 2]


def test_float64_is_cast_to_the_model_dtype(tmp_path):
    np.save(tmp_path / "d.npy", samples(2).astype(np.float64))
    [batch] = collect(SampleData(tmp_path / "d.npy", SPEC), 8)
    assert batch["input"].dtype == np.float32


@pytest.mark.parametrize(("array", "message"), [
    (samples(3)[:, :, :2], r"shape \[1, 2, 4\]"),
    (np.zeros((3, 1, 4, 4), np.int64), "dtype int64"),
    (np.zeros((0, 1, 4, 4), np.float32), "no samples"),
    (np.array(1.0, np.float32), "0-d"),
])
def test_bad_arrays_are_refused_when_opened(tmp_path, array, message):
    np.save(tmp_path / "d.npy", array)
    with pytest.raises(DataError, match=message):
        SampleData(tmp_path / "d.npy", SPEC)


def test_missing_keys_and_object_arrays(tmp_path):
    np.savez(tmp_path / "two.npz", a=samples(2), b=samples(2))
    with pytest.raises(DataError, match="no array for model input 'input'"):
        SampleData(tmp_path / "two.npz", SPEC)
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="never unpickles"):
        SampleData(tmp_path / "obj.npy", SPEC)
    np.savez(tmp_path / "uneven.npz", input=samples(2), labels=np.arange(3))
    with pytest.raises(DataError, match="different numbers of samples"):
        SampleData(tmp_path / "uneven.npz", SPEC, extra_keys=("labels",))


def test_non_finite_values_are_reported_with_their_samples(tmp_path):
    x = samples(10)
    x[7, 0, 1, 1] = np.nan
    np.save(tmp_path / "d.npy", x)
    data = SampleData(tmp_path / "d.npy", SPEC)
    with pytest.raises(DataError, match="samples 4..7"):
        collect(data, 4)


def test_truncated_files_are_an_error(tmp_path):
    np.save(tmp_path / "d.npy", samples(10))
    raw = (tmp_path / "d.npy").read_bytes()
    (tmp_path / "d.npy").write_bytes(raw[:-100])
    with pytest.raises(DataError, match="truncated"):
        collect(SampleData(tmp_path / "d.npy", SPEC), 4)


def test_fingerprint_reads_small_data_whole_and_large_data_in_spread_blocks(tmp_path,
                                                                            monkeypatch):
    np.save(tmp_path / "a.npy", samples(10300, 1))  # 659 KB
    np.save(tmp_path / "b.npy", samples(5700, 2))
    data = SampleData(tmp_path, SPEC)
    sizes = {name: (tmp_path / name).stat().st_size for name in ("a.npy", "b.npy")}

    def changed(name: str, offset: int) -> str:
        """The fingerprint with the byte at `offset` of file `name` changed."""
        path = tmp_path / name
        original = path.read_bytes()
        path.write_bytes(original[:offset] + bytes([original[offset] ^ 1]) + original[offset + 1:])
        try:
            return data.fingerprint()
        finally:
            path.write_bytes(original)

    whole = data.fingerprint()
    assert changed("a.npy", 300_000) != whole and changed("b.npy", sizes["b.npy"] - 1) != whole
    monkeypatch.setattr(bnq.data, "FINGERPRINT_BYTES", 4 << 16)  # 4 blocks over 1.0 MB
    sampled = data.fingerprint()
    assert sampled != whole
    # blocks at 0, 1/3 and 2/3 of the bytes (across the end of a.npy) and at the end
    assert changed("a.npy", 0) != sampled and changed("b.npy", sizes["b.npy"] - 1) != sampled
    assert changed("a.npy", sizes["a.npy"] - 1) != sampled
    assert changed("a.npy", 150_000) == sampled  # between blocks: not read
    (tmp_path / "b.npy").rename(tmp_path / "c.npy")
    with pytest.raises(OSError):
        data.fingerprint()
