"""`condiff sample/eval` solver options: --ems and --dc-ratios reach the solver they belong to, are refused
with one-line errors elsewhere, and a solver's own spacing (EDM's Karras grid) is the default grid."""

import json

import pytest

from clikit import ok, one_line_error, run

SAMPLE = ["sample", "--model", "digits", "--steps", "3", "--n", "2", "--cfg", "2"]


@pytest.mark.parametrize(
    "flag, solver, needle",
    [
        ("--ems", "ddim", "--ems is for --solver dpm-v3, got --solver ddim"),
        ("--dc-ratios", "unipc", "--dc-ratios is for --solver dc-solver, got --solver unipc"),
    ],
)
def test_file_options_belong_to_their_solver(tmp_path, capsys, flag, solver, needle):
    f = tmp_path / "x.json"
    f.write_text("{}")
    code, _, err = run(SAMPLE + ["--solver", solver, flag, str(f), "--out", str(tmp_path / "g.png")], capsys)
    one_line_error(code, err, needle)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("flag, solver", [("--ems", "dpm-v3"), ("--dc-ratios", "dc-solver")])
@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01", b"\x80\x04K\x01."])
def test_garbage_files_are_refused(tmp_path, capsys, flag, solver, content):
    f = tmp_path / ("stats.safetensors" if flag == "--ems" else "ratios.json")
    f.write_bytes(content)
    code, _, err = run(SAMPLE + ["--solver", solver, flag, str(f), "--out", str(tmp_path / "g.png")], capsys)
    one_line_error(code, err, str(f))


def test_ems_from_the_command_drives_dpm_v3(tmp_path, capsys):
    stats = tmp_path / "ems.safetensors"
    ok(
        ["ems", "compute", "--model", "digits", "--n-data", "16", "--grid", "8", "--cfg", "2", "--out", str(stats)],
        capsys,
    )
    out = tmp_path / "g.png"
    ok(SAMPLE + ["--solver", "dpm-v3", "--ems", str(stats), "--out", str(out)], capsys)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["ems"] == str(stats) and f"--ems {stats}" in side["reproduce"]
    # refused for a model of another shape
    code, _, err = run(["eval", "--model", "shapes", "--solver", "dpm-v3", "--ems", str(stats), "--n", "2"], capsys)
    one_line_error(code, err, "shape")


def test_dc_ratios_from_the_command_drive_dc_solver(tmp_path, capsys):
    ratios = tmp_path / "r.json"
    ok(
        [
            "dc",
            "search",
            "--model",
            "digits",
            "--nfe",
            "3",
            "--cfg",
            "2",
            "--n-data",
            "2",
            "--iters",
            "2",
            "--ref-steps",
            "20",
            "--out",
            str(ratios),
        ],
        capsys,
    )
    ok(
        [
            "eval",
            "--model",
            "digits",
            "--solver",
            "dc-solver",
            "--dc-ratios",
            str(ratios),
            "--steps",
            "3",
            "--cfg",
            "2",
            "--n",
            "4",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capsys,
    )
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["dc_ratios"] == str(ratios) and res["nfe"] == 3
    code, _, err = run(
        [
            "eval",
            "--model",
            "digits",
            "--solver",
            "dc-solver",
            "--dc-ratios",
            str(ratios),
            "--steps",
            "3",
            "--cfg",
            "2",
            "--n",
            "4",
            "--spacing",
            "karras",
        ],
        capsys,
    )
    one_line_error(code, err, "'karras'")


def test_solver_default_spacing(tmp_path, capsys):
    out = tmp_path / "g.png"
    ok(SAMPLE + ["--solver", "edm-heun", "--out", str(out)], capsys)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["spacing"] == "karras" and "--spacing karras" in side["reproduce"]
    ok(SAMPLE + ["--solver", "ddim", "--out", str(out)], capsys)
    assert json.loads(out.with_suffix(".json").read_text())["spacing"] == "uniform-t"


@pytest.mark.parametrize(
    "opt, needle",
    [
        ("order=x", "solver 'unipc' option order must be an integer, got 'x'"),
        ("corrector=1", "option corrector must be true or false, got 1"),
        ("eta=0.5", "does not take the options ['eta']; accepted: order, variant, corrector"),
        ("variant=bh9", "bh9"),
        ("noequals", "--solver-opt must be KEY=VALUE such as order=1, got 'noequals'"),
        ("order=[1]", "must be a number, true/false or a name"),
    ],
)
def test_bad_solver_options(tmp_path, capsys, opt, needle):
    code, _, err = run(SAMPLE + ["--solver", "unipc", "--solver-opt", opt, "--out", str(tmp_path / "g.png")], capsys)
    one_line_error(code, err, needle)
    assert not (tmp_path / "g.png").exists()


def test_solver_options_reach_the_solver(tmp_path, capsys):
    """--solver-opt order=1 corrector=false makes UniPC plain DDIM: identical images, recorded in the sidecar."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    ok(
        SAMPLE + ["--solver", "unipc", "--solver-opt", "order=1", "--solver-opt", "corrector=false", "--out", str(a)],
        capsys,
    )
    ok(SAMPLE + ["--solver", "ddim", "--out", str(b)], capsys)
    assert a.read_bytes() == b.read_bytes()
    side = json.loads(a.with_suffix(".json").read_text())
    assert side["solver_opt"] == ["order=1", "corrector=false"] and "--solver-opt order=1" in side["reproduce"]


@pytest.mark.parametrize("value", ["0", "1.5", "nan", "-0.1"])
def test_bad_dynamic_threshold(tmp_path, capsys, value):
    code, _, err = run(SAMPLE + ["--dynamic-threshold", value, "--out", str(tmp_path / "g.png")], capsys)
    one_line_error(code, err, "--dynamic-threshold must be a quantile ratio in (0, 1]")


def test_dynamic_threshold_reaches_the_sampler(tmp_path, capsys):
    """At cfg 8 the guided estimates leave [-1, 1], so thresholding changes the images; it is recorded."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    argv = ["sample", "--model", "digits", "--steps", "4", "--n", "4", "--cfg", "8", "--solver", "dpmpp-2m"]
    ok(argv + ["--dynamic-threshold", "0.9", "--out", str(a)], capsys)
    ok(argv + ["--out", str(b)], capsys)
    assert a.read_bytes() != b.read_bytes()
    side = json.loads(a.with_suffix(".json").read_text())
    assert side["dynamic_threshold"] == 0.9 and "--dynamic-threshold 0.9" in side["reproduce"]
