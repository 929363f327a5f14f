"""`condiff finetune` with objective "drakes" on a tiny DNA token model: the trajectory KL starts at exactly 0 (the
frozen reference equals the model), the run resumes exactly, the result is a token model, and bad recipes are one
line."""

from __future__ import annotations

import pytest
import torch

from clikit import one_line_error, run
from condiff.cli.train import run_trainer
from condiff.errors import ConfigError
from condiff.models.drakes_finetune import drakes_recipe_from_dict, make_drakes_trainer
from condiff.models.tokens import build_token_model, load_token_model, token_recipe_from_dict


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    r = token_recipe_from_dict(
        {"name": "b", "family": "dna", "model": {"dim": 16, "layers": 1, "heads": 2}, "data": {"length": 8}}
    )
    path = tmp_path_factory.mktemp("drakes") / "base"
    build_token_model(r).save(path)
    return path


def recipe(base, **drakes):
    return drakes_recipe_from_dict(
        {
            "name": "tiny-drakes",
            "base": str(base),
            "objective": "drakes",
            "drakes": {"sampler_steps": 4, "truncate": 2, **drakes},
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "eval_every": 0},
        }
    )


def test_kl_is_zero_at_the_start_and_the_reward_is_the_dna_reward(base, tmp_path):
    tr = make_drakes_trainer(recipe(base), tmp_path / "a", progress=False)
    loss, metrics = tr.loss_fn(0, torch.Generator().manual_seed(0))
    assert metrics["kl"] == 0.0
    assert abs(float(loss.detach()) + metrics["reward"]) < 1e-5  # -reward + alpha * 0


def test_drakes_resumes_exactly_and_exports_a_token_model(base, tmp_path):
    full = run_trainer(make_drakes_trainer(recipe(base), tmp_path / "a", progress=False))
    run_trainer(make_drakes_trainer(recipe(base), tmp_path / "b", progress=False), stop_after=2)
    resumed = run_trainer(make_drakes_trainer(recipe(base), tmp_path / "b", progress=False), resume=True)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)
    assert load_token_model(tmp_path / "b" / "model").kind == "radd"
    moved = any(
        not torch.equal(p, q) for p, q in zip(full.module.parameters(), load_token_model(base).module.parameters())
    )
    assert moved


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"reward": "gc"}, "'gc'"),
        ({"alpha": -1.0}, "drakes.alpha"),
        ({"tau": 0.0}, "drakes.tau"),
        ({"truncate": 0}, "drakes.truncate"),
    ],
)
def test_bad_drakes_values_are_one_line(base, over, needle):
    with pytest.raises(ConfigError) as e:
        recipe(base, **over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_finetune_command_refuses_an_image_base_for_drakes(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('name = "x"\nbase = "shapes"\nobjective = "drakes"\n')
    code, _, err = run(["finetune", str(tmp_path / "r.toml"), "--out", str(tmp_path / "o")], capsys)
    one_line_error(code, err, "not a token model")
