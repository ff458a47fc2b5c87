"""`bnq calibrate` at scale: peak memory of the whole process tree, and throughput with local
worker processes and a local Dask cluster.

    python benchmarks/scale.py MODELS_DIR [--model densenet121] [--repeats 3] [--baseline DIR]

MODELS_DIR holds what `python benchmarks/models.py MODELS_DIR` builds (the torchvision model and
calib.npz, 64 samples). Every run is `bnq calibrate` in a fresh subprocess; this script samples
the resident memory of that process and all its descendants every 20 ms and reports the peak of
their sum, and the command's wall time. Configurations run interleaved, round by round, so that
the noise of a shared machine falls on all of them alike; medians are printed.

1. Memory and time with the defaults (one process, `--memory-limit 1GiB`, batches of 32, 64
   samples, bias correction on), the same without bias correction (its second pass over the
   data), and the single-pass observation that holds every observed tensor of a whole batch
   (`--memory-limit 100GiB`), at batch 8 (at 32 it takes 7.8 GB); with `--baseline DIR`, also
   the defaults of the bnq package in DIR (an older version: `git archive dc386bc bnq | tar -x
   -C DIR` for bnq 0.1), run the same way.
2. Scaling, `--batch-size 8` so that the batches spread over the workers: throughput of the
   passes over the data (observation, then bias correction), (64 - 16) samples / (time at 64
   samples - time at 16), which takes the fixed costs (loading, fusing, writing the quantized
   model, starting the workers) out. `1 worker x 1 thread` is
   `--workers 1` pinned to one core (`taskset -c 0`); `N workers x 1 thread` is `--workers N`
   (bnq gives each cores // N threads); `dask 2 x 1 thread` is `--scheduler` of a LocalCluster of
   2 worker processes of one thread started by this script for that run only (with this
   process's environment restored after it starts: `observation_scaling.local_cluster`; a
   cluster kept up for the whole script, whose nanny also leaves MALLOC_TRIM_THRESHOLD_ in the
   environment of every later command, made bnq 0.1's defaults take 9.0 s instead of 5.5 s);
   `1 worker x all threads` is one process on every core. Ratio: throughput / (N x the
   single-thread worker's).

Every quantized model is compared with the others of the same number of samples, byte for byte
(batch size, workers, threads and the cluster must not change a bit). It needs `distributed`
and `psutil` (installed when missing; benchmark-only, not bnq dependencies).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from observation_scaling import local_cluster

REQUIREMENTS = {"distributed": "distributed", "psutil": "psutil"}
SCHEDULER = "<scheduler>"  # in a command: the address of the cluster started for its run
ROOT = Path(__file__).resolve().parent.parent


def ensure_installed() -> None:
    """pip-install the benchmark-only packages that are missing (never bnq's own dependencies)."""
    missing = [spec for module, spec in REQUIREMENTS.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)


def measure(command: list[str], root: Path = ROOT) -> tuple[float, int]:
    """(seconds, peak bytes of the process tree's summed RSS) of `command`, with the bnq package
    of `root`."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(root)})
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()}")
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path,
                        help="a directory holding an older bnq package, to time its defaults")
    args = parser.parse_args()
    ensure_installed()
    import dask
    import distributed

    from bnq.machine import describe

    cores = len(os.sched_getaffinity(0))
    model, data = args.models_dir / f"{args.model}.onnx", args.models_dir / "calib.npz"
    machine = describe()
    print(f"# {args.model} on {machine.cpu} ({', '.join(machine.features)}), {cores} cores; "
          f"medians of {args.repeats} interleaved rounds", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        bnq = [sys.executable, "-P", "-c", "from bnq.cli import main; main()",  # 0.1: no -m
               "calibrate", str(model), "-d", str(data), "--force"]
        small = ["--batch-size", "8"]
        defaults = {"default (batch 32, 1GiB)": [*bnq, "--num-samples", "64"],
                    "default, no bias correction": [*bnq, "--num-samples", "64",
                                                    "--no-bias-correction"],
                    "one pass, batch 8": [*bnq, "--num-samples", "64", *small,
                                          "--memory-limit", "100GiB"]}
        roots = {name: ROOT for name in defaults}
        if args.baseline:
            defaults["baseline's default"] = [*bnq, "--num-samples", "64"]
            roots["baseline's default"] = args.baseline.resolve()
        scaling = {"1 worker x 1 thread": (["taskset", "-c", "0", *bnq, *small], 1)}
        scaling |= {f"{n} workers x 1 thread": ([*bnq, *small, "--workers", str(n)], n)
                    for n in range(2, cores + 1)}
        scaling |= {"dask 2 x 1 thread": ([*bnq, *small, "--scheduler", SCHEDULER], 2),
                    f"1 worker x {cores} threads": ([*bnq, *small], 1)}
        runs: dict[str, list[tuple[float, int]]] = {}
        outputs: dict[str, set[bytes]] = {}  # by number of samples
        jobs = list(defaults.items()) + [
            (f"{name} @{count}", [*command, "--num-samples", str(count)])
            for name, (command, _) in scaling.items() for count in (16, 64)]
        for _ in range(args.repeats):
            for name, command in jobs:
                output = Path(scratch) / "q.onnx"
                with contextlib.ExitStack() as stack:
                    if SCHEDULER in command:  # up for its own turn only (module docstring)
                        cluster = stack.enter_context(local_cluster(distributed, dask, {}, None))
                        command = [cluster.scheduler_address if part == SCHEDULER else part
                                   for part in command]
                    runs.setdefault(name, []).append(measure([*command, "-o", str(output)],
                                                             roots.get(name, ROOT)))
                if name not in ("default, no bias correction", "baseline's default"):
                    # (those: another option, or another bnq, so other bytes)
                    outputs.setdefault(command[command.index("--num-samples") + 1], set()).add(
                        output.read_bytes())
                print(f"  {name}: {runs[name][-1][0]:.1f} s, {runs[name][-1][1] / 1e6:.0f} MB",
                      file=sys.stderr, flush=True)

        def seconds(name: str) -> float:
            return statistics.median(t for t, _ in runs[name])

        print(f"\n{'defaults, 64 samples':28} {'s':>7} {'peak tree MB':>13}")
        for name in defaults:
            print(f"{name:28} {seconds(name):7.1f} {max(p for _, p in runs[name]) / 1e6:13.0f}")
        rate = {name: 48 / (seconds(f"{name} @64") - seconds(f"{name} @16")) for name in scaling}
        unit = rate["1 worker x 1 thread"]
        print(f"\n{'throughput over the data':28} {'samples/s':>9} {'x 1x1':>6} {'/ N':>5} "
              f"{'peak tree MB':>13}")
        for name, (_, workers) in scaling.items():
            peak = max(p for _, p in runs[f"{name} @64"])
            print(f"{name:28} {rate[name]:9.2f} {rate[name] / unit:6.2f} "
                  f"{rate[name] / unit / workers:5.2f} "
                  f"{'-' if name.startswith('dask') else f'{peak / 1e6:.0f}':>13}")
        print("\nquantized models byte-identical across every round and configuration "
              f"(per number of samples): {all(len(set_) == 1 for set_ in outputs.values())}")


if __name__ == "__main__":
    main()
