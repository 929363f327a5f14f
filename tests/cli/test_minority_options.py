"""`condiff sample/eval --minority DIR --minority-level L --minority-scale W`: the images equal
MinorityGuidance around the same guided denoiser built by hand, the sidecar reproduces the options, and
misuse is one `error:` line."""

import json

import pytest
import torch

from clikit import ok, one_line_error, run
from condiff.core.grids import make_grid
from condiff.core.sampling import Gaussian, sample
from condiff.evaluation.evaluate import generate
from condiff.guidance import CFG
from condiff.guidance.build import GuidanceOptions
from condiff.guidance.minority import MinorityClassifier, MinorityGuidance
from condiff.models.minority import load_minority, save_minority
from condiff.nets import AttributeClassifier
from condiff.solvers import get_solver

STEPS = 4


@pytest.fixture(scope="module")
def level_dir(tmp_path_factory):
    """A 3-level minority classifier with random weights, saved as fit-minority saves one (recording the model
    it was fitted for, the bundled shapes model)."""
    from condiff.core.fitted import weights_digest
    from condiff.models.base import load_model

    torch.manual_seed(0)
    net = AttributeClassifier(heads=[["level", 3]], noise_aware=True, width=8, hidden=16).eval()
    d = tmp_path_factory.mktemp("mino") / "minority"
    digest = weights_digest(load_model("shapes").module)
    save_minority(MinorityClassifier(net, torch.tensor([0.2, 0.5]), 59.94, 5, {}, (0.0, 999.0), "shapes", digest), d)
    return d


def test_sample_equals_minority_guidance_by_hand(tmp_path, capsys, level_dir):
    from condiff.models.base import load_model

    out = tmp_path / "m.png"
    ok(
        [
            "sample",
            "--model",
            "shapes",
            "--cfg",
            "0",
            "--steps",
            str(STEPS),
            "--n",
            "2",
            "--seed",
            "5",
            "--minority",
            str(level_dir),
            "--minority-level",
            "1",
            "--minority-scale",
            "3",
            "--out",
            str(out),
        ],
        capsys,
    )
    side = json.loads(out.with_suffix(".json").read_text())
    assert (side["minority"], side["minority_level"], side["minority_scale"]) == (str(level_dir), 1, 3.0)
    assert f"--minority {level_dir} --minority-scale 3.0 --minority-level 1" in side["reproduce"]
    m = load_model("shapes")
    raw = m.family.null_raw(2)
    opts = GuidanceOptions(cfg=0.0, minority=load_minority(level_dir), minority_level=1, minority_scale=3.0)
    img, _ = generate(m, raw, get_solver("dpmpp-2m"), STEPS, 0.0, torch.Generator().manual_seed(5), guidance=opts)
    g = torch.Generator().manual_seed(5)
    grid = make_grid(m.schedule, STEPS)
    x = m.prior((2, 3, 32, 32), float(grid[0]), g)
    den = MinorityGuidance(CFG(m.denoiser, 0.0), load_minority(level_dir), 3.0, 1)
    with torch.no_grad():
        ref = sample(den, get_solver("dpmpp-2m"), grid, x, m.condition(raw), Gaussian(g)).x.clamp(-1, 1)
    assert torch.equal(img, ref)
    unguided, _ = generate(m, raw, get_solver("dpmpp-2m"), STEPS, 0.0, torch.Generator().manual_seed(5))
    assert not torch.equal(img, unguided)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--minority-scale", "2"], "need --minority"),
        (["--minority", "LEVEL_DIR", "--minority-level", "3"], "minority level must be an integer in [0, 2]"),
        (["--minority", "LEVEL_DIR", "--minority-level", "-1"], "--minority-level must be an integer >= 0"),
        (["--minority", "LEVEL_DIR", "--minority-scale", "inf"], "--minority-scale must be"),
    ],
)
def test_misuse_is_one_line(tmp_path, capsys, level_dir, extra, needle):
    extra = [str(level_dir) if e == "LEVEL_DIR" else e for e in extra]
    code, _, err = run(["eval", "--model", "shapes", "--n", "2", "--steps", "2"] + extra, capsys)
    one_line_error(code, err, needle)
