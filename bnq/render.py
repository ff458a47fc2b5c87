"""Reports as text for the `bnq` command (`bnq.cli`): rich tables, or JSON with `--json`. The
functions return the text, or print into the captured console `out`, and never touch stdout
themselves: `bnq.cli` prints the text once the work is done.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # the heavy modules (numpy, onnx, onnxruntime) load when a command runs
    from bnq.bench import KernelBench, ModelBench
    from bnq.calibrate import CalibrationReport
    from bnq.evaluate import EvaluationReport
    from bnq.execution import ExecutionPlan
    from bnq.fusion import FuseReport
    from bnq.machine import Machine

# A terminal's tables fold long names onto several lines (never cut them, see report_table);
# pipes and files get lines as long as the tables need, so that a name stays whole on one line.
# Reports are rendered into text (`report_text`) and printed by `bnq.cli`, which alone touches
# stdout, so that a closed pipe or a full disk there is handled in one place. A closed stdout
# (`bnq ... >&-`) is None: reports then go nowhere, the work is still done.
TTY = sys.stdout is not None and sys.stdout.isatty()
out = Console(file=io.StringIO(), force_terminal=TTY, highlight=False,
              width=None if TTY else 1 << 16)


def report_table(title: str, *columns: str, right: tuple[str, ...] = (), **options: Any) -> Table:
    """A report table: left columns (names) fold onto several lines on a narrow terminal rather
    than being cut; `right` columns (numbers) stay on one line."""
    table = Table(title=title, title_justify="left", caption_justify="left", **options)
    for column in columns:
        if column in right:
            table.add_column(column, justify="right", no_wrap=True)
        else:
            table.add_column(column, overflow="fold")
    return table


def report_text(as_json: bool, payload: Callable[[], Any], render: Callable[[], None]) -> str:
    """The report as text, made before an output file is written, so that nothing can fail
    between writing the file and telling the user about it."""
    if as_json:
        return json_text(payload()) + "\n"
    with out.capture() as capture:
        render()
    return capture.get()


def json_text(value: Any) -> str:
    """Strict JSON: a non-finite number (an SQNR of identical outputs) becomes null."""
    return json.dumps(_finite(value), indent=2, allow_nan=False)


def _finite(value: Any) -> Any:
    """`value` as plain JSON types: dataclasses and arrays unpacked, non-finite floats None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _finite(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _finite(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def fuse(model: Path, output: Path, report: FuseReport) -> None:
    """`bnq fuse`'s report: operator counts before and after, and each BatchNormalization's
    outcome."""
    counts = report_table(f"Operators in {model.name}", "op", "before", "after",
                          right=("before", "after"))
    for op in sorted(set(report.ops_before) | set(report.ops_after)):
        before, after = report.ops_before.get(op, 0), report.ops_after.get(op, 0)
        style = "" if before == after else "bold"
        counts.add_row(op, str(before), str(after), style=style)
    out.print(counts)
    if report.actions:
        actions = report_table("BatchNormalization nodes", "node", "outcome", "detail")
        colors = {"folded": "green", "fused": "green", "kept": "yellow"}
        for action in report.actions:
            actions.add_row(action.node, f"[{colors[action.outcome]}]{action.outcome}[/]",
                            action.detail)
        out.print(actions)
        out.print(f"{report.count('folded')} folded, {report.count('fused')} fused, "
                  f"{report.count('kept')} kept; wrote {output}")
    else:
        out.print(f"nothing to fuse: {model} has no BatchNormalization; wrote an unchanged "
                  f"copy to {output}")


# How onnxruntime computes a QLinearBatchNormRelu node, for each body bnq.qops.body_for chooses.
BODY_WORDS = {
    "integer": "onnxruntime's integer convolution kernels",
    "float": "a float32 formula of standard operators",
    "double": "a float64 formula of standard operators",
    "table": "a 256-entry lookup table per channel",
}


def calibration(output: Path, report: CalibrationReport) -> None:
    """`bnq calibrate`'s report: what was done to the model, then every quantized tensor."""
    formats = report.formats
    out.print(f"[bold]formats[/]: {formats.activation} activations, {formats.weight} weights"
              f"{' (7-bit)' if formats.reduce_range else ''}: {formats.reason}")
    fusion = report.fusion
    out.print(f"[bold]fusion[/]: {fusion.count('folded')} BatchNormalization folded into the "
              f"layer before, {fusion.count('fused')} fused with their Relu, "
              f"{fusion.count('kept')} kept")
    if fusion.count("fused"):
        out.print(f"[bold]fused BN-ReLU nodes[/]: give exactly PyTorch's quantized BNReLU2d "
                  f"codes in stock onnxruntime, no plugin needed ({BODY_WORDS[report.body]}, "
                  "checked exact for every input code)")
    if report.folded_pools:
        out.print(f"[bold]pooling[/]: {len(report.folded_pools)} AveragePool folded into the "
                  "1x1 convolution before it (one strided convolution: stays integer)")
    if report.equalization is not None:
        pairs = report.equalization.pairs
        out.print(f"[bold]equalization[/]: {len(pairs)} pairs of consecutive layers rescaled "
                  f"to matching weight ranges ({report.equalization.sweeps} sweeps)")
    if report.weights_rounded:
        out.print(f"[bold]weight rounding[/]: {report.weights_rounded} weights rounded by their "
                  "effect on the layer's output (GPTQ)")
    if report.bias_correction is not None:
        corrected = report.bias_correction
        out.print(f"[bold]bias correction[/]: {corrected.layers} layers, mean output shift "
                  f"removed {corrected.mean_abs_shift:.3g} on average, "
                  f"{corrected.max_abs_shift:.3g} at most")
    if report.choice is not None and report.choice.unscored:
        out.print(f"[bold]method auto[/]: {report.choice.chosen}, unscored: "
                  f"{report.choice.unscored}")
    elif report.choice is not None:
        scores = ", ".join(f"{name} {sqnr:.2f} dB" for name, sqnr in report.choice.sqnr_db.items())
        out.print(f"[bold]method auto[/]: chose {report.choice.chosen}; output SQNR against the "
                  "float model, each method calibrated on half the samples and run on the other "
                  f"half: {scores}")
    table = report_table("Quantized tensors", "tensor", "role", "granularity", "range",
                         "scale", "zero point", right=("range", "scale", "zero point"))
    for tensor in report.tensors:
        scale = (f"{tensor.scale_min:.4g}" if tensor.scale_min == tensor.scale_max
                 else f"{tensor.scale_min:.4g}..{tensor.scale_max:.4g}")
        table.add_row(tensor.name, tensor.role, tensor.granularity,
                      f"[{tensor.rmin:.4g}, {tensor.rmax:.4g}]", scale,
                      "per channel" if tensor.zero_point is None else str(tensor.zero_point))
    out.print(table)
    out.print(f"calibrated on {report.samples} samples in {report.batches} batches "
              f"({report.method}), {plan_text(report.plan)}; wrote {output}")


def plan_text(plan: ExecutionPlan) -> str:
    """How a run split its work (`bnq.execution.ExecutionPlan`), in words."""
    passes = f"{plan.passes} passes" if plan.passes > 1 else "1 pass"
    return (f"{passes} of micro-batches of {plan.micro_batch} (about "
            f"{size_text(plan.estimated_bytes)} of activations, limit "
            f"{size_text(plan.memory_limit)} per process)"
            + (", the data streamed to the cluster's workers" if plan.data == "streamed" else ""))


def size_text(size: int) -> str:
    """Bytes in binary units: 1.5 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


def _bar(value: float, top: float = 50.0, width: int = 25) -> str:
    import numpy as np

    filled = 0 if not np.isfinite(value) or value <= 0 else min(width, round(value / top * width))
    if np.isinf(value) and value > 0:
        filled = width
    return "█" * filled + "·" * (width - filled)


# The terminal shows this many layers; --json and --report hold them all.
LAYERS_SHOWN = 30


def evaluation(report: EvaluationReport, report_path: Path | None = None) -> None:
    """`bnq evaluate`'s report: the summary, then the worst tensors (LAYERS_SHOWN of them)."""
    from bnq.report import summary_rows

    summary = report_table(f"{report.samples} samples, backend {report.backend}", "what",
                           "value", right=("value",), show_header=False)
    for row in summary_rows(report):
        summary.add_row(*row)
    out.print(summary)
    if not report.layers:
        return
    both = report.backend_max_lsb_diff is not None
    numbers = ("SQNR (dB)", "", "clipped", *(("LSB diff",) if both else ()))
    layers = report_table(f"Quantized tensors against the float model, worst first "
                          f"({min(len(report.layers), LAYERS_SHOWN)} of {len(report.layers)})",
                          "tensor", "op", *numbers, right=numbers)
    for layer in report.layers[:LAYERS_SHOWN]:
        row = [layer.tensor, layer.op, f"{layer.sqnr_db:.2f}", _bar(layer.sqnr_db),
               f"{100 * layer.clipped:.3f}%"]
        if both:
            row.append("" if layer.backend_max_lsb_diff is None
                       else str(layer.backend_max_lsb_diff))
        layers.add_row(*row)
    out.print(layers)
    if len(report.layers) > LAYERS_SHOWN:
        out.print(f"{len(report.layers) - LAYERS_SHOWN} more in --json and --report")
    if report.plan is not None:
        out.print(f"run in {plan_text(report.plan)}")
    if report_path is not None:
        out.print(f"wrote {report_path}")


def machine_line(machine: Machine) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine.versions.items())
    return (f"{machine.cpu}, {machine.cores} cores, "
            f"features: {', '.join(machine.features) or 'none detected'}; {versions}")


def model_bench(report: ModelBench) -> None:
    """`bnq bench MODEL ...`'s latency table."""
    numbers = ("batch", "threads", "median ms", "p90 ms", "samples/s", "speed-up")
    table = report_table(f"Latency, {report.repeats} rounds after {report.warmup} warm-up",
                         "model", "backend", *numbers, right=numbers,
                         caption=machine_line(report.machine))
    for r in report.results:
        table.add_row(r.model, r.backend, str(r.batch_size), str(r.threads), f"{r.median_ms:.3f}",
                      f"{r.p90_ms:.3f}", f"{r.throughput:.1f}", f"{r.speedup:.2f}x")
    out.print(table)


def kernel_bench(machine: Machine, reports: list[KernelBench]) -> None:
    """`bnq bench --kernel`'s tables, one per shape and thread count."""
    for report in reports:
        numbers = ("median ms", "p90 ms", f"vs {report.reference}", "max code diff")
        table = report_table(f"Quantized BN-ReLU on uint8 {list(report.shape)}, "
                             f"{report.threads} thread(s), median of {report.repeats}", "path",
                             *numbers, right=numbers, caption=machine_line(machine))
        for path in report.paths:
            table.add_row(path.name, f"{path.median_ms:.2f}", f"{path.p90_ms:.2f}",
                          f"{path.speedup:.2f}x", str(path.max_code_diff))
        out.print(table)
