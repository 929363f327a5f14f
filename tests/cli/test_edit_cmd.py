"""`condiff invert`, `condiff edit` and `condiff bench edit` on the bundled shapes model (few steps, one inner
iteration): every editing method end to end, inversion files that reproduce the one-go edit bit for bit,
inputs of other sizes written back at their own size, and one-line errors (exit 2) before any model loads."""

import json
import math
import shlex

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clikit import ok, one_line_error, run
from condiff.cli import main
from condiff.cli.common import make_method, psnr
from condiff.cli.edit import bench_methods
from condiff.data import shapes
from condiff.data.images import read_image, write_image
from condiff.data.shapes import ATTRIBUTES
from condiff.inversion.methods import METHODS, load_inverted

STEPS = "4"
FAST = {"null-text": ["inner_steps=1"], "dci": ["iterations=1"]}  # the optimising methods, cut to one iteration
SOURCE_ATTRS = (0, 0, 1, 0)  # circle, red, large, top-left (shape, color, size, position)
FROM, TO = "large red circle top-left", "large blue circle top-left"
SIDECAR_KEYS = {
    "command",
    "model",
    "method",
    "options",
    "from",
    "to",
    "steps",
    "seed",
    "reconstruction_psnr",
    "labels",
    "notice",
    "seconds",
    "outputs",
    "output",
    "reproduce",
    "inversion",
    "original_size",
}


def _opts(method):
    return [a for o in FAST.get(method, []) for a in ("--method-opt", o)]


def _names(attrs):
    return {a: names[v] for (a, names), v in zip(ATTRIBUTES.items(), attrs)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A clean 32x32 render of SOURCE_ATTRS written as a PNG (the labeller reads clean renders exactly)."""
    attrs = torch.tensor([SOURCE_ATTRS])
    assert shapes.caption(attrs[0]) == FROM
    x = shapes.render_batch(attrs, torch.Generator().manual_seed(0)).images
    return write_image(x, tmp_path_factory.mktemp("src") / "source.png")


def _invert(source, out, method, *extra):
    return [
        "invert",
        "--image",
        str(source),
        "--prompt",
        FROM,
        "--method",
        method,
        "--steps",
        STEPS,
        *_opts(method),
        *extra,
        "--out",
        str(out),
    ]


def _edit(source, out, method, *extra):
    return [
        "edit",
        "--image",
        str(source),
        "--from",
        FROM,
        "--to",
        TO,
        "--method",
        method,
        "--steps",
        STEPS,
        *_opts(method),
        *extra,
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("method", list(METHODS))
def test_invert_then_edit_every_method(source, tmp_path, capsys, method):
    """For each method: `invert` writes a loadable inversion whose metadata records the settings; `edit` writes
    the edit at 32x32, the comparison strip and a sidecar whose labeller readings are attribute names (the
    clean source read exactly); the sidecar's reconstruction PSNR equals the inversion's (same seed, same
    computation); and editing from the saved inversion gives the same bytes as editing in one go."""
    inv = tmp_path / "inv.safetensors"
    printed = ok(_invert(source, inv, method), capsys)
    state, meta = load_inverted(inv)
    expect = make_method(method, {k: json.loads(v) for k, v in (o.split("=") for o in FAST.get(method, []))})
    assert state.method == method and state.grid.numel() == int(STEPS) + 1
    assert meta["steps"] == int(STEPS) and meta["seed"] == 0 and meta["prompt"] == FROM and meta["model"] == "shapes"
    assert meta["options"] == expect.options() and meta["original_size"] == [32, 32] and meta["notice"] is None
    assert math.isfinite(meta["reconstruction_psnr"]) and f"PSNR {meta['reconstruction_psnr']:.2f} dB" in printed
    recon = tmp_path / "inv_reconstruction.png"
    assert printed.startswith(f"inverted with {expect.label}: wrote {inv} and its reconstruction {recon} (")
    assert meta["reconstruction"] == str(recon) and Image.open(recon).size == (32, 32)
    written = read_image(recon, (3, 32, 32), resize=False).tensor
    assert meta["reconstruction_psnr_written"] == psnr(written, read_image(source, (3, 32, 32)).tensor)

    one = tmp_path / "one.png"
    ok(_edit(source, one, method), capsys)
    side = json.loads((tmp_path / "one.json").read_text())
    assert SIDECAR_KEYS <= set(side)
    assert (side["command"], side["method"], side["from"], side["to"], side["steps"], side["seed"]) == (
        "edit",
        method,
        FROM,
        TO,
        int(STEPS),
        0,
    )
    assert side["options"] == expect.options() and side["inversion"] is None and side["notice"] is None
    assert side["reconstruction_psnr"] == meta["reconstruction_psnr"]
    assert side["outputs"] == {
        "image": str(one),
        "compare": str(tmp_path / "one_compare.png"),
        "sidecar": str(tmp_path / "one.json"),
    }
    assert side["output"] == {"size": [32, 32], "fit": "native"}
    assert Image.open(one).size == (32, 32)
    strip = Image.open(tmp_path / "one_compare.png")
    assert strip.width >= 3 * 32 * 4 and strip.height >= 32 * 4  # three tiles magnified 4x
    assert set(side["labels"]) == {"source", "reconstruction", "edited"}
    for reading in side["labels"].values():
        assert set(reading) == set(ATTRIBUTES)
        assert all(v is None or v in ATTRIBUTES[a] for a, v in reading.items())
    assert side["labels"]["source"] == _names(SOURCE_ATTRS)

    again = tmp_path / "again.png"
    ok(
        ["edit", "--image", str(source), "--to", TO, "--inversion", str(inv), *_opts(method), "--out", str(again)],
        capsys,
    )
    assert again.read_bytes() == one.read_bytes()
    assert (tmp_path / "again_compare.png").read_bytes() == (tmp_path / "one_compare.png").read_bytes()
    side2 = json.loads((tmp_path / "again.json").read_text())
    assert side2["inversion"] == str(inv) and side2["from"] == FROM and side2["steps"] == int(STEPS)
    assert side2["labels"] == side["labels"] and side2["reconstruction_psnr"] == side["reconstruction_psnr"]


def test_reproduce_command_rebuilds_the_edit(source, tmp_path, capsys):
    """The sidecar's `reproduce` command, run with only --out changed, writes the same image bytes."""
    a = tmp_path / "a.png"
    ok(_edit(source, a, "edit-friendly", "--seed", "7", "--method-opt", "skip=1"), capsys)
    argv = shlex.split(json.loads((tmp_path / "a.json").read_text())["reproduce"])
    assert argv[:2] == ["condiff", "edit"] and "--seed" in argv and "skip=1" in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "b.png")
    ok(argv[1:], capsys)
    assert (tmp_path / "b.png").read_bytes() == a.read_bytes()


def _rgba(path, size):
    """An opaque RGBA image of ``size`` with a red square and a green/magenta stripe on the left/right edge."""
    w, h = size
    a = np.zeros((h, w, 4), np.uint8)
    a[..., 3] = 255
    a[h // 8 : h // 8 + h // 3, w // 5 : w // 5 + h // 3, 0] = 255
    a[:, :4, 1] = 200
    a[:, -4:, 0] = a[:, -4:, 2] = 150
    Image.fromarray(a, "RGBA").save(path)
    return a[..., :3]


@pytest.mark.parametrize(
    "size, fit, crop", [((48, 40), "pasted", [4, 0, 44, 40]), ((64, 64), "resized", [0, 0, 64, 64])]
)
def test_other_sizes_give_a_note_and_an_output_at_the_input_size(tmp_path, capsys, size, fit, crop):
    """A 48x40 RGBA input is centre-cropped to 40x40: one `note: ` line on stderr, the edit is pasted back into
    the crop box and every pixel outside the box is the original's; a 64x64 input is resized both ways."""
    src = tmp_path / "in.png"
    rgb = _rgba(src, size)
    out = tmp_path / "e.png"
    main(
        [
            "edit",
            "--image",
            str(src),
            "--from",
            "red square",
            "--to",
            "blue square",
            "--method",
            "ddim",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    notes = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and f"from {size[0]}x{size[1]} to 32x32" in notes[0]
    got = np.asarray(Image.open(out).convert("RGB"))
    assert got.shape == (size[1], size[0], 3)
    side = json.loads((tmp_path / "e.json").read_text())
    assert side["output"]["fit"] == fit and side["output"]["size"] == list(size) and side["crop"] == crop
    assert side["original_size"] == list(size) and notes[0] == f"note: {side['notice']}"
    left, top, right, bottom = crop
    outside = np.ones(rgb.shape[:2], bool)
    outside[top:bottom, left:right] = False
    if fit == "pasted":
        assert outside.sum() == 2 * 4 * size[1] and np.array_equal(got[outside], rgb[outside])
        assert not np.array_equal(got[~outside], rgb[~outside])  # the edit is inside the box


def test_no_resize_refuses_another_size(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.png"
    _rgba(src, (48, 40))
    monkeypatch.setattr("condiff.cli.common.load_model", _no_load)
    for argv in (
        _edit(src, tmp_path / "e.png", "ddim", "--no-resize"),
        _invert(src, tmp_path / "i.safetensors", "ddim", "--no-resize"),
    ):
        code, _, err = run(argv, capsys)
        one_line_error(code, err, "is 48x40 (width x height) but 32x32 is expected")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def _no_load(*_a, **_k):
    raise AssertionError("the model was loaded before the bad input was refused")


@pytest.fixture(scope="module")
def ddim_inversion(source, tmp_path_factory):
    """A 4-step ddim inversion of the source (written with one thread, like the tests)."""
    out = tmp_path_factory.mktemp("inv") / "ddim.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        main(_invert(source, out, "ddim"))
    return out


def _broken_copy(path, dest, drop=None, metadata=None):
    tensors, _ = load_inverted(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    kept = {k: v for k, v in tensors.tensors.items() if k != drop}
    save_file(kept, str(dest), metadata=meta if metadata is None else metadata)
    return dest


@pytest.mark.parametrize(
    "change, needle",
    [
        (["--method", "sdedit"], "was made with --method ddim, not sdedit"),
        (["--steps", "5"], "was made with --steps 4, not 5"),
        (["--from", "small red circle top-left"], "--from does not match the prompt 'large red circle top-left'"),
        (["--image", "OTHER"], "was made from another image"),
        (["--model", "digits", "--to", "3"], "was made with --model 'shapes', not 'digits'"),
        (["--inversion", "GARBAGE"], "is not a valid safetensors file"),
        (["--inversion", "PLAIN"], "is not a condiff inversion file"),
    ],
)
def test_mismatched_inversion_files_are_refused_before_loading(
    source, ddim_inversion, tmp_path, capsys, monkeypatch, change, needle
):
    """An inversion made with another method, steps, prompt, image or model, or a file that is not one: one
    line naming --inversion, exit 2, nothing written, no model loaded."""
    other = tmp_path / "other.png"
    write_image(shapes.render_batch(torch.tensor([[1, 2, 0, 4]]), torch.Generator().manual_seed(0)).images, other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"latent": torch.zeros(1, 3, 32, 32)}, str(plain))
    swap = {"OTHER": str(other), "GARBAGE": str(garbage), "PLAIN": str(plain)}
    argv = [
        "edit",
        "--image",
        str(source),
        "--to",
        TO,
        "--inversion",
        str(ddim_inversion),
        "--out",
        str(tmp_path / "e.png"),
    ]
    for opt, value in zip(change[::2], change[1::2]):
        value = swap.get(value, value)
        if opt in argv:
            argv[argv.index(opt) + 1] = value
        else:
            argv += [opt, value]
    monkeypatch.setattr("condiff.cli.common.load_model", _no_load)
    code, _, err = run(argv, capsys)
    one_line_error(code, err, needle)
    assert "--inversion" in err and not (tmp_path / "e.png").exists()


def test_inversion_file_missing_a_tensor_is_a_one_line_error(source, ddim_inversion, tmp_path, capsys):
    """Right metadata but no 'latent' tensor: found when sampling, one line naming the file."""
    bad = _broken_copy(ddim_inversion, tmp_path / "bad.safetensors", drop="latent")
    code, _, err = run(
        ["edit", "--image", str(source), "--to", TO, "--inversion", str(bad), "--out", str(tmp_path / "e.png")], capsys
    )
    one_line_error(code, err, f"--inversion {str(bad)!r} does not hold a usable ddim inversion")
    assert not (tmp_path / "e.png").exists()


def _with_options(base, argv, swap=None):
    """``base`` with each (option, value) of ``argv`` replacing that option's value, or appended (a value
    found in ``swap`` is replaced by its path first); --method-opt is always appended."""
    base = list(base)
    for opt, value in zip(argv[::2], argv[1::2]):
        value = (swap or {}).get(value, value)
        if opt in base and opt != "--method-opt":
            base[base.index(opt) + 1] = value
        else:
            base += [opt, value]
    return base


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--from", "large purple circle"], "--from: unknown word 'purple'"),
        (["--to", "huge blue circle"], "--to: unknown word 'huge'"),
        (["--to", "red blue"], "names the color twice"),
        (["--method", "nope"], "unknown editing method 'nope'; accepted: ddim, edit-friendly"),
        (["--method-opt", "foo=1"], "unknown option 'foo' for editing method 'ddim'"),
        (["--method-opt", "cfg=abc"], "must be a float, got 'abc'"),
        (["--method-opt", "cfg=NaN"], "--method-opt cfg must be a finite number, got 'NaN'"),
        (["--method-opt", "cfg=1e9"], "guidance scale"),
        (["--method-opt", "cfg"], "--method-opt must be KEY=VALUE"),
        (["--method-opt", "cfg=[1]"], "must be a number, true/false or a name"),
        (["--method-opt", "cfg=1", "--method-opt", "cfg=2"], "gives cfg twice"),
        (["--method", "edit-friendly", "--method-opt", "skip=1.5"], "option skip of 'edit-friendly' must be a int"),
        (["--method", "edit-friendly", "--method-opt", "exact=maybe"], "must be a bool, got 'maybe'"),
        (["--method", "sdedit", "--method-opt", "strength=0"], "strength must be a number in (0, 1]"),
        (["--steps", "0"], "--steps must be an integer in [1, 1000], got 0"),
        (["--steps", "abc"], "--steps"),
        (["--seed", "-1"], "--seed must be an integer"),
        (["--image", "MISSING"], "image file not found"),
        (["--image", "DIR"], "expected an image file, got a directory"),
        (["--image", "TEXT"], "is not an image of an accepted format"),
        (["--out", "e.jpg"], "--out must end in .png"),
        (["--out", "DIR/e.png"], "is a directory"),
        (["--out", "TEXT/e.png"], "is not a directory"),
        (["--model", "/no/such/model"], "'/no/such/model' is neither a bundled model"),
        (["--model", "digits"], "digits prompt must be a digit"),
    ],
)
def test_bad_edit_inputs_are_one_line_errors(source, tmp_path, capsys, monkeypatch, argv, needle):
    """Each bad input: exit 2, one `error:` line naming it, no traceback, no output, no model loaded."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "dir" / "e.png").mkdir()
    swap = {
        "MISSING": str(tmp_path / "missing.png"),
        "DIR": str(tmp_path / "dir"),
        "TEXT": str(tmp_path / "text.png"),
        "e.jpg": str(tmp_path / "e.jpg"),
        "DIR/e.png": str(tmp_path / "dir" / "e.png"),
        "TEXT/e.png": str(tmp_path / "text.png" / "e.png"),
    }
    base = _with_options(
        [
            "edit",
            "--image",
            str(source),
            "--from",
            FROM,
            "--to",
            TO,
            "--method",
            "ddim",
            "--out",
            str(tmp_path / "e.png"),
        ],
        argv,
        swap,
    )
    monkeypatch.setattr("condiff.cli.common.load_model", _no_load)
    code, _, err = run(base, capsys)
    one_line_error(code, err, needle)
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", "large purple circle"], "--prompt: unknown word 'purple'"),
        (["--method", "nope"], "unknown editing method 'nope'"),
        (["--method-opt", "foo=1"], "unknown option 'foo'"),
        (["--method", "null-text", "--method-opt", "inner_steps=-1"], "inner_steps must be a non-negative integer"),
        (["--out", "i.npz"], "--out must end in .safetensors"),
        (["--steps", "1001"], "--steps must be an integer in [1, 1000]"),
    ],
)
def test_bad_invert_inputs_are_one_line_errors(source, tmp_path, capsys, monkeypatch, argv, needle):
    base = _with_options(
        [
            "invert",
            "--image",
            str(source),
            "--prompt",
            FROM,
            "--method",
            "ddim",
            "--out",
            str(tmp_path / "i.safetensors"),
        ],
        argv,
    )
    monkeypatch.setattr("condiff.cli.common.load_model", _no_load)
    code, _, err = run(base, capsys)
    one_line_error(code, err, needle)
    assert not list(tmp_path.iterdir())


def test_bench_edit_writes_report_and_grid(tmp_path, capsys):
    """bench edit on 2 renders, 3 steps, ddim and sdedit: the JSON holds one result per method with the edit
    success of each kind in [0, 1], a finite PSNR and positive seconds; the table is printed; the figure has a
    block per kind (reconstruction, color, shape, position) of 3 rows (source + 2 methods) of 96-px tiles."""
    out = tmp_path / "b.json"
    printed = ok(["bench", "edit", "--n", "2", "--steps", "3", "--methods", "ddim,sdedit", "--json", str(out)], capsys)
    rep = json.loads(out.read_text())
    labels = [m.label for m in bench_methods("ddim,sdedit", None)]
    assert [r["method"] for r in rep["results"]] == rep["config"]["methods"] == labels
    assert [label.split("(")[0] for label in labels] == ["ddim", "sdedit"]
    for r in rep["results"]:
        assert set(r["edit_success"]) == {"color", "shape", "position"}
        assert all(0 <= v <= 1 and v * 2 == int(v * 2) for v in r["edit_success"].values())  # n = 2
        assert math.isfinite(r["psnr"]) and r["seconds"] > 0
    assert rep["config"]["n"] == 2 and rep["config"]["steps"] == 3 and rep["config"]["model"] == "shapes"
    assert rep["table"] in printed and f"wrote {out} and {tmp_path / 'b_grid.png'}" in printed
    fig = Image.open(tmp_path / "b_grid.png")
    assert fig.height >= 4 * 3 * 96 and fig.width >= 2 * 96


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "digits"], "must be a shapes model; 'digits' is a digits model"),
        (["--methods", "ddim,nope"], "unknown editing method 'nope'"),
        (["--methods", "ddim,ddim"], "--methods repeats ddim"),
        (["--methods", "ddim,"], "--methods must be all or a comma-separated list"),
        (["--method-opt", "null-text.inner_steps=1"], "is for null-text, which --methods does not run"),
        (["--method-opt", "inner_steps=1"], "--method-opt must be NAME.KEY=VALUE"),
        (["--method-opt", "ddim.foo=1"], "unknown option 'foo' for editing method 'ddim'"),
        (["--method-opt", "ddim.cfg=x"], "must be a float, got 'x'"),
        (["--n", "0"], "--n must be an integer in [1, 100000], got 0"),
        (["--examples", "0"], "--examples must be an integer in [1, 64], got 0"),
        (["--batch-size", "0"], "--batch-size"),
        (["--json", "b.txt"], "--json must end in .json"),
        (["--grid", "g.jpg"], "--grid must end in .png"),
    ],
)
def test_bad_bench_edit_inputs_are_one_line_errors(tmp_path, capsys, monkeypatch, argv, needle):
    base = ["bench", "edit", "--n", "2", "--methods", "ddim,sdedit", "--json", str(tmp_path / "b.json")]
    for opt, value in zip(argv[::2], argv[1::2]):
        if opt in base:
            base[base.index(opt) + 1] = value if opt != "--json" else str(tmp_path / value)
        else:
            base += [opt, value]
    monkeypatch.setattr("condiff.cli.common.load_model", _no_load)
    code, _, err = run(base, capsys)
    one_line_error(code, err, needle)
    assert not list(tmp_path.iterdir())


def test_method_options_given_with_an_inversion_are_noted(source, ddim_inversion, tmp_path, capsys):
    """--method-opt on top of a saved inversion: the sampling uses it (recorded in the sidecar) and one `note: `
    line says the inversion itself is used as saved."""
    out = tmp_path / "e.png"
    saved = make_method("ddim", {}).options()["cfg"]
    cfg = int(saved) + 2
    main(
        [
            "edit",
            "--image",
            str(source),
            "--to",
            TO,
            "--inversion",
            str(ddim_inversion),
            "--method-opt",
            f"cfg={cfg}",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.replace("\r", "\n")
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: --method-opt cfg={cfg} differs from the inversion's cfg={saved}; the saved inversion is used as it is"
    ]
    side = json.loads((tmp_path / "e.json").read_text())
    assert side["options"]["cfg"] == cfg and side["method_label"] == f"ddim(cfg={float(cfg)})"
    assert f"--method-opt cfg={cfg}" in side["reproduce"] and f"--inversion {ddim_inversion}" in side["reproduce"]


def test_digits_edit_has_no_labeller_reading(tmp_path, capsys):
    """Another family (digits, 16x16 gray): the edit is written at 16x16 and the sidecar's labels are null."""
    src = tmp_path / "d.png"
    write_image(torch.full((1, 16, 16), -1.0).index_fill_(2, torch.arange(7, 9), 1.0), src)
    out = tmp_path / "e.png"
    ok(
        [
            "edit",
            "--model",
            "digits",
            "--image",
            str(src),
            "--from",
            "1",
            "--to",
            "7",
            "--method",
            "ddim",
            "--steps",
            "3",
            "--out",
            str(out),
        ],
        capsys,
    )
    side = json.loads((tmp_path / "e.json").read_text())
    assert (
        side["labels"] is None and side["model"] == "digits" and side["output"] == {"size": [16, 16], "fit": "native"}
    )
    assert Image.open(out).size == (16, 16)


def test_bench_method_selection_follows_the_default_set():
    """--methods all is editbench.default_methods() as it stands; a listed name takes the default set's setting
    for it; NAME.KEY=VALUE changes that option on every run of NAME and nothing else."""
    from condiff.evaluation.editbench import default_methods

    defaults = default_methods()
    assert [m.label for m in bench_methods("all", None)] == [m.label for m in defaults]
    first = {}
    for m in defaults:
        first.setdefault(m.name, m)
    name = defaults[0].name
    assert [m.label for m in bench_methods(name, None)] == [first[name].label]
    key = next(k for k, v in first[name].options().items() if isinstance(v, float))
    tuned = bench_methods("all", [f"{name}.{key}=0.25"])
    for before, after in zip(defaults, tuned):
        want = {**before.options(), key: 0.25} if before.name == name else before.options()
        assert after.name == before.name and after.options() == want
