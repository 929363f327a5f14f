"""The diffmatch family: strict recipes with one-line errors, the packaged recipe, save/load (safetensors, pickles
refused), held-out EPEs, exact Trainer resume and the CLI's recipe dispatch."""

from __future__ import annotations

import json

import pytest
import torch

from condiff.cli.train import run_trainer
from condiff.data.matching import matching_batch
from condiff.errors import ConfigError, InputFileError
from condiff.models.diffmatch import (
    build_diffmatch_model,
    diffmatch_recipe_from_dict,
    evaluate_epe,
    load_diffmatch_model,
    make_diffmatch_trainer,
    model_dir,
)

TINY = {
    "name": "tiny-diffmatch",
    "family": "diffmatch",
    "model": {"channels": 8, "time_dim": 8, "feature_radius": 1, "local_radius": 1},
    "sampling": {"steps": 2, "hypotheses": 2},
    "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "keep_checkpoints": 5},
}


def tiny(**over):
    d = json.loads(json.dumps(TINY))
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return diffmatch_recipe_from_dict(d)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"family": "seq2seq"}, "'seq2seq'"),
        ({"colour": 1}, "'colour'"),
        ({"model": {"channels": 12}}, "model.channels must be a multiple of 8"),
        ({"model": {"channels": 4}}, "model.channels"),
        ({"model": {"time_dim": 7}}, "model.time_dim must be even"),
        ({"model": {"temperature": 0.0}}, "model.temperature"),
        ({"model": {"regression": 1}}, "model.regression must be bool, got 1"),
        ({"model": {"depth": 2}}, "model.depth"),
        ({"model": {"flow_scale": float("inf")}}, "model.flow_scale"),
        ({"diffusion": {"schedule": "edm"}}, "'edm'"),
        ({"sampling": {"solver": "dpm-v3"}}, "'dpm-v3'"),
        ({"sampling": {"steps": 0}}, "sampling.steps"),
        ({"sampling": {"hypotheses": 1000}}, "sampling.hypotheses"),
        ({"sampling": {"t_start": 2.0}}, "sampling.t_start must be 0 (from noise) or a time in"),
        ({"data": {"max_rotation": 60.0}}, "data.max_rotation"),
        ({"data": {"min_shapes": 3, "max_shapes": 1}}, "data.max_shapes 1 must be at least"),
        ({"data": {"texture": "x"}}, "data.texture must be float"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"name": "no spaces"}, "'no spaces'"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_value(over, needle):
    with pytest.raises(ConfigError) as e:
        tiny(**over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_packaged_recipe_loads_and_states_its_time_and_command():
    from condiff.cli.recipes import RECIPES_DIR, describe
    from condiff.cli.tokens import load_any_recipe

    r = load_any_recipe(RECIPES_DIR / "diffmatch.toml")
    assert (r.name, r.family, r.train.threads) == ("diffmatch", "diffmatch", 1)
    about = describe(RECIPES_DIR / "diffmatch.toml")
    assert "min" in about["cpu_time"] and "condiff train diffmatch --out runs/diffmatch" in about["comment"]


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    m = build_diffmatch_model(tiny())
    for p in m.module.parameters():  # non-zero output layers, so the round trip is tested on a non-trivial net
        p.data.normal_(0, 0.1)
    m.save(tmp_path / "run" / "model", {"note": 1})
    back = load_diffmatch_model(tmp_path / "run" / "model")
    assert model_dir(tmp_path / "run") == tmp_path / "run" / "model" and model_dir(tmp_path) is None
    assert back.config == m.config and back.info["note"] == 1 and back.has_regressor
    sd, sd2 = m.module.state_dict(), back.module.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    b = matching_batch(2, torch.Generator().manual_seed(0), m.data)
    f1, c1 = m.match(b.source, b.target, seed=3)
    f2, c2 = load_diffmatch_model(tmp_path / "run").match(b.source, b.target, seed=3)  # the run folder works too
    assert torch.equal(f1, f2) and torch.equal(c1.init_flow, c2.init_flow)
    assert torch.equal(m.regress(c1), back.regress(c2))
    res = evaluate_epe(back, 3, seed=0, steps=2)
    assert set(res) == {"init_epe", "diffmatch_epe", "regression_epe"} and all(v >= 0 for v in res.values())


def test_loading_refuses_pickles_bad_configs_and_weights_that_do_not_fit(tmp_path):
    m = build_diffmatch_model(tiny())
    m.save(tmp_path / "m")
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "extra.pt")
    with pytest.raises(InputFileError, match="extra.pt"):
        load_diffmatch_model(tmp_path / "m")
    m.save(tmp_path / "n")
    info = json.loads((tmp_path / "n" / "condiff.json").read_text())
    info["diffmatch"]["model"]["channels"] = 16
    (tmp_path / "n" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="net.safetensors does not fit"):
        load_diffmatch_model(tmp_path / "n")
    info["diffmatch"]["sampling"]["solver"] = "nope"
    (tmp_path / "n" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="'nope'"):
        load_diffmatch_model(tmp_path / "n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="not a diffmatch model folder"):
        load_diffmatch_model(tmp_path / "empty")
    with pytest.raises(InputFileError, match="does not exist"):
        load_diffmatch_model(tmp_path / "missing")
    no_reg = build_diffmatch_model(tiny(model={"regression": False}))
    assert not no_reg.has_regressor
    with pytest.raises(ConfigError, match="no regression baseline"):
        no_reg.regress(no_reg.condition(*[torch.zeros(1, 3, 32, 32)] * 2))


def test_diffmatch_training_resumes_exactly(tmp_path):
    r = tiny()
    full = run_trainer(make_diffmatch_trainer(r, tmp_path / "a", progress=False))
    run_trainer(make_diffmatch_trainer(r, tmp_path / "b", progress=False), stop_after=2)
    resumed = run_trainer(make_diffmatch_trainer(r, tmp_path / "b", progress=False), resume=True)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)
    assert load_diffmatch_model(tmp_path / "b").config["model"]["channels"] == 8


def test_train_recipe_dispatches_a_diffmatch_recipe(tmp_path):
    from condiff.cli.train import train_recipe

    r = tiny(model={"regression": False}, train={"steps": 2, "eval_every": 2, "eval_n": 2, "eval_steps": 1})
    tr = train_recipe(r, tmp_path / "o", progress=False)
    assert tr.step == 2 and set(tr.log[-1]) >= {"init_epe", "diffmatch_epe", "diffusion_loss"}
    assert "regression_epe" not in tr.log[-1]
    assert not load_diffmatch_model(tmp_path / "o").has_regressor
