"""The dense (Lotus, eps-model) and UniCon families on shapes: strict recipes with one-line errors, the start equals the
bundled shapes UNet on its old channels, Lotus predicts in exactly one network evaluation, save/load round trips
(pickles and malformed tables refused), exact Trainer resume, and the CLI's recipe dispatch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from condiff.cli.recipes import RECIPES_DIR, describe
from condiff.cli.tokens import load_any_recipe
from condiff.cli.train import run_trainer, train_recipe
from condiff.data import shapes
from condiff.errors import ConfigError, InputFileError
from condiff.models.dense import (
    RECON,
    TASKS,
    annotation,
    build_dense_model,
    dense_forward,
    dense_recipe_from_dict,
    evaluate_dense,
    load_dense_model,
    load_start,
    make_dense_trainer,
    read_map,
)
from condiff.models.unicon import (
    build_unicon_model,
    evaluate_unicon,
    load_unicon_model,
    make_unicon_trainer,
    mask_map,
    unicon_forward,
    unicon_recipe_from_dict,
)

TRAIN = {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 1, "ckpt_every": 2, "keep_checkpoints": 5}


def dense(**over):
    d = {"name": "tiny-dense", "family": "dense", "model": {"kind": "lotus", "reconstruction": True}, "train": TRAIN}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
    return dense_recipe_from_dict(d)


def unicon(**over):
    d = {"name": "tiny-unicon", "family": "unicon", "model": {"p_clean": 0.25}, "train": TRAIN}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k in d else v
    return unicon_recipe_from_dict(d)


@pytest.fixture(scope="module")
def start():
    return load_start("shapes")


@pytest.fixture(scope="module")
def lotus():
    torch.manual_seed(0)
    return build_dense_model(dense())


@pytest.fixture(scope="module")
def joint():
    torch.manual_seed(0)
    return build_unicon_model(unicon())


BATCH = shapes.sample_batch(3, torch.Generator().manual_seed(0))


# recipes --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,over,needle",
    [
        (dense, {"family": "unicon"}, "'unicon'"),
        (dense, {"colour": 1}, "'colour'"),
        (dense, {"model": {"kind": "marigold"}}, "unknown model.kind 'marigold'; accepted: lotus, eps"),
        (dense, {"model": {"kind": "eps"}}, "kind 'eps' takes false"),
        (dense, {"model": {"reconstruction": 1}}, "model.reconstruction must be bool, got 1"),
        (dense, {"model": {"depth": 2}}, "unknown key model.depth"),
        (dense, {"train": {"init_from": ""}}, "train.init_from must name the shapes model"),
        (dense, {"train": {"init_from": 3}}, "train.init_from must be str, got 3"),
        (dense, {"train": {"lr": -1.0}}, "train.lr"),
        (dense, {"name": "no spaces"}, "'no spaces'"),
        (dense, {"schedule": {}}, "unknown dense recipe key 'schedule'"),
        (unicon, {"model": {"p_clean": 0.6}}, "model.p_clean must be a finite number in [0, 0.5], got 0.6"),
        (unicon, {"model": {"p_clean": "x"}}, "model.p_clean must be float, got 'x'"),
        (unicon, {"model": {"map": "depth"}}, "unknown key model.map"),
        (unicon, {"train": {"batch_size": 0}}, "train.batch_size"),
        (unicon, {"family": "dense"}, "'dense'"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_value(make, over, needle):
    with pytest.raises(ConfigError) as e:
        make(**over)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["lotus", "dense-eps", "unicon"])
def test_packaged_recipes_load_and_state_their_cpu_time(name):
    r = load_any_recipe(RECIPES_DIR / f"{name}.toml")
    assert r.name == name and r.train.init_from == "shapes" and r.train.threads == 1
    about = describe(RECIPES_DIR / f"{name}.toml")
    assert "min" in about["cpu_time"] and f"condiff train {name} --out runs/{name}" in about["comment"]


def test_lotus_and_its_baseline_differ_only_in_kind_and_reconstruction():
    a, b = (load_any_recipe(RECIPES_DIR / f"{n}.toml").to_dict() for n in ("lotus", "dense-eps"))
    for d in (a, b):
        d.pop("name"), d.pop("model")
    assert a == b


# the start equals the pretrained net ----------------------------------------------------------------------------
def pretrained(start, images, t):
    n = images.shape[0]
    with torch.no_grad():
        out = start.unet(
            F.pixel_unshuffle(images, 2),
            t,
            encoder_hidden_states=start.context.expand(n, -1, -1),
            class_labels=start.pooled.expand(n, -1),
        ).sample
    return F.pixel_shuffle(out, 2)


def test_dense_start_equals_the_pretrained_net_on_the_image_channels(lotus, start):
    t = torch.tensor([999.0, 400.0, 5.0])
    want = pretrained(start, BATCH.images, t)
    with torch.no_grad():
        for switch in range(RECON + 1):
            y = torch.randn(3, 3, 32, 32)
            got = dense_forward(lotus.module, BATCH.images, y, t, torch.full((3,), switch))
            assert torch.equal(got, want)


def test_unicon_start_is_the_pretrained_net_on_the_image_and_zero_on_the_mask(joint, start):
    t = torch.tensor([999.0, 400.0, 5.0])
    want = pretrained(start, BATCH.images, t)
    with torch.no_grad():
        for t_map in (torch.full((3,), -1.0), torch.tensor([0.0, 500.0, 999.0])):
            img, m = unicon_forward(joint.module, BATCH.images, torch.randn(3, 1, 32, 32), t, t_map)
            assert torch.equal(img, want) and torch.equal(m, torch.zeros(3, 1, 32, 32))


# network evaluations --------------------------------------------------------------------------------------------
def count_forwards(module):
    calls = []
    handle = module["unet"].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_lotus_predicts_in_exactly_one_network_evaluation(lotus):
    calls, handle = count_forwards(lotus.module)
    try:
        p = lotus.predict(BATCH.images, "mask")
    finally:
        handle.remove()
    assert p.nfe == 1 and len(calls) == 1 and p.x.shape == (3, 3, 32, 32)
    with pytest.raises(ConfigError, match="one network evaluation; --steps must be 1, got 3"):
        lotus.predict(BATCH.images, "mask", steps=3)
    with pytest.raises(ConfigError, match="unknown task 'normals'; accepted: depth, mask"):
        lotus.predict(BATCH.images, "normals")


def test_the_eps_model_and_unicon_take_one_evaluation_per_step(joint):
    eps = build_dense_model(dense(model={"kind": "eps", "reconstruction": False}))
    calls, handle = count_forwards(eps.module)
    try:
        assert eps.predict(BATCH.images, "depth", steps=3).nfe == 3 and len(calls) == 3
    finally:
        handle.remove()
    clipped = eps.predict(BATCH.images, "depth", steps=2, threshold="clip").x
    assert clipped.abs().max() <= 1 and eps.predict(BATCH.images, "depth", steps=2, threshold="none").nfe == 2
    with pytest.raises(ConfigError, match="unknown threshold 'soft'; accepted: dynamic, clip, none"):
        eps.predict(BATCH.images, "depth", steps=2, threshold="soft")
    calls, handle = count_forwards(joint.module)
    try:
        maps, nfe = joint.image_to_map(BATCH.images, steps=2)
        images, nfe2 = joint.map_to_image(mask_map(BATCH.masks), steps=2, guidance=2.0)  # CFG: one batched call
        pi, pm, nfe3 = joint.joint(2, steps=2)
    finally:
        handle.remove()
    assert (nfe, nfe2, nfe3, len(calls)) == (2, 2, 2, 6)
    assert maps.shape == (3, 1, 32, 32) and images.shape == (3, 3, 32, 32) and pm.shape == (2, 1, 32, 32)


def test_maps_are_the_renders_depth_and_mask():
    task = torch.tensor([0, 1, 0])
    y = annotation(BATCH, task)
    assert y.shape == (3, 3, 32, 32) and torch.equal(y[:, 0], y[:, 2])
    assert torch.allclose(read_map(y[[0, 2]], "depth"), BATCH.depth[[0, 2]], atol=1e-6)
    assert torch.equal(read_map(y[[1]], "mask"), BATCH.masks[[1]])


# saving and loading ---------------------------------------------------------------------------------------------
def test_save_load_round_trips_give_identical_outputs(lotus, joint, tmp_path):
    lotus.save(tmp_path / "d", {"note": 1})
    back = load_dense_model(tmp_path / "d")
    assert back.config == lotus.config and back.info["note"] == 1 and back.kind == "lotus"
    assert torch.equal(back.predict(BATCH.images, "depth").x, lotus.predict(BATCH.images, "depth").x)
    joint.save(tmp_path / "u")
    u = load_unicon_model(tmp_path / "u")
    assert torch.equal(u.image_to_map(BATCH.images, 2)[0], joint.image_to_map(BATCH.images, 2)[0])


def test_loading_refuses_pickles_and_malformed_tables(lotus, joint, tmp_path):
    lotus.save(tmp_path / "d")
    torch.save({"x": torch.zeros(1)}, tmp_path / "d" / "unet" / "extra.bin")
    with pytest.raises(InputFileError, match="extra.bin"):
        load_dense_model(tmp_path / "d")
    lotus.save(tmp_path / "e")
    info = json.loads((tmp_path / "e" / "condiff.json").read_text())
    info["dense"]["kind"] = 3
    (tmp_path / "e" / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="'kind' is missing or wrong"):
        load_dense_model(tmp_path / "e")
    with pytest.raises(InputFileError, match="not a dense model"):
        load_dense_model(tmp_path)
    joint.save(tmp_path / "u")
    with pytest.raises(InputFileError, match="not a dense model"):
        load_dense_model(tmp_path / "u")
    with pytest.raises(InputFileError, match="not a unicon model"):
        load_unicon_model(tmp_path / "d")


# training -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["lotus", "unicon"])
def test_training_resumes_exactly(family, tmp_path):
    r, make = (dense(), make_dense_trainer) if family == "lotus" else (unicon(), make_unicon_trainer)
    full = run_trainer(make(r, tmp_path / "a", progress=False))
    run_trainer(make(r, tmp_path / "b", progress=False), stop_after=2)
    resumed = run_trainer(make(r, tmp_path / "b", progress=False), resume=True)
    assert resumed.start_step == 2
    for (name, p), q in zip(full.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(p, q), name
    load = load_dense_model if family == "lotus" else load_unicon_model
    assert load(tmp_path / "b" / "model").info["trained_steps"] == 4


def test_train_recipe_dispatches_both_families_and_scores_them(tmp_path):
    train = {"steps": 2, "eval_every": 2, "eval_n": 4, "eval_steps": 2}
    tr = train_recipe(dense(train=train), tmp_path / "d", progress=False)
    assert tr.step == 2 and set(tr.log[-1]) >= {"mask_iou", "depth_abs_rel", "depth_rmse", "annotation"}
    tr = train_recipe(unicon(train=train), tmp_path / "u", progress=False)
    assert set(tr.log[-1]) >= {"image_to_map_iou", "map_to_image_all", "joint_consistency", "loss_a", "loss_b"}
    m = load_dense_model(tmp_path / "d" / "model")
    res = evaluate_dense(m, 4, seed=0)
    assert res["nfe"] == 1 and set(res["depth"]) == {"abs_rel", "rmse", "rmse_all", "within_0.05"}
    assert 0 <= res["mask_iou"] <= 1 and "reconstruction_rmse" in res
    res = evaluate_unicon(load_unicon_model(tmp_path / "u" / "model"), 4, seed=0, steps=2)
    assert set(res["map_to_image"]) == {"shape", "size", "position", "all", "mask_iou", "guidance"}
    assert TASKS == ("depth", "mask")
