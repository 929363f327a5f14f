import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from condiff.discrete import ExactConditional, LambdaDCE, LogitDenoiser, NetworkDenoiser, mask_id, sample
from condiff.discrete.block import FixedBlocks, sample_blocks
from condiff.discrete.block_cache import BlockDCE, CachedBlockDenoiser, block_dce_loss, sample_blocks_cached
from condiff.discrete.losses import apply_mask, masked_nll
from condiff.errors import ConfigError
from condiff.nets.block_transformer import BlockTransformer
from discretekit import index_of, random_joint

V, D = 3, 4
M = mask_id(V)
L = 12


class Counting:
    """A block network passing through, counting the token positions it computes and keeping its outputs."""

    def __init__(self, net):
        self.net, self.positions, self.full, self.blocks = net, 0, [], []

    def __call__(self, onehot, cond=None):
        self.positions += onehot.shape[0] * onehot.shape[1]
        out = self.net(onehot, cond)
        self.full.append(out)
        return out

    def prefix_cache(self, onehot, cond=None):
        self.positions += onehot.shape[0] * onehot.shape[1]
        return self.net.prefix_cache(onehot, cond)

    def extend_cache(self, cache, onehot):
        self.positions += onehot.shape[0] * onehot.shape[1]
        return self.net.extend_cache(cache, onehot)

    def forward_block(self, onehot, cache, start, cond=None):
        self.positions += onehot.shape[0] * onehot.shape[1]
        out = self.net.forward_block(onehot, cache, start, cond)
        self.blocks.append((start, out))
        return out


class TokenCache:
    def __init__(self, tokens):
        self.tokens, self.length = tokens, tokens.shape[1]

    def __getitem__(self, rows):
        return TokenCache(self.tokens[rows])


class ExactBlockNet:
    """The exact conditionals of a joint as a cached block network: the cache is the clean prefix, the future [M]."""

    def __init__(self, log_joint):
        self.exact = ExactConditional(log_joint)
        self.vocab_size, self.length = self.exact.vocab_size, self.exact.length

    def __call__(self, onehot, cond=None):
        return self.exact(onehot.argmax(-1))

    def prefix_cache(self, onehot, cond=None):
        return TokenCache(onehot.argmax(-1))

    def extend_cache(self, cache, onehot):
        return TokenCache(torch.cat([cache.tokens, onehot.argmax(-1)], 1))

    def forward_block(self, onehot, cache, start, cond=None):
        assert start == cache.length
        block = onehot.argmax(-1)
        e = start + block.shape[1]
        future = torch.full((block.shape[0], self.length - e), M)
        return self.exact(torch.cat([cache.tokens, block, future], 1))[:, start:e]


def _net(block_size, **kw):
    torch.manual_seed(0)
    return BlockTransformer(vocab_size=V, length=L, block_size=block_size, dim=32, layers=2, heads=4, **kw).eval()


def _pvalue(x, law, n):
    counts = torch.bincount(index_of(x, V), minlength=V**D).double()
    expected = law * n
    keep = expected > 5
    return chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue


# sampling ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size,cache", [(1, True), (3, True), (4, False), (12, True)])
def test_same_draws_give_the_tokens_and_rows_of_sample_blocks_with_fewer_positions(block_size, cache):
    """Identical generator use: the same tokens and rows as the uncached sampler on the same network (full
    block-causal forward, future [M]), the same per-call logits, and the exact count of positions computed:
    the uncached sampler computes L per row, the cached one block_size per row plus each finished block but the
    last once per sequence for the cache."""
    n, steps = 16, 5
    slow, fast = Counting(_net(block_size)), Counting(_net(block_size))
    g = torch.Generator
    with torch.no_grad():
        a, ra = sample_blocks(
            CachedBlockDenoiser(slow, V),
            n,
            L,
            FixedBlocks(block_size),
            steps,
            generator=g().manual_seed(3),
            cache=cache,
        )
    b, rb, pos = sample_blocks_cached(
        CachedBlockDenoiser(fast, V),
        n,
        L,
        block_size,
        steps,
        generator=g().manual_seed(3),
        cache=cache,
        same_draws=True,
    )
    assert (a < V).all() and torch.equal(a, b) and ra == rb
    assert slow.positions == ra * L
    assert pos == fast.positions == rb * block_size + n * (L - block_size)
    assert len(slow.full) == len(fast.blocks)
    for full, (s, block) in zip(slow.full, fast.blocks):
        assert torch.allclose(block, full[:, s : s + block_size], atol=1e-5, rtol=0)
    ratio = slow.positions / pos
    print(f"block {block_size}: uncached {slow.positions} positions, cached {pos}, ratio {ratio:.2f}")
    assert ratio == 1 if block_size == L else ratio > 1.9


def test_block_draws_match_an_uncached_loop_over_the_block_with_the_same_generator():
    """The default draws random numbers for the block only: it equals ``sample`` on the block with the full
    forward (clean prefix, future [M]) as its denoiser, token for token and logit for logit."""
    n, steps, bs = 16, 4, 4
    net = _net(bs, cond_slots=2, cond_vocab=3)
    cond = torch.randint(3, (n, 2), generator=torch.Generator().manual_seed(1))
    start = torch.full((n, L), M)
    start[:, 0], start[:, 5] = 1, 2  # a prompt token in the first block and one in the second
    fast = Counting(net)
    b, rb, pos = sample_blocks_cached(
        CachedBlockDenoiser(fast, V),
        n,
        L,
        bs,
        steps,
        generator=torch.Generator().manual_seed(7),
        cond=cond,
        start=start,
    )
    assert (b[:, 0] == 1).all() and (b[:, 5] == 2).all() and (b < V).all()
    full = NetworkDenoiser(net, V)
    x, rows, seen = start.clone(), 0, []
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for s in range(0, L, bs):

            class Block(LogitDenoiser):
                vocab_size = V

                def __call__(self, xb, idx, s=s):
                    future = torch.full((len(idx), L - s - bs), M)
                    out = full(torch.cat([x[idx, :s], xb, future], 1), cond[idx])[:, s : s + bs]
                    seen.append(out)
                    return out

            x[:, s : s + bs], r = sample(
                Block(), n, bs, steps, generator=g, cond=torch.arange(n), start=x[:, s : s + bs]
            )
            rows += r
    assert torch.equal(b, x) and rb == rows
    assert pos == rows * bs + n * (L - bs)
    assert len(seen) == len(fast.blocks)
    for ref, (_, got) in zip(seen, fast.blocks):
        assert torch.allclose(torch.log_softmax(got, -1), ref, atol=1e-5, rtol=0)


def test_on_an_exact_toy_same_draws_equal_sample_blocks_and_block_draws_keep_the_law():
    lj = random_joint(V, D, seed=2)
    ex = CachedBlockDenoiser(ExactBlockNet(lj), V)
    a, ra = sample_blocks(ex, 3000, D, FixedBlocks(2), 3, generator=torch.Generator().manual_seed(5))
    b, rb, _ = sample_blocks_cached(ex, 3000, D, 2, 3, generator=torch.Generator().manual_seed(5), same_draws=True)
    assert torch.equal(a, b) and ra == rb
    n = 20000
    # blocks of one token: the chain rule, the exact joint
    x, rows, pos = sample_blocks_cached(ex, n, D, 1, 2, generator=torch.Generator().manual_seed(0))
    assert rows == D * n and pos == D * n + (D - 1) * n
    assert _pvalue(x, lj.exp().reshape(-1), n) > 1e-3
    # two blocks of two in one step each: the blockwise factorised law q (tests/discrete/test_discrete_block.py)
    x, rows, _ = sample_blocks_cached(ex, n, D, 2, 1, generator=torch.Generator().manual_seed(1))
    assert rows == 2 * n
    p = lj.exp()
    p01 = p.sum((2, 3))
    cond23 = p / p01[:, :, None, None]
    q = p01.sum(1)[:, None, None, None] * p01.sum(0)[None, :, None, None]
    q = q * cond23.sum(3, keepdim=True) * cond23.sum(2, keepdim=True)
    assert _pvalue(x, q.reshape(-1), n) > 1e-3
    assert _pvalue(x, p.reshape(-1), n) < 1e-6


def test_bad_sampler_settings_are_refused_with_the_value():
    ex = CachedBlockDenoiser(ExactBlockNet(random_joint(V, D)), V)
    with pytest.raises(ConfigError, match="block_size must divide the length 4, got 3"):
        sample_blocks_cached(ex, 2, D, 3, 1)
    with pytest.raises(ConfigError, match="block_size must be an integer >= 1, got 0"):
        sample_blocks_cached(ex, 2, D, 0, 1)
    with pytest.raises(ConfigError, match="steps_per_block must be an integer >= 1, got 0"):
        sample_blocks_cached(ex, 2, D, 2, 0)
    with pytest.raises(ConfigError, match=r"shape \(2, 4\), got \(2, 3\)"):
        sample_blocks_cached(ex, 2, D, 2, 1, start=torch.full((2, 3), M))
    with pytest.raises(ConfigError, match="block_size must be an integer >= 1, got -1"):
        BlockDCE(-1)
    with pytest.raises(ConfigError, match="block_size must divide the length 4, got 3"):
        block_dce_loss(ExactConditional(random_joint(V, D)), torch.zeros(2, D, dtype=torch.long), block_size=3)


# the block loss ---------------------------------------------------------------------------------------------------
def test_one_block_is_lambda_dce_exactly():
    ex = ExactConditional(random_joint(V, D))
    x0 = ex.sample(500, torch.Generator().manual_seed(0))
    a = block_dce_loss(ex, x0, torch.Generator().manual_seed(1), block_size=D)
    b = LambdaDCE()(ex, x0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    net = NetworkDenoiser(_net(L), V)
    x0 = torch.randint(V, (8, L), generator=torch.Generator().manual_seed(2))
    a = BlockDCE(L)(net, x0, torch.Generator().manual_seed(3))
    assert torch.equal(a, LambdaDCE()(net, x0, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("block_size", [1, 2])
def test_the_loss_sees_a_clean_prefix_a_masked_future_and_scores_block_b_with_weight_blocks_over_lambda(block_size):
    ex = ExactConditional(random_joint(V, D, seed=3))
    inputs = []

    class Recording(LogitDenoiser):
        vocab_size = V

        def __call__(self, x, cond=None):
            inputs.append(x.clone())
            return ex(x)

    n, blocks = 400, D // block_size
    x0 = ex.sample(n, torch.Generator().manual_seed(0))
    loss = block_dce_loss(Recording(), x0, torch.Generator().manual_seed(4), block_size=block_size)
    g = torch.Generator().manual_seed(4)  # the documented draws: lambda, the mask uniforms, the block
    lam = (torch.rand(n, generator=g, dtype=torch.float64) + torch.arange(n)) / n
    masked = torch.rand(x0.shape, generator=g, dtype=torch.float64) < lam[:, None]
    which = torch.randint(blocks, (n,), generator=g)
    (xt,) = inputs
    block_of = torch.arange(D) // block_size
    before, here, after = block_of < which[:, None], block_of == which[:, None], block_of > which[:, None]
    assert torch.equal(xt[before], x0[before]) and (xt[after] == M).all()
    assert torch.equal(xt[here] == M, masked[here])
    expect = masked_nll(ex(xt), x0, here & masked) * blocks / lam
    assert torch.allclose(loss, expect, rtol=1e-12, atol=0)
    assert (loss[~(here & masked).any(1)] == 0).all() and (loss > 0).any()


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_the_block_loss_expectation_is_the_entropy_exactly_by_enumeration(block_size):
    """E_b E_lambda E_M = (1/B) sum_b B int (1/lambda) sum_M lambda^|M| (1 - lambda)^(k - |M|) h_b(M) dlambda with
    int lambda^(m-1) (1 - lambda)^(k-m) = (m-1)! (k-m)! / k!, h_b(M) = E_x sum_{i in M} -log p(x^i | x^<b, the rest
    of block b): it telescopes to H(p) (block size 1: the chain rule)."""
    ex = ExactConditional(random_joint(V, D, seed=4))
    p, seqs, k = ex.log_p.exp(), ex.sequences, block_size
    total = 0.0
    for b in range(D // k):
        for pattern in itertools.product([False, True], repeat=k):
            m = sum(pattern)
            if not m:
                continue
            masked = torch.zeros(D, dtype=torch.bool)
            masked[b * k : (b + 1) * k] = torch.tensor(pattern)
            hidden = masked | (torch.arange(D) >= (b + 1) * k)
            h = float(
                (p * masked_nll(ex(apply_mask(seqs, hidden.expand_as(seqs), V)), seqs, masked.expand_as(seqs))).sum()
            )
            total += math.factorial(m - 1) * math.factorial(k - m) / math.factorial(k) * h
    assert math.isclose(total, ex.entropy(), rel_tol=1e-12)


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_the_block_loss_monte_carlo_is_within_three_standard_errors_of_the_entropy(block_size):
    ex = ExactConditional(random_joint(V, D, seed=5))
    n = 40000
    g = torch.Generator().manual_seed(block_size)
    values = BlockDCE(block_size)(ex, ex.sample(n, g), g)
    mean, se = float(values.mean()), float(values.std()) / math.sqrt(n)
    assert abs(mean - ex.entropy()) < 3 * se, (mean, ex.entropy(), se)


def test_the_block_loss_trains_a_block_transformer():
    net = _net(3, cond_slots=1, cond_vocab=2)
    x0 = torch.randint(V, (8, L), generator=torch.Generator().manual_seed(0))
    cond = torch.randint(2, (8, 1), generator=torch.Generator().manual_seed(1))
    loss = block_dce_loss(NetworkDenoiser(net, V), x0, torch.Generator().manual_seed(2), cond, block_size=3)
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [q.grad for q in net.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert net.embed.weight.grad.abs().sum() > 0 and net.cond_embed.weight.grad.abs().sum() > 0
