"""The units of work of `bnq.execution` on a Dask distributed cluster (the optional `distributed`
package: `pip install 'bnq[distributed]'`).

The job, models included, is scattered to every worker once (`broadcast=True`); each unit is a
task that reads its batch from the data path (which every worker must see at the same path),
runs it and returns its accumulator, merged by the caller in unit order. The scheduler reruns
the tasks of a worker that dies on the other workers; a task whose workers keep dying fails
(Dask's `KilledWorker`), and so does the run, with a one-line error: never a smaller sample
count. Ctrl-C cancels the tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bnq.errors import ArgumentError, BnqError, one_line
from bnq.execution import Accumulator, ExecutionError

CONNECT_SECONDS = 10


def _run_unit(shard, unit: tuple[int, int, int]) -> Accumulator:
    return shard.run(unit, lambda n: None)


def run_on_cluster(address: str, shard, units: Sequence[tuple[int, int, int]],
                   progress: Callable[[int], None]) -> list[Accumulator]:
    """Run `units` of `shard` (a `bnq.execution._Shard`) on the cluster of the scheduler at
    `address`; the accumulators in unit order."""
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
        if not client.scheduler_info().get("workers"):
            raise ExecutionError(f"the Dask scheduler at {address} has no workers; start "
                                 f"some with: dask worker {address}")
        remote = client.scatter(shard, broadcast=True, hash=False)
        futures = [client.submit(_run_unit, remote, unit, pure=False) for unit in units]
        index = {future.key: position for position, future in enumerate(futures)}
        done: list[Accumulator | None] = [None] * len(units)
        try:
            for future in as_completed(futures):
                position = index[future.key]
                try:
                    done[position] = future.result()
                except BnqError:
                    raise
                except Exception as error:  # KilledWorker, CommClosedError, ...
                    raise ExecutionError(
                        f"the Dask cluster failed to run samples {units[position][1]}.."
                        f"{units[position][1] + units[position][2] - 1}: "
                        f"{type(error).__name__}: {one_line(error)}; nothing was written") from None
                progress(units[position][2])
        finally:
            client.cancel([future for future in futures if not future.done()])
    return done
