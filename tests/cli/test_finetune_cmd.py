"""`condiff finetune`: every method and objective through the Trainer, on the bundled shapes model with tiny
settings: exact resume (SaRA across its re-selection, DPO with cached pairs), the exported model against its
adapter, SaRA's untouched large weights, DPO's log 2 start, DomainStudio's zero terms at the source, and one-line
errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from clikit import ok, one_line_error, run
from condiff.cli.finetune import (
    data_of,
    finetune,
    load_any_finetune_recipe,
    make_finetune_trainer,
    resolve_finetune_recipe,
)
from condiff.cli.recipes import describe
from condiff.cli.recipes import packaged_finetune as packaged
from condiff.core.files import load_json, load_tensors
from condiff.errors import ConfigError
from condiff.models.base import load_model
from condiff.training.finetune_recipe import finetune_recipe_from_dict
from condiff.training.trainer import step_generator


def tiny(**over) -> dict:
    base = {
        "name": "tiny-ft",
        "base": "shapes",
        "method": "lora",
        "objective": "denoise",
        "data": "striped",
        "lora": {"rank": 2, "alpha": 2.0},
        "sara": {"theta": 2e-3, "lambda_rank": 5e-4, "reselect_at": 0},
        "dpo": {"beta": 500.0, "prompts": 6, "margin": 1.0},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "keep_checkpoints": 5},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return base


def recipe(**over):
    return finetune_recipe_from_dict(tiny(**over))


def _weights(path):
    return load_tensors(path / "model.safetensors")


def _same_run(a, b, step):
    ta, tb = _weights(a / "checkpoints" / f"step-{step:08d}"), _weights(b / "checkpoints" / f"step-{step:08d}")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_packaged_recipes_parse_and_resolve():
    names = packaged()
    assert {"shapes-striped-lora", "shapes-striped-sara", "shapes-striped-full"} <= set(names)
    for name, path in names.items():
        r = load_any_finetune_recipe(resolve_finetune_recipe(name))
        assert r.name == name and r.train.threads == 1
        about = describe(path)  # what it trains, its measured CPU time, the command that runs it
        assert about["trains"] and "min" in (about["cpu_time"] or "") and f"condiff finetune {name}" in about["comment"]


@pytest.mark.parametrize(
    "over",
    [
        {"method": "lora"},
        {"method": "full"},
        {"method": "sara", "sara": {"reselect_at": 4}},  # resumed at step 3: the re-selection happens after
        {"method": "sara", "sara": {"reselect_at": 2}},  # resumed at step 3: the re-selection is rebuilt
        {"method": "lora", "objective": "dpo", "data": "preferences:larger"},
        {"method": "full", "objective": "domainstudio", "data": "striped:4"},
    ],
    ids=["lora", "full", "sara-before", "sara-after", "dpo", "domainstudio"],
)
def test_resume_repeats_an_uninterrupted_run_bit_for_bit(tmp_path, over):
    r = recipe(**over)
    finetune(r, tmp_path / "a", progress=False)
    finetune(r, tmp_path / "b", progress=False, stop_after=3)
    assert not (tmp_path / "b" / "model").exists()
    finetune(r, tmp_path / "b", resume=True, progress=False)
    _same_run(tmp_path / "a", tmp_path / "b", 6)
    a, b = load_model(tmp_path / "a" / "model"), load_model(tmp_path / "b" / "model")
    for (k, x), (_, y) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert torch.equal(x, y), k


def _prediction(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 32, 32, generator=g)
    raw, _ = model.family.random_conditions(3, g)
    with torch.no_grad():
        return model.denoiser(x, torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64), model.condition(raw))


def test_lora_run_exports_the_adapted_model_and_a_diffusers_adapter(tmp_path):
    from condiff.training.lora import load_lora

    finetune(recipe(method="lora", train={"ema_decay": 0.0}), tmp_path / "run", progress=False)
    info = load_json(tmp_path / "run" / "finetune.json")
    assert info["trainable_parameters"] == sum(
        v.numel() for v in load_tensors(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").values()
    )
    exported = load_model(tmp_path / "run" / "model")
    adapted = load_model("shapes")
    load_lora(adapted.module["unet"], tmp_path / "run" / "lora")
    base = load_model("shapes")
    assert torch.allclose(_prediction(exported), _prediction(adapted), atol=1e-5)
    assert not torch.allclose(_prediction(base), _prediction(adapted), atol=1e-4)  # it did train


def test_sara_run_keeps_every_large_weight_bit_identical(tmp_path):
    r = recipe(method="sara", train={"ema_decay": 0.0})
    tr = finetune(r, tmp_path / "run", progress=False)
    base = load_model("shapes").module["unet"].state_dict()
    out = load_model(tmp_path / "run" / "model").module["unet"].state_dict()
    changed = 0
    for k, w in base.items():
        large = w.abs() >= 2e-3 if w.dim() >= 2 else torch.ones_like(w, dtype=torch.bool)
        assert torch.equal(out[k][large], w[large]), k
        changed += int((out[k] != w).sum())
    assert changed > 0
    info = load_json(tmp_path / "run" / "finetune.json")
    selected = sum(v.numel() for v in load_tensors(tmp_path / "run" / "sara.safetensors").values())
    assert info["trainable_parameters"] == selected
    moments = sum(v.numel() for st in tr.opt.state.values() for k, v in st.items() if k != "step")
    assert moments == 2 * selected  # Adam's two moments, for the selected scalars only


def test_dpo_starts_at_log_2_with_implicit_accuracy_0(tmp_path):
    tr = make_finetune_trainer(recipe(objective="dpo", data="preferences:larger"), tmp_path / "run", progress=False)
    loss, metrics = tr.loss_fn(0, step_generator(0, 0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["implicit_accuracy"] == 0.0 and metrics["model_error"] == metrics["reference_error"]
    assert (tmp_path / "run" / "pairs.safetensors").is_file()
    pairs = load_tensors(tmp_path / "run" / "pairs.safetensors")
    from condiff.models.finetune_data import object_area

    assert bool((object_area(pairs["winners"]) >= object_area(pairs["losers"]) + 1.0).all())


def test_domainstudio_terms_vanish_at_the_source(tmp_path):
    lam = {"lambda_img": 1.0, "lambda_hf": 1.0, "lambda_hfmse": 0.0}
    tr = make_finetune_trainer(
        recipe(objective="domainstudio", data="striped:4", domainstudio=lam), tmp_path / "run", progress=False
    )
    _, metrics = tr.loss_fn(0, step_generator(0, 0))
    assert metrics["img"] == pytest.approx(0.0, abs=1e-6) and metrics["hf"] == pytest.approx(0.0, abs=1e-6)


def test_few_shot_data_holds_k_fixed_striped_images(tmp_path):
    from condiff.data import labeller
    from condiff.training.recipe import ObjectiveConfig

    data = data_of(recipe(data="striped:10"), load_model("shapes"), tmp_path, False)
    assert data.images.shape == (10, 3, 32, 32) and bool(labeller.stripes(data.images).all())
    x0, _ = data.batch(0, 32, torch.Generator().manual_seed(0), ObjectiveConfig())
    assert all(any(torch.equal(x, y) for y in data.images) for x in x0)


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"data": "nope"}, "'nope'"),
        ({"data": "striped:1"}, "striped:1"),
        ({"objective": "dpo", "data": "striped"}, "preferences:larger"),
        ({"objective": "domainstudio", "data": "preferences:larger"}, "domainstudio"),
    ],
)
def test_bad_data_is_one_line(tmp_path, over, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        make_finetune_trainer(recipe(**over), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(["finetune", "shapes-striped-lorra", "--out", str(tmp_path / "x")], capsys)
    one_line_error(code, err, "did you mean 'shapes-striped-lora'")
    code, _, err = run(["finetune", "shapes-striped-lora", "--allow-changes", "--out", str(tmp_path / "x")], capsys)
    one_line_error(code, err, "--allow-changes goes with --resume")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nbase = "shapes"\nmethod = "qlora"\n')
    code, _, err = run(["finetune", str(bad), "--out", str(tmp_path / "y")], capsys)
    one_line_error(code, err, "method 'qlora' is not accepted; accepted: full, lora, sara")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_trains_and_refuses_a_second_run_into_the_same_folder(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(
        'name = "cli-ft"\nbase = "shapes"\nmethod = "lora"\ndata = "striped"\n[lora]\nrank = 1\n'
        "[train]\nsteps = 2\nbatch_size = 2\nwarmup = 1\nckpt_every = 1\n"
    )
    out = ok(["finetune", str(path), "--out", str(tmp_path / "run")], capsys)
    assert "trained 2 steps" in out and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    code, _, err = run(["finetune", str(path), "--out", str(tmp_path / "run")], capsys)
    one_line_error(code, err, "already holds checkpoints")
    out = ok(["finetune", str(path), "--out", str(tmp_path / "run"), "--resume"], capsys)
    assert "finished at step 2: nothing to train" in out


def test_recipe_keys_are_checked():
    with pytest.raises(ConfigError, match="unknown fine-tuning recipe key 'objectiv'"):
        finetune_recipe_from_dict({**tiny(), "objectiv": "dpo"})
    with pytest.raises(ConfigError, match="lora.rank must be int"):
        finetune_recipe_from_dict(tiny(lora={"rank": 1.5}))
    with pytest.raises(ConfigError, match="loss.cond_dropout"):
        finetune_recipe_from_dict(tiny(loss={"cond_dropout": 1.5}))
    with pytest.raises(ConfigError, match="dpo.beta"):
        finetune_recipe_from_dict(tiny(dpo={"beta": 0.0}))
    r = finetune_recipe_from_dict(tiny())
    assert dataclasses.asdict(r)["lora"] == {"rank": 2, "alpha": 2.0}
