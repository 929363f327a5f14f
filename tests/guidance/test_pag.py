"""Perturbed-attention guidance on a tiny random UNet2DConditionModel (float64): the perturbed layer's closed
form, the scoped processor swap, the composition with CFG and layer selection by name."""

import pytest
import torch
from torch import nn

from condiff.core.denoiser import wrap
from condiff.core.schedules import VPLinear
from condiff.errors import ConfigError
from condiff.guidance import CFG
from condiff.guidance.pag import (
    PAG,
    IdentityAttention,
    identity_attention,
    perturbed_attention,
    select_layers,
    self_attention_layers,
)
from condiff.interop.tiny import tiny_unet as tiny_cross_attention_unet

F64 = torch.float64
CTX, LEN = 8, 3


def tiny_unet(seed=0):
    unet = tiny_cross_attention_unet(in_channels=3, cross_attention_dim=CTX, seed=seed, perturb=0.1)
    return unet.to(F64).eval()


def call(net, x, t_in, cond):
    return net["unet"](x, t_in, encoder_hidden_states=cond["encoder_hidden_states"]).sample


@pytest.fixture(scope="module")
def setup():
    net = nn.ModuleDict({"unet": tiny_unet()})
    den = wrap(net, VPLinear(), "eps", time_input=lambda t: 1000 * t, call=call)
    g = torch.Generator().manual_seed(1)
    n = 3
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=F64)
    cond = {
        "encoder_hidden_states": torch.randn(n, LEN, CTX, generator=g, dtype=F64),
        "null": {"encoder_hidden_states": torch.zeros(n, LEN, CTX, dtype=F64)},
    }
    return net, den, x, 0.5, cond


def processors(net):
    return {name: m.processor for name, m in net.named_modules() if hasattr(m, "set_processor")}


def no_null(cond):
    return {k: v for k, v in cond.items() if k != "null"}


def test_identity_attention_is_the_output_projection_of_the_values():
    """Closed form (spec 4d): the perturbed layer outputs W_o (W_v h) + b_o on random inputs, and with a
    single token ordinary attention (softmax of a 1x1 map = 1) gives the same."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=6, heads=2, dim_head=3, bias=True).to(F64)
    h = torch.randn(4, 5, 6, dtype=F64)
    wv, bv = attn.to_v.weight, attn.to_v.bias
    wo, bo = attn.to_out[0].weight, attn.to_out[0].bias
    assert torch.allclose(identity_attention(attn, h), (h @ wv.T + bv) @ wo.T + bo, rtol=1e-12, atol=1e-12)
    one = h[:, :1]
    assert torch.allclose(attn(one), identity_attention(attn, one), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(attn(h), identity_attention(attn, h), atol=1e-3)


def test_processor_perturbs_only_the_last_rows():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=6, heads=2, dim_head=3).to(F64)
    h = torch.randn(5, 7, 6, dtype=F64)
    normal = attn(h)
    with perturbed_attention([attn], rows=2):
        mixed = attn(h)
    assert torch.allclose(mixed[:3], normal[:3], rtol=1e-12, atol=1e-12)
    assert torch.allclose(mixed[3:], identity_attention(attn, h[3:]), rtol=1e-12, atol=1e-12)


def test_scale_zero_is_cfg_and_the_plain_denoiser(setup):
    """s = 0 equals CFG exactly (and the conditional denoiser without CFG), also through the batched
    three-branch contrast when the shortcut is disabled."""
    net, den, x, t, cond = setup
    with torch.no_grad():
        assert torch.equal(PAG(den, 0.0, cfg_scale=4.0)(x, t, cond), CFG(den, 4.0)(x, t, cond))
        assert torch.equal(PAG(den, 0.0)(x, t, cond), den(x, t, no_null(cond)))
        forced = PAG(den, lambda _t: 0.0, cfg_scale=4.0, skip_trivial=False)(x, t, cond)
        assert torch.allclose(forced, CFG(den, 4.0)(x, t, cond), rtol=1e-10, atol=1e-10)


def test_perturbed_forward_equals_a_hand_made_identity_attention_forward(setup):
    """The perturbed branch differs from the normal one and equals a forward in which a forward hook
    replaces each selected attn1's output by to_out(to_v(input)), computed independently."""
    net, den, x, t, cond = setup
    pag = PAG(den, 2.0, layers=["mid", "up_blocks.0"])
    chosen = [
        m
        for name, m in net["unet"].named_modules()
        if name.endswith("attn1") and name.startswith(("mid_block.", "up_blocks.0."))
    ]
    assert len(chosen) == 3 and len(pag.modules) == 3 and all(a is b for a, b in zip(pag.modules.values(), chosen))

    def hook(m, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return m.to_out[1](m.to_out[0](m.to_v(h)))

    c = no_null(cond)
    with torch.no_grad():
        normal = den(x, t, c)
        pert = pag.perturbed(x, t, c)
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in chosen]
        try:
            by_hand = den(x, t, c)
        finally:
            for h in handles:
                h.remove()
        assert (pert - normal).abs().max() > 1e-3
        assert torch.allclose(pert, by_hand, rtol=1e-10, atol=1e-10)
        guided = pag(x, t, cond)
    assert torch.allclose(guided, normal + 2.0 * (normal - by_hand), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batched", [True, False])
def test_composition_with_cfg(setup, batched):
    """x0 = x0_u + w (x0_c - x0_u) + s (x0_c - x0_p), in one [uncond, cond, perturbed] forward or in separate
    forwards, with per-sample times; equals the same mix in eps space."""
    net, den, x, _, cond = setup
    t = torch.tensor([0.3, 0.5, 0.7], dtype=F64)
    w, s = 3.0, 1.5
    pag = PAG(den, s, layers="mid", cfg_scale=w, batched=batched)
    with torch.no_grad():
        x0_u, x0_c = den(x, t, cond["null"]), den(x, t, no_null(cond))
        x0_p = pag.perturbed(x, t, no_null(cond))
        out = pag(x, t, cond)
    assert torch.allclose(out, x0_u + w * (x0_c - x0_u) + s * (x0_c - x0_p), rtol=1e-10, atol=1e-10)
    sig = VPLinear().sigma(t)[:, None, None, None]
    alp = VPLinear().alpha(t)[:, None, None, None]
    e = [(x - alp * v) / sig for v in (x0_u, x0_c, x0_p)]
    eps = e[0] + w * (e[1] - e[0]) + s * (e[1] - e[2])
    assert torch.allclose(out, (x - sig * eps) / alp, rtol=1e-9, atol=1e-9)


def test_swap_leaves_every_processor_unchanged_after_a_call_and_an_exception(setup):
    net, den, x, t, cond = setup
    before = processors(net)
    with torch.no_grad():
        PAG(den, 2.0, layers="mid,up", cfg_scale=2.0)(x, t, cond)
    after = processors(net)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)

    def boom(m, args, out):  # the swap is active, on exactly the selected layer, when the forward fails
        swapped = [k for k, p in processors(net).items() if isinstance(p, IdentityAttention)]
        assert swapped == ["unet.mid_block.attentions.0.transformer_blocks.0.attn1"]
        raise RuntimeError("boom")

    handle = net["unet"].conv_out.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            PAG(den, 2.0, layers="mid")(x, t, cond)
    finally:
        handle.remove()
    after = processors(net)
    assert all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, IdentityAttention) for p in after.values())


def test_layer_selection_by_name(setup):
    net, den, *_ = setup
    unet = net["unet"]
    every = self_attention_layers(unet)
    assert all(name.endswith("attn1") for name in every) and len(every) == 4
    assert list(select_layers(unet, "mid")) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert len(select_layers(unet, ["up_blocks.0"])) == 2
    assert len(select_layers(unet, "down, mid")) == 2
    assert len(select_layers(unet, ["up_blocks.0.attentions.1", "up"])) == 2  # no duplicates
    for bad in ("middle", "down_blocks.0", "up_blocks.0.attentions.1.transformer_blocks.0.attn2"):
        with pytest.raises(ConfigError) as err:
            PAG(den, 1.0, layers=bad)
        msg = str(err.value)
        assert "\n" not in msg and repr(bad) in msg and "mid_block.attentions.0" in msg and "accepted" in msg
    for bad in ([], "", [3]):
        with pytest.raises(ConfigError):
            PAG(den, 1.0, layers=bad)
    with pytest.raises(ConfigError):
        PAG(den, float("nan"))
    with pytest.raises(ConfigError, match="null"):
        PAG(den, 1.0, cfg_scale=2.0)(*setup[2:4], no_null(setup[4]))


def test_pag_term_composes_with_cfg_ag_and_rescale(setup):
    """PAGTerm(guided, D, s): guided + s (x0_c - x0_p). Over CFG it equals PAG with cfg_scale (eq. 11) to 1e-10;
    scale 0 is guided bit for bit; over AG at gamma_bar = 1 (never switches) it equals CFG + PAG; over AG that
    has switched it is x0_c + s (x0_c - x0_p). Through a Tap, x0_c is read from the inner call (same numbers to
    1e-10, one perturbed row per sample instead of two); an inner call in another layout is detected and
    x0_c evaluated instead."""
    from condiff.core.denoiser import X0
    from condiff.guidance import AdaptiveGuidance, CountRows, GuidanceRescale
    from condiff.guidance.cfg import batch_cond, split_batch
    from condiff.guidance.pag import PAGTerm, Tap

    net, den, x, _, cond = setup
    n = x.shape[0]
    t = torch.tensor([0.3, 0.5, 0.7], dtype=F64)
    w, s = 3.0, 1.5
    with torch.no_grad():
        ref = PAG(den, s, layers="mid", cfg_scale=w)(x, t, cond)
        assert torch.allclose(PAGTerm(CFG(den, w), den, s, "mid")(x, t, cond), ref, rtol=1e-10, atol=1e-10)
        counted = CountRows(den)
        tap = Tap(counted)
        tapped = PAGTerm(CFG(tap, w), counted, s, "mid", net=net["unet"], tap=tap)
        assert torch.allclose(tapped(x, t, cond), ref, rtol=1e-10, atol=1e-10)
        assert counted.rows == 3 * n and tap.last is None  # uncond + cond + perturbed, nothing kept
        never = AdaptiveGuidance(den, w, 1.0, space=X0())
        assert torch.allclose(PAGTerm(never, den, s, "mid").start()(x, t, cond), ref, rtol=1e-10, atol=1e-10)
        resc = GuidanceRescale(den, w, 0.7, space=X0())
        assert torch.equal(PAGTerm(resc, den, 0.0, "mid")(x, t, cond), resc(x, t, cond))
        x0_p = lambda tt: PAG(den, s, layers="mid").perturbed(x, tt, no_null(cond))  # noqa: E731
        t2 = t - 0.1  # the next, lower time of the same trajectory
        x0_c = den(x, t2, no_null(cond))
        for use_tap in (False, True):
            counted = CountRows(den)
            tap = Tap(counted)
            always = AdaptiveGuidance(tap if use_tap else counted, w, -1.0, space=X0())  # switches at once
            term = PAGTerm(always, counted, s, "mid", net=net["unet"], tap=tap if use_tap else None).start()
            term(x, t, cond)  # the switch
            rows = counted.rows
            out = term(x, t2, cond)
            assert torch.allclose(out, x0_c + s * (x0_c - x0_p(t2)), rtol=1e-10, atol=1e-10)
            assert (counted.rows - rows) / n == (2 if use_tap else 3)

        class CondFirst:  # CFG with the branches in [cond, uncond] order: the tap's last rows are not x0_c
            schedule = den.schedule

            def __call__(self, x, t, c):
                c = dict(c)
                null = c.pop("null")
                a, b = split_batch(tap(torch.cat([x, x]), torch.cat([t, t]), batch_cond([c, null])), 2)
                return b + w * (a - b)

        tap = Tap(den)
        assert torch.allclose(PAGTerm(CondFirst(), den, s, "mid", tap=tap)(x, t, cond), ref, rtol=1e-10, atol=1e-10)
