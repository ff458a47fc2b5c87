"""What bnq runs on: CPU model and features, cores, library versions; the integer formats
that suit this CPU; and the threads bnq's own NumPy work runs on."""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import TypeVar

T = TypeVar("T")

FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp")


@dataclass(frozen=True)
class Machine:
    cpu: str
    features: tuple[str, ...]
    cores: int
    versions: dict[str, str]


@cache
def thread_pool() -> ThreadPoolExecutor:
    """The process's threads for NumPy work split by the caller (NumPy releases the GIL in its
    loops), one per core: callers submit at most as many tasks at once as the threads they were
    given."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bnq")


def spread(work: Callable[[T], object], items: Sequence[T], threads: int) -> None:
    """`work(item)` for every item on `threads` (>= 1) threads (this one and the pool's), each
    item wholly on one thread, handed out in order to whichever thread is free: work on disjoint
    state gives the same results as one thread. If some fail, the first failing item's error
    is raised, as one thread would (every item before it was handed out, so run). It returns
    (or raises, Ctrl-C included) only once every thread is done. `work` must not use the pool
    itself (it could wait for threads that wait for it)."""
    lock, positions = threading.Lock(), iter(range(len(items)))

    def share() -> tuple[int, Exception] | None:
        while True:
            with lock:
                index = next(positions, None)
            if index is None:
                return None
            try:
                work(items[index])
            except Exception as error:  # raised below, in the caller's thread
                return index, error

    others = [thread_pool().submit(share) for _ in range(min(threads, len(items)) - 1)]
    try:
        mine = share()
    finally:
        wait(others)
    failures = [mine, *(other.result() for other in others)]
    first = min((failure for failure in failures if failure), default=None,
                key=lambda failure: failure[0])
    if first:
        raise first[1]


@cache
def describe() -> Machine:
    """This machine: the CPU, the features that decide integer kernels, cores, versions."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and cpu in ("", platform.machine(), "x86_64"):
                    cpu = value.strip()
                elif key in ("flags", "Features"):
                    flags |= set(value.split())
    except OSError:
        pass
    versions = {}
    for package in ("bnq", "numpy", "onnx", "onnxruntime", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return Machine(cpu or "unknown", tuple(f for f in FEATURES if f in flags),
                   os.cpu_count() or 1, versions)


@dataclass(frozen=True)
class IntegerFormats:
    """The integer types of a quantized model, and why they were chosen."""

    activation: str  # "uint8" or "int8"
    weight: str  # "int8"
    reduce_range: bool  # 7-bit weights
    reason: str


def default_formats(machine: Machine | None = None) -> IntegerFormats:
    """uint8 activations x int8 weights (onnxruntime's fast u8s8 kernels), with 7-bit weights on
    x86 CPUs that have AVX2 but no VNNI: there `vpmaddubsw` adds two u8 x s8 products into int16
    and saturates (8-bit weights cost the digits sample 16 dB of SQNR and up to 1.2 points of
    top-1 on a 2-core AMD EPYC with AVX2 and no VNNI), which 7-bit weights rule out."""
    machine = machine or describe()
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8"} & set(machine.features)
    if vnni:
        return IntegerFormats("uint8", "int8", False,
                              f"{sorted(vnni)[0]}: u8 x s8 dot products accumulate in int32")
    if "avx2" in machine.features:
        return IntegerFormats("uint8", "int8", True,
                              "AVX2 without VNNI: u8 x s8 pairs saturate int16, so weights use "
                              "7 bits")
    return IntegerFormats("uint8", "int8", False, "no x86 u8 x s8 saturation on this CPU")
