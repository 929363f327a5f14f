"""condiff.models.diffusevae: recipes (the shipped ones and one-line refusals), the conv VAE's shapes, the widened
start computing exactly the bundled shapes UNet whatever the reconstruction, save/load round trips, seeded
sampling and exact resume of the VAE's training."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from unittest import mock

import pytest
import torch
from torch import nn

from condiff.cli.recipes import RECIPES_DIR
from condiff.errors import ConfigError, InputFileError
from condiff.models import diffusevae as dv

TINY = {"latent_dim": 3, "width": 4, "sigma": 0.5, "beta": 1.0}


def tiny_vae_recipe(**train) -> dv.DiffuseVAERecipe:
    t = {"steps": 4, "batch_size": 4, "warmup": 1, "ckpt_every": 2, "eval_every": 0, **train}
    return dv.diffusevae_recipe_from_dict(
        {"name": "tiny", "family": "diffusevae", "model": {"kind": "vae", **TINY}, "train": t}
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny untrained VAE saved as a run folder (model/ inside), and a DiffuseVAE built on it."""
    d = tmp_path_factory.mktemp("dv")
    dv.build_diffusevae_model(tiny_vae_recipe()).save(d / "vae" / "model")
    r = dv.diffusevae_recipe_from_dict(
        {"name": "d", "family": "diffusevae", "model": {"kind": "ddpm", "vae": str(d / "vae")}}
    )
    m = dv.build_diffusevae_model(r)
    m.save(d / "ddpm")
    return d, m


def test_shipped_recipes_parse():
    vae = dv.diffusevae_recipe_from_dict(tomllib.loads((RECIPES_DIR / "diffusevae-vae.toml").read_text()))
    ddpm = dv.diffusevae_recipe_from_dict(tomllib.loads((RECIPES_DIR / "diffusevae.toml").read_text()))
    assert vae.model.kind == "vae" and vae.train.init_from == "" and vae.train.threads == 1
    assert ddpm.model.kind == "ddpm" and ddpm.model.vae == "runs/diffusevae-vae" and ddpm.train.init_from == "shapes"
    assert ddpm.train.threads == 1


BAD = [
    ({"model": {"kind": "gan"}}, "model.kind 'gan'"),
    ({"model": {"kind": "vae", "latent_dim": 0}}, "model.latent_dim"),
    ({"model": {"kind": "vae", "width": 10_000}}, "model.width"),
    ({"model": {"kind": "vae", "sigma": 0.0}}, "model.sigma must be a positive finite number, got 0.0"),
    ({"model": {"kind": "vae", "sigma": float("inf")}}, "model.sigma"),
    ({"model": {"kind": "vae", "beta": -1.0}}, "model.beta must be a finite number >= 0, got -1.0"),
    ({"model": {"kind": "vae", "vae": "runs/x"}}, "kind 'vae' takes none, got 'runs/x'"),
    ({"model": {"kind": "vae"}, "train": {"init_from": "shapes"}}, "train.init_from starts a kind 'ddpm'"),
    ({"model": {"kind": "ddpm"}}, "model.vae must name the trained VAE"),
    ({"model": {"kind": "ddpm", "vae": "v", "sigma": 0.1}}, "model.sigma belongs to the VAE's recipe"),
    ({"model": {"kind": "ddpm", "vae": "v"}, "train": {"init_from": " "}}, "train.init_from must name"),
    ({"model": {"kind": "vae", "latent": 3}}, "unknown key model.latent"),
    ({"model": {"kind": "vae"}, "extra": 1}, "unknown diffusevae recipe key 'extra'"),
    ({"model": {"kind": "vae", "latent_dim": 2.5}}, "model.latent_dim"),
    ({"family": "dense"}, "'dense'"),
]


@pytest.mark.parametrize("over,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_recipes_are_one_line_config_errors(over, needle):
    data = {"name": "x", "family": "diffusevae", **over}
    with pytest.raises(ConfigError) as e:
        dv.diffusevae_recipe_from_dict(data)
    msg = str(e.value)
    assert needle in msg and len(msg.splitlines()) == 1, msg


def test_conv_vae_shapes_and_range():
    vae = dv.ConvVAE(5, 4)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 5)
    y = vae.decode(mu)
    assert y.shape == (3, 3, 32, 32) and y.abs().max() <= 1


def test_the_start_is_the_bundled_unet_whatever_the_reconstruction(saved):
    from condiff.data import text
    from condiff.models.base import load_model

    _, m = saved
    src = load_model("shapes")
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        cond = src.family.encode(src.module, text.null_tokens(2))
        want = dv.shuffle(src.module["unet"](dv.unshuffle(x_t), t, **cond_kwargs(cond)).sample)
        a = dv.ddpm_forward(m.module, x_t, torch.randn(2, 3, 32, 32, generator=g), t)
        b = dv.ddpm_forward(m.module, x_t, torch.zeros(2, 3, 32, 32), t)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)


def cond_kwargs(cond):
    return {"encoder_hidden_states": cond["encoder_hidden_states"], "class_labels": cond["pooled"]}


def test_save_load_roundtrip_and_seeded_sampling(saved):
    d, m = saved
    for folder, kind in ((d / "vae", "vae"), (d / "ddpm", "ddpm")):
        back = dv.load_diffusevae_model(dv.find_model(folder))
        assert back.kind == kind and back.latent_dim == 3
        mine = m.module["vae"].state_dict()
        for k, v in back.module["vae"].state_dict().items():
            assert torch.equal(v, mine[k]), k
    back = dv.load_diffusevae_model(d / "ddpm")
    for part in ("unet", "extras"):
        mine = m.module[part].state_dict()
        assert all(torch.equal(v, mine[k]) for k, v in back.module[part].state_dict().items())
    x_hat, x, nfe = back.sample(3, seed=5, steps=2)
    x_hat2, x2, _ = back.sample(3, seed=5, steps=2)
    assert torch.equal(x, x2) and torch.equal(x_hat, x_hat2) and nfe == 2  # DPM-Solver++(2M): one evaluation per step
    z = torch.randn(3, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x_hat, back.vae.decode(z))
    # the refiner's noise is drawn for all rows first: each row gets the same noise whatever the batching
    with mock.patch.object(back, "refine", lambda x_hat, noise, steps, z=None, guidance=1.0: (noise, 1)):
        noise_2 = back.generate(z, 6, steps=2, batch=2)[1]
        noise_3 = back.generate(z, 6, steps=2, batch=3)[1]
    assert torch.equal(noise_2, noise_3)
    assert torch.equal(noise_3, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6)))
    vae_only = dv.load_diffusevae_model(d / "vae" / "model")
    xv, none, zero = vae_only.sample(3, seed=5)
    assert none is None and zero == 0 and torch.equal(xv, x_hat.clamp(-1, 1))
    with pytest.raises(ConfigError, match="needs a DiffuseVAE model"):
        vae_only.refine(xv, torch.zeros_like(xv))


def test_interpolation_rows_share_noise_and_start_at_the_first_image(saved):
    from condiff.data import shapes

    d, _ = saved
    m = dv.load_diffusevae_model(d / "ddpm")
    imgs = shapes.sample_batch(4, torch.Generator().manual_seed(0)).images
    x_hat, x, nfe = m.interpolate(imgs[:2], imgs[2:], 3, seed=0, steps=1)
    assert x_hat.shape == x.shape == (6, 3, 32, 32) and nfe == 1
    torch.testing.assert_close(x_hat[0], m.vae.decode(m.encode_mean(imgs[:1]))[0])
    torch.testing.assert_close(x_hat[5], m.vae.decode(m.encode_mean(imgs[3:4]))[0])


def test_loading_refuses_broken_folders(saved, tmp_path):
    d, _ = saved
    with pytest.raises(InputFileError, match="holds no DiffuseVAE model"):
        dv.find_model(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    info = json.loads((d / "vae" / "model" / "condiff.json").read_text())
    del info["diffusevae"]["sigma"]
    (broken / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="'sigma' is missing or wrong"):
        dv.load_diffusevae_model(broken)
    info["diffusevae"]["kind"] = "gan"
    (broken / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match="kind one of vae, ddpm"):
        dv.load_diffusevae_model(broken)
    r = dv.diffusevae_recipe_from_dict(
        {"name": "d", "family": "diffusevae", "model": {"kind": "ddpm", "vae": str(d / "ddpm")}}
    )
    with pytest.raises(ConfigError, match="it must be a VAE"):
        dv.build_diffusevae_model(r)


def test_vae_training_resumes_exactly(tmp_path):
    r = tiny_vae_recipe()
    full = dv.make_diffusevae_trainer(r, tmp_path / "a", progress=False).run()
    part = dv.make_diffusevae_trainer(r, tmp_path / "b", progress=False).run(stop_after=2)
    assert part.step == 2
    resumed = dv.make_diffusevae_trainer(r, tmp_path / "b", progress=False)
    assert resumed.resume() is not None and resumed.step == 2
    resumed.run()
    for (k, v), w in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(v, w), k
    out = resumed.export()
    back = dv.load_diffusevae_model(out)
    assert back.info["trained_steps"] == 4 and isinstance(back.module, nn.ModuleDict)


def test_ddpm_loss_trains_only_the_unet_and_extras(saved):
    d, _ = saved
    r = dv.diffusevae_recipe_from_dict(
        {
            "name": "d",
            "family": "diffusevae",
            "model": {"kind": "ddpm", "vae": str(d / "vae")},
            "train": {"steps": 1, "batch_size": 2, "warmup": 1},
        }
    )
    tr = dv.make_diffusevae_trainer(r, d / "run-ddpm", progress=False)
    assert tr.names and not any(n.startswith("vae.") for n in tr.names)
    before = {k: v.clone() for k, v in tr.module["vae"].state_dict().items()}
    loss = tr.train_step()
    assert loss > 0 and all(torch.equal(v, before[k]) for k, v in tr.module["vae"].state_dict().items())


def test_fitted_prior_roundtrips_and_draws_the_mixture(saved, tmp_path):
    """prior 'gmm': the folder holds the mixture fitted to the VAE's posterior samples; loaded back it is the same,
    samples draw z from it (and prior 'normal' from N(0, I)); a folder whose prior disagrees is refused."""
    from condiff.tasks.diffusevae import mixture_latents

    d, _ = saved
    r = dv.diffusevae_recipe_from_dict(
        {"name": "d", "family": "diffusevae", "model": {"kind": "ddpm", "vae": str(d / "vae"), "prior": "gmm",
                                                       "prior_components": 2}}
    )  # fmt: skip
    with mock.patch.object(dv, "PRIOR_FIT_N", 64):
        m = dv.build_diffusevae_model(r)
    m.save(tmp_path / "gmm")
    back = dv.load_diffusevae_model(tmp_path / "gmm")
    assert back.prior == "gmm" and back.module["prior"].config.components == 2
    p = back.module["prior"]
    for name, v in m.module["prior"].state_dict().items():
        assert torch.equal(v, p.state_dict()[name]), name
    assert not any(q.requires_grad for q in p.parameters())  # frozen: the Trainer never updates the prior
    x_hat, _, _ = back.sample(4, seed=2, refine=False)
    z = mixture_latents(4, p.weights, p.means, p.scale_tril, torch.Generator().manual_seed(2))
    torch.testing.assert_close(x_hat, back.vae.decode(z).clamp(-1, 1))
    x_hat_n, _, _ = back.sample(4, seed=2, refine=False, prior="normal")
    torch.testing.assert_close(x_hat_n, back.vae.decode(torch.randn(4, 3, generator=torch.Generator().manual_seed(2))))
    with pytest.raises(ConfigError, match="has no fitted latent prior"):
        dv.load_diffusevae_model(d / "ddpm").latents(2, torch.Generator(), "gmm")
    refused_after_edit(tmp_path / "gmm", {"prior_components": 3}, "prior's latent_dim or components differ")
    refused_after_edit(tmp_path / "gmm", {"prior": "flow"}, "prior must be one of normal, gmm")


def refused_after_edit(folder, changes: dict, match: str) -> None:
    """A saved model whose condiff.json 'diffusevae' table gets ``changes`` is refused on loading, one line."""
    info = json.loads((folder / "condiff.json").read_text())
    info["diffusevae"].update(changes)
    (folder / "condiff.json").write_text(json.dumps(info))
    with pytest.raises(InputFileError, match=match) as e:
        dv.load_diffusevae_model(folder)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"kind": "ddpm", "vae": "v", "prior": "flow"}, "model.prior"),
        ({"kind": "ddpm", "vae": "v", "prior_components": 0}, "model.prior_components"),
        ({"kind": "vae", "prior": "gmm"}, "model.prior belongs to a kind 'ddpm' recipe"),
    ],
)
def test_bad_prior_keys_are_one_line_config_errors(model, needle):
    with pytest.raises(ConfigError, match=needle):
        dv.diffusevae_recipe_from_dict({"name": "x", "family": "diffusevae", "model": model})


SPATIAL = {"decoder": "spatial", "latent_dim": 5, "width": 4, "patch": 8, "sigma": 0.5, "beta": 1.0}


def test_place_patch_pastes_exactly_on_the_pixel_grid():
    g = torch.Generator().manual_seed(0)
    patch = torch.rand(2, 3, 8, 8, generator=g)
    for m in (-5, 0, 3):  # shift by m pixels: the centre moves by 2 m / 32 in normalised units
        centre = torch.full((2, 2), 2 * m / 32)
        out = dv.place_patch(patch, centre, torch.full((2,), 0.5), 32)
        want = torch.zeros(2, 3, 32, 32)
        want[:, :, 12 + m : 20 + m, 12 + m : 20 + m] = patch
        torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_where_of_places_a_patch_at_the_renderers_centre():
    """A render's circle or square is symmetric about its centre (ShapesBatch.centres, jitter included), so its
    w-weighted centroid is that centre; where_of maps the centre to the latent whose placement puts a patch's centre
    there, and small to large by 3 / 5.5."""
    from condiff.data import shapes
    from condiff.tasks.diffusevae import object_measures

    g = torch.Generator().manual_seed(1)
    attrs = shapes.random_attrs(64, g)
    attrs[:, 0] = attrs[:, 0] % 2  # circle or square
    b = shapes.render_batch(attrs, g, jitter=1)  # more jitter would push large edge objects over the canvas edge
    w = dv.where_of(b.centres, attrs[:, 2])
    centre_px = (w[:, :2] * dv.POSITION_SCALE + 1) * shapes.SIZE / 2 - 0.5  # normalised -> pixel-centre units
    torch.testing.assert_close(object_measures(b.images)[:, :2].float(), centre_px, atol=1e-5, rtol=0)
    scale = torch.exp(dv.SIZE_SCALE * w[:, 2])
    torch.testing.assert_close(scale, torch.where(attrs[:, 2] == 1, 1.0, 3.0 / 5.5), atol=1e-6, rtol=0)


def test_training_batches_take_the_recipes_jitter():
    from condiff.data import shapes

    a = dv.training_batch(8, shapes.JITTER, torch.Generator().manual_seed(0))
    b = shapes.sample_batch(8, torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images)  # the default is the shapes stream itself
    c = dv.training_batch(256, 4, torch.Generator().manual_seed(0))
    off = c.centres - torch.stack(shapes.cell_centre(c.attrs[:, 3]), 1)
    assert off.abs().max() == 4 and torch.equal(off, off.round())


def test_spatial_vae_shapes_codes_and_paths():
    vae = dv.SpatialVAE(5, 4, 8)
    assert vae.latent_size == 8
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    mu, logvar, logits = vae.encode_all(x)
    assert mu.shape == logvar.shape == (3, 5) and logits.shape == (3, 3)
    z = vae.encode_mean(x)
    assert z.shape == (3, 8) and torch.equal(z[:, 5:].sum(1), torch.ones(3))  # a one-hot shape code
    y = vae.decode(z)
    assert y.shape == (3, 3, 32, 32) and y.abs().max() <= 1
    za = torch.cat([torch.zeros(5), torch.tensor([1.0, 0, 0])])
    zb = torch.cat([torch.ones(5), torch.tensor([0, 0, 1.0])])
    p = vae.path(za, zb, 5)
    torch.testing.assert_close(p[:, :5], torch.linspace(0, 1, 5).view(-1, 1).expand(5, 5))
    assert p[:2, 5:].tolist() == [[1, 0, 0]] * 2 and p[2:, 5:].tolist() == [[0, 0, 1]] * 3  # switches at s = 1/2
    prior = vae.prior_sample(6, torch.Generator().manual_seed(0))
    assert prior.shape == (6, 8) and torch.equal(prior[:, 5:].sum(1), torch.ones(6))
    conv = dv.ConvVAE(3, 4)
    torch.testing.assert_close(
        conv.path(torch.zeros(3), torch.ones(3), 3), dv.lerp_path(torch.zeros(3), torch.ones(3), 3)
    )


def test_spatial_vae_loss_supervises_where_and_code():
    from condiff.data import shapes

    torch.manual_seed(0)
    vae = dv.SpatialVAE(5, 4, 8, where_weight=2.0)
    b = shapes.sample_batch(4, torch.Generator().manual_seed(0))
    parts, extra = vae.loss(b, 0.5, 1.0, torch.Generator().manual_seed(1))
    mu, _, logits = vae.encode_all(b.images)
    where = (mu[:, 2:] - dv.where_of(b.centres, b.attrs[:, 2])).pow(2).sum(1)
    ce = torch.nn.functional.cross_entropy(logits, b.attrs[:, 0], reduction="none")
    torch.testing.assert_close(extra, 3072 * (2.0 * where + ce))
    assert parts.nll.shape == parts.kl.shape == (4,)


def test_spatial_vae_trains_saves_and_reloads(tmp_path):
    t = {"steps": 2, "batch_size": 4, "warmup": 1, "ckpt_every": 1, "eval_every": 0}
    r = dv.diffusevae_recipe_from_dict({"name": "s", "family": "diffusevae", "model": {"kind": "vae", **SPATIAL},
                                        "train": t})  # fmt: skip
    out = dv.make_diffusevae_trainer(r, tmp_path / "run", progress=False).run().export()
    back = dv.load_diffusevae_model(out)
    assert isinstance(back.vae, dv.SpatialVAE) and back.config["decoder"] == "spatial"
    assert back.vae.config.where_weight == SPATIAL.get("where_weight", 1.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = back.encode_mean(x)
    assert z.shape == (2, 8)
    x_hat, refined, _ = back.interpolate(x[:1], x[1:], 4)
    assert refined is None and x_hat.shape == (4, 3, 32, 32)
    torch.testing.assert_close(x_hat[0], back.vae.decode(z[:1]).clamp(-1, 1)[0])
    ddpm = dv.diffusevae_recipe_from_dict({"name": "d", "family": "diffusevae",
                                           "model": {"kind": "ddpm", "vae": str(tmp_path / "run")}})  # fmt: skip
    m = dv.build_diffusevae_model(ddpm)
    assert isinstance(m.vae, dv.SpatialVAE) and m.config["patch"] == 8 and m.config["decoder"] == "spatial"
    for prior, total in (("gmm", 2), ("factors", 2 * 2 * 3)):  # factors: what x where x one component per code
        model = {"kind": "ddpm", "vae": str(tmp_path / "run"), "prior": prior, "prior_components": 2, "jitter": 3}
        r = dv.diffusevae_recipe_from_dict({"name": "d", "family": "diffusevae", "model": model})
        with mock.patch.object(dv, "PRIOR_FIT_N", 64):
            m = dv.build_diffusevae_model(r)
        m.save(tmp_path / prior)
        back = dv.load_diffusevae_model(tmp_path / prior)  # the mixture covers the full latent, the code included
        assert back.module["prior"].config.latent_dim == 8 and back.module["prior"].config.components == total
        assert back.config["jitter"] == 3 and back.prior == prior
        z = back.latents(5, torch.Generator().manual_seed(0))
        assert z.shape == (5, 8)
        if prior == "factors":  # the code block's components sit on the one-hot codes
            torch.testing.assert_close(z[:, 5:].sum(1), torch.ones(5), atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"kind": "vae", "decoder": "mlp"}, "model.decoder 'mlp'"),
        ({"kind": "vae", "decoder": "spatial", "latent_dim": 3}, "model.latent_dim"),
        ({"kind": "vae", "decoder": "spatial", "patch": 12}, "model.patch must be a multiple of 8, got 12"),
        ({"kind": "vae", "decoder": "spatial", "patch": 64}, "model.patch"),
        ({"kind": "vae", "decoder": "spatial", "where_weight": -1.0}, "model.where_weight must be a finite number"),
        ({"kind": "vae", "patch": 8}, "model.patch belongs to decoder 'spatial'"),
        ({"kind": "vae", "size_in_decoder": True}, "model.size_in_decoder belongs to decoder 'spatial'"),
        ({"kind": "vae", "jitter": 9}, "model.jitter"),
        ({"kind": "ddpm", "vae": "v", "decoder": "spatial"}, "model.decoder belongs to the VAE's recipe"),
    ],
)
def test_bad_spatial_keys_are_one_line_config_errors(model, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        dv.diffusevae_recipe_from_dict({"name": "x", "family": "diffusevae", "model": model})
    assert len(str(e.value).splitlines()) == 1


def test_size_in_decoder_moves_the_canvas_without_scaling_it():
    """With size_in_decoder the size latent is the decoder's input: changing it changes the drawing but not where the
    canvas lands; an all-zero canvas stays all zero outside the 16x16 square around the centre."""
    torch.manual_seed(0)
    vae = dv.SpatialVAE(5, 4, 16, size_in_decoder=True)
    assert vae.from_latent.in_features == 2 + 3 + 1
    z = torch.zeros(2, 8)
    z[:, 5] = 1.0
    z[1, 4] = 2.0  # only the size latent differs
    x = vae.decode(z)
    assert not torch.equal(x[0], x[1])
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[8:24, 8:24] = False  # the canvas at the centre, unscaled
    assert torch.equal(x[:, :, outside], -torch.ones_like(x[:, :, outside]))


def test_conv_vae_loss_is_the_elbo_with_no_supervision():
    from condiff.data import shapes
    from condiff.tasks.diffusevae import vae_loss

    vae = dv.ConvVAE(3, 4)
    b = shapes.sample_batch(4, torch.Generator().manual_seed(0))
    parts, extra = vae.loss(b, 0.5, 2.0, torch.Generator().manual_seed(1))
    want = vae_loss(vae.encode, vae.decode, b.images, 0.5, 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(parts.loss, want.loss) and torch.equal(extra, torch.zeros(4))


def test_z_conditioned_refiner_starts_at_formulation_1_and_learns_from_z(saved, tmp_path):
    """model.z_condition: the UNet also sees z through a zero-initialised map added to its pooled embedding, so the
    start computes exactly the unconditioned start's output whatever z; one training step moves the map (and only
    the UNet, extras and map train); the folder round-trips; a z-conditioned model asked to refine without z, or a
    folder whose map disagrees with the VAE, is one line."""
    d, plain = saved
    model = {"kind": "ddpm", "vae": str(d / "vae"), "z_condition": True}
    r = dv.diffusevae_recipe_from_dict({"name": "z", "family": "diffusevae", "model": model,
                                        "train": {"steps": 1, "batch_size": 2, "warmup": 1}})  # fmt: skip
    m = dv.build_diffusevae_model(r)
    assert m.config["z_condition"] is True and isinstance(m.module["zembed"], dv.LatentEmbedding)
    g = torch.Generator().manual_seed(0)
    x_t, x_hat, t = (
        torch.randn(2, 3, 32, 32, generator=g),
        torch.randn(2, 3, 32, 32, generator=g),
        torch.tensor([5.0, 900.0]),
    )
    with torch.no_grad():
        want = dv.ddpm_forward(plain.module, x_t, x_hat, t)
        for z in (torch.zeros(2, 3), 10 * torch.randn(2, 3, generator=g)):
            assert torch.equal(dv.ddpm_forward(m.module, x_t, x_hat, t, z), want)
    with pytest.raises(ConfigError, match="pass the latents z") as e:
        dv.ddpm_forward(m.module, x_t, x_hat, t)
    assert len(str(e.value).splitlines()) == 1
    tr = dv.make_diffusevae_trainer(r, tmp_path / "run", progress=False)
    assert any(n.startswith("zembed.") for n in tr.names) and not any(n.startswith("vae.") for n in tr.names)
    tr.train_step()
    assert tr.module["zembed"].proj.weight.abs().sum() > 0  # the map learns from z
    tr.module["zembed"].proj.weight.data.normal_(generator=g)
    trained = dataclasses.replace(m, module=tr.module)
    trained.save(tmp_path / "zmodel")
    back = dv.load_diffusevae_model(tmp_path / "zmodel")
    assert back.config["z_condition"] is True
    assert torch.equal(back.module["zembed"].proj.weight, tr.module["zembed"].proj.weight)
    z1, z2 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    with torch.no_grad():  # now z matters, and the denoiser passes cond["z"] through
        assert not torch.equal(
            dv.ddpm_forward(back.module, x_t, x_hat, t, z1), dv.ddpm_forward(back.module, x_t, x_hat, t, z2)
        )
    noise = torch.randn(2, 3, 32, 32, generator=g)
    a, _ = back.refine(x_hat, noise, 2, z1)
    b, _ = back.refine(x_hat, noise, 2, z2)
    assert not torch.equal(a, b)
    _, x, _ = back.generate(z1, seed=3, steps=2)
    seeded = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # generate's noise for seed 3
    torch.testing.assert_close(x, back.refine(back.vae.decode(z1), seeded, 2, z1)[0])
    refused_after_edit(tmp_path / "zmodel", {"z_condition": "yes"}, "z_condition must be true or false")


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"kind": "vae", "z_condition": True}, "model.z_condition belongs to a kind 'ddpm' recipe"),
        ({"kind": "ddpm", "vae": "v", "z_condition": "yes"}, "model.z_condition"),
    ],
)
def test_bad_z_condition_is_a_one_line_config_error(model, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        dv.diffusevae_recipe_from_dict({"name": "x", "family": "diffusevae", "model": model})
    assert len(str(e.value).splitlines()) == 1


def test_guided_refiner_is_the_cfg_contrast_with_the_null_reconstruction(saved, tmp_path):
    """model.cond_drop: the training condition is the null one (x_hat = 0) in that share of rows, drawn from the
    step's generator; refine(guidance w) is x0_null + w (x0_cond - x0_null) (checked exactly at one step, where
    DPM-Solver++(2M) returns the x0 estimate at the first grid point), w = 1 is the unguided refiner and w = 0 the
    refiner given the null condition; the recipe's default weight is saved and reloaded."""
    d, _ = saved
    model = {"kind": "ddpm", "vae": str(d / "vae"), "cond_drop": 0.5, "guidance": 2.0}
    r = dv.diffusevae_recipe_from_dict({"name": "g", "family": "diffusevae", "model": model,
                                        "train": {"steps": 1, "batch_size": 8, "warmup": 1}})  # fmt: skip
    m = dv.build_diffusevae_model(r)
    assert m.config["cond_drop"] == 0.5 and m.config["guidance"] == 2.0
    seen = []

    def spy(module, x_t, x_hat, t_in, z=None):
        seen.append(x_hat)
        return torch.zeros_like(x_t)

    with mock.patch.object(dv, "ddpm_forward", spy):
        dv.diffusevae_loss_fn(m, r)(0, torch.Generator().manual_seed(3))
    rows = seen[0].flatten(1).abs().sum(1)
    g = torch.Generator().manual_seed(3)  # the same draws as the loss: the batch, z, then the keep mask
    batch = dv.training_batch(8, r.model.jitter, g)
    m.vae.posterior_sample(batch.images, g)
    keep = torch.rand(8, generator=g) >= 0.5
    assert torch.equal(rows > 0, keep) and 0 < int(keep.sum()) < 8
    # exactness of the contrast, on a refiner whose map from x_hat is not zero
    with torch.no_grad():
        m.module["unet"].conv_in.weight.normal_(generator=torch.Generator().manual_seed(1))
    m.save(tmp_path / "g")
    back = dv.load_diffusevae_model(tmp_path / "g")
    assert back.config["guidance"] == back.guidance == 2.0
    gen = torch.Generator().manual_seed(0)
    x_hat, noise = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(2, 3, 32, 32, generator=gen)
    from condiff.core.grids import make_grid

    grid = make_grid(back.schedule, 1)
    t0 = torch.full((2,), float(grid[0]), dtype=torch.float64)
    x_t = float(back.schedule.sigma(t0[0])) * noise
    with torch.no_grad():
        c = back.denoiser(x_t, t0, {"x_hat": x_hat})
        n0 = back.denoiser(x_t, t0, {"x_hat": torch.zeros_like(x_hat)})
    for w, want in ((2.0, n0 + 2.0 * (c - n0)), (1.0, c), (0.0, n0)):
        got, _ = back.refine(x_hat, noise, 1, guidance=w)
        torch.testing.assert_close(got, want.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="finite number"):
        back.refine(x_hat, noise, 1, guidance=float("nan"))
    with pytest.raises(ConfigError, match="needs a refiner trained with model.cond_drop > 0"):
        dv.load_diffusevae_model(d / "ddpm").refine(x_hat, noise, 1, guidance=2.0)
    refused_after_edit(tmp_path / "g", {"cond_drop": 0.0}, "guidance or cond_drop: guidance 2.0 needs a refiner")
    refused_after_edit(tmp_path / "g", {"cond_drop": "0.1"}, "cond_drop must be a number in")


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"kind": "vae", "cond_drop": 0.1}, "model.cond_drop belongs to a kind 'ddpm' recipe"),
        ({"kind": "vae", "guidance": 2.0}, "model.guidance belongs to a kind 'ddpm' recipe"),
        ({"kind": "ddpm", "vae": "v", "cond_drop": 1.0}, "model.cond_drop must be a number in [0, 1), got 1.0"),
        ({"kind": "ddpm", "vae": "v", "cond_drop": -0.1}, "model.cond_drop must be a number in [0, 1), got -0.1"),
        ({"kind": "ddpm", "vae": "v", "guidance": 2.0}, "model.guidance: guidance 2.0 needs a refiner trained"),
        ({"kind": "ddpm", "vae": "v", "cond_drop": 0.1, "guidance": float("inf")}, "model.guidance: the guidance"),
    ],
)
def test_bad_guidance_keys_are_one_line_config_errors(model, needle):
    with pytest.raises(ConfigError) as e:
        dv.diffusevae_recipe_from_dict({"name": "x", "family": "diffusevae", "model": model})
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_size_jitter_draws_sizes_between_small_and_large():
    """training_batch(size_jitter=True): half extents uniform on [small, large] (mean and spread within 3 SE), the size
    index the nearer size, the renders drawn at those extents; where_of with the table's extents equals where_of of
    the size indices; the recipe key is kept in the model's table."""
    from condiff.data import shapes

    lo, hi = shapes.HALF_EXTENT
    b = dv.training_batch(4000, 0, torch.Generator().manual_seed(0), size_jitter=True)
    e = b.extents
    assert e.min() >= lo and e.max() <= hi
    mean, var = (lo + hi) / 2, (hi - lo) ** 2 / 12
    assert abs(float(e.mean()) - mean) < 3 * (var / 4000) ** 0.5
    assert torch.equal(b.attrs[:, 2], (e >= mean).long())
    again = shapes.render_batch(b.attrs, None, jitter=0, extents=e)
    assert torch.equal(b.images, again.images)  # rendered at the drawn extents
    sizes = torch.tensor([0, 1, 1, 0])
    centres = torch.tensor([[7.0, 16.0], [25.0, 7.0], [16.0, 16.0], [9.0, 11.0]])
    torch.testing.assert_close(
        dv.where_of(centres, sizes, torch.tensor(shapes.HALF_EXTENT)[sizes]), dv.where_of(centres, sizes)
    )
    r = dv.diffusevae_recipe_from_dict(
        {"name": "s", "family": "diffusevae", "model": {"kind": "vae", **TINY, "size_jitter": True}}
    )
    assert dv.vae_config(r)["size_jitter"] is True


def test_subpixel_training_renders_are_the_continuous_jitter_renders_and_the_key_is_kept():
    """model.subpixel: the training batch is shapes.render_batch(..., subpixel=True) on the step's stream, its
    centres off the pixel grid within the jitter (with and without size_jitter), and the key is written to the
    model's table only when set."""
    from condiff.data import shapes

    b = dv.training_batch(64, 4, torch.Generator().manual_seed(7), subpixel=True)
    g = torch.Generator().manual_seed(7)
    replay = shapes.render_batch(shapes.random_attrs(64, g), g, jitter=4, subpixel=True)
    assert torch.equal(b.images, replay.images) and torch.equal(b.centres, replay.centres)
    for size_jitter in (False, True):
        b = dv.training_batch(64, 4, torch.Generator().manual_seed(8), size_jitter=size_jitter, subpixel=True)
        off = b.centres - torch.stack(shapes.cell_centre(b.attrs[:, 3]), 1)
        assert off.abs().max() <= 4 and (off != off.round()).all()
    plain = dv.training_batch(64, 4, torch.Generator().manual_seed(7))
    assert (plain.centres == plain.centres.round()).all()
    model = {"kind": "vae", **TINY}
    r = dv.diffusevae_recipe_from_dict({"name": "s", "family": "diffusevae", "model": {**model, "subpixel": True}})
    assert dv.vae_config(r)["subpixel"] is True
    r = dv.diffusevae_recipe_from_dict({"name": "s", "family": "diffusevae", "model": model})
    assert "subpixel" not in dv.vae_config(r)


@pytest.fixture(scope="module")
def spatial_refiner(tmp_path_factory):
    """A tiny what/where VAE (5 Gaussian dims and a 3-way shape code) and a z-conditioned refiner on it, trained one
    step so its z map is not zero."""
    d = tmp_path_factory.mktemp("code")
    t = {"steps": 1, "batch_size": 4, "warmup": 1, "ckpt_every": 1, "eval_every": 0}
    r = dv.diffusevae_recipe_from_dict({"name": "s", "family": "diffusevae", "model": {"kind": "vae", **SPATIAL},
                                        "train": t})  # fmt: skip
    dv.make_diffusevae_trainer(r, d / "vae", progress=False).run().export()
    model = {"kind": "ddpm", "vae": str(d / "vae"), "z_condition": True, "cond_drop": 0.2}
    r = dv.diffusevae_recipe_from_dict({"name": "z", "family": "diffusevae", "model": model, "train": t})
    dv.make_diffusevae_trainer(r, d / "ddpm", progress=False).run().export()
    return d


def test_a_recipe_goes_on_from_a_trained_refiner_with_the_code_dropped(spatial_refiner, tmp_path):
    """model.refiner: the start is the named refiner itself (its VAE and prior frozen, UNet, extras and z map
    trainable, equal weights), its table with this recipe's guidance keys in place of its own; model.code_drop
    zeroes z's shape code (and nothing else: not x_hat, not the Gaussian dims) in the rows the step's generator
    draws after the batch and z."""
    d = spatial_refiner
    base = dv.load_diffusevae_model(d / "ddpm")
    model = {"kind": "ddpm", "refiner": str(d / "ddpm"), "code_drop": 0.5, "guidance": 2.0}
    r = dv.diffusevae_recipe_from_dict({"name": "c", "family": "diffusevae", "model": model,
                                        "train": {"steps": 1, "batch_size": 8, "warmup": 1}})  # fmt: skip
    m = dv.build_diffusevae_model(r)
    assert m.config["code_drop"] == 0.5 and m.config["guidance"] == 2.0 and "cond_drop" not in m.config
    assert m.config["refiner_from"] == str(d / "ddpm") and m.config["z_condition"] is True
    assert set(m.module) == set(base.module) == {"unet", "extras", "zembed", "vae"}
    for name in base.module:
        for a, b in zip(m.module[name].state_dict().values(), base.module[name].state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    tr = dv.make_diffusevae_trainer(r, tmp_path / "run", progress=False)
    assert {n.split(".")[0] for n in tr.names} == {"unet", "extras", "zembed"}
    seen = []

    def spy(module, x_t, x_hat, t_in, z=None):
        seen.append((x_hat, z))
        return torch.zeros_like(x_t)

    with mock.patch.object(dv, "ddpm_forward", spy):
        dv.diffusevae_loss_fn(m, r)(0, torch.Generator().manual_seed(3))
    x_hat, z = seen[0]
    g = torch.Generator().manual_seed(3)  # the same draws as the loss: the batch, z, then the keep mask
    batch = dv.training_batch(8, m.config.get("jitter", 1), g)
    z_full = m.vae.posterior_sample(batch.images, g)
    keep = torch.rand(8, generator=g) >= 0.5
    assert 0 < int(keep.sum()) < 8
    torch.testing.assert_close(x_hat, m.vae.decode(z_full))
    torch.testing.assert_close(z[:, :5], z_full[:, :5])
    assert torch.equal(z[:, 5:].abs().sum(1) > 0, keep) and torch.equal(z[keep], z_full[keep])


def test_code_guidance_is_the_cfg_contrast_with_the_code_zeroed(spatial_refiner, tmp_path):
    """A refiner trained with model.code_drop is guided against z with its shape code zeroed, x_hat and the
    Gaussian dims kept: refine(guidance w) is x0_null + w (x0_cond - x0_null) (exact at one step); the saved
    weight is the default; asked without z it is one line; a table that contradicts it is refused on loading."""
    d = spatial_refiner
    model = {"kind": "ddpm", "refiner": str(d / "ddpm"), "code_drop": 0.15, "guidance": 3.0}
    r = dv.diffusevae_recipe_from_dict({"name": "c", "family": "diffusevae", "model": model})
    dv.build_diffusevae_model(r).save(tmp_path / "c")
    back = dv.load_diffusevae_model(tmp_path / "c")
    assert back.guidance == 3.0
    gen = torch.Generator().manual_seed(0)
    z = back.encode_mean(torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1)
    x_hat, noise = back.vae.decode(z), torch.randn(2, 3, 32, 32, generator=gen)
    from condiff.core.grids import make_grid

    grid = make_grid(back.schedule, 1)
    t0 = torch.full((2,), float(grid[0]), dtype=torch.float64)
    x_t = float(back.schedule.sigma(t0[0])) * noise
    null_z = torch.cat([z[:, :5], torch.zeros(2, 3)], 1)
    with torch.no_grad():
        c = back.denoiser(x_t, t0, {"x_hat": x_hat, "z": z})
        n0 = back.denoiser(x_t, t0, {"x_hat": x_hat, "z": null_z})
    assert not torch.equal(c, n0)  # the code matters to this refiner
    for w, want in ((3.0, n0 + 3.0 * (c - n0)), (1.0, c), (0.0, n0)):
        got, _ = back.refine(x_hat, noise, 1, z, guidance=w)
        torch.testing.assert_close(got, want.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="guided on the shape code of z; pass the latents z") as e:
        back.refine(x_hat, noise, 1, guidance=3.0)
    assert len(str(e.value).splitlines()) == 1
    refused_after_edit(tmp_path / "c", {"cond_drop": 0.1}, "code_drop needs z_condition true")
    refused_after_edit(tmp_path / "c", {"cond_drop": 0.0, "code_drop": 2.0}, "code_drop must be a number in")


@pytest.mark.parametrize(
    ("model", "train", "needle"),
    [
        ({"kind": "vae", "code_drop": 0.1}, {}, "model.code_drop belongs to a kind 'ddpm' recipe"),
        ({"kind": "vae", "refiner": "r"}, {}, "model.refiner belongs to a kind 'ddpm' recipe"),
        ({"kind": "ddpm", "vae": "v", "code_drop": 1.5}, {}, "model.code_drop must be a number in [0, 1), got 1.5"),
        ({"kind": "ddpm", "vae": "v", "code_drop": 0.1}, {}, "only a refiner with model.z_condition = true sees"),
        ({"kind": "ddpm", "vae": "v", "z_condition": True, "code_drop": 0.1, "cond_drop": 0.1}, {}, "give one of them"),
        ({"kind": "ddpm", "refiner": "r", "vae": "v"}, {}, "model.vae comes from model.refiner 'r'"),
        ({"kind": "ddpm", "refiner": "r", "prior": "gmm"}, {}, "model.prior comes from model.refiner 'r'"),
        ({"kind": "ddpm", "refiner": "r", "jitter": 2}, {}, "model.jitter comes from model.refiner"),
        ({"kind": "ddpm", "refiner": "r"}, {"init_from": "shapes"}, "train.init_from comes from model.refiner"),
        ({"kind": "ddpm", "refiner": "r", "guidance": 2.0}, {}, "model.guidance: guidance 2.0 needs a refiner"),
    ],
)
def test_bad_code_drop_and_refiner_keys_are_one_line_config_errors(model, train, needle):
    with pytest.raises(ConfigError) as e:
        dv.diffusevae_recipe_from_dict({"name": "x", "family": "diffusevae", "model": model, "train": train})
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_a_refiner_start_that_cannot_take_the_recipe_is_one_line(saved, spatial_refiner):
    """model.refiner naming a VAE, or code_drop on a refiner that does not see a shape code, is refused at build."""
    d, _ = saved
    cases = [
        ({"refiner": str(d / "vae")}, "is a VAE (kind 'vae'); it must be a refiner"),
        ({"refiner": str(d / "ddpm"), "code_drop": 0.1}, "does not see one (it needs z_condition and a spatial VAE)"),
        ({"refiner": str(d / "missing")}, "does not exist"),
    ]
    for extra, needle in cases:
        r = dv.diffusevae_recipe_from_dict({"name": "x", "family": "diffusevae", "model": {"kind": "ddpm", **extra}})
        with pytest.raises((ConfigError, InputFileError)) as e:
            dv.build_diffusevae_model(r)
        assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
