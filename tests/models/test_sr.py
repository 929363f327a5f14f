"""The x4 super-resolution family on shapes (condiff.models.sr): strict recipes with one-line errors, the exact
degradation, the start equals the bundled shapes UNet on its old channels, save/load round trips (pickles and
malformed tables refused), the searched start's file, the search's score equals the upscaled images' PSNR, exact
Trainer resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from condiff.cli.recipes import RECIPES_DIR, describe
from condiff.cli.tokens import load_any_recipe
from condiff.cli.train import run_trainer
from condiff.data import shapes
from condiff.errors import ConfigError, InputFileError
from condiff.evaluation.editbench import psnr
from condiff.models.dense import load_start, shuffle, unshuffle
from condiff.models.sr import (
    XT_FORMAT,
    build_sr_model,
    degrade,
    load_sr_model,
    load_start_file,
    make_sr_trainer,
    save_start,
    search_start,
    sr_forward,
    sr_recipe_from_dict,
    upsample,
    validation_batch,
)

TRAIN = {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 1, "ckpt_every": 1, "keep_checkpoints": 5}


def recipe(**over):
    d = {"name": "tiny-sr", "family": "sr", "model": {"upsample": "bicubic"}, "train": TRAIN}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
    return sr_recipe_from_dict(d)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sr_model(recipe())


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"family": "dense"}, "'dense'"),
        ({"colour": 1}, "'colour'"),
        ({"model": {"upsample": "lanczos"}}, "unknown model.upsample 'lanczos'; accepted: bicubic, nearest"),
        ({"model": {"upsample": 4}}, "model.upsample must be str, got 4"),
        ({"model": {"factor": 2}}, "unknown key model.factor"),
        ({"train": {"init_from": ""}}, "train.init_from must name the shapes model"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"schedule": {}}, "unknown sr recipe key 'schedule'"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_value(over, needle):
    with pytest.raises(ConfigError) as e:
        recipe(**over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_packaged_recipe_loads_and_states_its_cpu_time():
    r = load_any_recipe(RECIPES_DIR / "sr-shapes.toml")
    assert r.name == "sr-shapes" and r.family == "sr" and r.train.init_from == "shapes" and r.train.threads == 1
    about = describe(RECIPES_DIR / "sr-shapes.toml")
    assert "min" in about["cpu_time"] and "condiff train sr-shapes --out runs/sr-shapes" in about["comment"]


def test_degradation_is_the_block_mean_and_upsampling_inverts_it_on_block_images():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    blocks = low.repeat_interleave(4, 2).repeat_interleave(4, 3)  # constant 4x4 blocks
    torch.testing.assert_close(degrade(blocks), low, atol=1e-6, rtol=0)
    assert torch.equal(upsample(low, "nearest"), blocks)
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(upsample(flat), torch.full((1, 3, 32, 32), 0.3), atol=1e-6, rtol=0)
    assert float(upsample(torch.tensor([[[[-1.0, 1.0] * 4] * 8] * 3])).abs().max()) <= 1.0  # clipped overshoot


def test_start_equals_the_pretrained_net_whatever_the_condition(model):
    start = load_start("shapes")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    up = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        got = sr_forward(model.module, x, t, up)
        ctx, pooled = start.context.expand(3, -1, -1), start.pooled.expand(3, -1)
        want = shuffle(start.unet(unshuffle(x), t, encoder_hidden_states=ctx, class_labels=pooled).sample)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_gives_identical_outputs(model, tmp_path):
    model.save(tmp_path / "m")
    back = load_sr_model(tmp_path / "m")
    low = degrade(shapes.sample_batch(2, torch.Generator().manual_seed(2)).images)
    assert torch.equal(model.upscale(low, steps=2, seed=3), back.upscale(low, steps=2, seed=3))
    assert not torch.equal(back.upscale(low, steps=2, seed=3), back.upscale(low, steps=2, seed=4))


def test_loading_refuses_pickles_and_malformed_tables(model, tmp_path):
    model.save(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "condiff.json").read_text())
    info["sr"]["factor"] = 2
    (tmp_path / "m" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="factor 4"):
        load_sr_model(tmp_path / "m")
    del info["sr"]["upsample"]
    (tmp_path / "m" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="'upsample' is missing or wrong"):
        load_sr_model(tmp_path / "m")
    with pytest.raises(InputFileError, match="not a sr model folder"):
        load_sr_model(tmp_path)
    model.save(tmp_path / "p")
    torch.save({"x": torch.zeros(1)}, tmp_path / "p" / "unet" / "weights.bin")
    with pytest.raises(InputFileError):
        load_sr_model(tmp_path / "p")


def test_start_file_round_trips_and_refuses_bad_files(tmp_path):
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(4))
    save_start(tmp_path / "x.safetensors", x, 7, "ddim", "bicubic")
    back, steps, solver = load_start_file(tmp_path / "x.safetensors")
    assert torch.equal(back, x) and steps == 7 and solver == "ddim"
    good = {"format": XT_FORMAT, "steps": "7", "solver": "ddim"}
    bad = [
        ({"x_T": torch.zeros(3, 16, 16)}, good),
        ({"x_T": torch.full((3, 32, 32), float("nan"))}, good),
        ({"x_T": torch.zeros(3, 32, 32), "y": torch.zeros(1)}, good),
        ({"noise": torch.zeros(3, 32, 32)}, good),
        ({"x_T": torch.zeros(3, 32, 32)}, {**good, "format": "other"}),
        ({"x_T": torch.zeros(3, 32, 32)}, {**good, "steps": "0"}),
        ({"x_T": torch.zeros(3, 32, 32)}, {**good, "solver": "ddpm"}),
        ({"x_T": torch.zeros(3, 32, 32)}, None),
    ]
    for i, (tensors, meta) in enumerate(bad):
        save_file(tensors, str(tmp_path / f"b{i}.safetensors"), metadata=meta)
        with pytest.raises(InputFileError, match="condiff-sr-xT safetensors file"):
            load_start_file(tmp_path / f"b{i}.safetensors")
    torch.save({"x_T": x}, tmp_path / "p.safetensors")
    with pytest.raises(InputFileError, match="--xT"):
        load_start_file(tmp_path / "p.safetensors")


def test_search_keeps_the_best_candidate_and_its_score_is_the_upscaled_psnr(model):
    a = search_start(model, candidates=3, n_val=4, steps=2, seed=5, batch=5)
    b = search_start(model, candidates=3, n_val=4, steps=2, seed=5, batch=12)
    assert torch.equal(a.x_T, b.x_T) and a.index == b.index
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)  # other batch splits, same maths
    assert a.index == int(torch.argmax(a.scores)) and a.per_pair.shape == (3, 4)
    assert torch.equal(a.x_T, model.random_start(3, 2, 2**43 + 5)[a.index])
    v = validation_batch(4, 5)
    p = psnr(model.upscale(degrade(v.images), a.x_T, steps=2), v.images)
    torch.testing.assert_close(p.double(), a.per_pair[a.index], atol=1e-4, rtol=0)


def test_upscale_refuses_bad_shapes(model):
    with pytest.raises(ConfigError, match=r"\(B, 3, 8, 8\)"):
        model.upscale(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="x_T must be"):
        model.upscale(torch.zeros(2, 3, 8, 8), torch.zeros(3, 16, 16))
    with pytest.raises(ConfigError, match="solver"):
        model.upscale(torch.zeros(1, 3, 8, 8), solver="euler")
    torch.testing.assert_close(F.avg_pool2d(torch.ones(1, 3, 32, 32), 4), torch.ones(1, 3, 8, 8))


def test_training_resumes_exactly(tmp_path):
    r = recipe()
    full = run_trainer(make_sr_trainer(r, tmp_path / "a", progress=False))
    run_trainer(make_sr_trainer(r, tmp_path / "b", progress=False), stop_after=1)
    resumed = run_trainer(make_sr_trainer(r, tmp_path / "b", progress=False), resume=True)
    assert resumed.start_step == 1
    for (name, p), q in zip(full.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(p, q), name
    assert load_sr_model(tmp_path / "b" / "model").info["trained_steps"] == 2
