"""The Denoiser protocol and ``wrap``.

A Denoiser maps (x_t, t, cond) to x0_hat = E[x_0 | x_t, cond] and carries its NoiseSchedule. x0 is the
canonical output: guidance mixes in x0 space and solvers consume x0 (the data-prediction view of
DPM-Solver++, Lu et al. 2022b). ``cond`` is an opaque mapping passed through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from . import parameterization as P
from .errors import one_of
from .schedules import NoiseSchedule


@runtime_checkable
class Denoiser(Protocol):
    schedule: NoiseSchedule

    def __call__(self, x: torch.Tensor, t, cond: Mapping[str, Any] | None) -> torch.Tensor: ...


def coefficients(schedule: NoiseSchedule, t, x: torch.Tensor):
    """alpha(t), sigma(t) shaped to broadcast against x (t scalar or per-sample)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    shape = (-1,) + (1,) * (x.dim() - 1) if t.dim() == 1 else ()
    return a.reshape(shape).to(x.dtype), s.reshape(shape).to(x.dtype)


class Prediction:
    """What a network outputs: converts an output to x0, and gives the training target."""

    name = "?"

    def to_x0(self, out, x, a, s, t, schedule):
        raise NotImplementedError

    def target(self, x0, eps, a, s, t, schedule):
        raise NotImplementedError


class Eps(Prediction):
    name = "eps"

    def to_x0(self, out, x, a, s, t, schedule):
        return P.eps_to_x0(x, out, a, s)

    def target(self, x0, eps, a, s, t, schedule):
        return eps


class X0(Prediction):
    name = "x0"

    def to_x0(self, out, x, a, s, t, schedule):
        return out

    def target(self, x0, eps, a, s, t, schedule):
        return x0


class V(Prediction):
    name = "v"

    def to_x0(self, out, x, a, s, t, schedule):
        return P.v_to_x0(x, out, a, s)

    def target(self, x0, eps, a, s, t, schedule):
        return a * eps - s * x0


class FlowVelocity(Prediction):
    """u = dx/dt; derivatives of alpha/sigma are taken numerically from the schedule (exact for Flow)."""

    name = "flow"

    @staticmethod
    def _derivatives(a, t, schedule, dtype):
        tt = torch.as_tensor(t, dtype=torch.float64)
        h = 1e-6
        da = (schedule.alpha(tt + h) - schedule.alpha(tt - h)) / (2 * h)
        ds = (schedule.sigma(tt + h) - schedule.sigma(tt - h)) / (2 * h)
        return tuple(d.reshape(a.shape).to(dtype) if tt.dim() else d.to(dtype) for d in (da, ds))

    def to_x0(self, out, x, a, s, t, schedule):
        da, ds = self._derivatives(a, t, schedule, x.dtype)
        return P.flow_to_x0(x, out, a, s, da, ds)

    def target(self, x0, eps, a, s, t, schedule):
        da, ds = self._derivatives(a, t, schedule, x0.dtype)
        return da * x0 + ds * eps


PREDICTIONS = {p.name: p for p in (Eps(), X0(), V(), FlowVelocity())}


def as_prediction(name_or_obj) -> Prediction:
    if isinstance(name_or_obj, Prediction):
        return name_or_obj
    if name_or_obj not in PREDICTIONS:
        raise one_of("prediction type", name_or_obj, PREDICTIONS)
    return PREDICTIONS[name_or_obj]


def _default_call(net, x, t_in, cond):
    return net(x, t_in, **dict(cond or {}))


@dataclass
class WrappedDenoiser:
    """A network behind the Denoiser protocol (see ``wrap``)."""

    net: Callable
    schedule: NoiseSchedule
    prediction: Prediction
    time_input: Callable = lambda t: t
    call: Callable = _default_call

    def __call__(self, x, t, cond=None):
        a, s = coefficients(self.schedule, t, x)
        t_vec = torch.as_tensor(t, dtype=torch.float64)
        if t_vec.dim() == 0:
            t_vec = t_vec.expand(x.shape[0])
        out = self.call(self.net, x, self.time_input(t_vec).to(x.dtype), cond)
        return self.prediction.to_x0(out, x, a, s, t, self.schedule)


def wrap(net, schedule: NoiseSchedule, prediction="eps", time_input: Callable | None = None,
         call: Callable | None = None) -> WrappedDenoiser:
    """Adapt any network to the Denoiser protocol.

    ``prediction``: a Prediction object or one of eps, x0, v, flow. ``time_input`` maps the schedule's
    time to what the network expects (identity by default: VP-discrete's t is diffusers' timestep).
    ``call(net, x, t_in, cond)`` runs the network; by default ``net(x, t_in, **cond)``."""
    return WrappedDenoiser(net, schedule, as_prediction(prediction),
                           time_input or (lambda t: t), call or _default_call)
