"""Shared pieces of the fuzz suite (imported by its modules): a reproducible hypothesis profile, the
in-process CLI runner and the error contracts every bad input must meet.

CLI: exit code 2, exactly one line on stderr that starts with ``error: `` and names the bad value, no
traceback anywhere, no stray ``.*.tmp`` file next to the intended output. API: a CondiffError subclass
with a one-line message.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from condiff.cli import main
from condiff.errors import CondiffError

# derandomize: the same examples on every run and machine (no example database is consulted).
settings.register_profile(
    "condiff-fuzz",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
settings.load_profile("condiff-fuzz")

ROOT = Path(__file__).resolve().parents[2]
TINY_RECIPE = ROOT / "tests" / "fixtures" / "tiny_digits.toml"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Call ``condiff.cli.main(argv)`` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


class ModelLoaded(BaseException):
    """Raised by the guard below: a bad input got as far as loading or building a model."""


def guarded(*_args, **_kwargs):
    raise ModelLoaded("a model was loaded or built before the bad input was refused")


def expect_cli_error(argv: list[str], *needles: str) -> str:
    """Run ``argv``; assert the CLI error contract, and that it fails before any model is loaded or built;
    every needle must appear in the error line."""
    with mock.patch("condiff.cli.common.load_model", guarded), mock.patch("condiff.cli.train.make_trainer", guarded):
        code, out, err = run_cli(argv)
    assert "Traceback" not in out + err, (argv, err)
    lines = err.rstrip("\n").split("\n")
    assert code == 2, (argv, code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    for needle in needles:
        assert needle in lines[0], (argv, needle, lines[0])
    return lines[0]


def expect_api_error(fn, *args, needles: tuple[str, ...] = (), **kwargs) -> CondiffError:
    """Call ``fn``; assert it raises a typed CondiffError subclass with a one-line message naming the needles."""
    with pytest.raises(CondiffError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and msg.splitlines() == [msg], msg
    assert type(info.value) is not CondiffError, "expected a typed subclass of CondiffError"
    for needle in needles:
        assert needle in msg, (needle, msg)
    return info.value


def no_stray_temp_files(*dirs: Path) -> bool:
    """True when none of ``dirs`` (that exist) holds a ``.*.tmp`` file or directory."""
    return not any(d.is_dir() and any(d.glob(".*.tmp")) for d in dirs)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---- a small TOML writer (tomllib only reads) ------------------------------------------------------------


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _string(k)


def _string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(data: dict, prefix: str = "") -> str:
    """Scalars (and inline values) first, then one [table] per nested dict."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            lines += ["", f"[{name}]", to_toml(v, name)]
    return "\n".join(lines)


def wrong_type(default):
    """A hypothesis strategy of TOML values of the wrong type for a recipe field whose default is ``default``: a
    list always; text for a bool or a number; an integer or a bool for a string; a bool for a number."""
    choices = [st.lists(st.integers(), max_size=2)]
    if isinstance(default, bool):
        choices.append(st.text(max_size=4))
    elif isinstance(default, str):
        choices += [st.integers(), st.booleans()]
    else:
        choices += [st.text(max_size=4), st.booleans()]
    return st.one_of(choices)


def bad_json_target(d: Path, kind: str, stem: str) -> Path:
    """An unusable ``--json`` target in the fresh folder ``d``: "suffix" (not .json), "pickle" (an existing .pkl
    holding a pickle), "directory" (a folder named .json), "under-file" (below a regular file), else a .json in a
    read-only folder."""
    if kind == "suffix":
        return d / f"{stem}.txt"
    if kind == "pickle":
        import pickle

        target = d / f"{stem}.pkl"
        target.write_bytes(pickle.dumps({"a": 1}))
        return target
    if kind == "directory":
        target = d / f"{stem}.json"
        target.mkdir()
        return target
    if kind == "under-file":
        (d / "file").write_text("x")
        return d / "file" / f"{stem}.json"
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)
    return d / "ro" / f"{stem}.json"


def expect_bad_recipe(data: dict, workdir: Path, *needles: str, trainers: tuple[str, ...] = (), via_cli: bool = False):
    """``data`` written as a recipe file: loading it is a typed one-line error naming every needle, and (``via_cli``)
    `condiff train` on it exits 2 with that line and creates nothing, with the family's trainer builders
    (``trainers``, dotted names) patched so that nothing could train."""
    from condiff.cli.tokens import load_any_recipe

    d = Path(tempfile.mkdtemp(dir=workdir))
    path = d / "recipe.toml"
    path.write_text(to_toml(data))
    expect_api_error(load_any_recipe, path, needles=needles)
    if via_cli:
        with contextlib.ExitStack() as stack:
            for name in trainers:
                stack.enter_context(mock.patch(name, guarded))
            expect_cli_error(["train", str(path), "--out", str(d / "run")], *needles)
        assert not (d / "run").exists()


def wrong_type_case(recipe: dict, table: str, key: str, default, value) -> str:
    """Set ``recipe[table][key]`` to ``value`` (drawn by ``wrong_type(default)``; a bool for a bool is not wrong)
    and return the needle the refusal must name."""
    assume(not (isinstance(default, bool) and isinstance(value, bool)))
    recipe.setdefault(table, {})[key] = value
    return f"{table}.{key}"


def unknown_key_case(recipe: dict, tables, where: str, key: str) -> str:
    """Add the unknown ``key`` to the table ``where`` of ``recipe`` (its dataclass in ``tables``), or at the top
    level when ``where`` is empty, and return the needle the refusal must name."""
    if where:
        assume(key not in tables[where].__dataclass_fields__)
        recipe.setdefault(where, {})[key] = 1
        return f"{where}.{key}"
    assume(key not in recipe and key not in tables and key not in ("name", "family"))
    recipe[key] = 1
    return repr(key)
