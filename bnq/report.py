"""The evaluation report for people: its summary as (what, value) rows, shared by the terminal
table and the HTML page, and the HTML page itself (`render_html`) with its charts, drawn by
matplotlib (the optional extra `bnq[report]`) as SVG.
"""

from __future__ import annotations

from bnq.evaluate import EvaluationReport, LayerMetrics, OutputMetrics


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


# The HTML page: one self-contained file (styles inline, charts as inline SVG drawn by
# matplotlib, text as paths, no script, no link, no font or image fetched), readable offline.

HISTOGRAMS = 6  # the worst layers whose histograms are drawn
BAR_COLOR = "#1f77b4"  # matplotlib's first color; the range marks use RANGE_COLOR
RANGE_COLOR = "#d62728"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.name { overflow-wrap: anywhere; max-width: 40em; }
.note { color: #555; font-size: 0.9em; }
figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
.histograms { display: flex; flex-wrap: wrap; gap: 1em; }
.histograms figure { margin: 0; flex: 0 1 32em; }
"""


def require_matplotlib():
    """matplotlib's Figure; MissingExtraError with what to install when it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        from bnq.errors import MissingExtraError

        raise MissingExtraError("--report draws its charts with matplotlib: "
                                "pip install 'bnq[report]'") from None
    return Figure


def _svg(figure) -> str:
    """The figure as an inline <svg> element: no XML prolog or DOCTYPE (which names an external
    DTD), no metadata, text drawn as paths (matplotlib's default), so nothing is fetched."""
    import io

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight",
                   metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _finite_sqnr(values: list[float]) -> tuple[list[float], float]:
    """SQNRs with +inf (identical tensors) drawn as a bar 10 dB past the largest finite one."""
    finite = [v for v in values if v != float("inf")]
    top = max(finite, default=0.0) + 10
    return [top if v == float("inf") else max(v, 0.0) for v in values], top


def sqnr_chart(report: EvaluationReport) -> str:
    """Every quantized tensor's SQNR, one horizontal bar each, in graph order (top to bottom),
    so that where error enters and how it grows along the model shows at a glance."""
    Figure = require_matplotlib()
    layers = sorted(report.layers, key=lambda layer: layer.position)
    values, _ = _finite_sqnr([layer.sqnr_db for layer in layers])
    figure = Figure(figsize=(9, 1.2 + 0.22 * len(layers)))
    axes = figure.add_subplot()
    positions = range(len(layers))
    axes.barh(positions, values, color=BAR_COLOR, height=0.7)
    axes.set_yticks(list(positions), [_short(layer.tensor) for layer in layers], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("SQNR against the float model (dB, higher is better)")
    axes.set_ylim(len(layers) - 0.5, -0.5)
    axes.grid(axis="x", alpha=0.3)
    return _svg(figure)


def histogram_chart(layer: LayerMetrics) -> str:
    """The float values of one layer (log counts) with its calibrated range marked: values
    outside the range are clipped by quantization, a range much wider than the values wastes
    codes."""
    Figure = require_matplotlib()
    import numpy as np

    counts = np.asarray(layer.histogram)
    edges = np.linspace(*layer.histogram_range, len(counts) + 1)
    figure = Figure(figsize=(6, 2.4))
    axes = figure.add_subplot()
    axes.stairs(counts, edges, fill=True, color=BAR_COLOR)
    axes.axvspan(*layer.range, color=RANGE_COLOR, alpha=0.08)
    for edge in layer.range:
        axes.axvline(edge, color=RANGE_COLOR, linewidth=1.5)
    if counts.any():
        axes.set_yscale("log")
    axes.set_title(f"{_short(layer.tensor, 60)}: {layer.sqnr_db:.2f} dB, "
                   f"{100 * layer.clipped:.3f}% clipped", fontsize=9)
    axes.set_xlabel("float value (red: calibrated range)", fontsize=8)
    axes.tick_params(labelsize=7)
    return _svg(figure)


def _short(name: str, limit: int = 48) -> str:
    """A tensor name for a chart label: its tail, where the layer's own name is (the tables
    give every name whole)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def render_html(report: EvaluationReport, *, title: str, details: list[tuple[str, str]]) -> str:
    """The evaluation report as one self-contained HTML page: `details` (what was compared,
    on which machine) and the summary, each output's metrics, the per-layer SQNR chart and
    table (every layer), and the histograms of the worst layers with their calibrated ranges."""
    from html import escape

    def table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
        head = "".join(f"<th>{escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f'<td class="{"n" if i in numeric else "name" if i == 0 else ""}">'
                             f"{escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
            for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def number(value: float | None, digits: str = ".2f") -> str:
        return "" if value is None else format(value, digits)

    parts = [f"<h1>{escape(title)}</h1>",
             table(["", ""], [list(row) for row in details + summary_rows(report)], {1})]
    parts.append("<h2>Outputs</h2>")
    parts.append(table(
        ["output", "kind", "SQNR (dB)", "cosine", "max abs error", "mean abs error", "IoU > 0.5",
         "top-1 agreement", "top-5 agreement"],
        [[o.name, o.kind, number(o.sqnr_db), number(o.cosine, ".6f"),
          number(o.max_abs_error, ".4g"), number(o.mean_abs_error, ".4g"), number(o.iou, ".4f"),
          "" if o.top1_agreement is None else _percent(o.top1_agreement),
          "" if o.top5_agreement is None else _percent(o.top5_agreement)]
         for o in report.outputs], set(range(2, 9))))
    if report.layers:
        parts.append("<h2>Quantized tensors: SQNR against the float model, in graph order</h2>")
        parts.append('<p class="note">Each bar is a quantized activation (integer codes, '
                     "dequantized) against the float model's tensor at the same place. Error "
                     "enters where the bars drop.</p>")
        parts.append(f"<figure>{sqnr_chart(report)}</figure>")
        worst = report.layers[:HISTOGRAMS]
        parts.append(f"<h2>Float values and calibrated ranges of the {len(worst)} worst "
                     "tensors</h2>")
        parts.append('<div class="histograms">' + "".join(
            f"<figure>{histogram_chart(layer)}</figure>" for layer in worst) + "</div>")
        parts.append("<h2>Every quantized tensor, worst first</h2>")
        both = report.backend_max_lsb_diff is not None
        parts.append(table(
            ["tensor", "op", "SQNR (dB)", "mean abs error", "calibrated range", "clipped",
             *(["numpy vs onnxruntime (LSB)"] if both else [])],
            [[layer.tensor, layer.op, number(layer.sqnr_db), number(layer.mean_abs_error, ".4g"),
              f"[{layer.range[0]:.4g}, {layer.range[1]:.4g}]", f"{100 * layer.clipped:.3f}%",
              *([number(layer.backend_max_lsb_diff, "d")] if both else [])]
             for layer in report.layers], {2, 3, 4, 5, 6}))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
