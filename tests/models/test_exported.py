"""A diffusers-format folder written by `condiff export` loads back as a condiff model (`--model DIR`, a fine-tuning
`base`): the same networks, schedule and prediction, so the same outputs; broken exports are one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from clikit import ok, one_line_error, run
from condiff.errors import InputFileError
from condiff.models.base import load_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "shapes-diffusers"
    from condiff.cli import main

    main(["export", "--model", "shapes", "--out", str(out)])
    return out


def test_an_export_loads_back_with_the_same_denoiser(exported):
    a, b = load_model("shapes"), load_model(exported)
    assert b.family.name == "shapes" and b.prediction.name == a.prediction.name
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    raw = a.family.random_conditions(3, g)[0]
    with torch.no_grad():
        da = a.denoiser(x, t, a.family.encode(a.module, raw))
        db = b.denoiser(x, t, b.family.encode(b.module, raw))
    assert torch.equal(da, db)
    s = torch.linspace(0.01, 0.99, 7)
    assert torch.allclose(a.schedule.alpha(s), b.schedule.alpha(s)) and torch.allclose(
        a.schedule.sigma(s), b.schedule.sigma(s)
    )


def test_sample_and_finetune_take_an_export(exported, tmp_path, capsys):
    ok(
        [
            "sample",
            "--model",
            str(exported),
            "--prompt",
            "red circle",
            "--n",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "s.png"),
        ],
        capsys,
    )
    assert (tmp_path / "s.png").is_file()
    recipe = tmp_path / "ft.toml"
    recipe.write_text(
        f'name = "from-export"\nbase = "{exported}"\nmethod = "lora"\nobjective = "denoise"\ndata = "striped"\n'
        "[lora]\nrank = 2\nalpha = 2.0\n[train]\nsteps = 2\nbatch_size = 2\nwarmup = 1\nckpt_every = 2\n"
    )
    ok(["finetune", str(recipe), "--out", str(tmp_path / "run")], capsys)
    assert load_model(tmp_path / "run" / "model").family.name == "shapes"


def test_a_broken_export_is_one_line(exported, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "flow"}))
    with pytest.raises(InputFileError, match="prediction_type"):
        load_model(bad)
    code, _, err = run(["sample", "--model", str(bad)], capsys)
    one_line_error(code, err, "prediction_type")
