"""UniCon: one joint model of two modalities with a time per modality (Li et al., "A Simple Approach to Unifying
Diffusion-based Conditional Generation", ICLR 2025).

A joint network sees both modalities, each noised to its own time (t_a, t_b drawn independently in training), and
predicts both. The sampling schemes are chosen by the times alone, with the same weights:

- b given a: a held clean (t_a = clean), b integrated from T to clean (``UniCon.conditional("b")``);
- a given b: the mirror (``conditional("a")``);
- joint: both at the same t, T to clean (``UniCon.joint()``: a Denoiser over the channels of a and b together);
- coarse control: the given modality noised to a time s > 0 (``noised``, passed as ``given_t``);
- CFG-like guidance: the given modality clean against the given modality at T (pure noise, ``guidance_null``),
  mixed by condiff's ``CFG`` in x0 space.

With the given modality's time at the clean point the conditional denoiser is an ordinary conditional denoiser of
the other modality with the given data concatenated (the identity tests/tasks/test_unicon.py checks), and on a
jointly Gaussian pair its samples follow the exact Gaussian conditional.

The network is a callable ``net(x_a, x_b, t_a, t_b) -> (out_a, out_b)`` (raw predictions of ``prediction``: eps, x0
or v; times as the network takes them, ``time_input`` of the schedule's t). The families, data and recipes live
in ``condiff.models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from condiff.core.denoiser import Prediction, check_batch, check_cond_rows, coefficients
from condiff.errors import ConfigError, check_real

MODALITIES = ("a", "b")


def _times(t, n: int) -> torch.Tensor:
    """t as a float64 vector of n per-sample times (a number or a 0-d tensor is shared)."""
    tt = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    if tt.dim() == 0:
        return tt.expand(n).clone()
    if tt.shape != (n,):
        raise ConfigError(f"times must be one number or one per sample ({n}), got shape {tuple(tt.shape)}")
    return tt


@dataclass(frozen=True)
class UniCon:
    """The joint model: ``net`` with its schedule and prediction; modality a has ``channels_a`` channels and b
    ``channels_b`` (the joint x is their concatenation on dimension 1)."""

    net: Callable
    schedule: Any
    prediction: Prediction
    channels_a: int
    channels_b: int
    time_input: Callable = lambda t: t

    def x0(self, x_a, t_a, x_b, t_b) -> tuple[torch.Tensor, torch.Tensor]:
        """Both modalities' x0 estimates from x_a at t_a and x_b at t_b (numbers or one time per sample)."""
        check_batch(x_a, "x_a"), check_batch(x_b, "x_b")
        n = x_a.shape[0]
        for name, x, c in (("x_a", x_a, self.channels_a), ("x_b", x_b, self.channels_b)):
            if x.dim() < 2 or x.shape[1] != c:
                raise ConfigError(f"{name} must have {c} channels, got shape {tuple(x.shape)}")
        if x_b.shape[0] != n:
            raise ConfigError(f"x_a has {n} rows but x_b has {x_b.shape[0]}")
        ta, tb = _times(t_a, n), _times(t_b, n)
        (aa, sa), (ab, sb) = coefficients(self.schedule, ta, x_a), coefficients(self.schedule, tb, x_b)
        ia, ta_in = self.prediction.precondition(x_a, ta, aa, sa, self.schedule)
        ib, tb_in = self.prediction.precondition(x_b, tb, ab, sb, self.schedule)
        dt = x_a.dtype
        out_a, out_b = self.net(ia, ib, self.time_input(ta_in).to(dt), self.time_input(tb_in).to(dt))
        x0_a = self.prediction.to_x0(out_a, x_a, aa, sa, ta, self.schedule)
        x0_b = self.prediction.to_x0(out_b, x_b, ab, sb, tb, self.schedule)
        return x0_a, x0_b

    def joint(self) -> "JointDenoiser":
        return JointDenoiser(self)

    def conditional(self, target: str) -> "ConditionalDenoiser":
        """The Denoiser of modality ``target`` ('a' or 'b') given the other, which ``cond`` carries: ``given`` (its
        data) and ``given_t`` (its time: a number or one per sample; default the clean point)."""
        if target not in MODALITIES:
            raise ConfigError(f"unknown UniCon target {target!r}; accepted: a, b")
        return ConditionalDenoiser(self, target)


@dataclass(frozen=True)
class JointDenoiser:
    """Both modalities at one time: a Denoiser over x = cat(x_a, x_b) (dimension 1)."""

    unicon: UniCon

    @property
    def schedule(self):
        return self.unicon.schedule

    def __call__(self, x, t, cond=None):
        check_batch(x)
        u = self.unicon
        if x.dim() < 2 or x.shape[1] != u.channels_a + u.channels_b:
            raise ConfigError(
                f"the joint x must have {u.channels_a} + {u.channels_b} channels, got shape {tuple(x.shape)}"
            )
        x_a, x_b = x[:, : u.channels_a], x[:, u.channels_a :]
        return torch.cat(u.x0(x_a, t, x_b, t), 1)


@dataclass(frozen=True)
class ConditionalDenoiser:
    """Modality ``target`` at time t given the other modality: ``cond['given']`` (its data, one row per sample) at
    ``cond['given_t']`` (default: the clean point, the given data as it is)."""

    unicon: UniCon
    target: str

    @property
    def schedule(self):
        return self.unicon.schedule

    def __call__(self, x, t, cond=None):
        check_batch(x)
        cond = cond or {}
        given = cond.get("given")
        if not isinstance(given, torch.Tensor):
            other = "b" if self.target == "a" else "a"
            raise ConfigError(f"UniCon's conditional denoiser needs cond['given'] (modality {other}'s data)")
        check_cond_rows({"given": given}, x.shape[0])
        given_t = cond.get("given_t", self.schedule.t_clean)
        if self.target == "a":
            return self.unicon.x0(x, t, given, given_t)[0]
        return self.unicon.x0(given, given_t, x, t)[1]


# conditions ---------------------------------------------------------------------------------------------------
def noised(schedule, y: torch.Tensor, t, generator=None) -> torch.Tensor:
    """y at time t, alpha_t y + sigma_t eps: the given modality for coarse control (``given_t`` = t)."""
    tt = _times(t, y.shape[0])
    a, s = coefficients(schedule, tt, y)
    return a * y + s * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)


def given(schedule, y: torch.Tensor, t=None) -> dict:
    """The condition of a conditional scheme: ``{'given': y, 'given_t': t per row}`` (default t: the clean point).
    With guidance its null (``guidance_null``) has the same keys, as ``CFG`` batches them."""
    t = schedule.t_clean if t is None else t
    return {"given": y, "given_t": _times(t, y.shape[0]).to(y.dtype)}


def guidance_null(schedule, given: torch.Tensor, generator=None) -> dict:
    """UniCon's "unconditional" branch for CFG: the given modality at T (``noised`` to t_max, nearly pure noise),
    as a null condition ``{'given', 'given_t'}`` for ``condiff.guidance.CFG`` (cond['null'])."""
    t = schedule.t_max
    return {"given": noised(schedule, given, t, generator), "given_t": _times(t, given.shape[0]).to(given.dtype)}


# training -----------------------------------------------------------------------------------------------------
def sample_times(schedule, n: int, generator=None, p_clean: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_a, t_b): independent uniform times in [t_min, t_max]; with probability ``p_clean`` a row's a is set to the
    clean point instead and, with another ``p_clean`` (exclusive), its b, so that the conditional schemes' exact
    clean times are trained (2 p_clean <= 1)."""
    check_real("p_clean", p_clean, 0, 0.5)
    u = torch.rand(3, n, generator=generator, dtype=torch.float64)
    lo, hi = schedule.t_min, schedule.t_max
    t_a, t_b = lo + u[0] * (hi - lo), lo + u[1] * (hi - lo)
    clean = torch.tensor(float(schedule.t_clean), dtype=torch.float64)
    t_a = torch.where(u[2] < p_clean, clean, t_a)
    t_b = torch.where((u[2] >= p_clean) & (u[2] < 2 * p_clean), clean, t_b)
    return t_a, t_b


def unicon_loss(unicon: UniCon, x0_a, x0_b, t_a, t_b, generator=None) -> tuple[torch.Tensor, dict]:
    """Per-sample loss: each modality's MSE against its prediction target (eps, x0 or v) at its own time, both
    noised independently; a modality at the clean point has nothing to predict and adds nothing. Returns
    (per-sample loss, {'loss_a', 'loss_b'}: the branches' means over the rows where they count)."""
    n = x0_a.shape[0]
    ta, tb = _times(t_a, n), _times(t_b, n)
    sch, pred = unicon.schedule, unicon.prediction
    ea = torch.randn(x0_a.shape, generator=generator, dtype=x0_a.dtype).to(x0_a.device)
    eb = torch.randn(x0_b.shape, generator=generator, dtype=x0_b.dtype).to(x0_b.device)
    (aa, sa), (ab, sb) = coefficients(sch, ta, x0_a), coefficients(sch, tb, x0_b)
    xa, xb = aa * x0_a + sa * ea, ab * x0_b + sb * eb
    ia, ta_in = pred.precondition(xa, ta, aa, sa, sch)
    ib, tb_in = pred.precondition(xb, tb, ab, sb, sch)
    dt = x0_a.dtype
    out_a, out_b = unicon.net(ia, ib, unicon.time_input(ta_in).to(dt), unicon.time_input(tb_in).to(dt))
    clean = float(sch.t_clean)
    wa, wb = (ta != clean).to(dt).to(x0_a.device), (tb != clean).to(dt).to(x0_a.device)
    la = (out_a - pred.target(x0_a, ea, aa, sa, ta, sch)).pow(2).flatten(1).mean(1)
    lb = (out_b - pred.target(x0_b, eb, ab, sb, tb, sch)).pow(2).flatten(1).mean(1)
    metrics = {
        "loss_a": float((la.detach() * wa).sum() / wa.sum().clamp_min(1)),
        "loss_b": float((lb.detach() * wb).sum() / wb.sum().clamp_min(1)),
    }
    return wa * la + wb * lb, metrics
