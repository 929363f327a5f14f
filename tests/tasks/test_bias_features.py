"""condiff.tasks.bias_features: h-space collection, the k-sparse autoencoder, gradient x activation attribution and
the edits (DiffLens / Asyrp), against exact answers on tiny networks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from condiff.core.denoiser import wrap
from condiff.core.grids import make_grid
from condiff.core.sampling import initial_noise, sample
from condiff.core.schedules import VPLinear
from condiff.errors import ConfigError, InputFileError
from condiff.guidance import CFG
from condiff.interop.tiny import tiny_unet
from condiff.solvers import get_solver
from condiff.tasks import bias_features as bf
from condiff.tasks.features_hspace import active_rows

SCH = VPLinear()
GRID = make_grid(SCH, 4)
CTX = 8


@pytest.fixture(scope="module")
def unet_denoiser():
    """A tiny diffusers UNet2DConditionModel as condiff's families hold it (net['unet']), with a condition."""
    torch.manual_seed(0)
    net = nn.ModuleDict({"unet": tiny_unet(in_channels=3, cross_attention_dim=CTX, seed=0, perturb=0.1)})
    net.requires_grad_(False)
    den = wrap(net, SCH, "eps", call=lambda n, x, t, c: n["unet"](x, t, encoder_hidden_states=c["ctx"]).sample)
    g = torch.Generator().manual_seed(1)
    cond = {"ctx": torch.randn(3, 2, CTX, generator=g), "null": {"ctx": torch.zeros(3, 2, CTX)}}
    x = initial_noise(SCH, float(GRID[0]), (3, 3, 8, 8), torch.Generator().manual_seed(2))
    return den, cond, x


def _sample(den, x, cond, solver="dpmpp-2m"):
    with torch.no_grad():
        return sample(den, get_solver(solver), GRID, x, cond).x


def _sae_for(den, x, cond, layer="mid", m=12, k=3, steps=30):
    hs = bf.collect_hspace(den, get_solver("ddim"), GRID, x, cond, layer=layer)
    return bf.train_sae(hs.vectors(), m, k, steps=steps, batch_size=64, seed=0).sae.requires_grad_(False), hs


# ---- identity and composition ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["dpmpp-2m", "ddpm", "heun"])
def test_scale_one_no_addition_is_bit_identical(unet_denoiser, solver):
    den, cond, x = unet_denoiser
    sae, hs = _sae_for(den, x, cond)
    gen = torch.Generator

    def run(d):
        with torch.no_grad():
            from condiff.core.sampling import Gaussian

            return sample(d, get_solver(solver), GRID, x, cond, noise=Gaussian(gen().manual_seed(5))).x

    plain = run(den)
    assert torch.equal(run(bf.FeatureEdit(den, sae, [0, 3], scale=1.0, add=0.0)), plain)
    assert torch.equal(run(bf.FeatureEdit(den, sae, [0, 3], scale=[1.0, 1.0], add=[0.0, 0.0])), plain)
    assert torch.equal(run(bf.HShift(den, torch.ones(hs.h.shape[2:]), 0.0)), plain)
    # under CFG, and a real edit changes the samples
    assert torch.equal(run(CFG(bf.FeatureEdit(den, sae, [1], scale=1.0), 2.0)), run(CFG(den, 2.0)))
    assert not torch.equal(run(bf.FeatureEdit(den, sae, list(range(12)), scale=0.0)), plain)


def test_edits_outside_their_time_window_are_bit_identical(unet_denoiser):
    den, cond, x = unet_denoiser
    sae, hs = _sae_for(den, x, cond)
    plain = _sample(den, x, cond)
    window = (5.0, 6.0)  # VPLinear's times are in [1e-3, 1]: never active
    assert torch.equal(_sample(bf.FeatureEdit(den, sae, [0], scale=3.0, t_range=window), x, cond), plain)
    assert torch.equal(_sample(bf.HShift(den, torch.ones(hs.h.shape[2:]), 2.0, t_range=window), x, cond), plain)
    assert not torch.equal(_sample(bf.HShift(den, torch.ones(hs.h.shape[2:]), 2.0, t_range=(0.0, 1.0)), x, cond), plain)


@pytest.mark.parametrize("fraction,first", [(0.01, 1), (0.25, 1), (0.5, 2), (0.6, 2), (0.75, 3), (0.99, 4), (1.0, 4)])
def test_early_window_covers_exactly_the_first_steps(fraction, first):
    window = bf.early_window(GRID, fraction)
    calls = GRID[:-1]  # dpmpp-2m calls the network once per step, at the step's start
    active = active_rows(window, calls, len(calls)) if window is not None else torch.ones(len(calls), dtype=bool)
    assert active.tolist() == [i < first for i in range(len(calls))]
    assert (window is None) == (first == len(calls))


def test_an_early_window_edit_leaves_the_later_steps_alone(unet_denoiser):
    """f 1 is the edit without a window (bit-identical); an edit of the first step only differs from plain
    sampling, from the edit at every step, and the plain sampler restarted from its state after step 1 gives it."""
    den, cond, x = unet_denoiser
    sae, _ = _sae_for(den, x, cond)
    edit = dict(latents=list(range(12)), scale=0.0)
    full = _sample(bf.FeatureEdit(den, sae, **edit), x, cond)
    assert torch.equal(_sample(bf.FeatureEdit(den, sae, **edit, t_range=bf.early_window(GRID, 1.0)), x, cond), full)
    first = bf.FeatureEdit(den, sae, **edit, t_range=bf.early_window(GRID, 0.25))
    early = _sample(first, x, cond)
    assert not torch.equal(early, full) and not torch.equal(early, _sample(den, x, cond))
    with torch.no_grad():
        x1 = sample(first, get_solver("ddim"), GRID[:2], x, cond).x  # one step, edited
        rest = sample(den, get_solver("ddim"), GRID[1:], x1, cond).x  # the others, plain
        whole = sample(first, get_solver("ddim"), GRID, x, cond).x
    assert torch.equal(whole, rest)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, math.nan, "a"])
def test_early_window_rejects_bad_fractions(fraction):
    with pytest.raises(ConfigError, match="fraction of the steps"):
        bf.early_window(GRID, fraction)


# ---- collection ------------------------------------------------------------------------------------------


def test_collect_records_every_call_and_removes_its_hook(unet_denoiser):
    den, cond, x = unet_denoiser
    hs = bf.collect_hspace(den, get_solver("heun"), GRID, x, cond, layer="mid_block")
    assert hs.h.shape == (7, 3, 16, 4, 4)  # heun: 2 calls per step, 1 on the final step to sigma = 0
    assert hs.times.shape == (7, 3)
    assert torch.equal(hs.x, _sample(den, x, cond, "heun"))
    assert hs.vectors().shape == (7 * 3 * 16, 16)
    assert hs.vectors("flat").shape == (7 * 3, 16 * 16)
    assert not bf.find_layer(den, "mid")._forward_hooks


def test_vectors_round_trip_exactly():
    h = torch.randn(2, 5, 3, 4)
    for layout in bf.LAYOUTS:
        assert torch.equal(bf.from_vectors(bf.to_vectors(h, layout), h, layout), h)
    v = bf.to_vectors(h)
    assert torch.equal(v[4], h[0, :, 1, 0])  # position (1, 0) of row 0: index 1 * 4 + 0


def test_mean_difference_is_the_difference_of_group_means():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([False, False, False, True])
    dh = bf.mean_difference(h, a, b)
    assert torch.equal(dh, h[:, :2].mean(1) - h[:, 3])


# ---- the k-sparse autoencoder -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7, 16])
def test_topk_keeps_exactly_k_nonzeros(k):
    a = torch.rand(50, 16, generator=torch.Generator().manual_seed(k)) + 0.1  # no zeros, no ties
    z = bf.topk(a, k)
    assert ((z != 0).sum(1) == k).all()
    kept = z != 0
    assert torch.equal(z[kept], a[kept])
    if k < 16:  # the kept entries are the largest
        assert (a[kept].view(50, k).min(1).values > a[~kept].view(50, 16 - k).max(1).values).all()


def test_sae_codes_have_exactly_k_nonzeros():
    sae = bf.TopKSAE(6, 20, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_e.fill_(10.0)  # every pre-activation positive: TopK keeps exactly k of the ReLU's outputs
    z = sae.encode(torch.randn(100, 6, generator=torch.Generator().manual_seed(1)))
    assert ((z != 0).sum(1) == 4).all()
    with torch.no_grad():
        sae.b_e.fill_(-100.0)  # no positive pre-activation: nothing fires
    assert (sae.encode(torch.randn(5, 6)) == 0).all()


def test_train_sae_reconstructs_sparse_data():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(12, 8, generator=g)
    codes = bf.topk(torch.rand(2048, 12, generator=g), 2)
    data = codes @ atoms
    fit = bf.train_sae(data, 24, 2, steps=400, batch_size=256, lr=1e-2, seed=0)
    assert fit.nmse[0] > 0.3 and bf.sae_nmse(fit.sae, data) < 0.1
    assert torch.allclose(fit.sae.W_d.norm(dim=0), torch.ones(24), atol=1e-5)
    again = bf.train_sae(data, 24, 2, steps=400, batch_size=256, lr=1e-2, seed=0)
    assert torch.equal(again.sae.W_d, fit.sae.W_d)  # deterministic for a seed


# ---- attribution on a planted bottleneck direction --------------------------------------------------------


class Planted(nn.Module):
    """x (B, 6) -> h (B, 8) -> x0: h = A x + 3 u + 5 v (u, v orthonormal), and the output depends on h only
    through <h, u>: x0 = 0.5 x + tanh(<h, u> / 3) (every coordinate). v is a stronger but irrelevant direction.
    The SAE of ``planted_toy`` has u as latent 5, v as latent 9 and 14 random unit features whose component
    along u is shrunk to a fifth (they are features of something else that leaks a little into u)."""

    def __init__(self, u, v):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A = nn.Parameter(0.3 * torch.randn(8, 6, generator=g))
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.mid_block = nn.Identity()

    def forward(self, x):
        h = self.mid_block(x @ self.A.t() + 3 * self.u + 5 * self.v)
        return 0.5 * x + torch.tanh(h @ self.u / 3).unsqueeze(1)


def planted_toy():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    u, v = basis[:, 0], basis[:, 1]
    net = Planted(u, v).requires_grad_(False)
    den = wrap(net, SCH, "x0", call=lambda n, x, t, c: n(x))
    d = torch.randn(8, 16, generator=g)
    d = d - 0.8 * u.unsqueeze(1) * (u @ d)  # the other features are only weakly aligned with u
    d = d / d.norm(dim=0)
    d[:, 5], d[:, 9] = u, v  # the planted feature (5) and a distractor that fires more (9)
    sae = bf.TopKSAE(8, 16, 4, generator=g)
    with torch.no_grad():
        sae.W_d.copy_(d)
        sae.W_e.copy_(d.t())
        sae.b.zero_()
    return den, sae.requires_grad_(False)


@pytest.mark.parametrize("through", ["step", "trajectory"])
def test_attribution_ranks_the_planted_feature_first(through):
    den, sae = planted_toy()
    x = initial_noise(SCH, float(GRID[0]), (16, 6), torch.Generator().manual_seed(4))
    att = bf.attribute(den, get_solver("ddim"), GRID, x, {}, sae, lambda x0: x0.mean(1), layer="mid", through=through)
    assert att.per_call.shape == (4, 16) and att.times.shape == (4,)
    assert att.top(1) == [5]
    hs = bf.collect_hspace(den, get_solver("ddim"), GRID, x, {}, layer="mid")
    z = sae.encode(hs.vectors())
    assert z[:, 9].mean() > z[:, 5].mean() > 0  # the distractor fires more: activation alone would pick it
    assert abs(float(att.total[9])) < 1e-3 * float(att.total[5])  # no gradient along v
    # the score's sign reverses the ranking
    neg = bf.attribute(den, get_solver("ddim"), GRID, x, {}, sae, lambda x0: -x0.mean(1), layer="mid", through=through)
    assert neg.top(1, -1) == [5]


def test_attribution_is_gradient_times_activation_at_each_call():
    den, sae = planted_toy()
    x = initial_noise(SCH, float(GRID[0]), (4, 6), torch.Generator().manual_seed(4))
    att = bf.attribute(den, get_solver("ddim"), GRID, x, {}, sae, lambda x0: x0.sum(1), layer="mid")
    # by hand at the first call: x0 = 0.5 x + tanh(<h, u> / 3), d score / d z_j = 6 * (1 - tanh^2) / 3 * <d_j, u>
    h = x @ den.net.A.t() + 3 * den.net.u + 5 * den.net.v
    z = sae.encode(h)
    s = h @ den.net.u / 3
    grad = (6 * (1 - torch.tanh(s) ** 2) / 3).unsqueeze(1) * (sae.W_d.t() @ den.net.u).unsqueeze(0)
    assert torch.allclose(att.per_call[0], (z * grad).mean(0), atol=1e-5)


def test_steering_amplifies_the_top_and_ablates_the_bottom():
    att = bf.Attribution(torch.tensor([[0.5, -2.0, 3.0, 0.0, -0.1, 1.0]]), torch.tensor([1.0]))
    assert bf.steering(att, 2, 4.0) == ([2, 5, 1, 4], [4.0, 4.0, 0.0, 0.0])
    assert bf.steering(att, 1, 2.0, sign=-1) == ([1, 2], [2.0, 0.0])


# ---- the edits are exact ---------------------------------------------------------------------------------


def test_feature_edit_changes_h_by_the_decoded_difference():
    den, sae = planted_toy()
    edit = bf.FeatureEdit(den, sae, [5, 2], scale=[3.0, 0.0], add=[0.5, 0.0], layer="mid")
    h = torch.randn(7, 8, generator=torch.Generator().manual_seed(0))
    z = sae.encode(h)
    dz = torch.zeros_like(z)
    dz[:, 5] = 2 * z[:, 5] + 0.5
    dz[:, 2] = -z[:, 2]
    assert torch.allclose(edit.edit(h), h + sae.s * dz @ sae.W_d.t(), atol=1e-6)
    act = bf.FeatureEdit(den, sae, [5], add=1.0, active_only=True, layer="mid")
    assert torch.allclose(act.edit(h), h + ((z[:, 5] > 0).float() * sae.s).unsqueeze(1) * sae.W_d[:, 5], atol=1e-6)


def test_hshift_adds_the_direction_at_the_nearest_time():
    den, _ = planted_toy()
    table = torch.stack([torch.zeros(8), den.net.u])  # times 1.0 -> nothing, 0.0 -> u
    shift = bf.HShift(den, table, 2.0, times=torch.tensor([1.0, 0.0]), layer="mid")
    x = torch.randn(3, 6)
    t = torch.tensor([0.9, 0.2, 0.1], dtype=torch.float64)
    s = (x @ den.net.A.t() + 3 * den.net.u + 5 * den.net.v) @ den.net.u / 3
    expect = 0.5 * x + torch.tanh(s + torch.tensor([0.0, 2.0, 2.0]) / 3).unsqueeze(1)
    assert torch.allclose(shift.denoiser.net(x), 0.5 * x + torch.tanh(s).unsqueeze(1))
    from condiff.core.denoiser import X0

    assert isinstance(den.prediction, X0)
    assert torch.allclose(shift(x, t), expect, atol=1e-6)


def test_edits_stack(unet_denoiser):
    den, cond, x = unet_denoiser
    sae, hs = _sae_for(den, x, cond)
    both = bf.HShift(bf.FeatureEdit(den, sae, [0], scale=0.0), torch.ones(hs.h.shape[2:]), 0.5)
    assert both.module is bf.find_layer(den, "mid")
    _sample(both, x, cond)


# ---- hooks never stay ----------------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_hooks_are_removed_after_an_error(unet_denoiser):
    den, cond, x = unet_denoiser
    sae, hs = _sae_for(den, x, cond)
    mid = bf.find_layer(den, "mid")

    def failing_score(x0):
        raise Boom()

    with pytest.raises(Boom):
        bf.attribute(den, get_solver("ddim"), GRID, x, cond, sae, failing_score)
    assert not mid._forward_hooks

    def exploding(x_, t, c=None):
        den(x_, t, c)
        raise Boom()

    exploding.net = den.net
    exploding.schedule = den.schedule
    for wrapper in (
        bf.FeatureEdit(exploding, sae, [0], scale=2.0),
        bf.HShift(exploding, torch.ones(hs.h.shape[2:]), 1.0),
        bf.Recorder(exploding, mid),
    ):
        with pytest.raises(Boom):
            wrapper(x, torch.tensor(0.5), cond)
        assert not mid._forward_hooks
    # a direction of the wrong shape fails inside the hook: a one-line error, and the hook is gone
    with pytest.raises(ConfigError, match="direction has shape"):
        _sample(bf.HShift(den, torch.ones(3, 2, 2), 1.0), x, cond)
    assert not mid._forward_hooks
    assert not any(m._forward_hooks for m in den.net.modules())


# ---- bad inputs: one-line ConfigErrors ----------------------------------------------------------------------


def _one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert msg.splitlines() == [msg]
    for n in needles:
        assert n in msg, (n, msg)


def test_bad_inputs_are_one_line_config_errors(unet_denoiser):
    den, cond, x = unet_denoiser
    sae, hs = _sae_for(den, x, cond)
    d = torch.ones(hs.h.shape[2:])
    cases = [
        (lambda: bf.find_layer(den, "nope"), ("'nope'", "mid_block")),
        (lambda: bf.find_layer(den, ""), ("h-space layer",)),
        (lambda: bf.find_layer(object(), "mid"), ("torch network",)),
        (lambda: bf.FeatureEdit(den, sae, [12]), ("[0, 11]",)),
        (lambda: bf.FeatureEdit(den, sae, [1, 1]), ("distinct",)),
        (lambda: bf.FeatureEdit(den, sae, []), ("non-empty",)),
        (lambda: bf.FeatureEdit(den, sae, [1], scale=math.nan), ("feature scale",)),
        (lambda: bf.FeatureEdit(den, sae, [1, 2], add=[1.0]), ("one per latent",)),
        (lambda: bf.FeatureEdit(den, "sae", [1]), ("TopKSAE",)),
        (lambda: bf.FeatureEdit(den, sae, [1], t_range=(1.0, 0.0)), ("low <= high",)),
        (lambda: bf.HShift(den, d, math.inf), ("shift scale",)),
        (lambda: bf.HShift(den, torch.full_like(d, math.nan)), ("finite",)),
        (lambda: bf.HShift(den, d.unsqueeze(0), times=torch.zeros(2)), ("one time per direction",)),
        (lambda: bf.TopKSAE(4, 8, 9), ("SAE k", "[1, 8]")),
        (lambda: bf.TopKSAE(4, 8, 2, layout="grid"), ("'grid'", "position, flat")),
        (lambda: bf.train_sae(torch.ones(1, 4), 8, 2), ("N >= 2",)),
        (lambda: bf.train_sae(torch.full((4, 2), math.nan), 8, 2), ("finite",)),
        (
            lambda: bf.mean_difference(hs.h, torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)),
            ("no row",),
        ),
        (lambda: sae.encode(torch.ones(3, 5)), ("16 values",)),
        (lambda: bf.attribute(den, get_solver("ddim"), GRID, x, cond, sae, "score"), ("function",)),
        (
            lambda: bf.attribute(den, get_solver("ddim"), GRID, x, cond, sae, lambda x0: x0.sum()),
            ("one value per row",),
        ),
        (lambda: bf.attribute(den, get_solver("ddim"), GRID, x, cond, sae, len, through="x"), ("'x'", "trajectory")),
        (lambda: bf.steering(bf.Attribution(torch.zeros(1, 4), torch.zeros(1)), 3, 2.0), ("[1, 2]",)),
    ]
    for fn, needles in cases:
        with pytest.raises(ConfigError) as e:
            fn()
        _one_line(e, *needles)
    assert not any(m._forward_hooks for m in den.net.modules())


# ---- files ----------------------------------------------------------------------------------------------


def test_features_file_round_trip(tmp_path, unet_denoiser):
    den, cond, x = unet_denoiser
    sae, hs = _sae_for(den, x, cond)
    att = bf.Attribution(torch.randn(4, 12), torch.linspace(1, 0, 4))
    dh = torch.randn(4, *hs.h.shape[2:])
    f = bf.Features(sae, (3, 1), att.total, dh, torch.linspace(1, 0, 4, dtype=torch.float64), {"layer": "mid"})
    f.save(tmp_path / "f.safetensors")
    g = bf.load_features(tmp_path / "f.safetensors")
    assert g.latents == (3, 1) and g.meta == {"layer": "mid"} and g.sae.config() == sae.config()
    for n in ("W_e", "b_e", "W_d", "b", "s"):
        assert torch.equal(getattr(g.sae, n), getattr(sae, n))
    assert torch.equal(g.delta_h, dh) and torch.equal(g.attribution, att.total)
    v = hs.vectors()
    assert torch.equal(g.sae.encode(v), sae.encode(v))


def test_bad_features_files_are_one_line_input_errors(tmp_path):
    from condiff.core.files import save_tensors

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InputFileError) as e:
        bf.load_features(bad)
    _one_line(e, "bad.safetensors")
    other = tmp_path / "other.safetensors"
    save_tensors(other, {"x": torch.zeros(2)})
    with pytest.raises(InputFileError) as e:
        bf.load_features(other)
    _one_line(e, "not a condiff features file")
    sae = bf.TopKSAE(4, 6, 2)
    f = bf.Features(sae, (0,), torch.zeros(6), torch.zeros(2, 4), torch.zeros(2, dtype=torch.float64), {})
    f.save(tmp_path / "ok.safetensors")
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / "ok.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ok.safetensors"), "pt") as fh:
        meta = fh.metadata()
    for name, value in (("latents", torch.tensor([7])), ("W_d", torch.zeros(3, 3)), ("b", torch.full((4,), math.nan))):
        broken = dict(t, **{name: value})
        save_file(broken, tmp_path / "broken.safetensors", metadata=meta)
        with pytest.raises(InputFileError) as e:
            bf.load_features(tmp_path / "broken.safetensors")
        _one_line(e, "broken.safetensors")
