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
