"""Diffusion-DPO's objective (condiff.training.dpo) against its exact oracles: log 2 at theta = ref, a gradient
on the winner-loser gap alone where that gap is the reference's, and a lower loss when only the winner's error
falls."""

import math

import pytest
import torch

from condiff.errors import ConfigError
from condiff.training.dpo import dpo_loss, pair_errors

G = torch.Generator().manual_seed(0)


def _errors(n=16):
    return [torch.rand(n, generator=G, dtype=torch.float64) for _ in range(2)]


@pytest.mark.parametrize("beta", [1.0, 50.0, 5000.0])
def test_theta_equal_to_ref_gives_log_2_and_no_implicit_accuracy(beta):
    w, l = _errors()
    terms = dpo_loss(w, l, w.clone(), l.clone(), beta)
    assert terms.loss.item() == pytest.approx(math.log(2.0), abs=1e-15)
    assert terms.implicit_accuracy == 0.0 and terms.model_error == pytest.approx(terms.reference_error)


def test_at_the_references_gap_only_the_gap_gets_a_gradient():
    """Where theta's winner-loser gap equals the reference's, the loss is log 2 and its gradient is beta/4 per
    pair on the gap alone: equal and opposite on the two errors, so a shift of both errors (a change that keeps
    the gap) has zero gradient. (The literal claim "the gradient vanishes there" is false: d(-log sigmoid(u))/du
    at u = 0 is -1/2, which is what pushes the winner's error down from the start.)"""
    w, l = _errors()
    shift = torch.rand(16, generator=G, dtype=torch.float64)
    e_w = (w + shift).requires_grad_()
    e_l = (l + shift).requires_grad_()  # theta's errors differ from ref's, but e_w - e_l is ref's gap
    terms = dpo_loss(e_w, e_l, w, l, 5.0)
    gw, gl = torch.autograd.grad(terms.loss, (e_w, e_l))
    assert torch.allclose(gw, torch.full_like(gw, 0.25 * 5.0 / 16), rtol=1e-12)
    assert torch.equal(gw, -gl)
    assert terms.loss.item() == pytest.approx(math.log(2.0))


def test_lowering_only_the_winners_error_lowers_the_loss():
    w, l = _errors()
    base = dpo_loss(w, l, w, l, 10.0).loss
    better = dpo_loss(w - 0.01, l, w, l, 10.0)
    assert better.loss < base and better.implicit_accuracy == 1.0


def test_the_reference_gets_no_gradient():
    w, l = _errors()
    rw, rl = w.clone().requires_grad_(), l.clone().requires_grad_()
    e_w = w.clone().requires_grad_()
    dpo_loss(e_w, l, rw, rl, 3.0).loss.backward()
    assert rw.grad is None and rl.grad is None and e_w.grad is not None


def test_pair_errors_are_per_sample_mses_of_one_batch():
    calls = []

    def predict(x):
        calls.append(x.shape[0])
        return 2 * x

    x_w = torch.ones(3, 2, 2)
    x_l = torch.full((3, 2, 2), 3.0)
    e_w, e_l = pair_errors(predict, lambda x: x, x_w, x_l)
    assert calls == [6] and torch.equal(e_w, torch.ones(3)) and torch.equal(e_l, torch.full((3,), 9.0))


@pytest.mark.parametrize("beta", [0.0, -1.0, math.nan, math.inf, True])
def test_bad_beta_is_one_line(beta):
    w, l = _errors()
    with pytest.raises(ConfigError, match="beta must be a positive finite number"):
        dpo_loss(w, l, w, l, beta)


def test_mismatched_shapes_are_one_line():
    w, l = _errors()
    with pytest.raises(ConfigError, match="one length"):
        dpo_loss(w, l[:3], w, l, 1.0)
    with pytest.raises(ConfigError, match="one shape"):
        pair_errors(lambda x: x, lambda x: x, torch.ones(2, 3), torch.ones(3, 3))


def test_on_a_two_mode_toy_dpo_moves_mass_to_the_preferred_mode_and_a_larger_beta_less():
    """An eps-MLP pre-trained on two Gaussians at x = -2 (mode A) and x = +2 samples each about half the time;
    DPO on pairs with one sample in each mode, the A one preferred, raises A's share, and more at a small beta
    (a looser tie to the reference) than at a large one."""
    import copy

    from torch import nn

    from condiff.core.denoiser import diffuse, wrap
    from condiff.core.grids import make_grid
    from condiff.core.sampling import sample
    from condiff.core.schedules import VPDiscrete
    from condiff.solvers import DDIM

    g = torch.Generator().manual_seed(0)
    sch = VPDiscrete.from_betas("linear")

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

        def forward(self, x, t):
            t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]) / 1000.0
            return self.net(torch.cat([x, t[:, None]], 1))

    def data(n):
        mode = torch.randint(0, 2, (n,), generator=g)
        centre = torch.stack([torch.where(mode == 0, -2.0, 2.0), torch.zeros(n)], 1)
        return centre + 0.3 * torch.randn(n, 2, generator=g)

    def noised(x0, gen):
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen).double()
        eps = torch.randn(x0.shape, generator=gen)
        return diffuse(sch, x0, t, eps), t.float(), eps

    torch.manual_seed(0)
    net = MLP()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(1500):
        xt, t, eps = noised(data(256), g)
        loss = ((net(xt, t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def share_a(model):
        den = wrap(model, sch, "eps", call=lambda m, x, t_in, cond: m(x, t_in))
        z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
        x_T = z * float(sch.sigma(torch.tensor(sch.default_t_start())))
        with torch.no_grad():
            x = sample(den, DDIM(), make_grid(sch, 30), x_T, None).x
        return float((x[:, 0] < 0).float().mean())

    def dpo(beta):
        model, ref = copy.deepcopy(net), copy.deepcopy(net).eval()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(11)
        for _ in range(150):
            a, b = data(128), data(128)
            in_a, in_b = a[:, 0] < 0, b[:, 0] < 0
            keep = in_a ^ in_b  # one sample in each mode
            w = torch.where(in_a[:, None], a, b)[keep]
            lose = torch.where(in_a[:, None], b, a)[keep]
            t = torch.randint(0, 1000, (w.shape[0],), generator=gen).double()
            eps = torch.randn(w.shape, generator=gen)  # one t and one noise per pair
            xw, xl = diffuse(sch, w, t, eps), diffuse(sch, lose, t, eps)
            tt, ee = torch.cat([t, t]).float(), torch.cat([eps, eps])
            e_w, e_l = pair_errors(lambda x: model(x, tt), lambda x: ee, xw, xl)
            with torch.no_grad():
                r_w, r_l = pair_errors(lambda x: ref(x, tt), lambda x: ee, xw, xl)
            terms = dpo_loss(e_w, e_l, r_w, r_l, beta)
            opt.zero_grad()
            terms.loss.backward()
            opt.step()
        return share_a(model)

    base = share_a(net)
    small, large = dpo(30.0), dpo(1000.0)
    assert 0.4 < base < 0.6
    assert small > large > base + 0.1, (base, small, large)
