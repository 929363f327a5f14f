from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer  # noqa: E402

from condiff.cli import bench, dc, edit, ems, export, guidance, restore, sample  # noqa: E402
from condiff.errors import CondiffError, one_line  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="condiff: conditional diffusion - sample, evaluate, train, demo.",
)
app.command("models")(sample.models_cmd)
app.command("solvers")(sample.solvers_cmd)
app.command("sample")(sample.sample_cmd)
app.command("eval")(sample.eval_cmd)
app.command("train")(sample.train_cmd)
app.command("demo")(sample.demo_cmd)
app.command("invert")(edit.invert_cmd)
app.command("edit")(edit.edit_cmd)
app.command("restore")(restore.restore_cmd)
app.add_typer(export.app, name="export")
app.add_typer(guidance.app, name="guidance")
app.add_typer(ems.app, name="ems")
app.add_typer(dc.app, name="dc")
app.add_typer(bench.app, name="bench")


def _fail(message: str):
    """Print the one-line error and exit with code 2."""
    typer.echo(f"error: {one_line(message)}", err=True)
    sys.exit(2)


def _bad_input(e: Exception) -> str:
    """', got VALUE' for a value typer could not convert (its message does not name the value)."""
    errors = getattr(e.__cause__, "errors", None)
    try:
        items = errors() if callable(errors) else []
    except Exception:  # pragma: no cover
        items = []
    if items and isinstance(items[0], dict) and "input" in items[0]:
        return f", got {items[0]['input']!r}"
    return ""


def main(argv=None):
    try:
        from typer._click import exceptions as click_exc  # typer >= 0.25 vendors click
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    try:
        app(args=argv, standalone_mode=False)
    except CondiffError as e:
        _fail(str(e))
    except click_exc.NoArgsIsHelpError as e:
        typer.echo(e.format_message())
        sys.exit(2)
    except click_exc.UsageError as e:
        msg = e.format_message().replace("\n", " ") + _bad_input(e)
        _fail(msg + (f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""))
    except click_exc.ClickException as e:
        _fail(e.format_message())
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
