"""condiff.interop's adapters against diffusers itself: schedule table, time grid, prediction types, initial
latents, prompt encoding, the wrapped networks, and one-line errors for folders that are not pipelines."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from condiff.errors import ConfigError, InputFileError
from condiff.interop import (
    final_time,
    grid_from_scheduler,
    initial_latents,
    load_pipeline,
    prediction_from_config,
    schedule_from_scheduler,
    wrap_diffusers,
)
from condiff.interop.tiny import SD_SCHEDULER


def _sched(cls_name, **kw):
    import diffusers

    cfg = {k: v for k, v in SD_SCHEDULER.items() if k not in ("skip_prk_steps",)}
    return getattr(diffusers, cls_name).from_config({**cfg, "clip_sample": False, **kw})


def test_schedule_is_the_scheduler_table():
    """alpha(t)^2 at every integer t equals diffusers' alphas_cumprod[t] exactly; t = -1 is clean."""
    s = _sched("DDIMScheduler")
    sch = schedule_from_scheduler(s)
    t = torch.arange(1000, dtype=torch.float64)
    assert (
        torch.equal(sch.alpha(t) ** 2, s.alphas_cumprod.double())
        or float((sch.alpha(t) ** 2 / s.alphas_cumprod.double() - 1).abs().max()) < 1e-15
    )
    assert float(sch.sigma(-1.0)) == 0.0


@pytest.mark.parametrize(
    "cls_name,kw,final",
    [
        ("DDIMScheduler", dict(timestep_spacing="leading"), 0.0),
        ("DDIMScheduler", dict(timestep_spacing="trailing", set_alpha_to_one=True), -1.0),
        ("DPMSolverMultistepScheduler", dict(timestep_spacing="linspace"), -1.0),
        ("DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"), 0.0),
        ("EulerDiscreteScheduler", dict(timestep_spacing="leading"), -1.0),
    ],
)
def test_grid_is_the_scheduler_timesteps(cls_name, kw, final):
    """The grid is diffusers' timesteps for N steps, then the point its last step lands on (DDIM's
    final_alpha_cumprod, DPM-Solver's final sigma); the scheduler given is left untouched."""
    s = _sched(cls_name, **kw)
    grid = grid_from_scheduler(s, 10)
    ref = type(s).from_config(s.config)
    ref.set_timesteps(10)
    assert grid[:-1].tolist() == ref.timesteps.double().tolist()
    assert float(grid[-1]) == final == final_time(s)
    assert s.num_inference_steps is None


def test_grid_refuses_karras_sigmas_and_bad_steps():
    """Non-table noise levels and step counts outside [1, T] are one-line ConfigErrors."""
    with pytest.raises(ConfigError, match="karras"):
        grid_from_scheduler(_sched("DPMSolverMultistepScheduler", use_karras_sigmas=True), 10)
    with pytest.raises(ConfigError, match="steps must be"):
        grid_from_scheduler(_sched("DDIMScheduler"), 0)


def test_prediction_types():
    """epsilon, v_prediction and sample map to Eps, V, X0; anything else names the accepted values."""
    assert [prediction_from_config({"prediction_type": k}).name for k in ("epsilon", "v_prediction", "sample")] == [
        "eps",
        "v",
        "x0",
    ]
    with pytest.raises(ConfigError, match="epsilon"):
        prediction_from_config({"prediction_type": "flow"})


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_wrapped_unet_gives_diffusers_x0(sd, kind):
    """The wrapped UNet's x0 equals DDIMScheduler.step's pred_original_sample for the same network output
    (both prediction types), at a table timestep."""
    s = _sched("DDIMScheduler", prediction_type=kind)
    s.set_timesteps(10)
    d = wrap_diffusers(sd.network, s)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 16, 32, generator=g)
    t = int(s.timesteps[3])
    with torch.no_grad():
        out = sd.network(x, t, encoder_hidden_states=emb).sample
        ref = s.step(out, t, x).pred_original_sample
        ours = d(x, float(t), {"encoder_hidden_states": emb})
    assert float((ours - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_initial_latents_are_diffusers_prepare_latents(sd):
    """Same seed: the tensor diffusers' prepare_latents draws (shape, order, init_noise_sigma), bit for bit; with
    steps, the VP-space sample a Karras-form scheduler (Euler) feeds its first network call."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd.path, local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # init_noise_sigma > 1
    pipe.scheduler.set_timesteps(5)
    ref = pipe.prepare_latents(3, 4, 16, 24, torch.float32, "cpu", torch.Generator().manual_seed(7))
    p = dataclasses.replace(sd, scheduler=pipe.scheduler)
    ours = initial_latents(p, 3, 16, 24, torch.Generator().manual_seed(7))
    assert ours.shape == (3, 4, 8, 12) and torch.equal(ours, ref)
    vp = initial_latents(p, 3, 16, 24, torch.Generator().manual_seed(7), steps=5)  # what the first step's UNet sees
    assert torch.equal(vp, pipe.scheduler.scale_model_input(ref, pipe.scheduler.timesteps[0]))
    assert float((vp - ref / pipe.scheduler.init_noise_sigma).abs().max()) < 1e-6  # leading spacing: sigma_0 = max
    with pytest.raises(ConfigError, match="--height must be a positive multiple of 2"):
        initial_latents(p, 1, 15, 16, None)


def test_condition_is_diffusers_encode_prompt(sd):
    """condition(prompts, n, negative) holds encode_prompt's embeddings: n copies of each prompt in a row, the
    negative prompt (or "") as the null branch."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd.path, local_files_only=True)
    pos, neg = pipe.encode_prompt(["a red cat", "blue dog"], "cpu", 2, True, ["photo", "photo"])
    cond = sd.condition(["a red cat", "blue dog"], 2, negative="photo")
    assert torch.equal(cond["encoder_hidden_states"], pos) and torch.equal(cond["null"]["encoder_hidden_states"], neg)


def test_dit_pipeline_condition_and_learned_sigma(dit):
    """DiT: labels by name or index, the null class 1000 as diffusers' DiTPipeline uses, and only the eps half
    of the learned-sigma output is used (x0 from it equals DDIM's pred_original_sample)."""
    cond = dit.condition(["square", "2"], 2)
    assert cond["class_labels"].tolist() == [1, 1, 2, 2] and cond["null"]["class_labels"].tolist() == [1000] * 4
    with pytest.raises(ConfigError, match="circle"):
        dit.condition(["dragon"])
    with pytest.raises(ConfigError, match=r"\[0, 999\]"):
        dit.condition(["1000"])  # the null class is not a prompt
    assert dit.condition(["circle"], 2, negative="star")["null"]["class_labels"].tolist() == [3, 3]
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    s = dit.scheduler
    with torch.no_grad():
        out = dit.network(x, torch.full((4,), 500), class_labels=cond["class_labels"]).sample
        ref = type(s).from_config(s.config)
        ref.set_timesteps(2)
        ref = ref.step(out[:, :4], 500, x).pred_original_sample
        ours = dit.denoiser(x, 500.0, {"class_labels": cond["class_labels"]})
    assert ours.shape == x.shape and float((ours - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_load_errors_are_one_line(tmp_path, tiny_sd_dir):
    """A missing folder, a file, a folder without model_index.json, a missing part, an unsupported network
    class or library, missing safetensors weights: each an InputFileError naming the path."""
    with pytest.raises(InputFileError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputFileError, match="got the file"):
        load_pipeline(tmp_path / "f.txt")
    with pytest.raises(InputFileError, match="no model_index.json"):
        load_pipeline(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputFileError, match="missing"):
        load_pipeline(bad)
    (bad / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(InputFileError, match="condiff wraps UNet2DModel"):
        load_pipeline(bad)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_dir, copy)
    (copy / "model_index.json").write_text(json.dumps({**index, "vae": ["mylib", "Net"]}))
    with pytest.raises(InputFileError, match="diffusers and transformers parts only"):
        load_pipeline(copy)
    (copy / "model_index.json").write_text(json.dumps(index))
    (copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # e.g. a folder with pickled .bin weights
    with pytest.raises(InputFileError, match="cannot load part 'unet'"):
        load_pipeline(copy)


def test_unet2d_model_wrapped_matches_diffusers_loop():
    """A bare UNet2DModel (unconditional, v-prediction) wrapped with wrap_diffusers and run by condiff's DDIM on
    grid_from_scheduler equals diffusers' own DDIMScheduler loop (set_timesteps, unet, step) to 1e-5."""
    from diffusers import DDIMScheduler, UNet2DModel

    from condiff.core.sampling import sample
    from condiff.solvers import DDIM

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()
    s = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = x
    s.set_timesteps(10)
    with torch.no_grad():
        for t in s.timesteps:
            ref = s.step(unet(ref, t).sample, t, ref).prev_sample
        ours = sample(wrap_diffusers(unet, s), DDIM(), grid_from_scheduler(s, 10), x).x
    assert float((ours - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
