"""The evaluation report for people: its summary as (what, value) rows, shared by the terminal
table and the HTML page.
"""

from __future__ import annotations

from bnq.evaluate import EvaluationReport, OutputMetrics


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _output_rows(output: OutputMetrics, prefix: str) -> list[tuple[str, str]]:
    rows = []
    if output.kind == "classification":
        ks = ("top1", "top5") if output.top5_agreement is not None else ("top1",)
        agreements = {"top1": output.top1_agreement, "top5": output.top5_agreement}
        for k in ks:
            name = f"top-{k[3:]}"
            if output.accuracy is not None:
                ref, got = output.accuracy["reference"][k], output.accuracy["quantized"][k]
                rows += [(f"{prefix}{name} accuracy, float", _percent(ref)),
                         (f"{prefix}{name} accuracy, quantized", _percent(got)),
                         (f"{prefix}{name} accuracy drop", f"{100 * (ref - got):+.2f} points")]
            rows.append((f"{prefix}{name} agreement", _percent(agreements[k])))
    rows += [(f"{prefix}SQNR", f"{output.sqnr_db:.2f} dB"),
             (f"{prefix}cosine", f"{output.cosine:.6f}"),
             (f"{prefix}max / mean abs error",
              f"{output.max_abs_error:.4g} / {output.mean_abs_error:.4g}")]
    if output.iou is not None:
        rows.append((f"{prefix}IoU of maps > 0.5", f"{output.iou:.4f}"))
    return rows


def summary_rows(report: EvaluationReport) -> list[tuple[str, str]]:
    """What a reader wants first, as (what, value): per output, the figures that fit it (top-k
    for classification scores, IoU for maps in [0, 1]), and the kernel paths' agreement."""
    several = len(report.outputs) > 1
    rows = [row for output in report.outputs
            for row in _output_rows(output, f"{output.name}: " if several else "")]
    if len(report.outputs) == 1:
        rows.insert(0, ("output", f"{report.outputs[0].name} ({report.outputs[0].kind})"))
    if report.backend_max_lsb_diff is not None:
        rows.append(("numpy vs onnxruntime, fused nodes", f"{report.backend_max_lsb_diff} LSB"))
    return rows
