from __future__ import annotations

import contextlib
import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer  # noqa: E402

from condiff.cli import adapt as adapt_cli  # noqa: E402
from condiff.cli import (  # noqa: E402
    bench,
    catalog,
    certify,
    classify,
    dc,
    edit,
    ems,
    export,
    features,
    finetune,
    grid,
    guidance,
    match,
    predict,
    recipes,
    restore,
    sample,
    upscale,
)
from condiff.cli import forecast as forecast_cli  # noqa: E402
from condiff.cli import vae as vae_cli  # noqa: E402
from condiff.cli.ui import command as ui_command  # noqa: E402
from condiff.core.files import log_writes  # noqa: E402
from condiff.errors import CondiffError, Interrupted, one_line  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="condiff: conditional diffusion - sample, evaluate, train, demo.",
)


def _print_version(value: bool):
    if value:
        from condiff import __version__

        typer.echo(f"condiff {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        expose_value=False,
        callback=_print_version,
        help="print the version and exit",
    ),
):
    """condiff: conditional diffusion - sample, evaluate, train, demo."""


app.command("models")(catalog.models_cmd)
app.command("solvers")(sample.solvers_cmd)
app.command("sample")(sample.sample_cmd)
app.command("eval")(sample.eval_cmd)
app.command("train")(sample.train_cmd)
app.command("finetune")(finetune.finetune_cmd)
app.command("demo")(sample.demo_cmd)
app.command("invert")(edit.invert_cmd)
app.command("edit")(edit.edit_cmd)
app.command("restore")(restore.restore_cmd)
app.command("match")(match.match_cmd)
app.command("classify")(classify.classify_cmd)
app.command("certify")(certify.certify_cmd)
app.command("predict")(predict.predict_cmd)
app.command("unicon")(predict.unicon_cmd)
app.command("forecast")(forecast_cli.forecast_cmd)
app.command("adapt")(adapt_cli.adapt_cmd)
app.command("ui")(ui_command.ui_cmd)
app.add_typer(export.app, name="export")
app.add_typer(guidance.app, name="guidance")
app.add_typer(ems.app, name="ems")
app.add_typer(dc.app, name="dc")
app.add_typer(grid.app, name="grid")
app.add_typer(bench.app, name="bench")
app.add_typer(recipes.app, name="recipes")
app.add_typer(features.app, name="features")
app.add_typer(upscale.app, name="sr")
app.add_typer(vae_cli.app, name="vae")


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


@contextlib.contextmanager
def _signals_interrupt():
    """Within the block SIGINT and SIGTERM raise ``Interrupted``. Python's own SIGINT handler raises
    KeyboardInterrupt, which typer's main loop (0.29) turns into ``Exit(130)`` and, outside standalone mode, returns
    instead of raising: the command stopped, printed nothing and exited 0. The first signal also ignores further
    ones, so cleanup (temporary files, the trainer's report) runs to its end. A signal the parent ignores (a shell's
    background job) stays ignored; outside the main thread nothing is installed."""
    caught = (signal.SIGINT, signal.SIGTERM)

    def handler(signum, frame):
        for s in caught:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {}
    with contextlib.suppress(ValueError):  # signal.signal works only in the main thread
        for s in caught:
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _close_progress_bars():
    """Close the progress bars an interrupt left open (a bar with ``leave=True`` ends its line, one with
    ``leave=False`` clears it), so the interrupt's line starts a line of its own and no bar redraws after it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _exit_interrupted(e: Interrupted, written):
    """Close the progress bars, print the interrupt's one line and exit with 128 + the signal's number."""
    _close_progress_bars()
    typer.echo(f"error: {one_line(_interrupted(e, written))}", err=True)
    sys.exit(128 + e.signum)


def _interrupted(e: Interrupted, written) -> str:
    """The one line for an interrupted command: what it leaves (``e.kept``), else what it wrote before the signal."""
    name = signal.Signals(e.signum).name
    if e.kept:
        return f"interrupted ({name}): {e.kept}"
    there = list(dict.fromkeys(str(p) for p in written if os.path.lexists(p)))
    if not there:
        return f"interrupted ({name}): no output was written"
    more = f" and {len(there) - 3} more" if len(there) > 3 else ""
    return f"interrupted ({name}): only {', '.join(there[:3])}{more} had been written; the rest was not"


def main(argv=None):
    """Run the CLI: exit 2 with one ``error:`` line on a bad input; 130 (SIGINT) or 143 (SIGTERM) with one line
    naming what was kept when interrupted."""
    try:
        from typer._click import exceptions as click_exc  # typer >= 0.25 vendors click
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    from condiff.models.runtime import keep_freed_memory

    # sampling and training free and re-allocate the same tensor sizes every step: keep them on the heap
    keep_freed_memory(os.environ.get("CONDIFF_ALLOCATOR", "") != "system")
    written = []
    try:
        with log_writes() as written, _signals_interrupt():
            try:
                app(args=argv, standalone_mode=False)
            except Interrupted as e:  # reported while the handlers still ignore a second signal
                _exit_interrupted(e, written)
    except Interrupted as e:  # a signal just as the command ended, before the handlers were put back
        _exit_interrupted(e, written)
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


if __name__ == "__main__":
    main()
