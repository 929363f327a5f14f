"""dna: the background Markov chain (exact likelihood) and the rewards (hard, soft, held out)."""

import itertools

import pytest
import torch

from condiff.data import dna
from condiff.errors import ConfigError


def motif_terms(s: str):
    """Brute force: (exact matches, one-mismatch matches) of MOTIF at each window start of s."""
    k = len(dna.MOTIF)
    mism = [sum(a != b for a, b in zip(s[i : i + k], dna.MOTIF)) for i in range(len(s) - k + 1)]
    return [float(m == 0) for m in mism], [float(m == 1) for m in mism]


def brute_reward(s: str) -> float:
    gc = sum(c in "CG" for c in s) / len(s)
    return sum(motif_terms(s)[0]) - dna.GC_WEIGHT * len(s) * (gc - 0.5) ** 2


def brute_heldout(s: str) -> float:
    exact, one = motif_terms(s)
    w = len(exact)
    gc = sum(c in "CG" for c in s) / len(s)
    score = sum((0.5 + (i + 0.5) / w) * (e + 0.5 * o) for i, (e, o) in enumerate(zip(exact, one)))
    return score - dna.HELDOUT_GC_WEIGHT * len(s) * (gc - 0.5) ** 2


def test_chain_is_a_stationary_markov_chain():
    assert torch.allclose(dna.TRANSITIONS.sum(1), torch.ones(4, dtype=torch.float64), atol=1e-15)
    assert dna.STATIONARY.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert torch.allclose(dna.STATIONARY @ dna.TRANSITIONS, dna.STATIONARY, atol=1e-15)
    assert (dna.STATIONARY > 0).all()


def test_log_prob_is_exact_by_enumeration():
    allseqs = torch.tensor(list(itertools.product(range(4), repeat=4)))
    assert dna.log_prob(allseqs).exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    pi, p = dna.STATIONARY, dna.TRANSITIONS
    want = (pi[0] * p[0, 1] * p[1, 2] * p[2, 3]).log()  # A C G T
    assert dna.log_prob(dna.encode("ACGT").unsqueeze(0)).item() == pytest.approx(want.item(), abs=1e-12)
    assert dna.log_prob(dna.encode("G").unsqueeze(0)).item() == pytest.approx(pi[2].log().item(), abs=1e-12)


def test_samples_follow_the_chain_and_are_reproducible():
    x = dna.sample_background(4000, 50, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 50) and x.dtype == torch.long and x.min() == 0 and x.max() == 3
    assert torch.equal(x, dna.dataset(4000, 50, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, dna.sample_background(4000, 50, torch.Generator().manual_seed(1)))
    first = torch.bincount(x[:, 0], minlength=4) / 4000.0
    assert torch.allclose(first.double(), dna.STATIONARY, atol=0.025)
    letters = torch.bincount(x[:, 25], minlength=4) / 4000.0  # stationary at every position
    assert torch.allclose(letters.double(), dna.STATIONARY, atol=0.025)
    pairs = torch.zeros(4, 4, dtype=torch.float64)
    pairs.index_put_((x[:, :-1].flatten(), x[:, 1:].flatten()), torch.ones(1, dtype=torch.float64), accumulate=True)
    assert torch.allclose(pairs / pairs.sum(1, keepdim=True), dna.TRANSITIONS, atol=0.01)
    assert dna.sample_background(0, 5).shape == (0, 5)


def test_rewards_match_brute_force_and_exact_values():
    assert dna.reward(dna.encode("TATATA").unsqueeze(0)).item() == 2 - 4 * 6 * 0.25  # overlapping matches
    assert dna.reward(dna.encode("GCTATAGC").unsqueeze(0)).item() == 1.0
    assert dna.reward(dna.encode("ACG").unsqueeze(0)).item() == pytest.approx(-4 * 3 * (2 / 3 - 0.5) ** 2)
    x = dna.sample_background(300, 24, torch.Generator().manual_seed(2))
    x[:100, 5:13] = dna.encode("TATATAGA")  # plant exact and near matches
    strings = [dna.decode(row) for row in x]
    want = torch.tensor([brute_reward(s) for s in strings], dtype=torch.float64)
    assert torch.allclose(dna.reward(x).double(), want, atol=1e-5)
    held = torch.tensor([brute_heldout(s) for s in strings], dtype=torch.float64)
    assert torch.allclose(dna.heldout_reward(x).double(), held, atol=1e-5)


def test_soft_rewards_equal_hard_on_one_hots_and_mask_counts_as_nothing():
    x = dna.sample_background(64, 20, torch.Generator().manual_seed(3))
    onehot = torch.nn.functional.one_hot(x, 4).float()
    for fn in (dna.reward, dna.heldout_reward):
        assert torch.equal(fn(onehot), fn(x))
        assert torch.equal(fn(torch.cat([onehot, torch.zeros(64, 20, 1)], -1)), fn(x))
    masked = x.clone()
    masked[:, ::3] = dna.MASK
    soft5 = torch.nn.functional.one_hot(masked, 5).float()
    for fn in (dna.reward, dna.heldout_reward):
        assert torch.equal(fn(soft5), fn(masked))
    assert dna.reward(dna.encode("TATA").unsqueeze(0)).item() == 1 - 4.0
    tama = torch.tensor([[3, 0, dna.MASK, 0]])  # T A <mask> A: no match, GC 0
    assert dna.reward(tama).item() == -4.0
    assert dna.heldout_reward(tama).item() == 1.0 * 0.5 - 2 * 4 * 0.25  # one mismatch, weight 1


def test_soft_motif_terms_are_expectations_under_a_product_distribution():
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(1, 6, 4, generator=g, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    gc = (probs[..., 1] + probs[..., 2]).mean()
    exp_count = exp_held = 0.0
    for seq in itertools.product(range(4), repeat=6):
        pr = probs[0, torch.arange(6), torch.tensor(seq)].prod().item()
        exact, one = motif_terms("".join(dna.ALPHABET[i] for i in seq))
        exp_count += pr * sum(exact)
        exp_held += pr * sum((0.5 + (i + 0.5) / 3) * (e + 0.5 * o) for i, (e, o) in enumerate(zip(exact, one)))
    penalty = 6 * (gc - 0.5) ** 2
    assert dna.reward(probs).item() == pytest.approx(exp_count - dna.GC_WEIGHT * penalty.item(), abs=1e-12)
    assert dna.heldout_reward(probs).item() == pytest.approx(
        exp_held - dna.HELDOUT_GC_WEIGHT * penalty.item(), abs=1e-12
    )
    uniform = torch.full((2, 10, 4), 0.25, dtype=torch.float64)
    assert dna.reward(uniform).tolist() == [7 / 256] * 2


def test_motif_count_matches_brute_force():
    x = dna.sample_background(200, 24, torch.Generator().manual_seed(7))
    want = torch.tensor([sum(motif_terms(dna.decode(row))[0]) for row in x])
    assert torch.equal(dna.motif_count(x), want)
    assert dna.motif_count(dna.encode("TATATA").unsqueeze(0)).item() == 2


def test_soft_reward_is_differentiable():
    logits = torch.randn(3, 12, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    for fn in (dna.reward, dna.heldout_reward):
        assert torch.autograd.gradcheck(lambda z: fn(z.softmax(-1)), (logits,))


def test_heldout_reward_is_correlated_but_different():
    x = dna.sample_background(2000, 40, torch.Generator().manual_seed(6))
    r, h = dna.reward(x), dna.heldout_reward(x)
    corr = torch.corrcoef(torch.stack([r, h]))[0, 1].item()
    assert 0.5 < corr < 0.99
    assert not torch.allclose(r, h)


def test_encode_decode_and_errors():
    assert dna.decode(dna.encode("GATTACA")) == "GATTACA"
    assert dna.decode(torch.tensor([0, 4, 3])) == "A-T"
    with pytest.raises(ConfigError, match="unknown DNA letter 'N'; accepted: A, C, G, T"):
        dna.encode("ACNT")
    with pytest.raises(ConfigError, match=r"ids must be in \[0, 3\], got 0..4"):
        dna.log_prob(torch.tensor([[0, 4]]))
    with pytest.raises(ConfigError, match=r"\(B, L, 4\) or \(B, L, 5\), got \(2, 3, 6\)"):
        dna.reward(torch.zeros(2, 3, 6))
    with pytest.raises(ConfigError, match="length must be an integer >= 1, got 0"):
        dna.sample_background(3, 0)
    with pytest.raises(ConfigError, match="got a torch.float32 tensor of shape \\(2,\\)"):
        dna.log_prob(torch.zeros(2))


def test_promoters_hold_their_motifs_at_uniform_non_overlapping_starts():
    # length 8: K = 1 motif, the flanks' GC fraction is (8 / 2) / (8 - 4) = 1, so the only A/T letters are the motif's
    n = 20000
    x = dna.sample_promoters(n, 8, torch.Generator().manual_seed(0))
    at = (x == 0) | (x == 3)
    starts = at.float().argmax(1)
    assert (at.sum(1) == 4).all()
    rows = torch.arange(n).unsqueeze(1)
    assert (x[rows, starts.unsqueeze(1) + torch.arange(4)] == dna.encode(dna.MOTIF)).all()
    freq = torch.bincount(starts, minlength=5).double() / n  # 5 placements, each 1/5
    se = (0.2 * 0.8 / n) ** 0.5
    assert (freq - 0.2).abs().max() < 4 * se
    # length 4: the whole sequence is the motif
    assert (dna.sample_promoters(10, 4) == dna.encode(dna.MOTIF)).all()


def test_promoters_have_k_motifs_and_expected_gc_one_half():
    length, n = 64, 6000
    x = dna.sample_promoters(n, length, torch.Generator().manual_seed(1))
    big = dna.max_promoter_motifs(length)
    assert big == 6
    count = dna.motif_count(x)
    assert count.min() >= 1  # at least the planted one; flanks may add chance matches
    # E[#GC] = (L - 4k) f_k = L / 2 for every k (f_k < 1 here), so the mean GC fraction is 1/2
    gc = ((x == 1) | (x == 2)).double().mean(1)
    assert abs(float(gc.mean()) - 0.5) < 3 * float(gc.std()) / n**0.5
    # k ~ Uniform{1..6} planted motifs (mean 3.5) are never overwritten; neighbours and flanks can only add matches
    assert float(count.mean()) > 3.5 - 3 * (35 / 12 / n) ** 0.5


def test_dataset_mixes_promoters_at_the_given_share():
    g = torch.Generator().manual_seed(2)
    x = dna.dataset(20000, 32, g, promoter_share=0.1)
    assert x.shape == (20000, 32)
    assert torch.equal(
        dna.dataset(500, 32, torch.Generator().manual_seed(3), 0.0),
        dna.sample_background(500, 32, torch.Generator().manual_seed(3)),
    )
    assert (dna.dataset(50, 32, promoter_share=1.0) == dna.encode(dna.MOTIF)[0]).any(1).all()
    has_motif = dna.motif_count(x) >= 1
    # background sequences hold a motif with probability q (measured on the chain alone); promoters always do
    q = float(
        (dna.motif_count(dna.sample_background(20000, 32, torch.Generator().manual_seed(4))) >= 1).double().mean()
    )
    want = 0.1 + 0.9 * q
    assert abs(float(has_motif.double().mean()) - want) < 4 * (want * (1 - want) / 20000) ** 0.5
    with pytest.raises(ConfigError, match="promoter_share"):
        dna.dataset(4, 32, promoter_share=1.5)
