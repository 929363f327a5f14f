"""The dit_moe recipe family: recipe errors are one line naming the value, the packaged recipes (MoE and its dense
baseline) have the same active parameters and training compute, save/load round-trips, and training resumes
exactly (the Trainer, with the MoE's pass-through balance loss)."""

from __future__ import annotations

import pytest
import torch

from condiff.cli.recipe_kinds import KINDS
from condiff.cli.recipes import RECIPES_DIR, describe
from condiff.cli.tokens import load_any_recipe
from condiff.cli.train import run_trainer, train_recipe
from condiff.errors import ConfigError, InputFileError
from condiff.models.dit_moe import (
    active_parameters,
    build_dit_model,
    dit_recipe_from_dict,
    load_dit_model,
    make_dit_trainer,
)

TINY = {"patch_size": 8, "dim": 16, "depth": 1, "heads": 2, "experts": 4, "top_k": 2}


def recipe(model=None, train=None, **top):
    data = {
        "name": "tiny-moe",
        "family": "dit_moe",
        "model": {**TINY, **(model or {})},
        "train": {"steps": 4, "batch_size": 2, "ckpt_every": 2, "warmup": 1, **(train or {})},
        **top,
    }
    return dit_recipe_from_dict(data)


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"model": {"top_k": 5}}, "model.top_k"),
        ({"model": {"top_k": 0}}, "model.top_k"),
        ({"model": {"patch_size": 5}}, "model.patch_size"),
        ({"model": {"heads": 3}}, "model.dim"),
        ({"model": {"experts": -1}}, "model.experts"),
        ({"model": {"alpha": -0.5}}, "model.alpha"),
        ({"model": {"experts": 0, "dense_ratio": 0}}, "model.dense_ratio"),
        ({"model": {"routing": "topk"}}, "unknown key model.routing"),
        ({"model": {"dim": "64"}}, "model.dim must be int"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"init_from": "shapes"}}, "train.init_from"),
        ({"objective": {"prediction": "score"}}, "'score'"),
        ({"schedule": {"type": "nope"}}, "'nope'"),
        ({"family": "shapes"}, "'shapes'"),
        ({"name": "a b"}, "'a b'"),
        ({"extra": 1}, "'extra'"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_value(over, needle):
    model, train = over.pop("model", None), over.pop("train", None)
    with pytest.raises(ConfigError) as e:
        recipe(model, train, **over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_packaged_recipes_have_the_same_active_parameters_and_compute():
    moe, dense = (load_any_recipe(RECIPES_DIR / f"{n}.toml") for n in ("shapes-dit-moe", "shapes-dit-dense"))
    assert KINDS["dit_moe"].module == "condiff.models.dit_moe"
    for r in (moe, dense):
        about = describe(RECIPES_DIR / f"{r.name}.toml")
        assert r.train.threads == 1 and "min" in about["cpu_time"]
        assert f"condiff train {r.name} --out runs/{r.name}" in about["comment"]
    assert moe.train == dense.train and moe.schedule == dense.schedule and moe.objective == dense.objective
    m, d = moe.model, dense.model
    # active SwiGLU hidden per token: K experts of expert_ratio d plus the shared shared * shared_ratio d = dense
    assert m["top_k"] * m["expert_ratio"] + m["shared"] * m["shared_ratio"] == d["dense_ratio"]
    pm, pd = active_parameters(m), active_parameters(d)
    gate = m["depth"] * m["dim"] * m["experts"]  # the router's weights: the only active extra
    assert pm["active"] - pd["active"] == gate and pm["total"] > 2 * pd["total"]


@pytest.mark.parametrize("extra", [{}, {"cross_attention": True, "rope": True}])
def test_save_load_round_trips_give_identical_outputs(tmp_path, extra):
    from condiff.models.base import load_model

    m = build_dit_model(recipe(model=extra))
    for p in m.module.parameters():  # adaLN-Zero and the zero projections start at 0: give every block weights
        torch.nn.init.normal_(p, std=0.05)
    m.module.eval()
    m.save(tmp_path / "m")
    back = load_dit_model(tmp_path / "m")
    generic = load_model(tmp_path / "m")  # what condiff sample / eval read
    assert generic.family.name == "dit_moe"
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 700.0])
    raw = torch.tensor([[1, 3, 0, 9], [0, 0, 0, 0]])
    with torch.no_grad():
        a = m.denoiser(x, t, m.condition(raw))
        b = back.denoiser(x, t, back.condition(raw))
        c = generic.denoiser(x, t, generic.condition(raw))
    assert a.abs().max() > 0.01
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(InputFileError, match="not a dit_moe model"):
        load_dit_model(tmp_path)
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InputFileError, match="pickle"):
        load_dit_model(tmp_path / "m")


@pytest.mark.parametrize("experts", [4, 0])
def test_training_resumes_exactly(experts, tmp_path):
    r = recipe({"experts": experts})
    full = run_trainer(make_dit_trainer(r, tmp_path / "a", progress=False))
    run_trainer(make_dit_trainer(r, tmp_path / "b", progress=False), stop_after=2)
    resumed = run_trainer(make_dit_trainer(r, tmp_path / "b", progress=False), resume=True)
    assert resumed.start_step == 2
    for (name, p), q in zip(full.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(p, q), name
    assert load_dit_model(tmp_path / "b" / "model").info["trained_steps"] == 4


def test_train_recipe_dispatches_the_family_and_scores_it(tmp_path):
    tr = train_recipe(
        recipe(train={"steps": 2, "eval_every": 2, "eval_n": 2, "eval_steps": 2}), tmp_path / "r", progress=False
    )
    assert tr.step == 2 and set(tr.log[-1]["accuracy"]) == {"shape", "color", "size", "position", "all"}
