"""CFG dropout and CEP (specs training_discrete_tasks B2 oracles)."""

import math

import torch

from condiff.training.conditioning import cep, cfg_dropout


def test_cep_uniform_moments_and_bound():
    gamma, d = 1.5, 64
    g = torch.Generator().manual_seed(0)
    e = torch.zeros(100_000 // d * 16, d)
    delta = cep(e, gamma, "uniform", g) - e
    assert delta.abs().max() <= gamma / math.sqrt(d)
    sq = delta.pow(2).sum(-1).mean()
    # E||delta||^2 = d * (gamma^2/d)/3 = gamma^2/3; standard error of the mean is < 0.5% here
    assert abs(float(sq) - gamma**2 / 3) < 0.02 * gamma**2 / 3


def test_cep_gaussian_moments_and_no_grad():
    gamma, d = 1.0, 32
    g = torch.Generator().manual_seed(1)
    e = torch.zeros(4000, d, requires_grad=True)
    out = cep(e, gamma, "gaussian", g)
    sq = (out - e).detach().pow(2).sum(-1).mean()
    assert abs(float(sq) - gamma**2) < 0.03
    out.sum().backward()
    assert torch.equal(e.grad, torch.ones_like(e))  # delta carries no gradient


def test_cep_off_is_identity():
    e = torch.randn(3, 4)
    assert cep(e, 0.0) is e


def test_cfg_dropout_rate_and_rows():
    g = torch.Generator().manual_seed(2)
    cond = {"y": torch.arange(20000) % 10, "emb": torch.ones(20000, 3)}
    null = {"y": torch.tensor([10]), "emb": torch.zeros(1, 3)}
    out = cfg_dropout(cond, null, 0.1, g)
    dropped = out["y"] == 10
    assert abs(float(dropped.float().mean()) - 0.1) < 0.01  # 5 standard errors
    assert torch.equal(out["emb"][dropped], torch.zeros(int(dropped.sum()), 3))
    assert torch.equal(out["emb"][~dropped], torch.ones(int((~dropped).sum()), 3))
