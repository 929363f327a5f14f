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


@pytest.mark.parametrize("over", [{}, {"sampler": "ordered", "sampler_steps": 8, "truncate": 8, "adapter": 3}])
def test_drakes_resumes_exactly_and_exports_a_token_model(base, tmp_path, over):
    full = run_trainer(make_drakes_trainer(recipe(base, **over), tmp_path / "a", progress=False))
    run_trainer(make_drakes_trainer(recipe(base, **over), tmp_path / "b", progress=False), stop_after=2)
    resumed = run_trainer(make_drakes_trainer(recipe(base, **over), tmp_path / "b", progress=False), resume=True)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)
    assert load_token_model(tmp_path / "b" / "model").kind == "radd"
    start = dict(load_token_model(base).module.named_parameters())  # an adapter starts at zero
    assert any(not torch.equal(p, start.get(n, torch.zeros_like(p))) for n, p in full.module.named_parameters())


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"reward": "gc"}, "'gc'"),
        ({"alpha": -1.0}, "drakes.alpha"),
        ({"tau": 0.0}, "drakes.tau"),
        ({"truncate": 0}, "drakes.truncate"),
        ({"sampler": "euler"}, "'euler'"),
        ({"adapter": 4}, "drakes.adapter"),
        ({"adapter": -3}, "drakes.adapter"),
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


def test_the_ordered_sampler_needs_one_step_per_letter(base, tmp_path):
    with pytest.raises(ConfigError, match="sampler_steps must be the length 8 with the ordered sampler, got 4"):
        make_drakes_trainer(recipe(base, sampler="ordered"), tmp_path / "a", progress=False)


def test_an_adapter_starts_as_the_base_trains_alone_and_is_saved_with_the_model(base, tmp_path):
    r = recipe(base, sampler="ordered", sampler_steps=8, truncate=8, adapter=3)
    tr = make_drakes_trainer(r, tmp_path / "a", progress=False)
    trainable = {n for n, p in tr.module.named_parameters() if p.requires_grad}
    assert trainable == {"net.adapter.weight", "net.adapter.bias"}
    x = torch.nn.functional.one_hot(torch.randint(0, 5, (3, 8), generator=torch.Generator().manual_seed(0)), 5)
    pre = load_token_model(base).net.train()  # the same kernels as the trainer's copy
    with torch.no_grad():
        assert torch.equal(tr.module["net"](x.float()), pre(x.float()))  # the zero adapter leaves the output alone
    loss, metrics = tr.loss_fn(0, torch.Generator().manual_seed(0))
    assert metrics["kl"] == 0.0
    run_trainer(tr)
    saved = load_token_model(tmp_path / "a" / "model")
    assert saved.net.config.adapter_kernel == 3
    for name, p in saved.net.named_parameters():
        if not name.startswith("adapter."):
            assert torch.equal(p, dict(pre.named_parameters())[name])  # the network itself is frozen
    assert saved.net.adapter.weight.abs().sum() > 0  # and the adapter has trained
