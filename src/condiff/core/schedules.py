"""Noise schedules: x_t = alpha(t) x_0 + sigma(t) eps.

Every schedule gives alpha, sigma, log-SNR (log alpha^2/sigma^2) and its inverse, plus the time range.
Time is a float64 tensor (or float). ``t_clean`` is the time at which sigma = 0 (a grid may end there);
``t_min``/``t_max`` bound the noisy range that grids span.

- VP linear and VP cosine: Song et al. 2021 (score SDE, eq. 33) and Nichol & Dhariwal 2021 (eq. 17).
- VP-discrete: a DDPM ``alphas_cumprod`` table (Ho et al. 2020) with log-alpha interpolated linearly
  between integer steps, so it is defined for continuous t in [-1, T-1]; t = -1 is the clean point
  (alpha_cumprod = 1, diffusers' ``set_alpha_to_one``).
- VE/EDM: alpha = 1, sigma = t (Karras et al. 2022, Table 1).
- Flow / rectified flow: alpha = 1 - t, sigma = t (Liu et al. 2023; Lipman et al. 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from condiff.errors import ConfigError, one_of

Tensor = torch.Tensor
DEFAULT_START_SIGMA_RATIO = 20.0  # sigma/alpha where default grids start (see default_t_start)


def _as_tensor(t) -> Tensor:
    return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule:
    """Base class. Subclasses define ``log_alpha`` and ``log_sigma``; the rest follows."""

    t_clean: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0
    variance_preserving: bool = False

    def log_alpha(self, t) -> Tensor:
        raise NotImplementedError

    def log_sigma(self, t) -> Tensor:
        raise NotImplementedError

    def alpha(self, t) -> Tensor:
        return torch.exp(self.log_alpha(_as_tensor(t)))

    def sigma(self, t) -> Tensor:
        return torch.exp(self.log_sigma(_as_tensor(t)))

    def alpha_sigma(self, t) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)), the same values as the two calls (VP schedules evaluate log-alpha once)."""
        t = _as_tensor(t)
        return self.alpha(t), self.sigma(t)

    def log_snr(self, t) -> Tensor:
        """log(alpha^2 / sigma^2); decreasing in t. +inf at t_clean."""
        t = _as_tensor(t)
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def half_log_snr(self, t) -> Tensor:
        """lambda = log(alpha / sigma), the variable of DPM-Solver (Lu et al. 2022, eq. 3.2)."""
        return 0.5 * self.log_snr(t)

    def t_from_log_snr(self, log_snr) -> Tensor:
        raise NotImplementedError

    def sigma_over_alpha(self, t) -> Tensor:
        t = _as_tensor(t)
        return torch.exp(self.log_sigma(t) - self.log_alpha(t))

    def t_for_sigma_ratio(self, ratio: float) -> float:
        """The time at which sigma/alpha == ratio, clamped to [t_min, t_max]."""
        lam = torch.tensor(-2.0 * math.log(ratio), dtype=torch.float64)
        t = float(self.t_from_log_snr(lam))
        return min(max(t, self.t_min), self.t_max)

    def default_t_start(self) -> float:
        """Where sampling starts by default: t_max, but never past sigma/alpha = 20 (log-SNR ~ -6).

        With diffusers' cosine table, alpha_cumprod at T-1 is ~2e-9 and an eps-model's x0 estimate there is
        amplified ~2e4 times (a diffusers DPM-Solver trap). Even sigma/alpha = 80 amplifies eps errors 80x:
        with the bundled eps-model on digits it left 5% of 20-step samples noisy, against 0% from 20 (the
        level where diffusers' 'leading' spacing starts a 20-step cosine grid). Pass t_start to go higher."""
        return self.t_for_sigma_ratio(DEFAULT_START_SIGMA_RATIO)

    def to_config(self) -> dict:
        raise NotImplementedError


def alpha_sigma(schedule, t) -> tuple[Tensor, Tensor]:
    """(alpha(t), sigma(t)) of any schedule: its ``alpha_sigma`` where it has one, else the two calls."""
    both = getattr(schedule, "alpha_sigma", None)
    return both(t) if callable(both) else (schedule.alpha(t), schedule.sigma(t))


class GridTime(float):
    """A time of one trajectory's grid with alpha and sigma of ``schedule`` there, evaluated once.

    As a number it is the time itself (a float; arithmetic on it gives plain floats). ``sample`` makes its grid
    times into these once per trajectory (``grid_times``) and passes them to the solver, so a step
    (``condiff.solvers.base.point``) and a wrapped network (``condiff.core.denoiser.coefficients``) read
    ``alpha`` and ``sigma`` instead of evaluating the schedule in float64 at every use. They are read only for
    the same schedule object; any other time (a float, a tensor, a midpoint) is evaluated as before. The values
    are ``alpha_sigma(schedule, t)`` at t as a float64 tensor, exactly what each use computed before. A copy
    or a pickle is a plain float."""

    __slots__ = ("schedule", "alpha", "sigma")

    def __new__(cls, t, schedule):
        self = super().__new__(cls, t)
        a, s = alpha_sigma(schedule, torch.tensor(float(t), dtype=torch.float64))
        self.schedule, self.alpha, self.sigma = schedule, float(a), float(s)
        return self

    def __reduce__(self):
        return (float, (float(self),))


def grid_times(schedule, grid) -> list[GridTime]:
    """The times of a grid as ``GridTime`` objects of ``schedule`` (alpha and sigma evaluated once each)."""
    return [GridTime(float(t), schedule) for t in torch.as_tensor(grid, dtype=torch.float64).reshape(-1).tolist()]


def _vp_log_sigma(log_alpha: Tensor) -> Tensor:
    # sigma = sqrt(1 - alpha^2), computed stably: log(-expm1(2 log alpha)) / 2
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _vp_alpha_sigma(schedule, t) -> tuple[Tensor, Tensor]:
    # alpha(t) and sigma(t) of a VP schedule from one log-alpha: the same operations as alpha() and sigma()
    la = schedule.log_alpha(_as_tensor(t))
    return torch.exp(la), torch.exp(_vp_log_sigma(la))


def _vp_log_alpha_from_log_snr(log_snr: Tensor) -> Tensor:
    # alpha^2 = sigmoid(log_snr)
    return 0.5 * torch.nn.functional.logsigmoid(log_snr)


@dataclass(frozen=True)
class VPLinear(NoiseSchedule):
    """VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1]."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    t_clean: float = 0.0
    variance_preserving: bool = True

    def log_alpha(self, t):
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def alpha_sigma(self, t):
        return _vp_alpha_sigma(self, t)

    def t_from_log_snr(self, log_snr):
        la = _vp_log_alpha_from_log_snr(_as_tensor(log_snr))
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        # a t^2 + b t + la = 0, positive root, written stably
        return 2.0 * (-la) / (b + torch.sqrt(b * b - 4.0 * a * la))

    def to_config(self):
        return {"type": "vp_linear", "beta_min": self.beta_min, "beta_max": self.beta_max}


@dataclass(frozen=True)
class VPCosine(NoiseSchedule):
    """Cosine schedule, alpha^2 = f(t)/f(0) with f(t) = cos^2(pi/2 (t+s)/(1+s)) (Nichol & Dhariwal eq. 17).

    ``t_max`` defaults to 0.9946 where alpha^2 ~ 1e-4 (like the 0.999 beta cap), so every value is finite."""

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946
    t_clean: float = 0.0
    variance_preserving: bool = True

    def _f(self, t):
        return torch.cos(math.pi / 2 * (t + self.s) / (1 + self.s))

    def log_alpha(self, t):
        t = _as_tensor(t)
        la = torch.log(self._f(t)) - math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))
        return la.clamp(max=0.0)  # round-off gives ~1e-20 at t = 0, which made sigma(t_clean) NaN

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def alpha_sigma(self, t):
        return _vp_alpha_sigma(self, t)

    def t_from_log_snr(self, log_snr):
        la = _vp_log_alpha_from_log_snr(_as_tensor(log_snr))
        f0 = math.cos(math.pi / 2 * self.s / (1 + self.s))
        return torch.acos(torch.exp(la) * f0) * 2 * (1 + self.s) / math.pi - self.s

    def to_config(self):
        return {"type": "vp_cosine", "s": self.s}


def _check_alphas_cumprod(table) -> Tensor:
    """The table as a flat float64 tensor; refuses anything but a strictly decreasing table in (0, 1)."""
    want = "alphas_cumprod must be a strictly decreasing table of at least 2 values in (0, 1)"
    try:
        ac = torch.as_tensor(table, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ConfigError(f"{want}, got {type(table).__name__} {_short(table)}") from None
    if ac.numel() < 2:
        raise ConfigError(f"{want}, got {ac.numel()} value(s)")
    bad = ~((ac > 0) & (ac < 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ConfigError(f"{want}; value {i} is {float(ac[i])!r}")
    rising = ~(ac[1:] < ac[:-1])
    if bool(rising.any()):
        i = int(rising.nonzero()[0]) + 1
        raise ConfigError(f"{want}; value {i} ({float(ac[i])!r}) is not below value {i - 1} ({float(ac[i - 1])!r})")
    return ac


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True, eq=False)
class VPDiscrete(NoiseSchedule):
    """A discrete DDPM schedule from its ``alphas_cumprod`` table, continuous in t by log-alpha interpolation.

    t lives in [-1, T-1]: integer t reproduces the table exactly; t = -1 is the clean point (alpha = 1)."""

    alphas_cumprod: Tensor = field(default=None)
    variance_preserving: bool = True

    def __post_init__(self):
        ac = _check_alphas_cumprod(self.alphas_cumprod)
        object.__setattr__(self, "alphas_cumprod", ac)
        table = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(ac)])
        object.__setattr__(self, "_log_alpha_table", table)  # index i <-> t = i - 1

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.numel()

    def __repr__(self) -> str:  # not the 1000 table values
        return f"VPDiscrete(T={self.num_steps}, t in [-1, {self.num_steps - 1}])"

    @property
    def t_clean(self) -> float:  # type: ignore[override]
        return -1.0

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 0.0

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.num_steps - 1)

    @classmethod
    def from_betas(
        cls, kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
    ) -> "VPDiscrete":
        """Build the table like diffusers' DDPMScheduler, in float64 (kinds: linear, scaled_linear,
        squaredcos_cap_v2)."""
        n = num_steps
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
        else:
            raise one_of("beta schedule", kind, ["linear", "scaled_linear", "squaredcos_cap_v2"])
        return cls(alphas_cumprod=torch.cumprod(1.0 - betas, 0))

    def log_alpha(self, t):
        t = _as_tensor(t).to(torch.float64)
        pos = (t + 1.0).clamp(0.0, float(self.num_steps))
        lo = pos.floor().clamp(max=self.num_steps - 1)
        w = pos - lo
        lo = lo.long()
        tab = self._log_alpha_table
        return tab[lo] * (1 - w) + tab[(lo + 1).clamp(max=self.num_steps)] * w

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def alpha_sigma(self, t):
        return _vp_alpha_sigma(self, t)

    def t_from_log_snr(self, log_snr):
        la = _vp_log_alpha_from_log_snr(_as_tensor(log_snr).to(torch.float64))
        tab = self._log_alpha_table  # decreasing
        flat = la.reshape(-1)
        # find i with tab[i] >= la > tab[i+1]
        idx = torch.searchsorted(-tab, -flat, right=False).clamp(1, tab.numel() - 1)
        hi, lo = tab[idx - 1], tab[idx]
        w = (hi - flat) / (hi - lo)
        return ((idx - 1).to(torch.float64) + w - 1.0).reshape(la.shape)

    def to_config(self):
        return {"type": "vp_discrete", "alphas_cumprod": self.alphas_cumprod.tolist()}


@dataclass(frozen=True)
class EDM(NoiseSchedule):
    """VE / EDM: alpha = 1, sigma = t (Karras et al. 2022)."""

    t_min: float = 0.002
    t_max: float = 80.0
    t_clean: float = 0.0

    def log_alpha(self, t):
        return torch.zeros_like(_as_tensor(t), dtype=torch.float64)

    def log_sigma(self, t):
        return torch.log(_as_tensor(t).to(torch.float64))

    def t_from_log_snr(self, log_snr):
        return torch.exp(-0.5 * _as_tensor(log_snr))

    def to_config(self):
        return {"type": "edm", "sigma_min": self.t_min, "sigma_max": self.t_max}


@dataclass(frozen=True)
class Flow(NoiseSchedule):
    """Rectified flow: alpha = 1 - t, sigma = t, t in (0, 1)."""

    t_min: float = 1e-3
    t_max: float = 0.999
    t_clean: float = 0.0

    def log_alpha(self, t):
        return torch.log1p(-_as_tensor(t).to(torch.float64))

    def log_sigma(self, t):
        return torch.log(_as_tensor(t).to(torch.float64))

    def t_from_log_snr(self, log_snr):
        return torch.sigmoid(-0.5 * _as_tensor(log_snr))

    def to_config(self):
        return {"type": "flow"}


SCHEDULE_KEYS = {
    "vp_linear": ("beta_min", "beta_max"),
    "vp_cosine": ("s",),
    "vp_discrete": ("alphas_cumprod", "beta_schedule", "num_steps", "beta_start", "beta_end"),
    "edm": ("sigma_min", "sigma_max"),
    "flow": (),
}


def _number(cfg: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    """cfg[key] (or the default), checked to be a finite number (an integer if asked) in [lo, hi]."""
    value = cfg.get(key, default)
    kinds = int if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not lo <= value <= hi:  # NaN fails too
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"schedule.{key} must be {what} in [{lo}, {hi}], got {_short(value)}")
    return value


def schedule_from_config(cfg: dict) -> NoiseSchedule:
    """Inverse of ``NoiseSchedule.to_config`` (JSON-safe). Unknown types or keys and bad values are refused."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a schedule config must be a table (mapping), got {_short(cfg)}")
    kind = cfg.get("type")
    if not isinstance(kind, str) or kind not in SCHEDULE_KEYS:
        raise one_of("schedule type", kind, SCHEDULE_KEYS)
    for key in cfg:
        if key != "type" and key not in SCHEDULE_KEYS[kind]:
            raise ConfigError(
                f"unknown key schedule.{key} for type {kind!r}; accepted: {', '.join(('type',) + SCHEDULE_KEYS[kind])}"
            )
    if kind == "vp_linear":
        b0 = _number(cfg, "beta_min", 0.1, 0.0, 1e3)
        return VPLinear(b0, _number(cfg, "beta_max", 20.0, max(b0, 1e-6), 1e3))
    if kind == "vp_cosine":
        return VPCosine(_number(cfg, "s", 0.008, 0.0, 1.0))
    if kind == "vp_discrete":
        if "alphas_cumprod" in cfg:
            return VPDiscrete(alphas_cumprod=cfg["alphas_cumprod"])
        beta_schedule = cfg.get("beta_schedule", "linear")
        if not isinstance(beta_schedule, str):
            raise ConfigError(f"schedule.beta_schedule must be a string, got {_short(beta_schedule)}")
        return VPDiscrete.from_betas(
            beta_schedule,
            _number(cfg, "num_steps", 1000, 2, 100_000, integer=True),
            _number(cfg, "beta_start", 1e-4, 1e-12, 0.999),
            _number(cfg, "beta_end", 2e-2, 1e-12, 0.999),
        )
    if kind == "edm":
        lo = _number(cfg, "sigma_min", 0.002, 1e-12, 1e6)
        return EDM(lo, _number(cfg, "sigma_max", 80.0, lo * (1 + 1e-9), 1e6))
    return Flow()


def unit_time(t, t_min: float, t_max: float):
    """(t - t_min) / (t_max - t_min): a schedule's time mapped to [0, 1], the time input of a noise-aware
    classifier (a VP-discrete schedule's t runs to 999). Tensors are mapped in float64 and returned as float32;
    numbers stay numbers."""
    if isinstance(t, torch.Tensor):
        return ((t.double() - t_min) / (t_max - t_min)).float()
    return (float(t) - t_min) / (t_max - t_min)
