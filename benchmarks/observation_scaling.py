"""Throughput of `bnq.execution` alone (no loading, fusing or writing) on a calibration job:
one worker of one thread against N local workers of one thread, one process on every core, and
local Dask clusters of 2 workers of one thread: as Dask starts them, without the malloc setting
Dask's nanny gives its workers, and with workers that cannot read the data (streamed to them).

    python benchmarks/observation_scaling.py MODELS_DIR [--model densenet121] [--repeats 3]
                                                       [--tile 8] [--batch-size 32]

The job observes every tensor `bnq calibrate` observes (min/max) over calib.npz repeated `--tile`
times (64 x 8 = 512 samples), in batches of `--batch-size` (bnq's default, 32: a unit of work,
16 per run; 8 spreads 64 smaller units). Each configuration also runs on the first quarter of
those samples: the whole run's rate counts starting the workers (about a second each to load
the model) and sending them the job; the steady rate, the extra samples of the long run over
its extra time, does not. The single-thread worker is this process pinned to one core.
Configurations run interleaved, round by round; medians. Needs `distributed` (installed when
missing).

Dask's nanny starts every worker with MALLOC_TRIM_THRESHOLD_=65536 (its config
`distributed.nanny.pre-spawn-environ`, to hand freed memory back to the system at once), which
also turns off glibc's adaptive mmap threshold, and sets it in its own process's environment
too, where every process started later inherits it: the clusters here are started with this
process's environment restored afterwards, so that the local workers start as bnq's do.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if importlib.util.find_spec("distributed") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "distributed"],
                       check=True)
    import dask
    import distributed
    import numpy as np

    from bnq.calibrate import _Observation, prepare
    from bnq.data import SampleData, model_inputs
    from bnq.execution import Job, run, worker_threads
    from bnq.io import load_model
    from bnq.machine import describe
    from bnq.planning import plan_quantization

    model = load_model(args.models_dir / f"{args.model}.onnx")
    scratch = tempfile.mkdtemp()
    with np.load(args.models_dir / "calib.npz") as calib:
        samples = np.tile(calib["input"], (args.tile, 1, 1, 1))
    lengths = {"short": len(samples) // 4, "long": len(samples)}
    for name, length in lengths.items():
        np.save(Path(scratch) / f"{name}.npy", samples[:length])
    os.chdir(scratch)  # a relative path, which workers moved elsewhere cannot read
    datas = {name: SampleData(f"{name}.npy", model_inputs(model)) for name in lengths}
    fused = prepare(model)[0]
    plan = plan_quantization(fused)
    names = plan.activations + [node.output[0] for node in plan.batch_norms] + plan.bn_inputs
    per_channel = {name: name in plan.bn_inputs for name in names}

    def job(options: dict) -> Job:
        """The job with observers spread over the threads bnq gives each worker: `calibrate`'s."""
        threads = worker_threads(options.get("workers", 1), options.get("scheduler"))
        return Job((fused,), ("onnxruntime",), tuple(((name,),) for name in names),
                   functools.partial(_Observation, per_channel, {n: n for n in names}, "minmax",
                                     {}, 1, threads))

    cores = sorted(os.sched_getaffinity(0))
    machine = describe()
    print(f"# {args.model}, {lengths['long']} samples (and {lengths['short']}), batches of "
          f"{args.batch_size}, "
          f"{machine.cpu} ({', '.join(machine.features)}), {len(cores)} cores; medians of "
          f"{args.repeats} interleaved rounds")
    untrimmed = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    # each cluster is started for its own turn only: the idle workers of clusters kept up took
    # 5-20% from the other configurations on 2 cores
    clusters = {"dask 2 x 1 thread": ({}, None), "dask, no malloc trim": (untrimmed, None),
                "dask, data streamed": ({}, tempfile.mkdtemp())}
    configs = {"1 worker x 1 thread": ({"workers": 1}, 1, True)}
    configs |= {f"{n} workers x 1 thread": ({"workers": n}, n, False)
                for n in range(2, len(cores) + 1)}
    configs |= {name: ({}, 2, False) for name in clusters}
    configs[f"1 worker x {len(cores)} threads"] = ({"workers": 1}, 1, False)
    times = {(name, length): [] for name in configs for length in lengths}
    for _ in range(args.repeats):
        for name, (options, _, pinned) in configs.items():
            for length, data in datas.items():
                os.sched_setaffinity(0, cores[:1] if pinned else cores)
                with contextlib.ExitStack() as stack:
                    if name in clusters:
                        cluster = stack.enter_context(local_cluster(distributed, dask,
                                                                    *clusters[name]))
                        options = {"scheduler": cluster.scheduler_address}
                    start = time.perf_counter()
                    result = run(job(options), data, batch_size=args.batch_size, **options)
                    times[name, length].append(time.perf_counter() - start)
                assert result.samples == data.num_samples
                assert (result.plan.data == "streamed") == name.endswith("streamed")
                print(f"  {name}, {data.num_samples} samples: {times[name, length][-1]:.2f} s",
                      file=sys.stderr, flush=True)
    os.sched_setaffinity(0, cores)

    def rates(name: str) -> tuple[float, float]:
        """Samples/s: the long run's, and the steady rate (the long run's extra samples over its
        extra time; nan if noise made the long run no longer)."""
        short, long = (statistics.median(times[name, length]) for length in lengths)
        extra = lengths["long"] - lengths["short"]
        return lengths["long"] / long, extra / (long - short) if long > short else math.nan

    single = rates("1 worker x 1 thread")
    print(f"{'':24} {'whole run':^22}  {'steady':^22}")
    print(f"{'configuration':24} " + "  ".join([f"{'samples/s':>9} {'x 1x1':>6} {'/ N':>5}"] * 2))
    for name, (_, workers, _) in configs.items():
        columns = [f"{rate:9.2f} {rate / unit:6.2f} {rate / unit / workers:5.2f}"
                   for rate, unit in zip(rates(name), single)]
        print(f"{name:24} " + "  ".join(columns))


@contextlib.contextmanager
def local_cluster(distributed, dask, config: dict, elsewhere: str | None):
    """A LocalCluster of 2 worker processes of one thread under dask `config`, this process's
    environment restored once they have started; with `elsewhere`, its workers run in that
    directory, where the relative data path names nothing."""
    environment = dict(os.environ)
    with dask.config.set(config), distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=40) as cluster:
        os.environ.clear()
        os.environ.update(environment)
        if elsewhere:
            class Elsewhere(distributed.WorkerPlugin):
                def setup(self, worker) -> None:
                    os.chdir(elsewhere)

            with distributed.Client(cluster.scheduler_address) as client:
                client.register_plugin(Elsewhere())
        yield cluster


if __name__ == "__main__":
    main()
