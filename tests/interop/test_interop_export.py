"""``condiff export`` (issue 6, acceptance 4): the bundled shapes model as a diffusers-format folder whose UNet and
scheduler diffusers loads with its own classes, giving condiff's prediction on a fixed input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from clikit import one_line_error, run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from condiff.cli import main

    out = tmp_path_factory.mktemp("export") / "shapes_diffusers"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        main(["export", "--model", "shapes", "--out", str(out)])
    return out


def test_diffusers_loads_unet_and_scheduler_with_the_same_prediction(exported):
    """diffusers' UNet2DConditionModel.from_pretrained + DDPMScheduler.from_pretrained on the exported folder,
    called as condiff_export.json says, give condiff's network prediction (v) to 1e-6 (in fact bit for bit), and
    x0 (DDPMScheduler.step's pred_original_sample) to 1e-6 against condiff on the scheduler's own table. condiff's
    bundled model keeps its float64 table, which differs from diffusers' float32 cumprod by < 5e-5 relative
    (1.3e-5 at t = 999, ~3e-7 elsewhere); the x0 gap that leaves is bounded here too."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from condiff.core.denoiser import wrap
    from condiff.interop import schedule_from_scheduler
    from condiff.models.base import load_model
    from condiff.nets import SlotTextEncoder

    unet = UNet2DConditionModel.from_pretrained(exported / "unet").eval()
    sched = DDPMScheduler.from_pretrained(exported / "scheduler")
    text = SlotTextEncoder.from_pretrained(exported / "text_encoder").eval()
    meta = json.loads((exported / "condiff_export.json").read_text())
    assert meta["loads_in_diffusers"] == ["unet", "scheduler"] and sched.config.prediction_type == "v_prediction"
    f = meta["pixel_unshuffle"]
    m = load_model("shapes")
    call = lambda net, x, t_in, c: m.family.forward(net, m.model_cfg, x, t_in, c)  # noqa: E731
    raw = m.family.parse_prompt("large red circle top-left").expand(2, -1)
    cond = m.condition(raw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    sched.set_timesteps(1000)
    for t in (999, 500, 20):
        with torch.no_grad():
            hidden, pooled = text(raw)
            v = F.pixel_shuffle(
                unet(F.pixel_unshuffle(x, f), t, encoder_hidden_states=hidden, class_labels=pooled).sample, f
            )
            ref = sched.step(v, t, x).pred_original_sample
            v_condiff = m.family.forward(m.module, m.model_cfg, x, torch.full((2,), float(t)), cond)
            ours = wrap(m.module, schedule_from_scheduler(sched), m.prediction, call=call)(x, float(t), cond)
            own = m.denoiser(x, float(t), cond)
        assert float((v - v_condiff).abs().max()) <= 1e-6
        assert float((ours - ref).abs().max()) <= 1e-6
        assert float((own - ref).abs().max()) <= 1e-5 * float(x.abs().max())
    table = sched.alphas_cumprod.double() / m.schedule.alphas_cumprod
    assert float((table - 1).abs().max()) < 5e-5  # measured 1.3e-5, at t = 999 where alpha_cumprod is 2.4e-9


def test_export_refuses_bad_out(tmp_path, capsys):
    """--out that is a file: one line, exit 2; an unknown model names the accepted ones."""
    (tmp_path / "f").write_text("x")
    code, _, err = run(["export", "--model", "shapes", "--out", str(tmp_path / "f")], capsys)
    one_line_error(code, err, "not a directory")
    code, _, err = run(["export", "--model", "nope", "--out", str(tmp_path / "o")], capsys)
    one_line_error(code, err, "nope")
