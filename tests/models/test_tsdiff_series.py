"""The tsdiff family (condiff.models.tsdiff_series): the window network's shapes and determinism, window scaling
and the split, strict recipes with one-line errors, the packaged recipes, save/load (safetensors, pickles refused),
forecasts that commute with the series' units, refinement's identity at zero steps, and exact Trainer resume."""

from __future__ import annotations

import json

import pytest
import torch

from condiff.cli.train import run_trainer
from condiff.data.series import load_series, pool_series
from condiff.errors import ConfigError, InputFileError
from condiff.models.tsdiff_series import (
    TSDiffNet,
    build_tsdiff_model,
    load_tsdiff_model,
    make_tsdiff_trainer,
    model_dir,
    pool_names,
    pool_windows,
    split_windows,
    training_windows,
    tsdiff_loss_fn,
    tsdiff_recipe_from_dict,
    validation_start,
    validation_windows,
    window_scale,
)

TINY = {
    "name": "tiny-tsdiff",
    "family": "tsdiff",
    "model": {"channels": 4, "blocks": 2, "time_dim": 8},
    "data": {"series": "nile"},
    "forecast": {"samples": 3, "steps": 3, "refine_steps": 2},
    "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "keep_checkpoints": 5},
}


def tiny(**over):
    d = json.loads(json.dumps(TINY))
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return tsdiff_recipe_from_dict(d)


def randomised(model, seed=0):
    """Non-zero weights everywhere (the output layer starts at zero), so outputs depend on every layer."""
    g = torch.Generator().manual_seed(seed)
    for p in model.module.parameters():
        p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_network_shapes_determinism_and_zero_start():
    torch.manual_seed(0)
    a = TSDiffNet(8, 3, 3, 16)
    torch.manual_seed(0)
    b = TSDiffNet(8, 3, 3, 16)
    x, t = torch.randn(5, 25), torch.tensor([0.0, 10.0, 50.0, 99.0, 3.5])
    assert a(x, t).shape == (5, 25)
    assert torch.equal(a(x, t), b(x, t))  # same seed, same weights, same output
    assert torch.equal(a(x, t), torch.zeros(5, 25))  # zero-initialised output layer: eps_hat = 0 at the start
    m = build_tsdiff_model(tiny())  # so the start's x0 estimate is x / alpha(t) exactly
    x64 = torch.randn(2, m.length)
    alpha = float(m.schedule.alpha(torch.tensor(40.0, dtype=torch.float64)))
    assert torch.allclose(m.denoiser(x64, 40.0), x64 / alpha, atol=1e-6)
    with pytest.raises(ConfigError, match="windows"):
        a(torch.randn(2, 1, 25), t[:2])


def test_window_scaling_and_the_split_keep_the_test_part_unseen():
    s = load_series("nile")
    C, H = s.context_length, s.horizon
    assert training_windows(s, C, H, holdout=False).shape == (s.train_end - (C + H) + 1, C + H)
    w = training_windows(s, C, H)  # every window before the validation windows, none past them
    end = validation_start(s)
    assert end == s.train_end - s.num_windows * H and w.shape == (end - (C + H) + 1, C + H)
    last = s.values[end - C - H : end]
    loc, scale = window_scale(last[None, :C])
    assert torch.allclose(w[-1].double(), ((last - loc) / scale)[0], atol=1e-5)
    assert torch.allclose(w[:, :C].mean(1), torch.zeros(w.shape[0]), atol=1e-5)  # contexts standardised
    assert torch.allclose(w[:, :C].std(1, correction=0), torch.ones(w.shape[0]), atol=1e-5)
    ctx, tgt = validation_windows(s)
    assert tgt.shape == (s.num_windows, H) and torch.equal(tgt[-1], s.values[s.train_end - H : s.train_end])
    m = build_tsdiff_model(tiny())
    c, t, origins = split_windows(m)
    assert torch.equal(t, s.windows()[1]) and origins == s.origins and c.shape == (s.num_windows, C)
    c2, t2, _ = split_windows(m, 2)  # a shorter horizon: the first 2 points, from the L - 2 points before
    assert torch.equal(t2, t[:, :2]) and torch.equal(c2[:, -C:], c)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"family": "dense"}, "'dense'"),
        ({"colour": 1}, "'colour'"),
        ({"model": {"kernel": 4}}, "model.kernel must be odd"),
        ({"model": {"channels": 2}}, "model.channels"),
        ({"model": {"time_dim": 7}}, "model.time_dim must be even"),
        ({"model": {"depth": 2}}, "model.depth"),
        ({"data": {"series": "airline"}}, "'airline'"),
        ({"data": {"pool": "sunspots,airline"}}, "'airline'"),
        ({"data": {"pool": "elnino, elnino"}}, "twice"),
        ({"data": {"pool_fraction": 1.0}}, "data.pool_fraction"),
        ({"data": {"flip": 1}}, "data.flip must be bool"),
        ({"diffusion": {"beta_end": 0.9}}, "diffusion.beta_end"),
        ({"diffusion": {"num_steps": 1}}, "diffusion.num_steps"),
        ({"forecast": {"guidance": "l1"}}, "'l1'"),
        ({"forecast": {"samples": 0}}, "forecast.samples"),
        ({"forecast": {"std": 0.0}}, "forecast.std"),
        ({"forecast": {"refine_tau": 150.0}}, "forecast.refine_tau"),
        ({"forecast": {"refine_lr": float("nan")}}, "forecast.refine_lr"),
        ({"forecast": {"quantile_scale": "x"}}, "forecast.quantile_scale must be float"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"name": "no spaces"}, "'no spaces'"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_value(over, needle):
    with pytest.raises(ConfigError) as e:
        tiny(**over)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["co2", "sunspots", "nile", "nile-pool-se"])
def test_the_packaged_recipes_load_and_state_their_time_and_command(name):
    from condiff.cli.recipes import RECIPES_DIR, describe
    from condiff.cli.tokens import load_any_recipe

    path = RECIPES_DIR / f"tsdiff-{name}.toml"
    r = load_any_recipe(path)
    series = name.split("-")[0]
    assert (r.name, r.family, r.data.series, r.train.threads) == (f"tsdiff-{name}", "tsdiff", series, 1)
    assert pool_names(r.data.pool) == (["sunspots", "elnino"] if name == "nile-pool-se" else [])
    about = describe(path)
    assert "min" in about["cpu_time"] and f"condiff train tsdiff-{name} --out runs/tsdiff-{name}" in about["comment"]


def test_pool_windows_are_every_standardised_window_of_the_other_series():
    assert pool_names("") == [] and pool_names(" nile , elnino") == ["nile", "elnino"]
    C, H = 20, 5
    w = pool_windows("nile,elnino", C, H, exclude="nile")  # nile is the model's own: its windows are held out here
    (elnino,) = pool_series("elnino")
    assert elnino.numel() == 61 and w.shape == (61 - (C + H) + 1, C + H)
    z = w.double()
    assert torch.allclose(
        z[:, :C].mean(1), torch.zeros(len(z), dtype=z.dtype), atol=1e-5
    )  # each context: mean 0, std 1
    assert torch.allclose(z[:, :C].std(1, correction=0), torch.ones(len(z), dtype=z.dtype), atol=1e-5)
    loc, scale = window_scale(elnino[None, 7 : 7 + C])
    assert torch.allclose(z[7], ((elnino[7 : 7 + C + H] - loc) / scale)[0], atol=1e-5)
    with pytest.raises(ConfigError, match="no window"):
        pool_windows("nile", C, H, exclude="nile")


def test_the_pooled_loss_draws_its_share_of_pool_windows_and_flips_exactly(monkeypatch):
    import condiff.models.tsdiff_series as ts

    r = tiny(data={"pool": "elnino", "pool_fraction": 0.5, "flip": True}, train={"batch_size": 8})
    m = build_tsdiff_model(r)
    seen = []
    monkeypatch.setattr(ts, "diffusion_loss", lambda call, x0, *a: seen.append(x0) or torch.zeros(1))
    own = training_windows(m.series(), m.context, m.horizon)
    pool = pool_windows("elnino", m.context, m.horizon, "nile")
    tsdiff_loss_fn(m, r)(0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay: 4 own windows, then 4 pool windows, then the signs
    x0 = torch.cat(
        [own[torch.randint(own.shape[0], (4,), generator=g)], pool[torch.randint(pool.shape[0], (4,), generator=g)]]
    )
    signs = 1 - 2 * torch.randint(2, (8, 1), generator=g)
    (got,) = seen
    assert torch.equal(got, x0 * signs.float())
    assert set(signs.flatten().tolist()) == {-1, 1}  # this seed draws both signs


def test_save_load_round_trip_gives_identical_forecasts(tmp_path):
    m = randomised(build_tsdiff_model(tiny()))
    m.save(tmp_path / "run" / "model", {"note": 1})
    back = load_tsdiff_model(tmp_path / "run")  # the run folder works too
    assert model_dir(tmp_path / "run") == tmp_path / "run" / "model" and model_dir(tmp_path) is None
    assert back.config == m.config and back.info["note"] == 1
    ctx, _, _ = split_windows(m)
    for g in ("mse", "quantile"):
        assert torch.equal(m.forecast(ctx, guidance=g, seed=3), back.forecast(ctx, guidance=g, seed=3))
    f = m.forecast(ctx, seed=3)
    assert f.shape == (3, ctx.shape[0], m.horizon) and f.dtype == torch.float64
    assert not torch.equal(f, m.forecast(ctx, seed=4))  # the seed is the noise


def test_forecasts_and_refinement_commute_with_the_series_units():
    """Windows are standardised by their context, so forecasting a*y + b gives a*forecast(y) + b (same seed)."""
    m = randomised(build_tsdiff_model(tiny()))
    ctx, _, _ = split_windows(m)
    a, b = 3.0, -250.0
    for g in ("mse", "quantile"):
        f, f2 = m.forecast(ctx, guidance=g, seed=1), m.forecast(a * ctx + b, guidance=g, seed=1)
        assert torch.allclose(f2, a * f + b, rtol=1e-4, atol=1e-3)
    base = ctx[:, -1:].expand(-1, m.horizon)[None].repeat(2, 1, 1)
    r, r2 = m.refine(ctx, base, "langevin", seed=1), m.refine(a * ctx + b, a * base + b, "langevin", seed=1)
    assert torch.allclose(r2, a * r + b, rtol=1e-4, atol=1e-3)


def test_refinement_with_no_steps_returns_the_base_samples():
    m = build_tsdiff_model(tiny(forecast={"refine_steps": 0}))
    ctx, _, _ = split_windows(m)
    base = torch.randn(4, ctx.shape[0], m.horizon, dtype=torch.float64) * 100 + 800
    assert torch.allclose(m.refine(ctx, base, "ml"), base, rtol=1e-6)
    with pytest.raises(ConfigError, match="refinement method"):
        m.refine(ctx, base, "hmc")
    with pytest.raises(ConfigError, match="horizon"):
        m.forecast(ctx, horizon=m.length)


def test_loading_refuses_pickles_bad_configs_and_weights_that_do_not_fit(tmp_path):
    m = build_tsdiff_model(tiny())
    m.save(tmp_path / "m")
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "extra.pt")
    with pytest.raises(InputFileError, match="extra.pt"):
        load_tsdiff_model(tmp_path / "m")
    m.save(tmp_path / "n")
    info = json.loads((tmp_path / "n" / "condiff.json").read_text())
    info["tsdiff"]["model"]["channels"] = 8
    (tmp_path / "n" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="net.safetensors does not fit"):
        load_tsdiff_model(tmp_path / "n")
    info["tsdiff"]["data"]["series"] = "nope"
    (tmp_path / "n" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="'nope'"):
        load_tsdiff_model(tmp_path / "n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="holds no tsdiff model"):
        load_tsdiff_model(tmp_path / "empty")
    with pytest.raises(InputFileError, match="does not exist"):
        load_tsdiff_model(tmp_path / "missing")


def test_tsdiff_training_resumes_exactly(tmp_path):
    r = tiny()
    full = run_trainer(make_tsdiff_trainer(r, tmp_path / "a", progress=False))
    run_trainer(make_tsdiff_trainer(r, tmp_path / "b", progress=False), stop_after=2)
    resumed = run_trainer(make_tsdiff_trainer(r, tmp_path / "b", progress=False), resume=True)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)
    assert load_tsdiff_model(tmp_path / "b").config["data"]["series"] == "nile"


def test_train_recipe_dispatches_a_tsdiff_recipe(tmp_path):
    from condiff.cli.train import train_recipe

    r = tiny(train={"steps": 2, "eval_every": 2})
    tr = train_recipe(r, tmp_path / "o", progress=False)
    assert tr.step == 2 and "valid_crps_mse" in tr.log[-1] and tr.log[-1]["valid_crps_mse"] > 0
    assert load_tsdiff_model(tmp_path / "o").info["trained_steps"] == 2
