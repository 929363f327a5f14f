"""The robust_digits family (rRCM and the Gaussian-augmentation classifier): strict recipes with one-line errors,
the packaged recipes, the rRCM target as an EMA of the net, save/load (safetensors, pickles refused) and exact Trainer
resume."""

from __future__ import annotations

import pickle
import tomllib

import pytest
import torch

from condiff.cli.recipes import RECIPES_DIR
from condiff.cli.train import run_trainer
from condiff.errors import ConfigError, InputFileError
from condiff.models.robust_digits import (
    build_robust_model,
    load_robust_model,
    make_robust_trainer,
    robust_recipe_from_dict,
)

PACKAGED = ["rrcm-digits-0.25", "rrcm-digits-0.5", "noise-digits-0.25", "noise-digits-0.5"]


def tiny(kind="rrcm", **tables):
    data = {
        "name": "tiny",
        "family": "robust_digits",
        "model": {"kind": kind, "sigma": 0.25, "hidden": 16, "dim": 8, **tables.get("model", {})},
        "train": {
            "steps": 4,
            "batch_size": 8,
            "ckpt_every": 2,
            "eval_every": 0,
            "threads": 1,
            **tables.get("train", {}),
        },
    }
    if kind == "rrcm":
        data["pretrain"] = {"steps": 2, "grid": 5, **tables.get("pretrain", {})}
    return robust_recipe_from_dict(data)


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_recipes_load_and_state_their_time_and_command(name):
    text = (RECIPES_DIR / f"{name}.toml").read_text()
    r = robust_recipe_from_dict(tomllib.loads(text))
    assert r.name == name and r.model.kind == name.split("-")[0]
    assert "# CPU time:" in text and f"condiff train {name}" in text
    assert r.model.sigma == float(name.rsplit("-", 1)[1])


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"model": {"kind": "dds"}}, "model.kind"),
        ({"model": {"sigma": 0.0}}, "model.sigma"),
        ({"model": {"hidden": 2}}, "model.hidden"),
        ({"pretrain": {"steps": 99}}, "pretrain.steps"),
        ({"pretrain": {"temperature": 0.0}}, "pretrain.temperature"),
        ({"pretrain": {"target_decay": 1.5}}, "pretrain.target_decay"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_value(over, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as e:
        tiny(**over)
    assert len(str(e.value).splitlines()) == 1


def test_the_noise_baseline_refuses_a_pretrain_table():
    with pytest.raises(ConfigError, match=r"\[pretrain\] applies to model.kind 'rrcm' only"):
        robust_recipe_from_dict(
            {"name": "x", "family": "robust_digits", "model": {"kind": "noise"}, "pretrain": {"steps": 1}}
        )


def test_rrcm_starts_its_target_at_the_net_and_moves_it_by_ema(tmp_path):
    r = tiny(pretrain={"target_decay": 0.5})
    m = build_robust_model(r)
    for p, q in zip(m.net.parameters(), m.module["target"].parameters()):
        assert torch.equal(p, q) and not q.requires_grad
    assert "target" not in build_robust_model(tiny("noise")).module
    tr = make_robust_trainer(r, tmp_path / "a", progress=False)
    before = [p.detach().clone() for p in tr.model.net.parameters()]
    tr.train_step()  # step 0: the target follows the (unchanged) net, then the net moves
    target_after0 = [p.detach().clone() for p in tr.model.module["target"].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(target_after0, before))
    net1 = [p.detach().clone() for p in tr.model.net.parameters()]
    tr.train_step()  # step 1: target <- 0.5 target + 0.5 net
    for t, a, b in zip(tr.model.module["target"].parameters(), target_after0, net1):
        assert torch.allclose(t, 0.5 * a + 0.5 * b, atol=1e-7)


@pytest.mark.parametrize("kind", ["rrcm", "noise"])
def test_training_resumes_exactly_and_saves_a_loadable_model(tmp_path, kind):
    r = tiny(kind)
    full = run_trainer(make_robust_trainer(r, tmp_path / "a", progress=False))
    run_trainer(make_robust_trainer(r, tmp_path / "b", progress=False), stop_after=3)
    resumed = run_trainer(make_robust_trainer(r, tmp_path / "b", progress=False), resume=True)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)
    a, b = load_robust_model(tmp_path / "a"), load_robust_model(tmp_path / "b" / "model")
    x = torch.rand(6, 1, 16, 16)
    assert torch.equal(a.base_classifier()(x), b.base_classifier()(x))
    assert a.config["kind"] == kind and a.sigma == 0.25


def test_loading_refuses_pickles_missing_folders_and_weights_that_do_not_fit(tmp_path):
    run_trainer(make_robust_trainer(tiny(), tmp_path / "run", progress=False))
    with pytest.raises(InputFileError, match="does not exist"):
        load_robust_model(tmp_path / "nope")
    with pytest.raises(InputFileError, match="not a robust_digits model"):
        load_robust_model(tmp_path)
    model = tmp_path / "run" / "model"
    info = (model / "condiff.json").read_text()
    (model / "condiff.json").write_text(info.replace('"hidden": 16', '"hidden": 32'))
    with pytest.raises(InputFileError, match="does not fit"):
        load_robust_model(model)
    (model / "condiff.json").write_text(info)
    (model / "extra.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InputFileError, match="pickle"):
        load_robust_model(model)
