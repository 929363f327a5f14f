"""`condiff dc search` / `condiff dc show`: one-line errors with exit code 2, and a tiny real search on digits
that writes a loadable ratios file."""

import json

import pytest

from clikit import run
from condiff.cli import main
from condiff.solvers.dc_search import load_ratios, ratios_for


def _search(out, *extra):
    return [
        "dc",
        "search",
        "--model",
        "digits",
        "--nfe",
        "3",
        "--cfg",
        "3",
        "--n-data",
        "2",
        "--iters",
        "2",
        "--ref-steps",
        "20",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--nfe", "0", "--nfe must be a comma-separated list of integers in [3, 1000], got '0'"),
        ("--nfe", "a", "got 'a'"),
        ("--nfe", "5,,8", "got '5,,8'"),
        ("--nfe", "2", "got '2'"),
        ("--nfe", "5,5", "--nfe repeats 5"),
        ("--cfg", "nan", "--cfg must be a comma-separated list of finite numbers"),
        ("--cfg", "x", "got 'x'"),
        ("--cfg", "3,,5", "got '3,,5'"),
        ("--cfg", "1e9", "got '1e9'"),
        ("--n-data", "0", "--n-data must be an integer"),
        ("--ref-steps", "2", "--ref-steps must be an integer in [3,"),
        ("--iters", "0", "--iters"),
        ("--lr", "-1", "--lr"),
        ("--spacing", "nope", "unknown spacing 'nope'"),
        ("--base", "heun", "unknown --base 'heun'"),
        ("--axis", "sigma", "unknown --axis 'sigma'"),
        ("--model", "nope", "'nope' is neither a bundled model"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, option, value, needle):
    argv = _search(tmp_path / "r.json")
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    code, out, err = run(argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "r.json").exists()


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, needle in [
        (tmp_path, "must end in .json"),
        (tmp_path / "d.json", "is a directory"),
        (tmp_path / "file" / "r.json", "not a directory"),
    ]:
        if out.name == "d.json":
            out.mkdir()
        code, _, err = run(_search(out), capsys)
        assert code == 2 and err.count("\n") == 1 and "--out" in err and needle in err


@pytest.mark.parametrize(
    "content, needle",
    [
        ("garbage", "not valid JSON"),
        ("{}", "not a valid DC ratios file: missing key"),
        ('{"format": "condiff.solvers.dc_search-ratios"}', "missing key"),
    ],
)
def test_garbage_ratios_file_is_a_one_line_error(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, _, err = run(["dc", "show", str(path)], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err
    code, _, err = run(["dc", "show", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "not found" in err


def test_tiny_search_on_digits_writes_a_loadable_file(tmp_path, capsys):
    """nfe 3 (steps 1-2 fixed, step 3 searched), 2 data points, 2 iterations, 20-step reference: the file loads
    strictly, holds one entry with 3 ratios and the search metadata, and `dc show` reads it back."""
    out = tmp_path / "r.json"
    main(_search(out))
    printed = capsys.readouterr().out
    assert "nfe 3 cfg 3" in printed and f"wrote {out}" in printed
    r = load_ratios(out)
    assert set(r.entries) == {(3, 3.0)} and r.model == "digits" and r.base == "unipc" and r.axis == "lambda"
    ratios = r.entries[(3, 3.0)]
    assert len(ratios) == 3 and ratios[:2] == (1.0, 1.0) and ratios[2] != 1.0
    assert ratios_for(out, 3, 3.0) == ratios
    meta = json.loads(out.read_text())["search"]
    assert (
        meta["iters"] == 2
        and meta["ref_steps"] == 20
        and meta["seconds"] > 0
        and "condiff dc search" in meta["reproduce"]
    )
    main(["dc", "show", str(out), "--nfe", "3", "--cfg", "3"])
    assert "-> nfe 3 cfg 3: 1.0000, 1.0000" in capsys.readouterr().out
