"""Adaptive Guidance, AG (Castillo, Kohler, Pérez, Pérez, Pumarola, Ghanem, Arbeláez, Thabet, AAAI 2025,
"Adaptive guidance: training-free acceleration of conditional diffusion models", arXiv 2312.12487).

At every evaluation of a row that still uses guidance, both branches run and

    gamma = cos(eps_c(x_t), eps_u(x_t))      (each sample flattened)

Where alpha_t is (nearly) 0 at the start of the grid, eps_c = eps_u = x / sigma there and gamma ~ 1, so the
eps-space rule switches at the first evaluation for any gamma_bar below that, and on a model whose eps
cosine stays near 1 throughout it switches at once or never (docs/guidance.md). The similarity space is therefore an
option: ``space`` is a condiff
Prediction object, ``Eps()`` by default (the paper's rule), ``X0()`` (the cosine of the two denoised estimates,
which rises monotonically over a trajectory, as the paper expects of gamma) or ``V()``.

The evaluation returns the CFG estimate contrast(x0_c, x0_u, w). At the first evaluation where gamma > gamma_bar
the row switches: every later evaluation of that row in the trajectory is conditional-only (x0_guided = x0_c),
one network row instead of two. The evaluation that detects the switch still returns CFG, since both branches
were paid for (the paper leaves this open; the community implementation does the same). The cosine is clamped
to [-1, 1], so gamma_bar = 1 never switches and AG is then CFG bit for bit (same batched call, same
arithmetic); gamma_bar = -1 switches every row at its first evaluation.

The switch is per sample and per trajectory; rows that switched are dropped from the null branch of the
batched forward, layout [null rows still guided, cond rows], so the network cost is n + (rows still guided).

Per-trajectory state, explicit. The state is a frozen ``AGState`` and the pure function ``adaptive_step``
maps (x, t, cond, state) to (x0, state'). ``AdaptiveGuidance`` is the configuration; its ``start()`` returns an
``AGTrajectory``, the Denoiser of one trajectory, which creates the state (nothing switched) at its first
evaluation and passes it from evaluation to evaluation. ``sample`` starts its denoiser once per call
(``condiff.core.denoiser.start_trajectory``; wrappers forward ``start`` to what they wrap), so every run begins
afresh, and two trajectories stepped by hand, interleaved, are two ``start()`` calls. Every evaluation of a
trajectory belongs to it (repeated or rising t, as in EDM's churn, keep the switches); its batch size is fixed.
Calling the configuration itself is a ConfigError. The run's ``state`` (``sample(...).denoiser.state``) shows
which rows switched and at which t.

``CountRows`` wraps any Denoiser and counts its calls and batch rows: the network cost the loop's NFE (calls
of the guided denoiser) does not see. Its trajectories count into the object itself.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from condiff.core.denoiser import Eps, Prediction, Wrapper, start_trajectory
from condiff.errors import ConfigError
from condiff.guidance.cfg import contrast
from condiff.guidance.interval import branches, split_null
from condiff.guidance.rescale import to_space
from condiff.guidance.schedules import check_scale, per_row, scale_at


@dataclass(frozen=True)
class AGState:
    """The switch state of one trajectory (n rows).

    switched: bool [n], rows that are conditional-only from now on; switch_t: float64 [n], the t of the
    evaluation at which each row switched (nan if not yet); gamma: float64 [n], the cosine measured at the
    latest evaluation (nan for rows not measured); t_first / t_last: the largest t of the first / latest
    evaluation (a record; nothing depends on them); evaluations and rows: calls and network rows so far in this
    trajectory."""

    switched: torch.Tensor
    switch_t: torch.Tensor
    gamma: torch.Tensor
    t_first: float
    t_last: float
    evaluations: int = 0
    rows: int = 0

    @classmethod
    def start(cls, n: int, t_first: float) -> "AGState":
        nan = torch.full((n,), math.nan, dtype=torch.float64)
        return cls(torch.zeros(n, dtype=torch.bool), nan, nan.clone(), float(t_first), float(t_first))

    @property
    def n(self) -> int:
        return self.switched.numel()


def _t_max(t) -> float:
    return float(torch.as_tensor(t, dtype=torch.float64).max())


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of two batches (each sample flattened), in float64, clamped to [-1, 1]; 0 when
    either vector is zero."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(torch.float64).tiny)
    return ((a * b).sum(1) / den).clamp(-1.0, 1.0)


def similarity(space: Prediction, schedule, x, t, x0_c, x0_u) -> torch.Tensor:
    """gamma = cos(y_c, y_u) per sample, y the two estimates in the prediction ``space`` (rows of x match)."""
    return cosine(to_space(space, x, x0_c, t, schedule), to_space(space, x, x0_u, t, schedule))


def adaptive_step(
    denoiser,
    x: torch.Tensor,
    t,
    cond: Mapping[str, Any],
    null: Mapping[str, Any],
    scale,
    gamma_bar: float,
    state: AGState,
    space: Prediction = Eps(),
):
    """One AG evaluation: (x0_guided, next state). ``cond`` without its null entry; ``null`` the null one;
    gamma is measured in the prediction ``space``."""
    n = x.shape[0]
    if state.n != n:
        raise ConfigError(f"AG state is for a batch of {state.n}, got x with batch {n}")
    w = scale_at(scale, t)
    t_now = _t_max(t)
    nan = torch.full((n,), math.nan, dtype=torch.float64)
    if isinstance(w, float) and w in (0.0, 1.0):  # as CFG: one branch, nothing to measure
        out = denoiser(x, t, cond if w == 1.0 else null)
        return out, replace(state, gamma=nan, t_last=t_now, evaluations=state.evaluations + 1, rows=state.rows + n)
    active = ~state.switched.to(x.device)
    x0_c, x0_u = branches(denoiser, x, t, cond, null, active)
    k = x0_u.shape[0]
    index = active.nonzero().squeeze(1)
    if k == n:
        out = contrast(x0_c, x0_u, per_row(w, x0_c))
        t_rows = t
    else:
        tt = torch.as_tensor(t)
        t_rows = tt[index.to(tt.device)] if tt.dim() == 1 else t
        w_rows = w[index.to(w.device)] if isinstance(w, torch.Tensor) else w
        out = x0_c.clone()
        if k:
            out[index] = contrast(x0_c[index], x0_u, per_row(w_rows, x0_u))
    gamma = nan.clone()
    switched, switch_t = state.switched.clone(), state.switch_t.clone()
    if k:
        g = similarity(space, denoiser.schedule, x[index] if k < n else x, t_rows, x0_c[index] if k < n else x0_c, x0_u)
        index = index.cpu()
        gamma[index] = g.cpu()
        flip = index[g.cpu() > gamma_bar]
        switched[flip] = True
        tt = torch.as_tensor(t, dtype=torch.float64).cpu()
        switch_t[flip] = tt[flip] if tt.dim() == 1 else float(tt)
    return out, AGState(switched, switch_t, gamma, state.t_first, t_now, state.evaluations + 1, state.rows + n + k)


@dataclass
class AdaptiveGuidance(Wrapper):
    """AG (module docstring): CFG with weight ``scale`` (a number or w(t)) until a row's cosine between the two
    branches in ``space`` (eps by default) exceeds ``gamma_bar`` in [-1, 1]; conditional-only for that row
    afterwards. A configuration: ``start()`` gives the Denoiser of one trajectory (``sample`` calls it)."""

    denoiser: Any
    scale: float | Callable = 3.0
    gamma_bar: float = 0.995
    null: Mapping[str, Any] | None = None
    space: Prediction = field(default_factory=Eps)

    def __post_init__(self):
        self.scale = check_scale(self.scale)
        g = self.gamma_bar
        if not isinstance(g, numbers.Real) or isinstance(g, bool) or not -1.0 <= g <= 1.0:
            raise ConfigError(
                f"AG threshold gamma_bar must be a number in [-1, 1] (1: never switch, i.e. CFG), got {g!r}"
            )
        if not isinstance(self.space, Prediction):
            raise ConfigError(f"AG similarity space must be a Prediction object (Eps(), X0(), V()), got {self.space!r}")

    def start(self, memo: dict | None = None) -> "AGTrajectory":
        """The Denoiser of one new trajectory (fresh state), over the started inner denoiser."""
        return AGTrajectory(self, start_trajectory(self.denoiser, memo))

    def __call__(self, x, t, cond=None):
        raise ConfigError(
            "AdaptiveGuidance keeps per-trajectory state: run it with sample(), or call .start() for "
            "the denoiser of one trajectory"
        )


@dataclass
class AGTrajectory(Wrapper):
    """One trajectory of adaptive guidance: ``config`` (the AdaptiveGuidance), the started inner ``denoiser``
    and ``state``, the AGState (None before the first evaluation). ``start()`` begins a new trajectory."""

    config: AdaptiveGuidance
    denoiser: Any
    state: AGState | None = None

    def start(self, memo: dict | None = None) -> "AGTrajectory":
        return self.config.start(memo)

    def __call__(self, x, t, cond=None):
        c = self.config
        cond, null = split_null(cond, c.null, what="adaptive guidance")
        state = AGState.start(x.shape[0], _t_max(t)) if self.state is None else self.state
        out, self.state = adaptive_step(self.denoiser, x, t, cond, null, c.scale, float(c.gamma_bar), state, c.space)
        return out


@dataclass
class CountRows(Wrapper):
    """Wraps a Denoiser; counts its calls and the batch rows it was given (the network's cost). A started
    trajectory over a stateful inner denoiser counts into this object too."""

    denoiser: Any
    calls: int = 0
    rows: int = 0

    def start(self, memo: dict | None = None):
        inner = start_trajectory(self.denoiser, memo)
        return self if inner is self.denoiser else _CountInto(self, inner)

    def __call__(self, x, t, cond=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.denoiser(x, t, cond)


@dataclass
class _CountInto(Wrapper):
    """``CountRows`` over a started inner denoiser, counting into the ``counter`` it was started from."""

    counter: CountRows
    denoiser: Any

    def start(self, memo: dict | None = None):
        return self.counter.start(memo)

    def __call__(self, x, t, cond=None):
        self.counter.calls += 1
        self.counter.rows += x.shape[0]
        return self.denoiser(x, t, cond)
