"""The units of work of `bnq.execution` on a Dask distributed cluster (the optional `distributed`
package: `pip install 'bnq[distributed]'`).

The job, models included, is scattered to every worker once (`broadcast=True`). Then the data:

* **From the shared path.** Every worker computes the fingerprint of the data as it sees it at
  the data's path (`SampleData.fingerprint`: the files' names, sizes and content, at most
  16 MiB of it read) and the caller compares it with its own. When every worker's matches, each
  unit is a task that reads its batch from the path. A worker that joins later checks its own
  fingerprint before its first task and fails it if it differs.
* **Streamed from the caller.** When a worker cannot read the path, or sees different data
  there (a stale copy), the caller reads each batch itself and scatters it to the cluster with
  its task, keeping at most IN_FLIGHT tasks per worker thread submitted and unfinished: the
  caller and each worker hold a few batches at a time, whatever the size of the data set.

Each task returns its accumulator; they are merged by the caller in unit order as they arrive.
The scheduler reruns the tasks of a worker that dies on the other workers; a task whose workers
keep dying fails (Dask's `KilledWorker`), and so does the run, with a one-line error: never a
smaller sample count. Ctrl-C cancels the tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError

from bnq.errors import ArgumentError, BnqError, DataError, one_line
from bnq.execution import Accumulator, ExecutionError, InUnitOrder

CONNECT_SECONDS = 10
IN_FLIGHT = 2  # streamed tasks per worker thread: one running, one whose batch is on its way

# In a worker process: the fingerprint of the data of each run (by the key of its scattered
# job) as the worker sees it, None when it cannot read it.
_SEEN: dict[str, str | None] = {}


def _fingerprint_here(data, run: str) -> str | None:
    if run not in _SEEN:
        try:
            _SEEN[run] = data.fingerprint()
        except OSError:
            _SEEN[run] = None
    return _SEEN[run]


def _run_from_path(shard, unit: tuple[int, int, int], run: str, fingerprint: str) -> Accumulator:
    if _fingerprint_here(shard.data, run) != fingerprint:
        raise DataError(f"a worker on host {os.uname().nodename} that joined the cluster after bnq "
                        f"checked the data cannot read {shard.data.path} or sees different data "
                        "there; run bnq again (it then streams the data to the workers)")
    return shard.run(unit, lambda n: None)


def _run_streamed(shard, unit: tuple[int, int, int], batches: list) -> Accumulator:
    return shard.run(unit, lambda n: None, batches)


def run_on_cluster(address: str, shard, units: Sequence[tuple[int, int, int]],
                   progress: Callable[[int], None], merge: Callable[[Accumulator], None]) -> str:
    """Run `units` of `shard` (a `bnq.execution._Shard`) on the cluster of the scheduler at
    `address`, handing their accumulators to `merge` in unit order; how the workers got the
    data: "path" or "streamed"."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise ArgumentError("--scheduler needs the distributed package: pip install "
                            "'bnq[distributed]'") from None
    try:
        client = Client(address, timeout=CONNECT_SECONDS)
    except (OSError, TimeoutError, ValueError) as error:
        raise ExecutionError(f"cannot reach the Dask scheduler at {address}: "
                             f"{one_line(error)}") from None
    with client:
        threads = sum(client.nthreads().values())
        if not threads:
            raise ExecutionError(f"the Dask scheduler at {address} has no workers; start "
                                 f"some with: dask worker {address}")
        try:
            fingerprint = shard.data.fingerprint()
        except OSError as error:
            raise DataError(f"cannot read the data at {shard.data.path}: "
                            f"{one_line(error)}") from None
        try:
            remote = client.scatter(shard, broadcast=True, hash=False)
            seen = client.run(_fingerprint_here, shard.data, remote.key, on_error="return")
        except Exception as error:  # a worker that died meanwhile: CommClosedError, ...
            raise ExecutionError(f"the Dask cluster at {address} failed to take the job: "
                                 f"{type(error).__name__}: {one_line(error)}; nothing was "
                                 "written") from None
        streamed = any(value != fingerprint for value in seen.values())
        running, futures = as_completed(), {}
        ahead = iter(range(len(units)))

        def submit_next() -> None:
            position = next(ahead, None)
            if position is None:
                return
            unit = units[position]
            if streamed:
                [batches] = client.scatter([list(shard.batches(unit))], hash=False)
                future = client.submit(_run_streamed, remote, unit, batches, pure=False)
            else:
                future = client.submit(_run_from_path, remote, unit, remote.key, fingerprint,
                                       pure=False)
            futures[future] = position
            running.add(future)

        done = InUnitOrder(merge)
        try:
            for _ in range(IN_FLIGHT * threads if streamed else len(units)):
                submit_next()
            for future in running:
                position = futures.pop(future)
                try:
                    part = future.result()
                except Exception as error:
                    raise _failure(error, units[position]) from None
                done.add(position, part)
                progress(units[position][2])
                submit_next()
        finally:
            client.cancel(list(futures))
    return "streamed" if streamed else "path"


def _failure(error: Exception, unit: tuple[int, int, int]) -> BnqError:
    """The error of a run whose unit failed with `error`: a BnqError (the task's own) as it is,
    else an ExecutionError naming the unit's samples (KilledWorker, ...)."""
    if isinstance(error, BnqError):
        return error
    if isinstance(error, CancelledError):  # the scheduler lost the scattered job with them
        text = "every worker that held bnq's job died (or the cluster was restarted)"
    else:
        text = f"{type(error).__name__}: {one_line(error)}"
    first, count = unit[1:]
    return ExecutionError(f"the Dask cluster failed to run samples {first}..{first + count - 1}: "
                          f"{text}; nothing was written")
