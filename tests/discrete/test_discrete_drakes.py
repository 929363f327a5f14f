"""DRAKES against exact answers on an enumerable toy: a Markov chain over 4 tokens and 4 positions, whose exact
conditionals are the pretrained model, and a tilted model log c_theta = log c_pre + delta_theta(x_t) (delta an
MLP of the soft one-hot, zero at initialisation). Every law and KL of the 4-step sampler is computed exactly by
propagating the distribution over the (V+1)^L partially masked states."""

import copy
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from condiff.discrete import ExactConditional, LogitDenoiser, LogLinear, one_hot, sample, sample_ordered
from condiff.discrete.drakes import (
    drakes_loss,
    gumbel_softmax,
    soft_trajectory,
    soft_trajectory_ordered,
    step_kl,
    straight_through,
    trajectory_kl,
)
from condiff.discrete.schedules import unmask_fraction
from condiff.errors import ConfigError
from discretekit import index_of, markov_joint

V, L, STEPS = 4, 4, 4
CHAIN = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.3, 0.1, 0.3, 0.3], [0.2, 0.2, 0.1, 0.5], [0.1, 0.4, 0.4, 0.1]])
LOG_JOINT = markov_joint(CHAIN, torch.tensor([0.1, 0.3, 0.3, 0.3]), L)
EXACT = ExactConditional(LOG_JOINT)
STATES = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))  # every x_t, row-major in base V+1
PLACE = (V + 1) ** torch.arange(L - 1, -1, -1)
FINAL = (STATES < V).all(1)  # the fully unmasked states, in the order of EXACT.sequences
R = (EXACT.sequences == 0).sum(1).double()  # the reward on every sequence


class Pretrained(LogitDenoiser):
    """The exact conditionals c_pre, looked up at the argmax of the (soft) input."""

    vocab_size = V
    table = EXACT(STATES).float()

    def __call__(self, x, cond=None):
        ids = x.argmax(-1) if x.is_floating_point() else x
        return self.table[(ids * PLACE).sum(-1)]


PRE = Pretrained()


class Tilted(LogitDenoiser):
    """p_theta(x^i = v | x_t) = softmax(log c_pre(x_t)[i] + delta_theta(x_t)[i]); delta_theta's last layer is zero."""

    vocab_size = V

    def __init__(self, seed=0, hidden=64):
        g = torch.Generator().manual_seed(seed)
        first, last = nn.Linear(L * (V + 1), hidden), nn.Linear(hidden, L * V)
        with torch.no_grad():
            first.weight.copy_(torch.randn(first.weight.shape, generator=g) / math.sqrt(L * (V + 1)))
            first.bias.zero_()
            last.weight.zero_()
            last.bias.zero_()
        self.net = nn.Sequential(first, nn.Tanh(), last)

    def delta(self, h, net=None):
        return (self.net if net is None else net)(h.flatten(1)).view(*h.shape[:2], V)

    def __call__(self, x, cond=None, net=None):
        h = one_hot(x, V).float()
        return torch.log_softmax(PRE(h) + self.delta(h, net), -1)


def perturbed(scale=0.5, seed=1):
    model = Tilted()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.net[2].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def count_zeros(x):
    return x[..., 0].sum(-1)


def sampler_law(model, steps=STEPS):
    """The exact law of the tau-leaping sampler's output over V^L (row-major) and the exact trajectory KL to PRE."""
    with torch.no_grad():
        # the Gumbel-max draw samples softmax(logits): renormalise the float32 log-probabilities in float64
        lp, lpre = torch.log_softmax(model(STATES).double(), -1), torch.log_softmax(PRE(STATES).double(), -1)
    masked = STATES == V
    keep = nn.functional.one_hot(STATES, V + 1).double()
    grid = torch.linspace(1.0, 1e-5, steps + 1, dtype=torch.float64).tolist()
    pi = torch.zeros(len(STATES), dtype=torch.float64)
    pi[-1] = 1.0  # all masked
    kl = 0.0
    for k in range(steps):
        frac = 1.0 if k == steps - 1 else unmask_fraction(LogLinear(), grid[k], grid[k + 1])
        q = torch.cat([frac * lp.exp(), torch.full((len(STATES), L, 1), 1 - frac, dtype=torch.float64)], -1)
        q = torch.where(masked[..., None], q, keep)  # (states, L, V+1): each position's next-token law
        move = torch.ones(len(STATES), len(STATES), dtype=torch.float64)
        for i in range(L):
            move = move * q[:, i, STATES[:, i]]
        kl += float((pi * step_kl(lp, lpre, masked, frac)).sum())
        pi = pi @ move
    assert abs(float(pi[FINAL].sum()) - 1) < 1e-12
    return pi[FINAL], kl


def fine_tune(alpha, iters=300, seed=0, tau=0.5, lr=1e-2, n=256):
    model = Tilted(seed)
    opt = torch.optim.Adam(model.net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        loss, stats = drakes_loss(model, PRE, count_zeros, alpha, n=n, length=L, steps=STEPS, tau=tau, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, stats


def test_the_tilted_model_is_the_pretrained_model_at_initialisation():
    model = Tilted()
    h = one_hot(STATES, V).float()
    assert torch.equal(model.delta(h), torch.zeros(len(STATES), L, V))
    assert torch.allclose(model(STATES), PRE(STATES), atol=1e-6)
    law, kl = sampler_law(model)
    assert torch.allclose(law, sampler_law(PRE)[0], atol=1e-6) and kl < 1e-10


def test_step_kl_is_the_kl_of_the_whole_step_law_over_stay_and_the_tokens():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 5, V, generator=g, dtype=torch.float64), -1)
    lpre = torch.log_softmax(torch.randn(3, 5, V, generator=g, dtype=torch.float64), -1)
    masked = torch.rand(3, 5, generator=g) < 0.6
    frac = 0.3
    direct = torch.zeros(3, dtype=torch.float64)
    for b, i in itertools.product(range(3), range(5)):
        if masked[b, i]:  # an unmasked token is copied by both processes and adds nothing
            q = torch.cat([frac * lp[b, i].exp(), torch.tensor([1 - frac], dtype=torch.float64)])
            q_pre = torch.cat([frac * lpre[b, i].exp(), torch.tensor([1 - frac], dtype=torch.float64)])
            direct[b] += (q * (q / q_pre).log()).sum()
    assert torch.allclose(step_kl(lp, lpre, masked, frac), direct, rtol=1e-12, atol=0)


def test_gumbel_softmax_at_low_temperature_draws_the_categorical():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    n = 20000
    soft = gumbel_softmax(p.log().expand(n, 4), 0.01, torch.Generator().manual_seed(0))
    assert torch.allclose(soft.sum(-1), torch.ones(n, dtype=torch.float64))
    counts = torch.bincount(soft.argmax(-1), minlength=4).double()
    assert chisquare(counts, p * n).pvalue > 1e-3
    assert chisquare(soft.sum(0), p * n).pvalue > 1e-3  # the soft draws themselves are (nearly) one-hot
    # the argmax is the Gumbel-max draw whatever the temperature
    warm = gumbel_softmax(p.log().expand(n, 4), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(warm.argmax(-1), soft.argmax(-1))


def test_straight_through_is_the_hard_one_hot_forward_and_the_soft_gradient():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    soft = torch.softmax(logits, -1)
    hard = straight_through(soft)
    assert torch.equal(hard, nn.functional.one_hot(soft.argmax(-1), 5).float())
    (g_hard,) = torch.autograd.grad((hard * w).sum(), logits, retain_graph=True)
    (g_soft,) = torch.autograd.grad((soft * w).sum(), logits)
    assert torch.equal(g_hard, g_soft)


def test_the_forward_pass_is_the_ordinary_samplers_draw_and_the_joint_relaxation_has_its_law():
    model = perturbed()
    x, _ = sample(model, 2000, L, STEPS, generator=torch.Generator().manual_seed(3))
    traj = soft_trajectory(model, 2000, L, STEPS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(traj.tokens, x)  # relax="tokens" uses sample's random stream
    assert torch.equal(traj.x0.detach(), one_hot(x, V))
    law, _ = sampler_law(model)
    n = 20000
    for tokens in (
        sample(model, n, L, STEPS, generator=torch.Generator().manual_seed(4))[0],
        soft_trajectory(model, n, L, STEPS, relax="joint", generator=torch.Generator().manual_seed(5)).tokens,
    ):
        counts = torch.bincount(index_of(tokens, V), minlength=V**L).double()
        keep = law * n > 5
        assert chisquare(counts[keep], law[keep] * n * counts[keep].sum() / (law[keep] * n).sum()).pvalue > 1e-3


def test_the_trajectory_kl_estimate_is_unbiased_for_the_exact_trajectory_kl():
    model = perturbed()
    _, exact = sampler_law(model)
    with torch.no_grad():
        kl = trajectory_kl(soft_trajectory(model, 20000, L, STEPS, generator=torch.Generator().manual_seed(0)), PRE)
    assert exact > 0.05
    assert abs(float(kl.mean()) - exact) < 3 * float(kl.std()) / math.sqrt(len(kl))


class Recorder(LogitDenoiser):
    """Records each call's output; calls before ``frozen_before`` use a copy of the network cut off from the
    model's parameters."""

    vocab_size = V

    def __init__(self, model, frozen_before=0):
        self.model, self.frozen_before, self.outputs = model, frozen_before, []
        self.frozen = copy.deepcopy(model.net).requires_grad_(False)

    def __call__(self, x, cond=None):
        out = self.model(x, net=self.frozen if len(self.outputs) < self.frozen_before else None)
        self.outputs.append(out)
        return out


def test_truncated_backprop_keeps_only_the_last_steps_gradient():
    def run(truncate, frozen_before=0):
        model = perturbed()
        rec = Recorder(model, frozen_before)
        g = torch.Generator().manual_seed(0)
        loss, _ = drakes_loss(rec, PRE, count_zeros, 1.0, n=128, length=L, steps=STEPS, generator=g, truncate=truncate)
        return loss, rec.outputs, torch.autograd.grad(loss, list(model.net.parameters()), retain_graph=True)

    loss1, out1, grad1 = run(1)
    loss4, out4, grad4 = run(STEPS)
    assert torch.equal(loss1, loss4)  # truncation changes the gradient only
    assert [o.requires_grad for o in out1] == [False] * (STEPS - 1) + [True]
    # with full backprop every earlier call does receive gradient, so the check above is not vacuous
    for o in out4[:-1]:
        (g,) = torch.autograd.grad(loss4, o, retain_graph=True)
        assert g.abs().sum() > 0
    assert not all(torch.allclose(a, b) for a, b in zip(grad1, grad4))
    # K = 1 equals full backprop through a run whose earlier calls are cut off from the parameters
    loss_cut, _, grad_cut = run(STEPS, frozen_before=STEPS - 1)
    assert torch.equal(loss_cut, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grad1, grad_cut))


def test_fine_tuning_reaches_the_tilted_target_and_a_larger_alpha_keeps_closer_to_the_pretrained_model():
    p = LOG_JOINT.exp().reshape(-1)
    pre_r = float((p * R).sum())
    kls = {}
    for alpha in (0.5, 2.0):
        model, stats = fine_tune(alpha)
        law, kls[alpha] = sampler_law(model)
        target = p * torch.exp(R / alpha)
        target_r = float((target * R).sum() / target.sum())  # E_{p*}[r], p* proportional to p_pre exp(r / alpha)
        assert abs(pre_r / target_r - 1) > 0.25  # the 10% band leaves the pretrained model out
        assert abs(float((law * R).sum()) / target_r - 1) < 0.10, (alpha, float((law * R).sum()), target_r)
        assert math.isfinite(float(stats["kl"])) and math.isfinite(kls[alpha])
    assert 0 < kls[2.0] < kls[0.5]


def test_a_huge_alpha_leaves_the_reward_where_it_was():
    model, _ = fine_tune(1e4)
    n = 20000
    x, _ = sample(model, n, L, STEPS, generator=torch.Generator().manual_seed(7))
    r = (x == 0).sum(1).double()
    pre_r = float((sampler_law(PRE)[0] * R).sum())
    assert abs(float(r.mean()) - pre_r) < 3 * float(r.std()) / math.sqrt(n)


def test_bad_drakes_settings_are_refused_with_the_value():
    model = Tilted()
    with pytest.raises(ConfigError, match="got 0"):
        soft_trajectory(model, 2, L, 0)
    with pytest.raises(ConfigError, match="got 5"):
        soft_trajectory(model, 2, L, 4, truncate=5)
    with pytest.raises(ConfigError, match="'gumbel'"):
        soft_trajectory(model, 2, L, 4, relax="gumbel")
    with pytest.raises(ConfigError, match="got 0"):
        gumbel_softmax(torch.zeros(2, 3), 0.0)
    with pytest.raises(ConfigError, match="got -1"):
        drakes_loss(model, PRE, count_zeros, -1.0, n=2, length=L, steps=4)


def test_soft_reward_scores_the_relaxed_output_for_the_gradient_and_reports_the_hard_reward():
    model = perturbed()

    def run(soft):
        g = torch.Generator().manual_seed(0)
        loss, stats = drakes_loss(
            model, PRE, count_zeros, 0.0, n=64, length=L, steps=STEPS, generator=g, soft_reward=soft
        )
        return loss, stats

    (hard_loss, hard), (soft_loss, soft) = run(False), run(True)
    assert torch.equal(hard["reward"], soft["reward"]) and torch.equal(hard["kl"], soft["kl"])  # same draws
    assert torch.equal(hard_loss, -hard["reward"])  # alpha 0: the loss is minus the reward of the hard output
    g = torch.Generator().manual_seed(0)
    traj = soft_trajectory(model, 64, L, STEPS, generator=g)
    assert torch.allclose(soft_loss, -count_zeros(traj.soft).mean())  # ... or of the relaxed one
    assert not torch.allclose(soft_loss, hard_loss)


def ordered_law(model):
    """The exact law of the left-to-right sampler over V^L, in the order of EXACT.sequences."""
    seqs = EXACT.sequences
    logq = torch.zeros(len(seqs), dtype=torch.float64)
    with torch.no_grad():
        for i in range(L):
            state = seqs.clone()
            state[:, i:] = V  # position i and those after it are still masked
            logq += torch.log_softmax(model(state).double(), -1)[torch.arange(len(seqs)), i, seqs[:, i]]
    return logq.exp()


def test_the_ordered_trajectory_draws_the_ordered_samplers_tokens_and_estimates_the_sequence_kl():
    model = perturbed()
    x, _ = sample_ordered(model, 4000, L, generator=torch.Generator().manual_seed(3))
    traj = soft_trajectory_ordered(model, 4000, L, generator=torch.Generator().manual_seed(3))
    assert torch.equal(traj.tokens, x)
    assert torch.equal(traj.x0.detach(), one_hot(x, V))
    q, p = ordered_law(model), ordered_law(PRE)
    assert torch.allclose(p, LOG_JOINT.exp().reshape(-1).double(), atol=1e-6)  # exact conditionals draw the joint
    exact = float((q * (q / p).log()).sum())  # one token per step: the trajectory KL is the sequences' KL
    with torch.no_grad():
        kl = trajectory_kl(traj, PRE)
    assert exact > 0.05
    assert abs(float(kl.mean()) - exact) < 3 * float(kl.std()) / math.sqrt(len(kl))


def test_ordered_truncation_cuts_the_early_steps_and_bad_settings_are_refused():
    traj = soft_trajectory_ordered(perturbed(), 8, L, truncate=1)
    assert [st.logp.requires_grad for st in traj.steps] == [False] * (L - 1) + [True]
    with pytest.raises(ConfigError, match="steps must be length = 4, got 3"):
        drakes_loss(perturbed(), PRE, count_zeros, 1.0, n=8, length=L, steps=3, ordered=True)
    with pytest.raises(ConfigError, match="truncate must lie in 1..length = 1..4, got 5"):
        soft_trajectory_ordered(PRE, 8, L, truncate=5)
    with pytest.raises(ConfigError, match="order must be a permutation of 0..3"):
        soft_trajectory_ordered(PRE, 8, L, order=torch.tensor([0, 0, 1, 2]))


def test_ordered_fine_tuning_reaches_the_tilted_target():
    p = LOG_JOINT.exp().reshape(-1).double()
    alpha = 0.5
    model = Tilted(0)
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = drakes_loss(model, PRE, count_zeros, alpha, n=256, length=L, steps=L, generator=g, ordered=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    target = p * torch.exp(R / alpha)
    target_r = float((target * R).sum() / target.sum())
    assert abs(float((p * R).sum()) / target_r - 1) > 0.25  # the 10% band leaves the pretrained model out
    assert abs(float((ordered_law(model) * R).sum()) / target_r - 1) < 0.10
