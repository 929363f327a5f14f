"""DRAKES: reward fine-tuning of a masked diffusion model through a differentiable reverse trajectory (Wang et al.,
"Fine-Tuning Discrete Diffusion Models via Reward Optimization with Applications to DNA and Protein Design",
ICLR 2025, arXiv:2410.13643).

Objective: max_theta E_{x ~ p_theta}[r(x)] - alpha KL(P_theta^traj || P_pre^traj). The reverse process (MDLM /
Tweedie tau-leaping, Sahoo et al. 2024) runs on soft one-hots (B, L, V+1): on the step t -> s a masked position
stays masked with probability m(s)/m(t) and becomes token v with probability (m(t) - m(s))/m(t) c_theta(x_t)[v];
the draw is relaxed with Gumbel-softmax (Jang et al. 2017), the copy rule x_s = f x_t + (1 - f) draw with
f = 1 - x_t[..., M] (the hard indicator) carries unmasked tokens over, the last step unmasks everything, the output
is the straight-through argmax, and only the last K steps carry gradients (truncated backpropagation).

The stay/unmask probabilities are shared by the two processes and only the token law differs, so the per-step KL
is exact in closed form: KL_step = sum_{i masked at t} (m(t) - m(s))/m(t) KL(c_theta(x_t)[i] || c_pre(x_t)[i]).

``soft_trajectory``'s default relaxes only the token (the stay/unmask coin does not depend on theta); DRAKES'
relaxation of the whole (V+1)-way step is ``relax="joint"``, whose reward gradient is biased low (see there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from condiff.discrete.denoiser import mask_id, one_hot
from condiff.discrete.schedules import LogLinear, MaskSchedule, unmask_fraction
from condiff.errors import ConfigError


def _gumbel(shape, generator):
    """Gumbel(0, 1) noise in float64, drawn as ``sampling.sample`` draws it."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(1e-20, 1 - 1e-12)
    return -torch.log(-torch.log(u))


def _check_tau(tau: float) -> None:
    if not (tau > 0 and math.isfinite(tau)):
        raise ConfigError(f"the Gumbel-softmax temperature tau must be a finite number > 0, got {tau}")


def gumbel_softmax(logp: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """softmax((logp + g) / tau) with g ~ Gumbel(0, 1) i.i.d.: a soft one-hot whose argmax is an exact draw from
    softmax(logp) (the Gumbel-max trick) and which tends to that one-hot as tau -> 0."""
    _check_tau(tau)
    return torch.softmax((logp + _gumbel(logp.shape, generator).to(logp.dtype)) / tau, -1)


def straight_through(soft: torch.Tensor) -> torch.Tensor:
    """The one-hot of argmax(soft) in the forward pass, the gradient of ``soft`` in the backward pass."""
    hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


@dataclass(frozen=True)
class SoftStep:
    """One reverse step t -> s: the model's input x_t (B, L, V+1), the positions masked at t (B, L), the unmask
    probability (m(t) - m(s))/m(t), and c_theta(x_t) as log-probabilities (B, L, V)."""

    x: torch.Tensor
    masked: torch.Tensor
    fraction: float
    logp: torch.Tensor


@dataclass(frozen=True)
class SoftTrajectory:
    """The straight-through output x_0 (B, L, V+1), the steps that produced it, and the relaxed (soft) x_0 itself."""

    x0: torch.Tensor
    steps: tuple[SoftStep, ...]
    soft: torch.Tensor | None = None

    @property
    def tokens(self) -> torch.Tensor:
        return self.x0.argmax(-1)


RELAXATIONS = ("tokens", "joint")


def soft_trajectory(
    denoiser,
    n: int,
    length: int,
    steps: int,
    *,
    schedule: MaskSchedule = LogLinear(),
    tau: float = 0.5,
    generator: torch.Generator | None = None,
    truncate: int | None = None,
    cond: torch.Tensor | None = None,
    relax: str = "tokens",
    hard_inputs: bool = True,
    t_end: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> SoftTrajectory:
    """Run the relaxed reverse process from all-mask on the grid linspace(1, t_end, steps + 1) of
    ``sampling.sample``. The forward pass is an exact draw of the tau-leaping sampler (Gumbel-max in float64 on the
    hard state); the soft one-hots ride along for the gradient. ``truncate`` = K keeps gradients on the last K
    steps only (None: all). ``hard_inputs``: the model sees the hard x_t with the soft x_t's gradient (straight
    through); otherwise the soft x_t itself, as in DRAKES' code.

    ``relax`` picks what the Gumbel-softmax relaxes:
    - "joint": the (V+1)-way categorical {stay: m(s)/m(t), v: (m(t)-m(s))/m(t) c_theta[v]} as in DRAKES, with the
      hard copy rule. Its gradient drops the stay/unmask boundary whenever the draw stays masked (that soft draw is
      overwritten), which shrinks the reward gradient (by about 0.5-0.7 on the tests' toys);
    - "tokens" (default): the same law factored as Bernoulli((m(t)-m(s))/m(t)) x Categorical(c_theta); the
      Bernoulli does not depend on theta, so only the token is relaxed. The random stream is that of
      ``sampling.sample``: the same generator gives the same tokens.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    truncate = steps if truncate is None else truncate
    if not 1 <= truncate <= steps:
        raise ConfigError(f"truncate must lie in 1..steps = 1..{steps}, got {truncate}")
    if relax not in RELAXATIONS:
        raise ConfigError(f"relax must be one of {', '.join(RELAXATIONS)}, got {relax!r}")
    _check_tau(tau)
    v = denoiser.vocab_size
    m = mask_id(v)
    hard = one_hot(torch.full((n, length), m, dtype=torch.long), v).to(dtype)  # the exact sampler's state
    soft = hard  # its relaxation, which carries the gradient
    grid = torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64).tolist()
    grad_on = torch.is_grad_enabled()
    records = []
    for k in range(steps):
        frac = 1.0 if k == steps - 1 else unmask_fraction(schedule, grid[k], grid[k + 1])
        with torch.set_grad_enabled(grad_on and k >= steps - truncate):
            soft = soft if torch.is_grad_enabled() else soft.detach()
            x_in = hard + (soft - soft.detach()) if hard_inputs else soft
            masked = hard[..., m] == 1
            out = denoiser(x_in, cond)
            logp = out.to(dtype)
            if relax == "tokens":
                u = torch.rand(n, length, generator=generator, dtype=torch.float64)
                noise = _gumbel((n, length, v), generator)
                change = masked & (u < frac)
                pick = (out.double() + noise).argmax(-1)
                draw = torch.softmax((logp + noise.to(dtype)) / tau, -1)
                draw = torch.cat([draw, torch.zeros_like(draw[..., :1])], -1)
                replace = change
            else:
                log_unmask = math.log(frac) if frac > 0 else -math.inf
                log_stay = math.log1p(-frac) if frac < 1 else -math.inf
                logq = torch.cat([out.double() + log_unmask, torch.full_like(out[..., :1], log_stay).double()], -1)
                noise = _gumbel((n, length, v + 1), generator)
                pick = (logq + noise).argmax(-1)
                change = masked & (pick != m)
                draw = torch.softmax((logq + noise).to(dtype) / tau, -1)
                replace = masked  # f = 1 - x_t[..., M]: a draw that stays masked also replaces the soft state
            soft = torch.where(replace.unsqueeze(-1), draw, soft)  # x_s = f x_t + (1 - f) draw, f hard
            hard = torch.where(change.unsqueeze(-1), torch.nn.functional.one_hot(pick, v + 1).to(dtype), hard)
        records.append(SoftStep(x_in, masked, frac, logp))
    return SoftTrajectory(hard + (soft - soft.detach()), tuple(records), soft)


def soft_trajectory_ordered(
    denoiser,
    n: int,
    length: int,
    *,
    order: torch.Tensor | None = None,
    tau: float = 0.5,
    generator: torch.Generator | None = None,
    truncate: int | None = None,
    cond: torch.Tensor | None = None,
    hard_inputs: bool = True,
    dtype: torch.dtype = torch.float32,
) -> SoftTrajectory:
    """The relaxed ordered (any-order autoregressive) sampler: step k draws position ``order[k]`` (left to right by
    default) from c_theta(x_t) and nothing else, so the trajectory has ``length`` steps and each step's KL is the KL
    at that one position (``step_kl`` with fraction 1). The forward pass is ``sampling.sample_ordered``'s draw: the
    same generator gives the same tokens. ``truncate``, ``tau`` and ``hard_inputs`` are as in ``soft_trajectory``."""
    order = torch.arange(length) if order is None else order
    if sorted(order.tolist()) != list(range(length)):
        raise ConfigError(f"order must be a permutation of 0..{length - 1}, got {order.tolist()}")
    truncate = length if truncate is None else truncate
    if not 1 <= truncate <= length:
        raise ConfigError(f"truncate must lie in 1..length = 1..{length}, got {truncate}")
    _check_tau(tau)
    v = denoiser.vocab_size
    m = mask_id(v)
    hard = one_hot(torch.full((n, length), m, dtype=torch.long), v).to(dtype)
    soft = hard
    grad_on = torch.is_grad_enabled()
    records = []
    for k, i in enumerate(order.tolist()):
        with torch.set_grad_enabled(grad_on and k >= length - truncate):
            soft = soft if torch.is_grad_enabled() else soft.detach()
            x_in = hard + (soft - soft.detach()) if hard_inputs else soft
            out = denoiser(x_in, cond)
            logp = out.to(dtype)
            noise = _gumbel((n, v), generator)
            pick = (out[:, i].double() + noise).argmax(-1)
            draw = torch.softmax((logp[:, i] + noise.to(dtype)) / tau, -1)
            column = torch.zeros(n, length, dtype=torch.bool)
            column[:, i] = True
            here = column.unsqueeze(-1)
            soft = torch.where(here, torch.cat([draw, torch.zeros_like(draw[:, :1])], -1).unsqueeze(1), soft)
            hard = torch.where(here, torch.nn.functional.one_hot(pick, v + 1).to(dtype).unsqueeze(1), hard)
        records.append(SoftStep(x_in, column, 1.0, logp))
    return SoftTrajectory(hard + (soft - soft.detach()), tuple(records), soft)


def relaxed_trajectory(
    denoiser, n: int, length: int, steps: int, *, ordered: bool = False, schedule=LogLinear(), relax="tokens", **kw
) -> SoftTrajectory:
    """``soft_trajectory_ordered`` (``ordered``: ``steps`` must equal ``length``; ``schedule`` and ``relax`` do not
    apply) or ``soft_trajectory``; ``kw`` (tau, generator, truncate, cond, hard_inputs) go to either."""
    if not ordered:
        return soft_trajectory(denoiser, n, length, steps, schedule=schedule, relax=relax, **kw)
    if steps != length:
        raise ConfigError(
            f"the ordered sampler takes one step per position: steps must be length = {length}, got {steps}"
        )
    return soft_trajectory_ordered(denoiser, n, length, **kw)


def step_kl(logp: torch.Tensor, logp_pre: torch.Tensor, masked: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B,) the exact KL of one reverse step: fraction * sum over masked i of KL(c_theta[i] || c_pre[i])."""
    p = logp.exp()
    live = p > 0  # 0 log 0 = 0, written so that no NaN reaches the gradient
    diff = torch.where(live, logp, torch.zeros_like(logp)) - torch.where(live, logp_pre.to(logp.dtype), 0.0)
    per_token = (p * diff).sum(-1)
    return fraction * torch.where(masked, per_token, torch.zeros_like(per_token)).sum(-1)


def trajectory_kl(traj: SoftTrajectory, pretrained, cond: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) sum over the steps of ``step_kl`` along the sampled trajectory, a one-sample estimate of
    KL(P_theta^traj || P_pre^traj); gradients flow where the trajectory kept them."""
    total = 0
    for st in traj.steps:
        with torch.no_grad():
            logp_pre = pretrained(st.x.detach(), cond)
        total = total + step_kl(st.logp, logp_pre, st.masked, st.fraction)
    return total


def drakes_loss(
    model,
    pretrained,
    reward: Callable[[torch.Tensor], torch.Tensor],
    alpha: float,
    *,
    n: int,
    length: int,
    steps: int,
    schedule: MaskSchedule = LogLinear(),
    tau: float = 0.5,
    generator: torch.Generator | None = None,
    truncate: int | None = None,
    cond: torch.Tensor | None = None,
    relax: str = "tokens",
    hard_inputs: bool = True,
    soft_reward: bool = False,
    ordered: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-mean r(x_0) + alpha * mean KL(traj), and the detached means {"reward", "kl"}. ``reward`` maps one-hots
    (B, L, V+1) to (B,) and should be differentiable in them: the straight-through x_0 (hard values, soft gradient),
    or with ``soft_reward`` the relaxed x_0 itself (DRAKES gives its reward model the soft one-hots: a reward whose
    gradient vanishes at hard inputs, such as a product of letter indicators, still gets a signal); the reported
    "reward" is always that of the hard x_0. ``ordered``: the trajectory is ``soft_trajectory_ordered``'s, left to
    right (``steps`` must then equal ``length``; ``schedule`` and ``relax`` do not apply)."""
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a finite number >= 0, got {alpha}")
    traj = relaxed_trajectory(
        model,
        n,
        length,
        steps,
        ordered=ordered,
        schedule=schedule,
        tau=tau,
        generator=generator,
        truncate=truncate,
        cond=cond,
        relax=relax,
        hard_inputs=hard_inputs,
    )
    r = reward(traj.x0)
    kl = trajectory_kl(traj, pretrained, cond)
    objective = reward(traj.soft) if soft_reward else r
    loss = -objective.mean() + alpha * kl.mean()
    return loss, {"reward": r.mean().detach(), "kl": kl.mean().detach()}
