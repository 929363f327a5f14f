"""``condiff export --model shapes --out DIR``: a condiff model as a diffusers-format folder
(condiff.interop.export says what diffusers loads from it and what it does not)."""

from __future__ import annotations

from pathlib import Path

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt

app = typer.Typer(
    help="Write a condiff model as a diffusers-format folder (UNet + scheduler load in diffusers).",
    no_args_is_help=True,
)


@app.callback(invoke_without_command=True)
def export_cmd(
    model: str = typer.Option(..., help="bundled model name (shapes, digits) or a model directory"),
    out: Path = typer.Option(..., help="the folder to write (replaced atomically if it exists)"),
    threads: ThreadsOpt = None,
):
    """Write unet/ and scheduler/ (diffusers classes), the text encoder where the model has one, and
    condiff_export.json (how the network is called, what diffusers can and cannot load)."""
    from condiff.interop.export import export_model

    common.check_out(out, "--out", kind="dir")
    common.use_threads(threads)
    m = common.load_model(model)
    path = export_model(m, out)
    typer.echo(f"wrote {path} (diffusers loads unet/ and scheduler/; see {path / 'condiff_export.json'})")
