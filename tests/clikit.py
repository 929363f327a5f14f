"""Helpers for CLI tests: run `condiff.cli.main` and check its one-line errors."""

import pytest

from condiff.cli import main


def run(argv, capsys):
    """(exit code, stdout, stderr) of a command that exits (errors always do)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def ok(argv, capsys) -> str:
    """stdout of a command that succeeds."""
    main(argv)
    return capsys.readouterr().out


def one_line_error(code, err, needle):
    """Exit code 2, one `error: ...` line on stderr containing ``needle``, no traceback."""
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err


def record_grids(monkeypatch) -> list:
    """The grids that sampling (condiff.evaluation.evaluate.make_grid) builds from now on, as lists, in order."""
    import condiff.evaluation.evaluate as ev

    seen, real = [], ev.make_grid

    def spy(*a, **k):
        g = real(*a, **k)
        seen.append(g.tolist())
        return g

    monkeypatch.setattr(ev, "make_grid", spy)
    return seen
