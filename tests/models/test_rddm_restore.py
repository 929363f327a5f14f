"""The rddm family (condiff.models.rddm_restore): the degradations' exact properties, recipe reading, the start equal
to the pretrained shapes UNet (zero widened weights), save/load, counted network evaluations, the Trainer's loss and
exact resume, and `condiff restore --method rddm|ddpm` on a saved (untrained) model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clikit import ok
from condiff.cli.recipes import RECIPES_DIR
from condiff.cli.tokens import load_any_recipe
from condiff.data import shapes, text
from condiff.data.images import read_image, write_image
from condiff.errors import ConfigError, InputFileError
from condiff.models import rddm_restore as rr
from condiff.models.base import load_model
from condiff.tasks import rddm


def _recipe(kind="rddm", **train):
    return rr.rddm_recipe_from_dict(
        {"name": f"t-{kind}", "family": "rddm", "model": {"kind": kind}, "train": {"batch_size": 2, **train}}
    )


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {k: rr.build_restore_model(_recipe(k)) for k in rr.KINDS}


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    d = tmp_path_factory.mktemp("rddm")
    for k, m in built.items():
        m.save(d / k / "model")
    b = shapes.sample_batch(1, torch.Generator().manual_seed(5))
    write_image(rr.degrade(b.images, "denoise", torch.Generator().manual_seed(1)).clamp(-1, 1), d / "in.png")
    return d


def _images(n=4, seed=0):
    return shapes.sample_batch(n, torch.Generator().manual_seed(seed)).images


# degradations -------------------------------------------------------------------------------------------------
def test_denoise_adds_exactly_sigma_times_the_generators_normal_draw():
    x = _images()
    y = rr.degrade(x, "denoise", torch.Generator().manual_seed(3))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(y - x, rr.NOISE_SIGMA * z, rtol=0, atol=1e-6)


def test_blur_kernel_is_a_normalised_symmetric_gaussian_and_blurs_a_delta_into_itself():
    k = rr.blur_kernel().double()
    assert k.shape == (2 * rr.BLUR_RADIUS + 1,) * 2
    assert abs(float(k.sum()) - 1) < 1e-6
    torch.testing.assert_close(k, k.flip(0))
    torch.testing.assert_close(k, k.T)
    # the ratio of two entries is the Gaussian's: k[r, r + 1] / k[r, r] = exp(-1 / (2 sigma^2))
    r = rr.BLUR_RADIUS
    assert abs(float(k[r, r + 1] / k[r, r]) - math.exp(-1 / (2 * rr.BLUR_SIGMA**2))) < 1e-6
    delta = torch.zeros(1, 3, 32, 32)
    delta[:, :, 16, 16] = 1.0
    out = rr.blur(delta)
    torch.testing.assert_close(out[0, 1, 16 - r : 17 + r, 16 - r : 17 + r], k.float(), rtol=0, atol=1e-7)
    assert float(out.sum()) == pytest.approx(3.0, abs=1e-5)  # away from the border no mass is lost


def test_blur_keeps_constant_images_and_ignores_the_generator():
    c = torch.full((2, 3, 32, 32), 0.3)
    torch.testing.assert_close(rr.blur(c), c, rtol=0, atol=1e-6)
    x = _images()
    a = rr.degrade(x, "deblur", torch.Generator().manual_seed(0))
    b = rr.degrade(x, "deblur", torch.Generator().manual_seed(99))
    assert torch.equal(a, b)


def test_inpaint_fills_exactly_one_box_per_image_and_keeps_every_other_pixel():
    x = _images(8)
    y = rr.degrade(x, "inpaint", torch.Generator().manual_seed(4))
    m = rr.box_masks(8, torch.Generator().manual_seed(4))
    assert m.shape == (8, 1, 32, 32) and m.flatten(1).sum(1).tolist() == [rr.BOX**2] * 8
    rows, cols = m[:, 0].any(2), m[:, 0].any(1)  # the box is one contiguous BOX x BOX square
    assert rows.sum(1).tolist() == cols.sum(1).tolist() == [rr.BOX] * 8
    assert torch.equal(y, torch.where(m, torch.full_like(x, rr.FILL), x))


def test_mixed_degradation_rows_equal_the_single_degradations_drawn_in_order():
    x = _images(6)
    task = torch.tensor([0, 1, 2, 2, 1, 0])
    mixed = rr.degrade_mixed(x, task, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    each = [rr.degrade(x, name, g) for name in rr.DEGRADATIONS]
    for i, t in enumerate(task.tolist()):
        assert torch.equal(mixed[i], each[t][i])


def test_psnr_of_a_known_error():
    a = torch.zeros(1, 3, 4, 4)
    assert float(rr.psnr(a + 0.2, a)[0]) == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-4)


def test_unknown_degradation_is_one_line():
    with pytest.raises(ConfigError, match="accepted: denoise, deblur, inpaint"):
        rr.degrade(_images(1), "sr", None)


# recipes ------------------------------------------------------------------------------------------------------
def test_shipped_recipes_differ_only_in_the_model_table():
    a, b = (load_any_recipe(RECIPES_DIR / f"{n}.toml") for n in ("rddm-shapes", "ddpm-restore-shapes"))
    assert (a.model.kind, b.model.kind) == ("rddm", "ddpm") and a.family == b.family == "rddm"
    assert (a.model.sum_scale, a.model.loss, a.model.objective, b.model.prediction) == (0.01, "l1", "pred_res", "v")
    assert a.train == b.train and a.train.threads == 1 and a.train.init_from == "shapes"


@pytest.mark.parametrize(
    "model,needles",
    [
        ({"kind": "sde"}, ("model.kind", "'sde'", "accepted: rddm, ddpm")),
        ({"sum_scale": 0.0}, ("model.sum_scale",)),
        ({"sum_scale": 1.5}, ("model.sum_scale", "1.5")),
        ({"loss": "l3"}, ("model.loss", "'l3'", "accepted: l1, l2")),
        ({"kind": "ddpm", "sum_scale": 0.5}, ("kind 'ddpm'", "model.sum_scale")),
        ({"kind": "ddpm", "loss": "l2"}, ("kind 'ddpm'", "model.loss")),
        ({"objective": "pred_x0"}, ("model.objective", "'pred_x0'", "accepted: pred_res_noise, pred_res")),
        ({"kind": "ddpm", "objective": "pred_res"}, ("model.objective is RDDM's", "'pred_res'")),
        ({"kind": "ddpm", "prediction": "x0"}, ("model.prediction", "'x0'", "accepted: v, eps")),
        ({"prediction": "eps"}, ("model.prediction is the ddpm kind's", "'eps'")),
    ],
)
def test_recipe_errors_name_the_bad_value(model, needles):
    with pytest.raises(ConfigError) as e:
        rr.rddm_recipe_from_dict({"name": "x", "family": "rddm", "model": model})
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


# the start ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_start_computes_the_pretrained_network_whatever_the_degraded_input(built):
    src = load_model("shapes")
    cond = src.family.encode(src.module, text.null_tokens(1))
    unet = src.module["unet"].eval()
    g = torch.Generator().manual_seed(0)
    x, x_in = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([5.0, 400.0, 999.0])
    ref = rr.shuffle(
        unet(
            rr.unshuffle(x),
            t,
            encoder_hidden_states=cond["encoder_hidden_states"].expand(3, -1, -1),
            class_labels=cond["pooled"].expand(3, -1),
        ).sample
    )
    switch = torch.tensor([0, 1, 2])
    for kind, m in built.items():
        out = rr.restore_forward(m.module.eval(), x, x_in, t, switch)
        torch.testing.assert_close(out[:, :3], ref, rtol=1e-5, atol=1e-5)
        if kind == "rddm":
            assert out.shape[1] == 6 and torch.equal(out[:, 3:], torch.zeros_like(ref))  # residual head: zero
        else:
            assert out.shape[1] == 3


def test_rddm_schedule_is_the_papers_restoration_one(built):
    s = built["rddm"].rddm_schedule
    assert s.num_steps == 1000
    assert float(s.alpha_bar[-1]) == pytest.approx(1.0, abs=1e-12)
    assert float(s.beta_bar[-1]) ** 2 == pytest.approx(0.01, abs=1e-12)


def test_ddpm_kinds_wrap_their_prediction(built):
    assert built["ddpm"].prediction.name == "v" and built["ddpm"].config["prediction"] == "v"
    assert built["rddm"].config["prediction"] == "res_noise"


@pytest.mark.parametrize("kind", rr.KINDS)
def test_restore_counts_one_network_evaluation_per_step_and_repeats_by_seed(built, kind):
    m = built[kind]
    x_in = rr.degrade(_images(2), "deblur")
    a, b = m.restore(x_in, "deblur", 3, seed=1), m.restore(x_in, "deblur", 3, seed=1)
    assert a.nfe == 3 and torch.equal(a.x, b.x) and float(a.x.abs().max()) <= 1


# save and load ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", rr.KINDS)
def test_save_load_roundtrip(built, saved, kind):
    m = rr.load_restore_model(saved / kind)  # a run folder: its model/ is read
    assert m.config == json.loads(json.dumps(built[kind].config))
    for (n1, p1), (n2, p2) in zip(built[kind].module.state_dict().items(), m.module.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert rr.check_model_kind(saved / kind, kind) == saved / kind / "model"
    with pytest.raises(InputFileError, match=f"is a model of kind '{kind}'"):
        rr.check_model_kind(saved / kind, "ddpm" if kind == "rddm" else "rddm")


def test_load_refuses_a_changed_table(saved, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(saved / "rddm" / "model", d)
    info = json.loads((d / "condiff.json").read_text())
    info["rddm"]["degradations"]["noise_sigma"] = 0.1
    (d / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="degradations"):
        rr.load_restore_model(d)
    info["rddm"]["degradations"] = rr.degradation_config()
    info["rddm"]["kind"] = "ddpm"  # a ddpm kind cannot predict residual and noise
    (d / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="prediction"):
        rr.load_restore_model(d)
    info["rddm"]["prediction"] = "v"  # a ddpm table over rddm networks (24 outputs)
    (d / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="24 in, 12 out"):
        rr.load_restore_model(d)
    with pytest.raises(InputFileError, match="not a rddm model folder"):
        rr.load_restore_model(tmp_path)


# training -----------------------------------------------------------------------------------------------------
def test_rddm_loss_at_the_start_is_the_l1_of_the_targets_against_the_start_outputs(built):
    """The Trainer's loss is rddm.loss on (residual, noise) at the drawn t; recomputed from the same draws."""
    r = _recipe("rddm")
    m = built["rddm"]
    m.module.train()
    fn = rr.restore_loss_fn(m, r)
    loss, _ = fn(0, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    b = shapes.sample_batch(2, g)
    task = torch.randint(3, (2,), generator=g)
    x_in = rr.degrade_mixed(b.images, task, g)
    t = torch.randint(1000, (2,), generator=g)
    eps = torch.randn(b.images.shape, generator=g)
    x_t = rddm.q_sample(m.rddm_schedule, b.images, x_in, t, eps)
    with torch.no_grad():
        out = m.rddm_net()(x_t, t, x_in, {"switch": task})
    expect = (out["res"] - (x_in - b.images)).abs().mean() + (out["noise"] - eps).abs().mean()
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-5)
    m.module.eval()


def test_pred_res_loss_is_the_l1_of_the_residual_alone():
    """objective pred_res (the paper's SM-Res): the Trainer's loss is the L1 of the residual head alone."""
    torch.manual_seed(0)
    r = rr.rddm_recipe_from_dict(
        {"name": "t-res", "family": "rddm", "model": {"objective": "pred_res"}, "train": {"batch_size": 2}}
    )
    m = rr.build_restore_model(r)
    assert m.objective == "pred_res" and m.config["objective"] == "pred_res"
    with torch.no_grad():  # a non-zero residual head, so the loss is not just the L1 of the target
        m.module["unet"].conv_out.weight[12:].normal_(0, 0.01)
    loss, _ = rr.restore_loss_fn(m, r)(0, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    b = shapes.sample_batch(2, g)
    task = torch.randint(3, (2,), generator=g)
    x_in = rr.degrade_mixed(b.images, task, g)
    t = torch.randint(1000, (2,), generator=g)
    eps = torch.randn(b.images.shape, generator=g)
    x_t = rddm.q_sample(m.rddm_schedule, b.images, x_in, t, eps)
    with torch.no_grad():
        out = m.rddm_net()(x_t, t, x_in, {"switch": task})
    assert set(out) == {"res"}
    expect = (out["res"] - (x_in - b.images)).abs().mean()
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-5)


@torch.no_grad()
def test_pred_res_one_step_restoration_is_the_input_minus_the_predicted_residual():
    """With the noise solved from I_t, the last step to the clean point lands on I_in - res_hat exactly."""
    torch.manual_seed(0)
    r = rr.rddm_recipe_from_dict({"name": "t-res", "family": "rddm", "model": {"objective": "pred_res"}})
    m = rr.build_restore_model(r)
    m.module["unet"].conv_out.weight[12:].normal_(0, 0.01)
    m.module.eval()
    x_in = rr.degrade(_images(2), "deblur")
    got = m.restore(x_in, "deblur", 1, seed=3)
    _, bb = m.rddm_schedule.at(999)
    x_T = x_in + float(bb) * torch.randn(x_in.shape, generator=torch.Generator().manual_seed(3))
    res = m.rddm_net()(x_T, torch.full((2,), 999), x_in, {"switch": m.switch("deblur", 2)})["res"]
    assert got.nfe == 1
    torch.testing.assert_close(got.x, (x_in - res).clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_ddpm_sampling_options_are_checked_and_count_evaluations(built):
    x_in = rr.degrade(_images(2), "deblur")
    for solver in rr.DDPM_SOLVERS:
        for threshold in ("dynamic", "clip", "none"):
            assert built["ddpm"].restore(x_in, "deblur", 3, 1, threshold=threshold, solver=solver).nfe == 3
    with pytest.raises(ConfigError, match="solver.*'heun'.*accepted: dpmpp-2m, ddim"):
        built["ddpm"].restore(x_in, "deblur", 3, solver="heun")
    with pytest.raises(ConfigError, match="threshold"):
        built["ddpm"].restore(x_in, "deblur", 3, threshold="soft")


def test_training_resumes_exactly(tmp_path):
    r = _recipe("rddm", steps=2, ckpt_every=1, eval_every=0)
    a = rr.make_rddm_trainer(r, tmp_path / "a", progress=False).run()
    b = rr.make_rddm_trainer(r, tmp_path / "b", progress=False).run(stop_after=1)
    c = rr.make_rddm_trainer(r, tmp_path / "b", progress=False)
    assert c.resume() is not None and c.step == 1
    c.run()
    for p, q in zip(a.module.parameters(), c.module.parameters()):
        assert torch.equal(p, q)
    assert b.step == 1


# the command --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,task", [("rddm", "denoise"), ("ddpm", "inpaint")])
def test_restore_command_writes_image_compare_and_sidecar(saved, tmp_path, capsys, kind, task):
    out = tmp_path / "r.png"
    argv = ["restore", "--method", kind, "--model", str(saved / kind), "--task", task, "--image", str(saved / "in.png")]
    stdout = ok([*argv, "--out", str(out), "--steps", "2", "--seed", "3"], capsys)
    assert "2 network evaluations" in stdout
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["method"] == kind and rec["task"] == task and rec["nfe"] == 2 and rec["steps"] == 2
    assert rec["reproduce"].startswith(f"condiff restore --method {kind} --task {task} ")
    assert (tmp_path / "r_compare.png").is_file()
    # the written image is the model's restoration of the input, 8-bit rounded
    m = rr.load_restore_model(saved / kind)
    x_in = read_image(saved / "in.png", (3, 32, 32)).tensor
    expect = m.restore(x_in, task, 2, 3).x
    got = read_image(out, (3, 32, 32)).tensor
    assert float((got - expect).abs().max()) <= 1 / 127.5 + 1e-6
