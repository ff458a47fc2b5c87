"""The HTML report: it parses, references nothing outside itself, holds every layer, and a real
browser (headless Chromium) renders its charts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bnq import load_model, save_model
from bnq.calibrate import calibrate
from bnq.cli import cli
from bnq.data import SampleData, model_inputs
from bnq.evaluate import evaluate
from bnq.machine import IntegerFormats

pytest.importorskip("matplotlib")  # the report extra; .ci/run installs it
from bnq.report import BAR_COLOR, HISTOGRAMS, RANGE_COLOR, render_html  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits_cnn.onnx"
EVAL = ROOT / "samples" / "eval.npz"
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}
# Attributes through which a page loads something
FETCHING = {"src", "href", "xlink:href", "action", "data", "poster", "srcset", "background"}


class _Page(HTMLParser):
    """Checks that tags nest and close, and collects what a browser would fetch."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.references: list[str] = []
        self.errors: list[str] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.references += [value for name, value in attrs if name in FETCHING]
        self.references += [value for name, value in attrs if name == "style" and "url(" in value]
        if tag == "td":
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.references += [value for name, value in attrs if name in FETCHING]

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    reference = load_model(SAMPLE)
    data = SampleData(ROOT / "samples" / "calib.npz", model_inputs(reference))
    quantized, _ = calibrate(reference, data, formats=IntegerFormats("uint8", "int8", True, ""),
                             num_samples=64)
    folder = tmp_path_factory.mktemp("report")
    save_model(quantized, folder / "q.onnx")
    report = evaluate(quantized, reference,
                      SampleData(EVAL, model_inputs(reference), extra_keys=("labels",)),
                      num_samples=96, backend="both")
    return folder, report


def test_page_parses_references_nothing_outside_and_holds_every_layer(evaluated):
    _, report = evaluated
    page = render_html(report, title="t", details=[("machine", "here")])
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert page.startswith("<!DOCTYPE html>")
    assert parser.errors == [] and parser.stack == []
    assert parser.references and all(ref.startswith("#") for ref in parser.references)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(parser.tags)
    assert "@import" not in page and "<!DOCTYPE svg" not in page
    # no address anywhere, but XML namespace names (identifiers a browser never fetches)
    assert "://" not in re.sub(r'xmlns(:\w+)?="[^"]*"', "", page)
    assert parser.tags.count("svg") == 1 + min(HISTOGRAMS, len(report.layers))
    for layer in report.layers:
        assert layer.tensor in parser.cells  # every layer, whole, in the table
    assert "QLinearBatchNormRelu" in parser.cells
    for row in ("top-1 accuracy, float", "SQNR", "numpy vs onnxruntime, fused nodes"):
        assert row in parser.cells


def test_chromium_renders_the_charts(evaluated, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    Image = pytest.importorskip("PIL.Image")
    _, report = evaluated
    page = tmp_path / "report.html"
    page.write_text(render_html(report, title="t", details=[]), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)

    def near(color: str) -> np.ndarray:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        return np.abs(pixels - rgb).max(axis=2) <= 12

    bars, ranges = near(BAR_COLOR), near(RANGE_COLOR)
    # the bar chart and the histograms are drawn: thousands of pixels in the bars' color, in
    # a region that is not blank, and the calibrated ranges' red lines
    assert bars.sum() > 20_000, bars.sum()
    rows = np.flatnonzero(bars.any(axis=1))
    chart = pixels[rows.min():rows.max() + 1]
    assert chart.std() > 30
    assert ranges.sum() > 500, ranges.sum()


def test_cli_writes_the_report_only_when_asked(evaluated, tmp_path):
    folder, _ = evaluated
    runner = CliRunner()
    page = tmp_path / "r.html"
    args = ["evaluate", str(folder / "q.onnx"), "-r", str(SAMPLE), "-d", str(EVAL),
            "--num-samples", "40"]
    result = runner.invoke(cli, [*args, "--report", str(page)])
    assert result.exit_code == 0, result.output
    assert f"wrote {page}" in result.stdout and page.read_text().startswith("<!DOCTYPE html>")
    before = page.read_bytes()
    result = runner.invoke(cli, [*args, "--report", str(page)])
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert page.read_bytes() == before
    assert runner.invoke(cli, [*args, "--report", str(page), "--force"]).exit_code == 0
    result = runner.invoke(cli, [*args, "--force"])
    assert result.exit_code == 2 and "--force does not apply" in result.stderr
    result = runner.invoke(cli, [*args, "--report", str(tmp_path / "r.txt")])
    assert result.exit_code == 1 and ".html" in result.stderr


def test_missing_matplotlib_is_one_line_before_any_work(evaluated, tmp_path, monkeypatch):
    folder, _ = evaluated
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = CliRunner().invoke(cli, ["evaluate", str(folder / "q.onnx"), "-r", str(SAMPLE),
                                      "-d", str(EVAL), "--report", str(tmp_path / "r.html")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "bnq[report]" in result.stderr
    assert not (tmp_path / "r.html").exists()
