"""The `bnq` command: a thin shell over the Python API. The only module that prints.

Reports go to stdout (a rich table, or JSON with `--json`); progress and errors go to stderr.
A `BnqError` becomes one `Error: ...` line and exit code 1, bad usage exit code 2, Ctrl-C exit
code 130; a traceback only with `--debug`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from bnq.errors import BnqError
from bnq.fusion import FuseReport, fuse
from bnq.io import check_output_path, load_model, save_model

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

MODEL = click.Path(dir_okay=False, path_type=Path)


class _Group(click.Group):
    """Turns library errors into one line and an exit code; `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BnqError as error:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            err.print("interrupted: nothing was written")
            ctx.exit(130)
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


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@cli.command("fuse")
@click.argument("model", type=MODEL)
@click.option("-o", "--output", type=MODEL, required=True,
              help="Where to write the fused model (.onnx or .npz).")
@_force_option
@_json_option
def fuse_command(model: Path, output: Path, force: bool, as_json: bool) -> None:
    """Fold Conv/ConvTranspose/Gemm + BatchNormalization and fuse the remaining
    BatchNormalization + Relu pairs of MODEL (.onnx or .npz) into bnq.BatchNormRelu nodes.

    Only exact rewrites are made; every BatchNormalization left alone is listed with the
    reason. The output runs in stock onnxruntime."""
    check_output_path(output, [model], overwrite=force)
    fused, report = fuse(load_model(model))
    save_model(fused, output, overwrite=force)
    if as_json:
        _print_json({"model": str(model), "output": str(output), "folded": report.count("folded"),
                     "fused": report.count("fused"), "kept": report.count("kept"),
                     **dataclasses.asdict(report)})
    else:
        _render_fuse(model, output, report)


def _render_fuse(model: Path, output: Path, report: FuseReport) -> None:
    counts = Table(title=f"Operators in {model.name}", title_justify="left")
    for column in ("op", "before", "after"):
        counts.add_column(column, justify="left" if column == "op" else "right")
    for op in sorted(set(report.ops_before) | set(report.ops_after)):
        before, after = report.ops_before.get(op, 0), report.ops_after.get(op, 0)
        style = "" if before == after else "bold"
        counts.add_row(op, str(before), str(after), style=style)
    out.print(counts)
    if report.actions:
        actions = Table(title="BatchNormalization nodes", title_justify="left")
        for column in ("node", "outcome", "detail"):
            actions.add_column(column)
        colors = {"folded": "green", "fused": "green", "kept": "yellow"}
        for action in report.actions:
            actions.add_row(action.node, f"[{colors[action.outcome]}]{action.outcome}[/]",
                            action.detail)
        out.print(actions)
        out.print(f"{report.count('folded')} folded, {report.count('fused')} fused, "
                  f"{report.count('kept')} kept; wrote {output}")
    else:
        out.print(f"nothing to fuse: {model} has no BatchNormalization; wrote an unchanged copy "
                  f"to {output}")


def main() -> None:
    cli(prog_name="bnq")
