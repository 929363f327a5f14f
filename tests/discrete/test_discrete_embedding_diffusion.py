"""Embedding diffusion (DiffuSeq loss, DDIM sampler with clamping): the sqrt schedule, a finite loss that falls in a
few steps on a tiny net, sampler shapes and determinism under a seed, clamping, and one-line input errors."""

from __future__ import annotations

import math

import pytest
import torch

from condiff.discrete.embedding_diffusion import (
    LossWeights,
    embedding_diffusion_loss,
    make_schedule,
    nearest_embedding,
    sample_embeddings,
    sqrt_schedule,
    unit_time,
)
from condiff.errors import ConfigError
from condiff.nets.diffusia import DiffuSIANet

V, L = 9, 5


def tiny(spiral: bool = True):
    torch.manual_seed(0)
    return DiffuSIANet(V, L, dim=16, layers=1, heads=2, spiral=spiral, embed_dim=4)


def test_sqrt_schedule_is_diffusion_lm_s():
    s = sqrt_schedule(2000)
    ac = s.alphas_cumprod
    assert ac.numel() == 2000 and bool((ac[1:] < ac[:-1]).all())
    # alpha_bar_i = f((i+1)/T) / f(0) with f(u) = 1 - sqrt(u + 1e-4), until the last, capped step
    f = lambda u: 1 - math.sqrt(u + 1e-4)  # noqa: E731
    assert ac[999].item() == pytest.approx(f(1000 / 2000) / f(0), rel=1e-9)
    assert float(unit_time(s, s.t_max)) == 1.0 and float(unit_time(s, s.t_clean)) == 0.0
    assert make_schedule("cosine").variance_preserving
    with pytest.raises(ConfigError, match="'linear'"):
        make_schedule("linear")


def test_loss_is_finite_and_falls_on_a_tiny_model():
    net = tiny()
    sched = make_schedule("sqrt", 200)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(V, (32, L), generator=g)
    tgt = src.flip(1)  # a fixed function of the source
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss, terms = embedding_diffusion_loss(net, sched, src, tgt, torch.Generator().manual_seed(step % 3))
        assert torch.isfinite(loss) and set(terms) == {"mse", "round_x0", "round_z0", "prior"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    _, terms = embedding_diffusion_loss(net, sched, src, tgt, g, LossWeights(0.0, 0.0, False, 0.1))
    assert set(terms) == {"mse"}


def test_sampler_shapes_determinism_and_steps():
    net = tiny().eval()
    sched = make_schedule("sqrt", 200)
    src = torch.randint(V, (4, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = sample_embeddings(net, sched, src, L, 6, torch.Generator().manual_seed(3))
        b = sample_embeddings(net, sched, src, L, 6, torch.Generator().manual_seed(3))
        c = sample_embeddings(net, sched, src, L, 6, torch.Generator().manual_seed(4))
    assert a.tokens.shape == (4, L) and a.x.shape == (4, L, 4) and a.nfe == 6
    assert a.tokens.dtype == torch.long and int(a.tokens.max()) < V
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)
    # clamped: the final sample is made of embedding rows
    assert torch.equal(nearest_embedding(a.x, net.embedding.weight), a.x)
    with torch.no_grad():
        free = sample_embeddings(net, sched, src, L, 6, torch.Generator().manual_seed(3), clamp=False)
    assert free.tokens.shape == (4, L) and not torch.equal(free.x, a.x)


def test_plain_net_samples_the_same_with_its_encoder_cached():
    plain = tiny(spiral=False).eval()
    sched = make_schedule("cosine")
    src = torch.randint(V, (2, L), generator=torch.Generator().manual_seed(0))

    class Uncached(torch.nn.Module):  # the same net, without ``encode``: the encoder runs at every step
        def __init__(self, net):
            super().__init__()
            self.inner, self.embedding, self.config = net, net.embedding, net.config

        def forward(self, *args, **kw):
            return self.inner(*args, **kw)

    with torch.no_grad():
        a = sample_embeddings(plain, sched, src, L, 4, torch.Generator().manual_seed(0))
        b = sample_embeddings(Uncached(plain), sched, src, L, 4, torch.Generator().manual_seed(0))
    assert torch.equal(a.x, b.x)


def test_nearest_embedding():
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    x = torch.tensor([[[0.9, 0.1], [0.1, 2.0], [0.2, -0.1]]])
    assert torch.equal(nearest_embedding(x, w), w[torch.tensor([[1, 2, 0]])])


@pytest.mark.parametrize(
    "src,tgt,steps,needle",
    [
        (torch.zeros(2, L), None, 3, "src must be a 2-D integer"),
        (torch.full((2, L), V), None, 3, f"src ids must be in [0, {V - 1}]"),
        (torch.zeros(2, L, dtype=torch.long), None, 0, "steps must be a positive integer"),
        (torch.zeros(2, L, dtype=torch.long), torch.zeros(3, L, dtype=torch.long), 3, "one row each"),
    ],
)
def test_bad_inputs_are_one_line_errors(src, tgt, steps, needle):
    net, sched = tiny(), make_schedule("sqrt", 50)
    with pytest.raises(ConfigError) as e:
        if tgt is None:
            sample_embeddings(net, sched, src, L, steps)
        else:
            embedding_diffusion_loss(net, sched, src, tgt)
    assert needle in str(e.value) and "\n" not in str(e.value)
