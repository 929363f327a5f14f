"""``condiff recipes``: the training recipes packaged with condiff (``condiff/recipes/*.toml``, in the wheel).

``condiff recipes`` lists them (name, CPU time, what each trains); ``condiff recipes copy NAME DEST`` writes one
out to edit; ``condiff train NAME`` trains one by name (``resolve_recipe``). A recipe's first comment line says
what it trains and a ``# CPU time: ...`` comment line states its measured training time. Names become files
here, in the CLI layer; ``condiff.training.recipe.load_recipe`` takes a path.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
from pathlib import Path

import typer

from condiff.errors import ConfigError, InputFileError, OutputFileError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
CPU_TIME = "cpu time:"

app = typer.Typer(
    help="The packaged training recipes: list them, copy one out to edit (`condiff train NAME` trains one).",
    add_completion=False,
)


def packaged() -> dict[str, Path]:
    """{name: path} of the packaged recipes, sorted by name (a recipe's name is its file's stem)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.toml"), key=lambda p: p.stem)}


def packaged_finetune() -> dict[str, Path]:
    """{name: path} of the packaged fine-tuning recipes (``condiff finetune NAME``), in ``recipes/finetune``."""
    return {p.stem: p for p in sorted((RECIPES_DIR / "finetune").glob("*.toml"), key=lambda p: p.stem)}


def describe(path: Path) -> dict:
    """What a recipe's leading comment says: ``trains`` (its first line), ``cpu_time`` (the text after
    ``# CPU time:``, None where the recipe states none) and ``comment`` (the whole leading comment)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    cpu = next((s[len(CPU_TIME) :].strip() for s in lines if s.lower().startswith(CPU_TIME)), None)
    return {"trains": lines[0] if lines else "", "cpu_time": cpu, "comment": "\n".join(lines)}


def did_you_mean(text: str, names) -> str:
    close = difflib.get_close_matches(text.lower(), list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_path(text: str) -> bool:
    """How `condiff train` reads its argument: a path when it ends in .toml or holds a path separator, else a
    packaged recipe's name."""
    return text.lower().endswith(".toml") or "/" in text or os.sep in text


def resolve_recipe(arg, command: str = "train") -> Path:
    """The recipe file `condiff COMMAND ARG` runs (``train``: the training recipes; ``finetune``: the fine-tuning
    ones): a path (``is_path``) as given, or the packaged recipe of that name. An unknown name, or a path that does
    not exist, is one line naming the packaged recipes."""
    text = str(arg)
    recipes = packaged_finetune() if command == "finetune" else packaged()
    if is_path(text):
        path = Path(text)
        if not path.exists():
            stem = path.stem
            if stem in recipes:
                hint = f"; the packaged recipe of that name is `condiff {command} {stem}`"
            else:
                hint = did_you_mean(stem, recipes) or ""
                hint += "; `condiff recipes` lists the packaged recipes, which train by name"
            raise InputFileError(f"recipe not found: {text!r}{hint}")
        return path
    if text in recipes:
        return recipes[text]
    raise ConfigError(
        f"unknown recipe {text!r}{did_you_mean(text, recipes)}; packaged recipes: {', '.join(recipes)} "
        f"(or give a path to a .toml file)"
    )


def recipe_name(arg) -> str:
    """A packaged recipe's name (training or fine-tuning), else one ConfigError line (with did-you-mean)."""
    recipes = {**packaged(), **packaged_finetune()}
    if str(arg) not in recipes:
        raise ConfigError(
            f"unknown recipe {str(arg)!r}{did_you_mean(str(arg), recipes)}; packaged recipes: {', '.join(recipes)}"
        )
    return str(arg)


def records() -> list[dict]:
    """One JSON-ready record per packaged recipe: name, file, what it trains, stated CPU time, comment."""
    rows = [{"name": n, "command": "train", "file": str(p), **describe(p)} for n, p in packaged().items()]
    rows += [{"name": n, "command": "finetune", "file": str(p), **describe(p)} for n, p in packaged_finetune().items()]
    return rows


def table(rows: list[dict]) -> str:
    """The listing `condiff recipes` prints: one aligned row per recipe (``-`` where no CPU time is stated)."""
    head = ("name", "CPU time", "trains")
    cells = [(r["name"], (r["cpu_time"] or "-").split(" (")[0], r["trains"]) for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in [head, *cells]]
    return "\n".join(lines)


@app.callback(invoke_without_command=True)
def recipes_cmd(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="print the records (with each recipe's file) as JSON"),
):
    """List the packaged recipes: name, stated CPU time (measured; training compute on one thread), what it
    trains. `condiff train NAME --out DIR` trains one; `condiff recipes copy NAME DEST` writes one out to edit."""
    if ctx.invoked_subcommand is not None:
        return
    rows = records()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(table([r for r in rows if r["command"] == "train"]))
    typer.echo("\nfine-tuning recipes (condiff finetune NAME):\n")
    typer.echo(table([r for r in rows if r["command"] == "finetune"]))
    typer.echo(
        "\ntrain one: condiff train NAME --out runs/NAME (fine-tune: condiff finetune NAME); edit one: condiff recipes "
        "copy NAME DIR, then condiff train DIR/NAME.toml (condiff finetune DIR/NAME.toml)"
    )


@app.command("copy")
def copy_cmd(
    name: str = typer.Argument(..., help="a packaged recipe's name (`condiff recipes` lists them)"),
    dest: Path = typer.Argument(
        ..., help="a directory (the file is DEST/NAME.toml; created if missing) or a path ending in .toml"
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing file"),
):
    """Write a packaged recipe out to edit; an existing file is kept unless --force."""
    from condiff.cli import common
    from condiff.core.files import atomic_write_text

    source = {**packaged(), **packaged_finetune()}[recipe_name(name)]
    command = "finetune" if name in packaged_finetune() else "train"
    target = dest if dest.suffix.lower() == ".toml" and not dest.is_dir() else dest / source.name
    if dest.exists() and not dest.is_dir() and dest.suffix.lower() != ".toml":
        raise OutputFileError(f"{str(dest)!r} is a file; give a directory or a path ending in .toml")
    if target.is_dir():
        raise OutputFileError(f"{str(target)!r} is a directory; give a path ending in .toml or another directory")
    if target.exists() and not force:
        raise OutputFileError(f"{str(target)!r} already exists; pass --force to replace it")
    common.check_out(target, "DEST", ".toml")
    atomic_write_text(target, source.read_text(encoding="utf-8"))
    typer.echo(f"wrote {target}; train it with: condiff {command} {shlex.quote(str(target))} --out runs/{name}")
