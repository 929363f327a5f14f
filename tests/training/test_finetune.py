"""The fine-tuning methods and objectives as objects: exported plain networks compute what the adapted ones do,
SaRA's export leaves the trained model intact, the penalty is added only where a method has one, and the
optimizer-state count."""

from __future__ import annotations

import copy

import torch

from condiff.models.base import load_model
from condiff.training import sara as sara_lib
from condiff.training.finetune import Full, Lora, Sara, optimizer_state_bytes, with_penalty


def _out(model, module):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 16, 16, generator=g)
    hidden = torch.randn(2, 8, 64, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    with torch.no_grad():
        return module["unet"](x, torch.tensor([300, 700]), encoder_hidden_states=hidden, class_labels=pooled).sample


def _perturb(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(1e-2 * torch.randn(p.shape, generator=g))


def test_lora_plain_copy_computes_the_adapted_network():
    m = load_model("shapes")
    Lora(rank=2, alpha=2.0).prepare(m)
    _perturb([p for p in m.module.parameters() if p.requires_grad])
    plain = Lora().plain(m, m.module)
    assert not any("lora" in k for k in plain.state_dict())
    assert torch.allclose(_out(m, plain), _out(m, m.module), atol=1e-5)


def test_sara_plain_copy_computes_the_adapted_network_and_leaves_it_usable():
    m = load_model("shapes")
    Sara(theta=2e-3).prepare(m)
    _perturb(sara_lib.trainable(m.module["unet"]))
    before = _out(m, m.module)
    ema_like = copy.deepcopy(m.module)  # what the Trainer exports from
    plain = Sara().plain(m, ema_like)
    assert torch.equal(_out(m, plain), before)
    assert torch.equal(_out(m, m.module), before)  # the trained (and the copied) network still work
    assert torch.equal(_out(m, ema_like), before)


def test_full_trains_every_weight_and_adds_no_penalty():
    m = load_model("shapes")
    n = Full().prepare(m)
    assert n == sum(p.numel() for p in m.module.parameters())
    fn = with_penalty(lambda step, g: (torch.tensor(1.5), {"a": 1.0}), Full(), m.module)
    loss, metrics = fn(0, torch.Generator().manual_seed(0))
    assert loss.item() == 1.5 and metrics == {"a": 1.0}


def test_sara_penalty_is_the_nuclear_norm_drawn_after_the_objective():
    m = load_model("shapes")
    method = Sara(theta=2e-3, lambda_rank=0.5, min_dim=32)
    method.prepare(m)
    _perturb(sara_lib.trainable(m.module["unet"]))
    fn = with_penalty(lambda step, g: (torch.zeros(()), {}), method, m.module)
    loss, metrics = fn(0, torch.Generator().manual_seed(3))
    want = sara_lib.nuclear_penalty(m.module["unet"], 0.5, torch.Generator().manual_seed(3), 32)
    assert loss.item() == want.item() > 0 and metrics["penalty"] == want.item()


def test_optimizer_state_bytes_counts_both_moments_and_the_step():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(10)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 10 * 4 + 4  # exp_avg, exp_avg_sq (float32) and a float32 step
