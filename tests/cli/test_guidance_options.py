"""`condiff sample/eval` guidance options (--pag, --pag-layers, --ag, --ag-space, --cfg-rescale,
--guidance-interval, --negative-prompt) and the builder behind them (condiff.guidance.build)."""

import json
import math

import pytest
import torch

from clikit import ok, one_line_error, run
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.errors import ConfigError
from condiff.guidance import CFG, PAG, AdaptiveGuidance, CountRows, GuidanceInterval, GuidanceRescale, NegativeGuidance
from condiff.guidance.build import GuidanceOptions, NegativeAsNull, build_guidance
from condiff.solvers import get_solver

STEPS = 4


@pytest.fixture(scope="module")
def shapes():
    from condiff.models.base import load_model

    torch.set_num_threads(1)
    return load_model("shapes")


def old_generate(model, raw, solver, steps, cfg, seed):
    """The sampler as it was before the guidance options: CFG(model.denoiser, cfg) in the loop."""
    from condiff.core.grids import UniformT

    g = torch.Generator().manual_seed(seed)
    grid = make_grid(model.schedule, steps, UniformT())
    with torch.no_grad():
        cond = model.condition(raw)
        x = model.prior((raw.shape[0], *model.family.image_shape), float(grid[0]), g)
        return sample(CFG(model.denoiser, cfg), solver, grid, x, cond, Gaussian(g)).x.clamp(-1, 1)


def new_generate(model, raw, solver, steps, cfg, seed, **options):
    from condiff.evaluation.evaluate import generate_counted

    g = torch.Generator().manual_seed(seed)
    guide = GuidanceOptions(cfg=cfg, **options) if options else None
    return generate_counted(model, raw, solver, steps, cfg, g, guidance=guide)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"pag": 0.0},
        {"ag": 1.0},
        {"ag": 1.0, "ag_space": "eps"},
        {"cfg_rescale": 0.0},
        {"interval": (-math.inf, math.inf)},
        {"negative_prompt": ""},
    ],
)
def test_neutral_options_equal_old_cfg_bit_for_bit(shapes, options):
    """No option, --pag 0, --ag 1, --cfg-rescale 0, an interval that holds every t and the empty negative
    prompt (= the null caption) give exactly the images of the old CFG sampler, at CFG's network cost."""
    raw = shapes.family.random_conditions(3, torch.Generator().manual_seed(1))[0]
    solver = get_solver("dpmpp-2m")
    ref = old_generate(shapes, raw, solver, STEPS, 3.0, 7)
    images, nfe, rows = new_generate(shapes, raw, solver, STEPS, 3.0, 7, **options)
    assert torch.equal(images, ref)
    assert nfe == STEPS and rows == 2 * STEPS


def test_row_counts_follow_each_method(shapes):
    """Network rows per sample: PAG 3 per call; AG with gamma_bar = -1 switches every row after its first
    call (nfe + 1); an interval pays 2 rows at the grid times inside it and 1 outside; PAG limited to an
    interval pays 3 inside and 1 outside."""
    raw = shapes.family.random_conditions(2, torch.Generator().manual_seed(2))[0]
    solver = get_solver("ddim")
    times = make_grid(shapes.schedule, STEPS)[:STEPS]
    inside = int(((times > 500.0) & (times <= 900.0)).sum())
    assert 0 < inside < STEPS
    cases = [
        ({"pag": 2.0}, 3 * STEPS),
        ({"ag": -1.0}, STEPS + 1),
        ({"interval": (500.0, 900.0)}, STEPS + inside),
        ({"pag": 2.0, "interval": (500.0, 900.0)}, STEPS + 2 * inside),
        ({"negative_prompt": "red"}, 2 * STEPS),
        ({"cfg_rescale": 0.7}, 2 * STEPS),
    ]
    plain = new_generate(shapes, raw, solver, STEPS, 3.0, 4)[0]
    for options, rows in cases:
        images, nfe, got = new_generate(shapes, raw, solver, STEPS, 3.0, 4, **options)
        assert nfe == STEPS and got == rows, options
        assert not torch.equal(images, plain), options  # each option changes the samples


def test_builder_composes_the_library_objects(shapes):
    """build_guidance returns the library's own objects: CFG by default, PAG over the model's denoiser with
    cfg_scale, AG in x0 space, rescale in x0, GuidanceInterval, NegativeGuidance for a plain negative prompt and
    NegativeAsNull around a method otherwise."""
    from condiff.core.denoiser import X0

    D = shapes.denoiser
    assert type(build_guidance(D, GuidanceOptions(cfg=2.0))) is CFG
    pag = build_guidance(CountRows(D), GuidanceOptions(cfg=2.0, pag=1.5, pag_layers=("up",)))
    assert isinstance(pag, PAG) and pag.cfg_scale == 2.0 and all(".attn1" in n for n in pag.modules)
    assert all(n.startswith("up_blocks") for n in pag.modules)
    ag = build_guidance(D, GuidanceOptions(cfg=2.0, ag=0.99))
    assert isinstance(ag, AdaptiveGuidance) and isinstance(ag.space, X0) and ag.gamma_bar == 0.99
    assert isinstance(build_guidance(D, GuidanceOptions(cfg_rescale=0.5)), GuidanceRescale)
    assert isinstance(build_guidance(D, GuidanceOptions(interval=(1.0, 2.0))), GuidanceInterval)
    assert isinstance(build_guidance(D, GuidanceOptions(negative_prompt="red")), NegativeGuidance)
    wrapped = build_guidance(D, GuidanceOptions(ag=0.9, negative_prompt="red"))
    assert isinstance(wrapped, NegativeAsNull) and isinstance(wrapped.denoiser, AdaptiveGuidance)


def test_negative_as_null_equals_negative_guidance(gmm):
    """NegativeAsNull(CFG(D, w)) is NegativeGuidance(D, w) and CFG with null := the negative condition, bit for
    bit, on the GMM oracle; and the negative condition is really used (it differs from plain CFG)."""
    from condiff.core.schedules import VPCosine

    sch = VPCosine()
    D = gmm.denoiser(sch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, gmm.dim, generator=g, dtype=torch.float64)
    y = torch.arange(6) % 2
    null = gmm.null_cond(6)
    cond = {"y": y, "null": null, "negative": {"y": 1 - y}}
    a = NegativeAsNull(CFG(D, 2.5))(x, 0.4, cond)
    b = NegativeGuidance(D, 2.5)(x, 0.4, cond)
    assert torch.equal(a, b)
    assert torch.equal(a, CFG(D, 2.5)(x, 0.4, {"y": y, "null": {"y": 1 - y}}))
    assert not torch.allclose(a, CFG(D, 2.5)(x, 0.4, {"y": y, "null": null}))


SAMPLE = ["sample", "--model", "digits", "--steps", "3", "--n", "2", "--cfg", "2", "--seed", "5"]
EVAL = ["eval", "--model", "digits", "--steps", "3", "--n", "4", "--cfg", "2", "--seed", "5"]


@pytest.mark.parametrize(
    "flags, rows",
    [
        ([], 6),
        (["--pag", "1.5", "--pag-layers", "mid,up"], 9),
        (["--ag", "-1", "--ag-space", "eps"], 4),
        (["--cfg-rescale", "0.7"], 6),
        (["--guidance-interval", "-inf,inf"], 6),
        (["--negative-prompt", "3"], 6),
    ],
)
def test_each_option_end_to_end(tmp_path, capsys, flags, rows):
    """Each option runs through `sample` (sidecar records it, its reproduce command carries it) and `eval`
    (JSON keeps the accuracy keys and reports nfe and network_rows_per_sample)."""
    out = tmp_path / "g.png"
    ok(SAMPLE + flags + ["--out", str(out)], capsys)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["nfe"] == 3 and side["network_rows_per_sample"] == rows
    for flag in flags[::2]:
        assert flag in side["reproduce"]
    ok(EVAL + flags + ["--json", str(tmp_path / "e.json")], capsys)
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res["accuracy"]) == {"class"} and 0 <= res["accuracy"]["class"] <= 1  # the digits judge's key
    assert res["nfe"] == 3 and res["network_rows_per_sample"] == rows
    assert res["pag"] == (1.5 if "--pag" in flags else None) and res["ag"] == (-1.0 if "--ag" in flags else None)


def test_sidecar_reproduce_command_reproduces(tmp_path, capsys):
    """Running the sidecar's reproduce command again writes the same PNG bytes."""
    import shlex

    out = tmp_path / "a.png"
    ok(SAMPLE + ["--pag", "1", "--guidance-interval", "300,inf", "--negative-prompt", "4", "--out", str(out)], capsys)
    argv = shlex.split(json.loads(out.with_suffix(".json").read_text())["reproduce"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "b.png")
    ok(argv, capsys)
    assert out.read_bytes() == (tmp_path / "b.png").read_bytes()


def test_pag_zero_and_ag_one_are_plain_cfg_from_the_cli(tmp_path, capsys):
    """From the CLI, --pag 0 and --ag 1 write exactly the PNG of the run without guidance options."""
    ok(SAMPLE + ["--out", str(tmp_path / "plain.png")], capsys)
    ok(SAMPLE + ["--pag", "0", "--out", str(tmp_path / "pag.png")], capsys)
    ok(SAMPLE + ["--ag", "1", "--out", str(tmp_path / "ag.png")], capsys)
    plain = (tmp_path / "plain.png").read_bytes()
    assert (tmp_path / "pag.png").read_bytes() == plain == (tmp_path / "ag.png").read_bytes()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--pag", "nan"], "--pag must be a finite number"),
        (["--pag", "1e5"], "--pag must be a finite number"),
        (["--ag", "nan"], "--ag must be a cosine threshold"),
        (["--ag", "1.5"], "--ag must be a cosine threshold gamma_bar in [-1, 1] (1: never switch, i.e. CFG), got 1.5"),
        (["--cfg-rescale", "nan"], "--cfg-rescale must be a rescale factor phi in [0, 1], got nan"),
        (["--cfg-rescale", "2"], "--cfg-rescale must be a rescale factor phi in [0, 1], got 2.0"),
        (["--pag", "1", "--pag-layers", " , "], "--pag-layers must be a comma-separated list"),
        (["--pag-layers", "mid"], "--pag-layers needs --pag"),
        (["--ag-space", "eps"], "--ag-space needs --ag"),
        (["--ag", "0.9", "--ag-space", "v"], "unknown --ag-space 'v'; accepted: x0, eps"),
        (["--guidance-interval", "500"], "--guidance-interval must be LO,HI"),
        (["--guidance-interval", "a,b"], "got 'a,b'"),
        (["--guidance-interval", "800,200"], "got '800,200'"),
        (["--guidance-interval", "nan,1"], "got 'nan,1'"),
        (["--ag", "0.9", "--cfg-rescale", "0.5"], "--ag and --cfg-rescale do not compose"),
        (["--negative-prompt", "seven"], "--negative-prompt: digits prompt must be a digit 0-9, got 'seven'"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_bad_values_are_one_line_errors(tmp_path, capsys, monkeypatch, flags, needle, command):
    """Bad guidance values and combinations are one `error:` line with exit 2, raised before the model is
    loaded and before anything is written."""
    from condiff.cli import common

    def no_load(model):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(common, "load_model", no_load)
    out = tmp_path / "g.png"
    argv = SAMPLE + ["--out", str(out)] if command == "sample" else EVAL + ["--json", str(tmp_path / "e.json")]
    code, _, err = run(argv + flags, capsys)
    one_line_error(code, err, needle)
    assert not out.exists() and not (tmp_path / "e.json").exists()


def test_unknown_layer_and_shapes_words_are_one_line_errors(tmp_path, capsys):
    """An unknown PAG layer (checked against the loaded network, before sampling) and an unknown word in a
    shapes negative prompt (checked before loading) are one-line errors that list what is accepted."""
    out = tmp_path / "g.png"
    code, _, err = run(SAMPLE + ["--pag", "1", "--pag-layers", "mid,bogus", "--out", str(out)], capsys)
    one_line_error(code, err, "unknown PAG layer 'bogus'; accepted: mid, down, up")
    assert not out.exists()
    code, _, err = run(
        ["eval", "--model", "shapes", "--n", "2", "--steps", "3", "--negative-prompt", "blue wiggly"], capsys
    )
    one_line_error(code, err, "--negative-prompt: unknown word 'wiggly'")


def test_options_object_refuses_bad_values_directly():
    """GuidanceOptions itself refuses non-composing methods and bad values (library callers get the same
    one-line errors as the CLI)."""
    with pytest.raises(ConfigError, match="ag and cfg_rescale do not compose"):
        GuidanceOptions(ag=0.9, cfg_rescale=0.5)
    with pytest.raises(ConfigError, match="pag_layers"):
        GuidanceOptions(pag=1.0, pag_layers="mid")
    with pytest.raises(ConfigError, match="cfg must be"):
        GuidanceOptions(cfg=math.nan)
    with pytest.raises(ConfigError, match="--ag and --cfg-rescale do not compose"):  # the CLI's labels
        GuidanceOptions(ag=0.9, cfg_rescale=0.5, labels={"ag": "--ag", "cfg_rescale": "--cfg-rescale"})
