"""The `bnq` command: a thin shell over the Python API. With `bnq.render`, which turns its
reports into text, the only modules that print.

Reports go to stdout (a rich table, or JSON with `--json`: `bnq.render`); progress and errors go
to stderr.
A `BnqError` becomes one `Error: ...` line and exit code 1, bad usage exit code 2, Ctrl-C exit
code 130 (SIGTERM 143, SIGHUP 129, after the same clean-up); a traceback only with `--debug`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from bnq import render
from bnq.errors import BnqError, one_line

if TYPE_CHECKING:  # the heavy modules (numpy, onnx, onnxruntime) load when a command runs
    import numpy as np

    from bnq.machine import IntegerFormats

# The registries' keys, spelled out so that `--help` needs no numpy, onnx or onnxruntime (which
# take 0.4 s to import); tests/test_cli.py checks them against bnq.observers.OBSERVERS,
# bnq.runtime.BACKENDS and bnq.evaluate.BACKEND_CHOICES.
METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
METHOD = "minmax"  # bnq.calibrate.calibrate's defaults, checked by tests/test_cli.py too
WEIGHT_ROUNDING = False
BIAS_CORRECTION = True
EQUALIZE = False
BACKENDS = ("numpy", "onnxruntime")
BACKEND_CHOICES = (*BACKENDS, "both")
# More threads than 4 per core measure only the cost of creating them (4000 took minutes).
MAX_THREADS = 4 * (os.cpu_count() or 1)

err = Console(stderr=True, highlight=False)

MODEL = click.Path(dir_okay=False, path_type=Path)


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the program is, so that the same clean-up as for Ctrl-C
    runs (no temporary file left) instead of the process just vanishing."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(signum)


class _Group(click.Group):
    """Turns library errors into one line and an exit code; `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BnqError as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(error)) from None
        except (KeyboardInterrupt, Terminated) as error:
            if ctx.params.get("debug"):
                raise
            signum = error.signum if isinstance(error, Terminated) else signal.SIGINT
            err.print(f"{'interrupted' if signum == signal.SIGINT else 'terminated'}: "
                      "nothing was written")
            ctx.exit(128 + signum)
        except OSError as error:  # the file system said no where bnq did not expect it
            if ctx.params.get("debug"):
                raise
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(f"{where}{error.strerror or one_line(error)}") from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:  # a bug: still one line, the traceback behind --debug
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(f"internal error: {type(error).__name__}: {error} "
                                       "(rerun with --debug for the traceback)") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback when something fails.")
@click.version_option(package_name="bnq")
def cli(debug: bool) -> None:
    """Fuse, calibrate and run quantized BatchNorm + ReLU CNNs, bit-exact with PyTorch's
    quantized BNReLU2d.

    Typical flow: bnq fuse -> bnq calibrate -> bnq evaluate / bnq bench."""


def _json_option(function):
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the report as JSON on stdout instead of tables.")(function)


def _force_option(function):
    return click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")(function)


class _Size(click.ParamType):
    """N or HxW."""

    name = "N|HxW"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | tuple[int, int]:
        if isinstance(value, (int, tuple)):
            return value
        try:
            parts = tuple(int(part) for part in value.lower().split("x"))
        except ValueError:
            parts = ()
        if len(parts) not in (1, 2) or min(parts) < 1:
            self.fail(f"{value!r} is not a size: N or HxW, e.g. 224 or 224x224", param, ctx)
        return parts[0] if len(parts) == 1 else parts


class _Floats(click.ParamType):
    """Comma-separated numbers, one per channel or one for all."""

    name = "A[,B,C]"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(part) for part in value.split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


# bnq.images.PRESETS' keys (tests/test_cli.py checks), spelled out for a fast --help.
PRESETS = ("imagenet", "paddleocr", "unit")
IMAGE_OPTIONS = ("preset", "resize", "crop", "scale", "mean", "std", "channels", "layout")


def _data_options(function):
    """--data, --batch-size, --num-samples and the image options, shared by the commands that
    read samples."""
    for option in reversed([
        click.option("-d", "--data", type=click.Path(path_type=Path), required=True,
                     help="Samples: .npz keyed by input name, .npy, a directory of them, or a "
                          "folder of JPEG/PNG images (class subfolders give labels)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Samples per batch run through the model."),
        click.option("--num-samples", type=click.IntRange(min=1), default=None,
                     help="Use at most this many samples (default: all)."),
        click.option("--preset", type=click.Choice(PRESETS), default=None,
                     help="Images: a preprocessing convention: imagenet (resize the shorter "
                          "side to size/0.875, center crop, /255, ImageNet mean/std, RGB), "
                          "paddleocr (resize, /255, ImageNet mean/std, BGR), unit (resize, "
                          "/255). Default: unit. The options below override it."),
        click.option("--resize", type=_Size(), default=None,
                     help="Images: shorter side to N (aspect kept), or exactly HxW "
                          "(default: the model's input size)."),
        click.option("--crop", type=_Size(), default=None,
                     help="Images: center crop N or HxW after resizing."),
        click.option("--scale", type=float, default=None,
                     help="Images: pixel values (0-255) are multiplied by this (default 1/255)."),
        click.option("--mean", type=_Floats(), default=None,
                     help="Images: subtracted after scaling, per channel (e.g. "
                          "0.485,0.456,0.406)."),
        click.option("--std", type=_Floats(), default=None,
                     help="Images: divides after the mean, per channel."),
        click.option("--channels", type=click.Choice(["RGB", "BGR"]), default=None,
                     help="Images: channel order (default RGB; BGR for OpenCV-trained models)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default=None,
                     help="Images: tensor layout (default: from the model's input shape)."),
    ]):
        function = option(function)
    return function


def _open_samples(ctx: click.Context, data: Path, model, image: dict[str, Any],
                  extra_keys: tuple[str, ...] = ()):
    """SampleData for `model`; image options for data that is not a folder of images are a
    usage error."""
    from bnq.data import SampleData, model_inputs
    from bnq.images import PRESETS as PRESET_TABLE
    from bnq.images import Preprocessing, holds_images, with_options

    given = {key: value for key, value in image.items() if value is not None}
    preprocessing = None
    if given:
        if not (data.is_dir() and holds_images(data)):
            _refuse(ctx, IMAGE_OPTIONS, f"to {data}: it is not a folder of JPEG/PNG images")
        crop = given.pop("crop", None)
        preset = PRESET_TABLE[given.pop("preset")] if "preset" in given else Preprocessing()
        preprocessing = with_options(preset, crop=(crop, crop) if isinstance(crop, int) else crop,
                                     **given)
    return SampleData(data, model_inputs(model), extra_keys=extra_keys, images=preprocessing)


class _Bytes(click.ParamType):
    """A size in bytes: a number with an optional unit, 1000-based (kB, MB, GB) or 1024-based
    (KiB, MiB, GiB)."""

    name = "size"
    UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        try:
            size = int(float(number) * self.UNITS[text[len(number):]])
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size such as 512MB, 1GiB or 2000000000", param, ctx)
        if size < 1:
            self.fail(f"{value!r}: the size must be positive", param, ctx)
        return size


def _execution_options(function):
    """--memory-limit, --workers and --scheduler, shared by calibrate and evaluate."""
    for option in reversed([
        # "1GiB" is bnq.execution.DEFAULT_MEMORY_LIMIT (tests/test_execution.py checks)
        click.option("--memory-limit", type=_Bytes(), default="1GiB", show_default=True,
                     help="Activations each process may hold (512MB, 2GiB, ...): batches are "
                          "split, or tensors observed in several passes, to stay under it. "
                          "The results do not depend on it."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Local worker processes, each on its share of the batches with "
                          "cores/workers onnxruntime threads and its own --memory-limit. "
                          "The results do not depend on it."),
        click.option("--scheduler", metavar="ADDRESS", default=None,
                     help="Run on the Dask cluster of this scheduler (tcp://host:8786; needs "
                          "bnq[distributed]). Workers read DATA from its path if they all see "
                          "the same data there, else bnq streams it to them."),
    ]):
        function = option(function)
    return function


def _emit(text: str) -> None:
    """Print a report on stdout. A reader that went away (`bnq ... | head`) is no error: the
    work is done and the rest of the report is not wanted. A stdout that cannot take it (a
    full disk, /dev/full) is one."""
    try:
        click.echo(text, nl=False)
    except BrokenPipeError:
        _silence_stdout()
    except OSError as error:
        _silence_stdout()
        raise BnqError(f"standard output: cannot write the report ({error.strerror})") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit does not fail
    again on what is still buffered."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@cli.command("fuse", short_help="Fold Conv+BN and fuse BN+Relu, exactly.")
@click.argument("model", type=MODEL)
@click.option("-o", "--output", type=MODEL, required=True,
              help="Where to write the fused model (.onnx or .npz).")
@_force_option
@_json_option
def fuse_command(model: Path, output: Path, force: bool, as_json: bool) -> None:
    """Fold Conv/ConvTranspose/Gemm + BatchNormalization and fuse the remaining
    BatchNormalization + Relu pairs of MODEL (.onnx or .npz) into bnq.BatchNormRelu nodes.

    Only exact rewrites are made; every BatchNormalization left alone is listed with the
    reason. The output runs in stock onnxruntime.

    \b
    Example:
      bnq fuse samples/digits_cnn.onnx -o /tmp/digits_fused.onnx
    """
    from bnq.fusion import fuse
    from bnq.io import check_output_path, load_model, save_model

    check_output_path(output, [model], overwrite=force)
    fused, report = fuse(load_model(model))
    text = render.report_text(as_json, lambda: {"model": str(model), "output": str(output),
                                                "folded": report.count("folded"),
                                                "fused": report.count("fused"),
                                                "kept": report.count("kept"),
                                                **dataclasses.asdict(report)},
                              lambda: render.fuse(model, output, report))
    save_model(fused, output, overwrite=force)
    _emit(text)


def _progress(description: str, total: int):
    """A progress bar on stderr, shown only on a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err, transient=True,
                        disable=not err.is_terminal)
    progress.add_task(description, total=total)
    return progress


@cli.command("calibrate", short_help="Quantize a float model with ranges calibrated on sample data.")
@click.argument("model", type=MODEL)
@_data_options
@click.option("-o", "--output", type=MODEL, required=True,
              help="Where to write the quantized model (.onnx or .npz).")
@click.option("--method", type=click.Choice(METHODS), default=METHOD, show_default=True,
              help="How activation ranges are chosen from the observed values; auto keeps the "
                   "method whose model's outputs come closest to the float model's, each method "
                   "calibrated on half of DATA and scored on the other half (on the real models "
                   "measured: 3 to 7 times minmax's calibration time).")
@click.option("--percentile", type=float, default=99.999, show_default=True,
              callback=lambda ctx, param, value: _in_range(value, 50, 100),
              help="With --method percentile or auto: the percentile of the values kept in "
                   "range (50 to 100).")
@click.option("--activation-type", type=click.Choice(["uint8", "int8"]), default=None,
              help="Integer type of activations (default: chosen for this CPU, see the report).")
@click.option("--weight-type", type=click.Choice(["int8"]), default="int8", show_default=True,
              help="Integer type of Conv/Gemm/MatMul weights.")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="7-bit weights, which avoid u8 x s8 saturation on AVX2 CPUs without VNNI "
                   "(default: on for such CPUs).")
@click.option("--weight-rounding/--no-weight-rounding", default=WEIGHT_ROUNDING,
              show_default=True,
              help="Round Conv/Gemm/MatMul weights by their effect on the layer's output on "
                   "DATA (GPTQ) instead of to the nearest code; one more pass over DATA.")
@click.option("--bias-correction/--no-bias-correction", default=BIAS_CORRECTION,
              show_default=True,
              help="Correct each Conv/Gemm's int32 bias by the mean output shift quantization "
                   "causes on DATA; one more pass over DATA.")
@click.option("--equalize/--no-equalize", default=EQUALIZE, show_default=True,
              help="Cross-layer equalization: rescale the channels between consecutive "
                   "Conv/Gemm layers (nothing, Relu, LeakyRelu, PRelu or MaxPool between) so "
                   "their weight ranges match; exact in float.")
@_execution_options
@_force_option
@_json_option
@click.pass_context
def calibrate_command(ctx: click.Context, model: Path, data: Path, output: Path, method: str,
                      percentile: float, batch_size: int, num_samples: int | None,
                      activation_type: str | None, weight_type: str, reduce_range: bool | None,
                      weight_rounding: bool, bias_correction: bool, equalize: bool,
                      memory_limit: int, workers: int, scheduler: str | None, force: bool,
                      as_json: bool, **image: Any) -> None:
    """Quantize MODEL (float, fused or not) with ranges calibrated on DATA.

    Conv/Gemm/MatMul get int8 weights per output channel and quantized activations (QDQ, which
    onnxruntime runs with integer kernels); every BatchNormalization + Relu becomes a
    bnq.QLinearBatchNormRelu node, bit-exact with PyTorch's quantized BNReLU2d.

    \b
    Examples:
      bnq calibrate samples/digits_cnn.onnx -d samples/calib.npz -o /tmp/digits_int8.onnx
      bnq calibrate resnet50.onnx -d photos/ --preset imagenet -o resnet50_int8.onnx
    """
    from bnq.calibrate import calibrate
    from bnq.io import check_output_path, load_model, save_model

    check_output_path(output, [model, data], overwrite=force)
    float_model = load_model(model)
    samples = _open_samples(ctx, data, float_model, image)
    formats = _formats(activation_type, weight_type, reduce_range)
    options = {"percentile": percentile} if method in ("percentile", "auto") else {}
    passes = 1 + weight_rounding + bias_correction + (method == "auto") * (1 + bias_correction)
    total = min(num_samples or samples.num_samples, samples.num_samples) * passes
    with _progress("calibrating", total) as progress:
        quantized, report = calibrate(
            float_model, samples, formats=formats, method=method, method_options=options,
            batch_size=batch_size, num_samples=num_samples, memory_limit=memory_limit,
            workers=workers, scheduler=scheduler, weight_rounding=weight_rounding,
            bias_correction=bias_correction, equalize=equalize,
            progress=lambda n: progress.advance(progress.task_ids[0], n))
    text = render.report_text(as_json, lambda: {"model": str(model), "output": str(output),
                                                **dataclasses.asdict(report)},
                              lambda: render.calibration(output, report))
    save_model(quantized, output, overwrite=force)
    _emit(text)


def _in_range(value: float, low: float, high: float) -> float:
    if not low <= value <= high:  # NaN fails this too
        raise click.BadParameter(f"{value} is not a number from {low} to {high}")
    return value


def _formats(activation_type: str | None, weight_type: str,
             reduce_range: bool | None) -> IntegerFormats:
    """The CPU's default formats, with the user's choices on top (and said so)."""
    from bnq.machine import IntegerFormats, default_formats

    chosen = default_formats()
    if activation_type is None and reduce_range is None:
        return chosen
    return IntegerFormats(activation_type or chosen.activation, weight_type,
                          chosen.reduce_range if reduce_range is None else reduce_range,
                          "chosen on the command line")


@cli.command("evaluate", short_help="Compare a quantized model with its float model on data.")
@click.argument("quantized", type=MODEL)
@click.option("-r", "--reference", type=MODEL, required=True,
              help="The float model QUANTIZED was made from.")
@_data_options
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="onnxruntime",
              show_default=True,
              help="Which runtime runs QUANTIZED; 'both' also compares the fused nodes' two "
                   "kernel paths code for code.")
@click.option("--labels", default="labels", show_default=True,
              help="Key of the labels array in DATA, for top-1/top-5 accuracy.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Also write the report as one self-contained HTML page (.html) with charts: "
                   "per-layer SQNR, histograms of the worst layers' values with their "
                   "calibrated ranges. Needs bnq[report].")
@click.option("--force", is_flag=True, help="With --report: overwrite the page if it exists.")
@_execution_options
@_json_option
@click.pass_context
def evaluate_command(ctx: click.Context, quantized: Path, reference: Path, data: Path,
                     batch_size: int, num_samples: int | None, backend: str, labels: str,
                     report_path: Path | None, force: bool, memory_limit: int, workers: int,
                     scheduler: str | None, as_json: bool,
                     **image: Any) -> None:
    """Compare QUANTIZED with its float REFERENCE on DATA: for each output the figures that fit
    it (top-1/top-5 agreement and accuracy for classification scores; SQNR, cosine, errors, and
    IoU at 0.5 for maps in [0, 1]), then the SQNR of every quantized tensor against the float
    tensor at the same place, worst first, so you see where quantization error enters.

    \b
    Examples:
      bnq evaluate /tmp/digits_int8.onnx -r samples/digits_cnn.onnx -d samples/eval.npz
      bnq evaluate resnet50_int8.onnx -r resnet50.onnx -d val/ --preset imagenet
      bnq evaluate /tmp/digits_int8.onnx -r samples/digits_cnn.onnx -d samples/eval.npz \\
        --report /tmp/digits_report.html
    """
    from bnq.evaluate import evaluate
    from bnq.io import check_output_path, load_model, write_atomic

    if report_path is None:
        _refuse(ctx, ("force",), "without --report")
    else:
        from bnq.report import render_html, require_matplotlib

        check_output_path(report_path, [quantized, reference, data], overwrite=force,
                          suffixes=(".html", ".htm"))
        require_matplotlib()  # before the work, not after it
    float_model = load_model(reference)
    samples = _open_samples(ctx, data, float_model, image, extra_keys=(labels,))
    if ctx.get_parameter_source("labels") == click.core.ParameterSource.COMMANDLINE and (
            not samples.has(labels) or labels in {spec.name for spec in samples.inputs}):
        raise BnqError(f"{data}: no labels under --labels {labels!r} (a key that is no model "
                       "input); give the key of the labels array, or leave --labels out")
    total = min(num_samples or samples.num_samples, samples.num_samples)
    with _progress("evaluating", total) as progress:
        report = evaluate(load_model(quantized), float_model, samples, backend=backend,
                          batch_size=batch_size, num_samples=num_samples, labels=labels,
                          memory_limit=memory_limit, workers=workers, scheduler=scheduler,
                          progress=lambda n: progress.advance(progress.task_ids[0], n),
                          names=(str(quantized), str(reference)))
    text = render.report_text(as_json, lambda: dataclasses.asdict(report),
                              lambda: render.evaluation(report, report_path))
    if report_path is not None:
        from bnq.machine import describe

        page = render_html(report, title=f"bnq evaluate: {quantized.name} against "
                                         f"{reference.name}",
                           details=[("quantized model", str(quantized)),
                                    ("float model", str(reference)),
                                    ("data", f"{data} ({report.samples} samples)"),
                                    ("backend", report.backend),
                                    ("machine", render.machine_line(describe()))])
        write_atomic(report_path, lambda handle: handle.write(page.encode()), overwrite=force)
    _emit(text)


@cli.command("bench", short_help="Time models per backend and thread count, or the operator alone.")
@click.argument("models", nargs=-1, type=MODEL)
@click.option("--kernel", is_flag=True,
              help="Time the fused quantized BN-ReLU operator alone against its baselines "
                   "(numpy float formula, onnxruntime QDQ subgraph, PyTorch when installed).")
@click.option("--backend", "backends", type=click.Choice(BACKENDS), multiple=True,
              default=["onnxruntime"], show_default=True, help="Backends to time (repeatable).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per run.")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), multiple=True,
              help=f"Intra-op threads (repeatable; default: 1 and all cores; at most "
                   f"{MAX_THREADS}, 4 per core).")
@click.option("-d", "--data", type=click.Path(path_type=Path), default=None,
              help="Take the input batch from these samples instead of random data.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Untimed rounds first.")
@click.option("--repeats", type=click.IntRange(min=1), default=30, show_default=True,
              help="Timed rounds (every model runs once per round).")
@click.option("--shape", default="32,64,56,56", show_default=True,
              help="With --kernel: the uint8 tensor shape N,C,... (rank 3 to 5).")
@_json_option
@click.pass_context
def bench_command(ctx: click.Context, models: tuple[Path, ...], kernel: bool,
                  backends: tuple[str, ...], batch_size: int, threads: tuple[int, ...],
                  data: Path | None, warmup: int, repeats: int, shape: str,
                  as_json: bool) -> None:
    """Time MODELS (e.g. a float model and its quantized version) per backend and thread
    count, alternately in one run, with speed-ups against the first model; or, with --kernel,
    the fused quantized BN-ReLU operator alone.

    \b
    Examples:
      bnq bench samples/digits_cnn.onnx /tmp/digits_int8.onnx --threads 1
      bnq bench --kernel --shape 8,64,56,56
    """
    from bnq.bench import bench_kernel, bench_models
    from bnq.io import load_model
    from bnq.machine import describe

    if kernel:
        _refuse(ctx, ("models", "backends", "batch_size", "data", "warmup"), "with --kernel")
    else:
        _refuse(ctx, ("shape",), "without --kernel (it sets the tensor of the operator alone)")
    machine = describe()
    threads = threads or tuple(sorted({1, machine.cores}))
    if kernel:
        try:
            dims = tuple(int(part) for part in shape.split(","))
        except ValueError:
            raise click.BadParameter(f"{shape!r} is not a comma-separated list of integers",
                                     param_hint="--shape") from None
        reports = [bench_kernel(dims, count, repeats) for count in threads]
        _emit(render.report_text(as_json, lambda: {"machine": machine, "kernel": reports},
                                 lambda: render.kernel_bench(machine, reports)))
        return
    if not models:
        raise click.UsageError("give at least one MODEL, or --kernel")
    labels = [path.name for path in models]
    if len(set(labels)) < len(labels):  # same file names in other folders, or one model twice
        labels = [f"{index}:{path}" for index, path in enumerate(models, 1)]
    loaded = {label: load_model(path) for label, path in zip(labels, models)}
    first = next(iter(loaded.values()))
    feeds = _bench_feeds(first, data, batch_size)
    report = bench_models(loaded, feeds, backends=backends, threads=threads, warmup=warmup,
                          repeats=repeats)
    _emit(render.report_text(
        as_json, lambda: {"machine": report.machine, "warmup": report.warmup,
                          "repeats": report.repeats, "results": report.results},
        lambda: render.model_bench(report)))


def _refuse(ctx: click.Context, names: tuple[str, ...], reason: str) -> None:
    """A usage error (exit code 2) for any of the parameters `names` the user gave: they do not
    apply to the mode chosen, and ignoring them silently would mislead."""
    for param in ctx.command.params:
        if param.name in names and ctx.get_parameter_source(param.name) in (
                click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
            shown = param.human_readable_name if isinstance(param, click.Argument) \
                else "/".join(param.opts)
            raise click.UsageError(f"{shown} does not apply {reason}", ctx)


def _bench_feeds(model, data: Path | None, batch_size: int) -> dict[str, np.ndarray]:
    import numpy as np

    from bnq.data import SampleData, model_inputs
    from bnq.limits import check_size

    specs = model_inputs(model)
    if data is not None:
        return next(SampleData(data, specs).batches(batch_size, batch_size))
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in specs:
        if any(dim is None for dim in spec.shape[1:]):
            raise BnqError(f"model input {spec.name!r} has dynamic dimensions "
                           f"{list(spec.shape)}: pass --data with samples of the right shape")
        check_size(8 * batch_size * math.prod(spec.shape[1:]),  # drawn as float64
                   f"random input {spec.name!r} for a batch of {batch_size}", BnqError,
                   "use a smaller --batch-size")
        feeds[spec.name] = rng.standard_normal((batch_size, *spec.shape[1:])).astype(spec.dtype)
    return feeds


def main() -> None:
    for name in ("SIGTERM", "SIGHUP"):  # SIGHUP: the terminal closed; neither on Windows
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)
    cli(prog_name="bnq")
