"""RDDM: residual denoising diffusion (Liu et al., "Residual Denoising Diffusion Models", CVPR 2024).

The residual is I_res = I_in - I_0 (the degraded input minus the clean image). The forward marginal is

    I_t = I_0 + alpha_bar_t I_res + beta_bar_t eps,
    alpha_bar_t = sum_{i <= t} alpha_i,  beta_bar_t^2 = sum_{i <= t} beta_i^2

with alpha_bar_T = 1 for the paper's schedules, so I_T = I_in + beta_bar_T eps. The network predicts the residual and
the noise (objective ``pred_res_noise``; ``pred_res``, ``pred_noise`` and ``pred_x0_noise`` recover the other one
from I_t and I_in). The sampler is the paper's generalised DDIM step from t to s < t:

    I_s = I_t - (alpha_bar_t - alpha_bar_s) I_res_hat - (beta_bar_t - sqrt(beta_bar_s^2 - sigma^2)) eps_hat + sigma z,
    sigma^2 = eta (beta_bar_t^2 - beta_bar_s^2) beta_bar_s^2 / beta_bar_t^2

(eta = 0: deterministic; eta = 1: the posterior of the residual-free process). Two reductions are exact:

- residual off (alpha_bar = 0): I_t = I_0 + beta_bar_t eps is a variance-exploding diffusion (alpha = 1, sigma =
  beta_bar_t) and the step is DDIM on it with DDIM's eta^2 = RDDM's eta (eta = 1: the DDPM ancestral step);
- ``RDDMSchedule.from_alphas_cumprod`` (alpha_bar_t = 1 - sqrt(abar_t), beta_bar_t^2 = 1 - abar_t) with I_in = 0 is
  the DDPM x_t exactly with I_res = -x_0: an eps-network converts exactly (``eps_model``) and eta = 0 is DDIM.

Times are table indices t in {0, ..., T-1}; t = -1 is the clean point (alpha_bar = beta_bar = 0). Deviation: the
paper's code builds its "increased" and "decreased" weights from linspace(0, 1, T), whose zero weight makes
beta_bar_1 = 0 (I_1 noiseless, eps undefined there); here the weights are i / T, i = 1..T, before normalising.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from condiff.core.denoiser import check_batch
from condiff.core.sampling import Gaussian, NoiseSource
from condiff.errors import ConfigError, check_int, check_real, one_of

OBJECTIVES = ("pred_res_noise", "pred_res", "pred_noise", "pred_x0_noise")
WEIGHTS = ("increased", "decreased", "average")
LOSSES = ("l1", "l2")


def coefficient_weights(kind: str, num_steps: int, sum_scale: float = 1.0) -> torch.Tensor:
    """The paper's per-step weights (float64, length ``num_steps``) summing to ``sum_scale``: ``increased`` (linear
    increasing, i / T), ``decreased`` (the reverse) or ``average`` (constant)."""
    num_steps = check_int("num_steps", num_steps, lo=1)
    sum_scale = check_real("sum_scale", sum_scale, 0.0, math.inf, lo_open=True)
    if kind not in WEIGHTS:
        raise one_of("RDDM weight schedule", kind, WEIGHTS)
    if kind == "average":
        w = torch.ones(num_steps, dtype=torch.float64)
    else:
        w = torch.arange(1, num_steps + 1, dtype=torch.float64)
        if kind == "decreased":
            w = w.flip(0)
    return w / w.sum() * sum_scale


@dataclass(frozen=True, eq=False)
class RDDMSchedule:
    """The cumulative tables alpha_bar_t and beta_bar_t (float64, length T, index t = 0..T-1; t = -1 is clean).
    alpha_bar may be any finite values (0 everywhere: the residual-free baseline); beta_bar must be positive and
    strictly increasing, so every step has noise to remove."""

    alpha_bar: torch.Tensor = field(default=None)
    beta_bar: torch.Tensor = field(default=None)

    def __post_init__(self):
        ab, bb = self.alpha_bar, self.beta_bar
        if not isinstance(ab, torch.Tensor) or not isinstance(bb, torch.Tensor):
            raise ConfigError("RDDMSchedule needs alpha_bar and beta_bar as 1-D tensors")
        ab, bb = ab.detach().to(torch.float64).cpu(), bb.detach().to(torch.float64).cpu()
        if ab.dim() != 1 or bb.dim() != 1 or ab.numel() < 1 or ab.shape != bb.shape:
            raise ConfigError(
                f"alpha_bar and beta_bar must be 1-D tensors of one length, got shapes {tuple(ab.shape)} "
                f"and {tuple(bb.shape)}"
            )
        if not bool(torch.isfinite(ab).all() and torch.isfinite(bb).all()):
            raise ConfigError("alpha_bar and beta_bar must be finite")
        if not bool((bb > 0).all()) or not bool((bb[1:] > bb[:-1]).all()):
            raise ConfigError("beta_bar must be positive and strictly increasing")
        object.__setattr__(self, "alpha_bar", ab)
        object.__setattr__(self, "beta_bar", bb)

    @property
    def num_steps(self) -> int:
        return self.alpha_bar.numel()

    def __repr__(self) -> str:
        return f"RDDMSchedule(T={self.num_steps}, alpha_bar_T={float(self.alpha_bar[-1]):g}, " + (
            f"beta_bar_T^2={float(self.beta_bar[-1]) ** 2:g})"
        )

    @classmethod
    def paper(
        cls,
        num_steps: int = 1000,
        sum_scale: float = 1.0,
        alpha_kind: str = "decreased",
        beta_kind: str = "increased",
    ) -> RDDMSchedule:
        """The paper's defaults: alpha_t "decreased" summing to 1, beta_t^2 "increased" summing to ``sum_scale``
        (0.01 for restoration, 1 for generation)."""
        alphas = coefficient_weights(alpha_kind, num_steps)
        betas2 = coefficient_weights(beta_kind, num_steps, sum_scale)
        return cls(alpha_bar=alphas.cumsum(0), beta_bar=betas2.cumsum(0).sqrt())

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> RDDMSchedule:
        """The DDPM table as RDDM: alpha_bar_t = 1 - sqrt(abar_t), beta_bar_t^2 = 1 - abar_t (I_in = 0: I_t is the
        DDPM x_t and I_res = -x_0)."""
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.dim() != 1 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ConfigError("alphas_cumprod must be a 1-D tensor with values in (0, 1)")
        return cls(alpha_bar=1.0 - ac.sqrt(), beta_bar=(1.0 - ac).sqrt())

    @classmethod
    def residual_off(cls, beta_bar) -> RDDMSchedule:
        """alpha_bar = 0: the plain variance-exploding baseline I_t = I_0 + beta_bar_t eps."""
        bb = torch.as_tensor(beta_bar, dtype=torch.float64)
        return cls(alpha_bar=torch.zeros_like(bb), beta_bar=bb)

    def at(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_bar_t, beta_bar_t) as float64 tensors for integer t (a scalar or a tensor of indices) in
        [-1, T-1]; t = -1 gives (0, 0)."""
        t = torch.as_tensor(t)
        if t.dtype == torch.bool or t.is_complex() or (t.is_floating_point() and not bool((t == t.round()).all())):
            raise ConfigError(f"RDDM times must be integers in [-1, {self.num_steps - 1}], got {_short(t)}")
        t = t.long()
        t = t.cpu()
        if not bool(((t >= -1) & (t < self.num_steps)).all()):
            raise ConfigError(f"RDDM times must be integers in [-1, {self.num_steps - 1}], got {_short(t)}")
        zero = torch.zeros(1, dtype=torch.float64)
        ab, bb = torch.cat([zero, self.alpha_bar]), torch.cat([zero, self.beta_bar])
        return ab[t + 1], bb[t + 1]


def _short(t: torch.Tensor) -> str:
    values = t.flatten().tolist()
    return repr(values[0]) if len(values) == 1 else repr(values[:6])[:-1] + (", ...]" if len(values) > 6 else "]")


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample coefficient shaped to broadcast against x (batch first)."""
    if v.dim() == 0:
        return v
    if v.numel() != x.shape[0]:
        raise ConfigError(f"t has {v.numel()} entries but x has {x.shape[0]} rows")
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _check_pair(x0: torch.Tensor, x_in: torch.Tensor, names=("x0", "x_in")) -> None:
    check_batch(x0, names[0])
    check_batch(x_in, names[1])
    if x0.shape != x_in.shape:
        raise ConfigError(
            f"{names[0]} and {names[1]} must have one shape, got {tuple(x0.shape)} and {tuple(x_in.shape)}"
        )


def residual(x0: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """I_res = I_in - I_0."""
    _check_pair(x0, x_in)
    return x_in - x0


def marginal(schedule: RDDMSchedule, x0: torch.Tensor, x_in: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward marginal q(I_t | I_0, I_in) = N(I_0 + alpha_bar_t I_res, beta_bar_t^2 I): (mean, std), the mean in
    x0's dtype and the std a float64 tensor broadcastable against it."""
    _check_pair(x0, x_in)
    ab, bb = schedule.at(t)
    ab = _per_sample(ab, x0)
    mean = (x0.double() + ab * (x_in.double() - x0.double())).to(x0.dtype)
    return mean, _per_sample(bb, x0)


def q_sample(schedule: RDDMSchedule, x0: torch.Tensor, x_in: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """I_t = I_0 + alpha_bar_t (I_in - I_0) + beta_bar_t eps, computed in float64, returned in x0's dtype."""
    if not isinstance(eps, torch.Tensor) or eps.shape != x0.shape:
        raise ConfigError(f"eps must be a tensor of x0's shape {tuple(x0.shape)}")
    mean, std = marginal(schedule, x0, x_in, t)
    return (mean.double() + std * eps.double()).to(x0.dtype)


def targets(x0: torch.Tensor, x_in: torch.Tensor, eps: torch.Tensor, objective: str = "pred_res_noise") -> dict:
    """The regression targets of ``objective``: {"res": I_res, "noise": eps} for pred_res_noise, {"res"} for
    pred_res, {"noise"} for pred_noise, {"x0", "noise"} for pred_x0_noise."""
    _check_pair(x0, x_in)
    if objective not in OBJECTIVES:
        raise one_of("RDDM objective", objective, OBJECTIVES)
    out = {
        "pred_res_noise": {"res": x_in - x0, "noise": eps},
        "pred_res": {"res": x_in - x0},
        "pred_noise": {"noise": eps},
        "pred_x0_noise": {"x0": x0, "noise": eps},
    }[objective]
    return out


def loss(prediction: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], kind: str = "l1") -> torch.Tensor:
    """The sum over the predicted quantities of the mean L1 (the paper's default) or mean squared error."""
    if kind not in LOSSES:
        raise one_of("RDDM loss", kind, LOSSES)
    if set(prediction) != set(target) or not target:
        raise ConfigError(f"prediction has keys {sorted(prediction)} but the targets are {sorted(target)}")
    total = 0.0
    for key, y in target.items():
        d = prediction[key] - y
        total = total + (d.abs().mean() if kind == "l1" else d.pow(2).mean())
    return total


def to_res_noise(
    schedule: RDDMSchedule,
    objective: str,
    out: Mapping[str, torch.Tensor],
    x_t: torch.Tensor,
    x_in: torch.Tensor,
    t,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(I_res_hat, eps_hat) from a network's outputs under ``objective``, the missing one solved from
    I_t = I_in + (alpha_bar_t - 1) I_res + beta_bar_t eps (pred_noise needs alpha_bar_t != 1)."""
    if objective not in OBJECTIVES:
        raise one_of("RDDM objective", objective, OBJECTIVES)
    if not isinstance(out, Mapping):
        raise ConfigError(f"an RDDM model must return a mapping of outputs, got {type(out).__name__}")
    need = {"pred_res_noise": ("res", "noise"), "pred_res": ("res",), "pred_noise": ("noise",)}
    need["pred_x0_noise"] = ("x0", "noise")
    missing = [k for k in need[objective] if k not in out]
    if missing:
        raise ConfigError(f"objective {objective} needs the outputs {list(need[objective])}, missing {missing}")
    ab, bb = schedule.at(t)
    ab, bb = _per_sample(ab, x_t), _per_sample(bb, x_t)
    xt, xin = x_t.double(), x_in.double()
    if objective == "pred_res_noise":
        res, eps = out["res"].double(), out["noise"].double()
    elif objective == "pred_x0_noise":
        res, eps = xin - out["x0"].double(), out["noise"].double()
    elif objective == "pred_res":
        res = out["res"].double()
        eps = (xt - xin - (ab - 1) * res) / bb
    else:
        if bool((ab == 1).any()):
            raise ConfigError("pred_noise cannot recover the residual where alpha_bar_t = 1 (at t = T)")
        eps = out["noise"].double()
        res = (xt - xin - bb * eps) / (ab - 1)
    return res.to(x_t.dtype), eps.to(x_t.dtype)


def step(
    schedule: RDDMSchedule,
    x_t: torch.Tensor,
    t: int,
    s: int,
    res: torch.Tensor,
    eps: torch.Tensor,
    eta: float = 0.0,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """One reverse step from t to s < t (s = -1: clean) given the predictions I_res_hat and eps_hat:
    I_s = I_t - (alpha_bar_t - alpha_bar_s) res - (beta_bar_t - sqrt(beta_bar_s^2 - sigma^2)) eps + sigma z with
    sigma^2 = eta (beta_bar_t^2 - beta_bar_s^2) beta_bar_s^2 / beta_bar_t^2; z is drawn from ``noise`` only when
    sigma > 0."""
    eta = check_real("eta", eta, 0.0, 1.0)
    t, s = check_int("t", t, -1), check_int("s", s, -1)
    if not s < t:
        raise ConfigError(f"an RDDM step needs s < t, got t={t}, s={s}")
    (ab_t, bb_t), (ab_s, bb_s) = schedule.at(t), schedule.at(s)
    ab_t, bb_t, ab_s, bb_s = (float(v) for v in (ab_t, bb_t, ab_s, bb_s))
    var = eta * (bb_t**2 - bb_s**2) * bb_s**2 / bb_t**2
    c_eps = bb_t - math.sqrt(max(bb_s**2 - var, 0.0))
    x_s = x_t.double() - (ab_t - ab_s) * res.double() - c_eps * eps.double()
    if var > 0:
        x_s = x_s + math.sqrt(var) * (noise or Gaussian()).sample(x_t).double()
    return x_s.to(x_t.dtype)


def timesteps(schedule: RDDMSchedule, steps: int) -> list[int]:
    """``steps + 1`` descending integer times from T - 1 to the clean -1, evenly spaced (the paper's DDIM skip)."""
    steps = check_int("steps", steps, 1, schedule.num_steps)
    T = schedule.num_steps
    ts = torch.linspace(T - 1, -1, steps + 1, dtype=torch.float64).round().long().tolist()
    return ts


Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Mapping[str, Any] | None], Mapping[str, torch.Tensor]]


def sample(
    model: Model,
    schedule: RDDMSchedule,
    x_in: torch.Tensor,
    steps: int | None = None,
    eta: float = 0.0,
    objective: str = "pred_res_noise",
    cond: Mapping[str, Any] | None = None,
    noise: NoiseSource | None = None,
    x_start: torch.Tensor | None = None,
    times: list[int] | None = None,
) -> torch.Tensor:
    """Restore (or generate, with I_in = 0) from I_T = I_in + beta_bar_T eps (exact when alpha_bar_T = 1; pass
    ``x_start`` otherwise). ``model(I_t, t, I_in, cond)`` returns the objective's outputs as a mapping ("res",
    "noise", "x0"), t a per-sample long tensor of table indices. ``times`` (descending ints ending at -1)
    overrides the evenly spaced ``steps`` (default 5 for restoration, the paper's)."""
    check_batch(x_in, "x_in")
    noise = noise or Gaussian()
    if times is None:
        times = timesteps(schedule, 5 if steps is None else steps)
    else:
        times = [check_int("time", v, -1, schedule.num_steps - 1) for v in times]
        if len(times) < 2 or times[-1] != -1 or any(b >= a for a, b in zip(times, times[1:])):
            raise ConfigError("times must be strictly descending integers ending at the clean -1, at least 2")
    if x_start is None:
        _, bb = schedule.at(times[0])
        x = (x_in.double() + float(bb) * noise.sample(x_in).double()).to(x_in.dtype)
    else:
        if x_start.shape != x_in.shape:
            raise ConfigError(f"x_start must have x_in's shape {tuple(x_in.shape)}, got {tuple(x_start.shape)}")
        x = x_start
    for t, s in zip(times, times[1:]):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        res, eps = to_res_noise(schedule, objective, model(x, tt, x_in, cond), x, x_in, t)
        x = step(schedule, x, t, s, res, eps, eta, noise)
    return x


def eps_model(eps_net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], alphas_cumprod) -> Model:
    """An eps-prediction network of a DDPM table as an RDDM model (``from_alphas_cumprod``, I_in = 0):
    res = -x0_hat = -(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), noise = eps. ``eps_net(x_t, t)``."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def model(x_t, t, x_in, cond=None):
        eps = eps_net(x_t, t)
        a = ac[t.cpu()].sqrt().to(x_t.device).reshape(-1, *([1] * (x_t.dim() - 1)))
        s = (1 - ac[t.cpu()]).sqrt().to(x_t.device).reshape(-1, *([1] * (x_t.dim() - 1)))
        x0 = (x_t.double() - s * eps.double()) / a
        return {"res": (-x0).to(x_t.dtype), "noise": eps}

    return model
