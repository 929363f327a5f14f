"""`condiff sample/eval --classifier/--cg-scale/--cg-attribute/--cg-raw`: the sampled images are exactly those of
the library's guidance objects on the same seed, the JSON records and reproduces the options, and every
misuse is one `error:` line."""

import json

import pytest
import torch

from clikit import ok, one_line_error, run
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.guidance import CFG
from condiff.guidance.attribute import TARGET_KEY, classifier_guidance, elucd_guidance
from condiff.guidance.build import GuidanceOptions
from condiff.models.classifiers import load_classifier, load_guidance_classifier
from condiff.solvers import get_solver

STEPS = 5


def _by_hand(model, prompt, n, seed, guide):
    return _by_hand_solver(model, model.family.parse_prompt(prompt).expand(n, -1), seed, guide, "ddpm")


def _by_hand_solver(model, raw, seed, guide, solver):
    """Sample ``raw`` with guide(CFG(D, 0), grid) as the evaluate loop does (same seed, prior and noise)."""
    n = raw.shape[0]
    g = torch.Generator().manual_seed(seed)
    grid = make_grid(model.schedule, STEPS)
    cond = model.condition(raw)
    cond[TARGET_KEY] = model.family.attribute_targets(raw)[:, 1]
    x = model.prior((n, 3, 32, 32), float(grid[0]), g)
    with torch.no_grad():
        return sample(guide(CFG(model.denoiser, 0.0), grid), get_solver(solver), grid, x, cond, Gaussian(g)).x


@pytest.mark.parametrize("raw", [False, True])
def test_sample_equals_the_library_objects(tmp_path, capsys, raw):
    """--cfg 0 --classifier clean [--cg-raw]: EluCD (or the raw classifier on x_t) around the unconditional
    model, pixel for pixel as built by hand; the sidecar names the options and its reproduce line has them."""
    from condiff.evaluation.evaluate import generate
    from condiff.models.base import load_model

    torch.set_num_threads(1)
    out = tmp_path / "g.png"
    argv = [
        "sample",
        "--model",
        "shapes",
        "--prompt",
        "red",
        "--cfg",
        "0",
        "--solver",
        "ddpm",
        "--steps",
        str(STEPS),
        "--n",
        "2",
        "--seed",
        "3",
        "--classifier",
        "clean",
        "--cg-scale",
        "4",
        "--out",
        str(out),
    ]
    ok(argv + (["--cg-raw"] if raw else []), capsys)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["classifier"] == "clean" and side["cg_scale"] == 4.0 and side["cg_raw"] is raw
    assert "--classifier clean --cg-scale 4.0 --cg-attribute color" in side["reproduce"]
    net = load_classifier("clean")
    if raw:
        guide = lambda d, grid: classifier_guidance(d, net, "color", 4.0)  # noqa: E731
    else:
        guide = lambda d, grid: elucd_guidance(d, net, "color", 4.0, grid)  # noqa: E731
    ref = _by_hand(load_model("shapes"), "red", 2, 3, guide).clamp(-1, 1)
    # the grid PNG is 8-bit, so the comparison goes through the function the command calls
    opts = GuidanceOptions(cfg=0.0, classifier=load_classifier("clean"), cg_scale=4.0, cg_raw=raw)
    m = load_model("shapes")
    img, _ = generate(
        m,
        m.family.parse_prompt("red").expand(2, -1),
        get_solver("ddpm"),
        STEPS,
        0.0,
        torch.Generator().manual_seed(3),
        guidance=opts,
    )
    assert torch.equal(img, ref)


def test_eval_keeps_accuracy_and_adds_nfe(tmp_path, capsys):
    out = tmp_path / "e.json"
    ok(
        [
            "eval",
            "--model",
            "shapes",
            "--cfg",
            "0",
            "--solver",
            "ddpm",
            "--steps",
            str(STEPS),
            "--n",
            "4",
            "--classifier",
            "clean",
            "--cg-scale",
            "2",
            "--json",
            str(out),
        ],
        capsys,
    )
    res = json.loads(out.read_text())
    assert set(res["accuracy"]) == {"shape", "color", "size", "position", "all"} and res["nfe"] == STEPS
    assert res["classifier"] == "clean" and res["cg_attribute"] == "color"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--cg-scale", "2"], "need --classifier"),
        (["--classifier", "nope"], "neither a bundled classifier"),
        (["--classifier", "clean", "--cg-scale", "nan"], "--cg-scale must be"),
        (["--classifier", "clean", "--cg-attribute", "texture"], "texture"),
        (["--classifier", "clean", "--prompt", "circle"], "name a color"),
        (["--classifier", "clean", "--solver", "dpmpp-2s"], "EluCD is defined at its grid times"),
    ],
)
def test_misuse_is_one_line(tmp_path, capsys, extra, needle):
    argv = ["sample", "--model", "shapes", "--steps", "3", "--n", "2", "--out", str(tmp_path / "x.png")]
    if "--prompt" not in extra:
        argv += ["--prompt", "red"]
    code, _, err = run(argv + extra, capsys)
    one_line_error(code, err, needle)  # an off-grid solver (EluCD) too: refused by a dry run, before sampling


def test_the_issue_stack_runs_end_to_end(tmp_path, capsys):
    """`--cfg 3 --pag 2 --pag-layers mid --ag 0.995 --classifier clean --cg-scale 2` with DPM-Solver++(2M):
    CFG + PAG + AG + (EluCD) classifier guidance in one run, with every option in the sidecar and PAG's and
    AG's rows counted; the same options through ``generate`` (what the command calls) give finite images at
    one guided call per step."""
    from condiff.evaluation.evaluate import generate
    from condiff.models.base import load_model

    out = tmp_path / "s.png"
    argv = [
        "sample",
        "--model",
        "shapes",
        "--prompt",
        "small blue square",
        "--cfg",
        "3",
        "--pag",
        "2",
        "--pag-layers",
        "mid",
        "--ag",
        "0.995",
        "--classifier",
        "clean",
        "--cg-scale",
        "2",
        "--solver",
        "dpmpp-2m",
        "--steps",
        str(STEPS),
        "--n",
        "2",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    ok(argv, capsys)
    side = json.loads(out.with_suffix(".json").read_text())
    assert (side["pag"], side["ag"], side["classifier"], side["cg_scale"], side["nfe"]) == (
        2.0,
        0.995,
        "clean",
        2.0,
        STEPS,
    )
    # per step: cond (+ uncond until AG switches) + the perturbed row (PAG reads cond from AG's call)
    assert 2 * STEPS <= side["network_rows_per_sample"] <= 3 * STEPS
    opts = GuidanceOptions(
        cfg=3.0, pag=2.0, pag_layers=("mid",), ag=0.995, classifier=load_classifier("clean"), cg_scale=2.0
    )
    m = load_model("shapes")
    img, nfe = generate(
        m,
        m.family.parse_prompt("small blue square").expand(2, -1),
        get_solver("dpmpp-2m"),
        STEPS,
        3.0,
        torch.Generator().manual_seed(1),
        guidance=opts,
    )
    assert nfe == STEPS and img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()


def test_ppap_directory_as_classifier(tmp_path, capsys):
    """--classifier DIR with PPAP experts (saved by save_ppap; here fresh LoRA experts, equal to the clean
    classifier) runs PPAP guidance: the same images as ppap_attribute_guidance built by hand."""
    from condiff.core.fitted import weights_digest
    from condiff.evaluation.evaluate import generate
    from condiff.guidance.ppap import MultiExpert, lora_expert, ppap_attribute_guidance, save_ppap
    from condiff.models.base import load_model

    clean = load_classifier("clean")
    m = load_model("shapes")
    experts = MultiExpert([lora_expert(clean, rank=2) for _ in range(2)], m.schedule.t_min, m.schedule.t_max)
    recorded = {"classifier": "clean", "model": "shapes", "model_weights": weights_digest(m.module)}  # as train-ppap
    save_ppap(experts, tmp_path / "ppap", clean, info=recorded)
    out = tmp_path / "p.png"
    ok(
        [
            "sample",
            "--model",
            "shapes",
            "--prompt",
            "green",
            "--cfg",
            "0",
            "--solver",
            "ddim",
            "--steps",
            str(STEPS),
            "--n",
            "2",
            "--classifier",
            str(tmp_path / "ppap"),
            "--cg-scale",
            "3",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert json.loads(out.with_suffix(".json").read_text())["classifier"] == str(tmp_path / "ppap")
    opts = GuidanceOptions(cfg=0.0, classifier=load_guidance_classifier(tmp_path / "ppap"), cg_scale=3.0)
    raw = m.family.parse_prompt("green").expand(2, -1)
    img, _ = generate(m, raw, get_solver("ddim"), STEPS, 0.0, torch.Generator().manual_seed(0), guidance=opts)
    loaded = load_guidance_classifier(tmp_path / "ppap")
    ref = _by_hand_solver(m, raw, 0, lambda d, grid: ppap_attribute_guidance(d, loaded, "color", 3.0), "ddim")
    assert torch.equal(img, ref.clamp(-1, 1))
    code, _, err = run(
        [
            "sample",
            "--model",
            "shapes",
            "--prompt",
            "green",
            "--classifier",
            str(tmp_path / "ppap"),
            "--cg-raw",
            "--steps",
            "2",
            "--n",
            "1",
            "--out",
            str(tmp_path / "q.png"),
        ],
        capsys,
    )
    one_line_error(code, err, "--cg-raw applies to a clean classifier")
