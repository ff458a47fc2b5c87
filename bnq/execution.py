"""Run models over sample data in bounded memory, in worker processes or on a Dask cluster.

A `Job` names the models to run (each on its backend), the tensors to fetch from them besides
their outputs, in groups (tensors fetched together: a node's output in both models of
`bnq evaluate`), and a factory of accumulators: objects fed with the fetched tensors
(`update(batch, fetched)`) whose `merge` is exact. The result is therefore the same, bit for bit,
however the work is split:

* **Micro-batches.** A batch of the data is run in slices of `micro_batch` samples. A model
  of the job may run on some samples only (`Job.samples`, chosen by their indices in the data:
  `bnq.choice`'s folds), which its results per sample do not depend on.
* **Passes.** When even one sample's tensors exceed the memory limit, the groups are fetched in
  several passes over the data, each pass running the models again for its groups only.
* **Workers.** Units of work (one pass over one batch) run in worker processes, each with its
  own onnxruntime sessions and `cores // workers` intra-op threads so that workers do not fight
  over cores; each unit's accumulator comes back to the caller and is merged in unit order.
* **A Dask cluster** (`scheduler="tcp://host:8786"`, the optional `distributed` package) runs the
  same units (`bnq.cluster`): the job (with its models) is sent once to every worker; each unit
  reads its batch from the data path when every worker sees the same data there, else the
  caller reads the batch and sends it with the unit. A worker that dies has its units rerun
  elsewhere by the scheduler; a unit that fails for good stops the run with an error.

Each unit's accumulator is merged as soon as the units before it are: only those that finish
early wait, so the caller's memory does not grow with the number of batches.

Memory. A fetched tensor stays alive until the run returns, and the array handed to the
accumulators is a second copy, so per sample a pass fetching the set S holds about

    estimate = sum over the models of bytes(intermediate tensors not fetched) + 2 * bytes(S)

with every size from ONNX shape inference at the data's sample shapes (a tensor of unknown
size counts as the largest known one). On torchvision DenseNet-121 at 224 x 224 the estimate is
234 MB per sample and the process's peak memory grew by 240 MB per sample of a batch. The plan
takes micro-batches of `limit // estimate` samples (at most the batch size) when one sample
fits, else single samples and the groups packed in order into as few passes as fit.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from bnq.data import SampleData
from bnq.errors import ArgumentError, BnqError, DataError, one_line
from bnq.graph import NameScope, concrete_shapes, with_outputs
from bnq.runtime import fixed_batch, make_runner

DEFAULT_MEMORY_LIMIT = 1 << 30
# A key a Job may list in `keys`: each sample's index in the data (0, 1, ... in data order),
# handed to the accumulators in every pass, whatever the split.
SAMPLE = "bnq:sample"
_POLL_SECONDS = 0.2  # how often the caller looks for dead workers while waiting


class ExecutionError(BnqError):
    """A worker process or a cluster that failed to run its share of the work."""


class Accumulator(Protocol):
    def update(self, batch: dict[str, np.ndarray], fetched: list[dict[str, np.ndarray]],
               groups: tuple[int, ...]) -> None:
        """Take one micro-batch: the data's arrays and, per model, the tensors fetched by this
        pass, which are those of the job's `groups`."""

    def merge(self, other: Accumulator) -> None:
        """Add what `other` took, exactly."""


@dataclass(frozen=True)
class Job:
    """What to run: `groups[g][m]` are tensors of model `m` fetched together; group 0 is
    fetched in the first pass, with the data's extra `keys` (such as labels; `SAMPLE`, the
    samples' indices, comes in every pass)."""

    models: tuple[onnx.ModelProto, ...]
    backends: tuple[str, ...]
    groups: tuple[tuple[tuple[str, ...], ...], ...]
    accumulator: Callable[[], Accumulator]
    keys: tuple[str, ...] = ()
    # Per model (all when empty or None): which samples of a micro-batch it runs on, a mask
    # from their indices; the accumulators get that model's tensors of those samples only.
    samples: tuple[Callable[[np.ndarray], np.ndarray] | None, ...] = ()


@dataclass(frozen=True)
class ExecutionPlan:
    """How each process splits its work and gets its data (the results do not depend on it). It
    depends on the memory limit and on whether a cluster's workers see the data, not on the
    number of workers, so reports are the same for any number."""

    memory_limit: int  # bytes of activations allowed per process
    estimated_bytes: int  # the estimate for the largest pass at `micro_batch` samples
    micro_batch: int
    passes: int
    data: str  # "path": each process reads the data from its path; "streamed": the caller sends it


@dataclass(frozen=True)
class RunResult:
    accumulator: Accumulator
    samples: int
    batches: int
    plan: ExecutionPlan


def run(job: Job, data: SampleData, *, batch_size: int = 32, num_samples: int | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT, workers: int = 1,
        scheduler: str | None = None,
        progress: Callable[[float], None] | None = None) -> RunResult:
    """Run `job` over `data` and return its merged accumulator; `memory_limit` holds for each
    worker process. `progress(n)` is told of the samples done (fractions of a sample when there
    are several passes)."""
    if batch_size < 1:
        raise ArgumentError(f"batch size must be at least 1, got {batch_size}")
    if num_samples is not None and num_samples < 1:
        raise ArgumentError(f"the number of samples must be at least 1, got {num_samples}")
    threads = worker_threads(workers, scheduler)
    if memory_limit < 1:
        raise ArgumentError(f"the memory limit must be positive, got {memory_limit}")
    total = min(num_samples or data.num_samples, data.num_samples)
    micro_batch, passes, estimate = plan_passes(job, data, batch_size, memory_limit)
    shard = _Shard(job, data, tuple(passes), micro_batch, threads, batch_size)
    bounds = data.batch_bounds(batch_size, num_samples)
    units = [(p, first, count) for p in range(len(passes)) for first, count in bounds]
    advance = (lambda n: progress(n / len(passes))) if progress else (lambda n: None)
    result = job.accumulator()
    source = "path"
    if scheduler:
        from bnq.cluster import run_on_cluster
        source = run_on_cluster(scheduler, shard, units, advance, result.merge)
    elif workers == 1:
        for unit in units:
            result.merge(shard.run(unit, advance))
    else:
        _run_in_workers(shard, units, workers, advance, result.merge)
    plan = ExecutionPlan(memory_limit, estimate, micro_batch, len(passes), source)
    return RunResult(result, total, len(bounds), plan)


def worker_threads(workers: int, scheduler: str | None = None) -> int:
    """The threads of each worker process: the cores shared among the local workers; one on a
    cluster, whose workers are started one per core."""
    if workers < 1:
        raise ArgumentError(f"the number of workers must be at least 1, got {workers}")
    return 1 if scheduler else max(1, len(os.sched_getaffinity(0)) // workers)


def plan_passes(job: Job, data: SampleData, batch_size: int,
                memory_limit: int) -> tuple[int, list[tuple[int, ...]], int]:
    """(micro-batch, the groups of each pass, the estimated bytes of the largest pass) under
    `memory_limit` bytes (module docstring)."""
    sizes = [_tensor_bytes(model, data.sample_shapes()) for model in job.models]
    group_bytes = [sum(sizes[m][name] for m, names in enumerate(group) for name in names)
                   for group in job.groups]
    fetched = [{name for group in job.groups for name in group[m]} for m in range(len(sizes))]
    base = sum(size for m, model_sizes in enumerate(sizes)
               for name, size in model_sizes.items() if name not in fetched[m])
    whole = base + 2 * sum(group_bytes)
    if whole <= memory_limit:
        micro = max(1, min(batch_size, memory_limit // max(whole, 1)))
        return micro, [tuple(range(len(job.groups)))], whole * micro
    passes: list[list[int]] = [[]]
    used = base
    for index, size in enumerate(group_bytes):
        if passes[-1] and used + 2 * size > memory_limit:
            passes.append([])
            used = base
        passes[-1].append(index)
        used += 2 * size
    largest = base + 2 * max(sum(group_bytes[g] for g in groups) for groups in passes)
    return 1, [tuple(groups) for groups in passes], largest


def _tensor_bytes(model: onnx.ModelProto, samples: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes per sample of the model's inputs and of every tensor its nodes compute, by shape
    inference with the inputs fixed to one sample of the data; a tensor of unknown size counts
    as the largest known one (as float32 values of an input when inference tells nothing)."""
    shapes = concrete_shapes(model, {name: (1, *shape) for name, shape in samples.items()})
    known = {name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in shapes.items()}
    largest = max(known.values(), default=max(4 * math.prod(s) for s in samples.values()))
    names = [value.name for value in model.graph.input if value.name in samples]
    names += [name for node in model.graph.node for name in node.output if name]
    return {name: known.get(name, largest) for name in names}


class _Shard:
    """Runs units of a job, (pass, first sample, samples), into fresh accumulators. Holds the
    runners of one pass at a time; pickled without them, to start worker processes."""

    def __init__(self, job: Job, data: SampleData, passes: tuple[tuple[int, ...], ...],
                 micro_batch: int, threads: int, batch_size: int) -> None:
        self.job, self.data, self.passes = job, data, passes
        self.micro_batch, self.threads, self.batch_size = micro_batch, threads, batch_size
        self.fixed = [fixed_batch(model) or 1 for model in job.models]
        self._lock = threading.Lock()
        self._runners: tuple[int, list] | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_runners")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _runners=None)

    def names(self, groups: int | tuple[int, ...]) -> list[list[str]]:
        """Per model, the tensors of a pass (its index) or of the given groups."""
        if isinstance(groups, int):
            groups = self.passes[groups]
        return [list(dict.fromkeys(name for g in groups for name in self.job.groups[g][m]))
                for m in range(len(self.job.models))]

    def runners(self, pass_index: int) -> list:
        with self._lock:
            if self._runners is None or self._runners[0] != pass_index:
                self._runners = None  # the previous pass's sessions go before the next's come
                every = self.names(tuple(range(len(self.job.groups))))
                self._runners = (pass_index, [
                    _fetching(model, backend, names, everything, self.threads)
                    for model, backend, names, everything
                    in zip(self.job.models, self.job.backends, self.names(pass_index), every)])
            return self._runners[1]

    def keys(self, pass_index: int) -> tuple[str, ...]:
        """The data's extra keys a pass reads: the job's in the first pass (but SAMPLE, which
        bnq numbers itself), none after."""
        return tuple(key for key in self.job.keys if key != SAMPLE) if pass_index == 0 else ()

    def batches(self, unit: tuple[int, int, int]) -> Iterator[dict[str, np.ndarray]]:
        """The data of a unit, read from the data path."""
        pass_index, first, count = unit
        try:
            yield from self.data.batches(self.batch_size, count, keys=self.keys(pass_index),
                                         first=first)
        except OSError as error:
            raise DataError(f"cannot read the data at {self.data.path} on host "
                            f"{os.uname().nodename}: {one_line(error)}") from error

    def run(self, unit: tuple[int, int, int], progress: Callable[[int], None],
            batches: Iterable[dict[str, np.ndarray]] | None = None) -> Accumulator:
        """A fresh accumulator fed with the unit, whose `batches` are read here unless given."""
        pass_index = unit[0]
        runners = self.runners(pass_index)
        accumulator = self.job.accumulator()
        selections = self.job.samples or (None,) * len(runners)
        position = unit[1]
        for batch in self.batches(unit) if batches is None else batches:
            size = len(next(iter(batch.values())))
            if SAMPLE in self.job.keys or any(selections):
                batch[SAMPLE] = np.arange(position, position + size)
                position += size
            for start in range(0, size, self.micro_batch):
                micro = {key: array[start:start + self.micro_batch] for key, array in batch.items()}
                feeds = {key: micro[key] for key in micro
                         if key not in self.job.keys and key != SAMPLE}
                fetched = []
                for fixed, run_one, select in zip(self.fixed, runners, selections):
                    rows = None if select is None else select(micro[SAMPLE])
                    if rows is None:
                        fetched.append(run_one(feeds))
                    elif not rows.any():
                        fetched.append({})
                    elif fixed > 1:  # the rows may not split into the model's fixed batches
                        fetched.append({k: v[rows] for k, v in run_one(feeds).items()})
                    else:
                        fetched.append(run_one({k: v[rows] for k, v in feeds.items()}))
                accumulator.update(micro, fetched, self.passes[pass_index])
                progress(len(next(iter(micro.values()))))
        return accumulator


def _fetching(model: onnx.ModelProto, backend: str, names: list[str], everything: list[str],
              threads: int) -> Callable:
    """A function from feeds to the tensors `names` of `model` (by name). Every other tensor of
    `everything` (fetched in another pass) gets a reader, a ReduceMin to a scalar output:
    onnxruntime fuses a node into the next only when nothing else reads its output, so each
    pass's graph is optimized the same way as one pass fetching everything, and computes the
    same bits (a Conv fused with the Add after it rounds differently from the two apart)."""
    held = [name for name in everything if name not in names]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    scope = NameScope(probe.graph)
    sinks = [scope.fresh(f"{name}_held") for name in held]
    probe.graph.node.extend(onnx.helper.make_node("ReduceMin", [name], [sink], keepdims=0,
                                                  name=sink) for name, sink in zip(held, sinks))
    probe = with_outputs(probe, names + sinks)
    run_probe = make_runner(probe, backend, threads)
    outputs = [value.name for value in probe.graph.output]
    wanted = set(names)
    return lambda feeds: {name: value for name, value in zip(outputs, run_probe(feeds))
                          if name in wanted}


class InUnitOrder:
    """Takes the accumulators of units as they finish, in any order, and hands them to `merge`
    in unit order, holding only those that finished before an earlier unit."""

    def __init__(self, merge: Callable[[Accumulator], None]) -> None:
        self.merge, self.merged = merge, 0
        self.early: dict[int, Accumulator] = {}

    def add(self, index: int, part: Accumulator) -> None:
        self.early[index] = part
        while self.merged in self.early:
            self.merge(self.early.pop(self.merged))
            self.merged += 1


def _run_in_workers(shard: _Shard, units: Sequence, workers: int,
                    progress: Callable[[int], None], merge: Callable[[Accumulator], None]) -> None:
    """Run the units in `workers` spawned processes; their accumulators go to `merge` in unit
    order. A worker that fails stops the run with its error; one that dies, with an
    ExecutionError; on any exit (Ctrl-C included) every worker is terminated."""
    context = multiprocessing.get_context("spawn")  # onnxruntime's threads do not survive fork
    tasks, results = context.Queue(), context.Queue()
    for index, unit in enumerate(units):
        tasks.put((index, unit))
    for _ in range(workers):
        tasks.put(None)
    processes = [context.Process(target=_worker, args=(shard, tasks, results), daemon=True)
                 for _ in range(min(workers, len(units)))]
    done = InUnitOrder(merge)
    try:
        with _ctrl_c_deferred():
            for process in processes:
                process.start()
        while done.merged < len(units):
            try:
                kind, value = results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                for process in processes:
                    if process.exitcode not in (None, 0):
                        raise ExecutionError(
                            f"worker process {process.pid} died (exit code {process.exitcode}) "
                            "before finishing its share of the samples; nothing was written")
                continue
            if kind == "progress":
                progress(value)
            elif kind == "error":
                raise value
            else:
                done.add(*value)
    finally:
        tasks.cancel_join_thread()  # units no worker will take: do not wait to send them
        started = [process for process in processes if process.pid is not None]
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join()


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C inside the block raises KeyboardInterrupt when it ends (in the main thread), and
    SIGINT stays blocked in the processes started inside it (they inherit the signal mask): a
    Ctrl-C reaches a whole terminal's process group, and a worker it cut off while Python starts
    would leave the caller blocked, writing the worker's job to a pipe nobody reads."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def _worker(shard: _Shard, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller stops its workers itself
    try:
        while (task := tasks.get()) is not None:
            index, unit = task
            results.put(("done", (index, shard.run(unit, lambda n: results.put(("progress", n))))))
    except BnqError as error:
        results.put(("error", error))
    except Exception as error:  # a bug: still one line for the user
        results.put(("error", ExecutionError(
            f"internal error in a worker: {type(error).__name__}: {one_line(error)}")))
