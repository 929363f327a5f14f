"""The TSDiff family: an unconditional 1-D diffusion model over windows [context, horizon] of one of statsmodels'
series (``condiff.data.series``: co2, sunspots, nile), made to forecast by observation self-guidance and to refine
a base forecaster (``condiff.tasks.tsdiff``; Kollovieh et al., NeurIPS 2023, "Predict, Refine, Synthesize:
Self-Guiding Diffusion Models for Probabilistic Time Series Forecasting", sec. 3.1 eq. 8 and sec. 3.2 eqs. 10-11).

Network (paper sec. 4 / appendix B, with the dilated-conv drop-in the spec allows for S4): input 1x1 conv (1 -> h),
a sinusoidal step embedding -> MLP -> h, then residual blocks (add the time embedding, a dilated conv with dilation
2^i, tanh * sigmoid gate, 1x1 convs to the residual and the skip path), the sum of the skips -> ReLU -> 1x1 conv to
the eps prediction. Schedule: TSDiff's table, T = 100, linear beta from 1e-4 to 0.1 (``condiff.core.schedules``'
VPDiscrete); the loss is the eps-MSE at uniform t (Ho et al. 2020, eq. 14).

Scaling: each window is standardised by its context's mean and standard deviation (``window_scale``; TSDiff divides
by the context's mean |x|, which flattens co2's season to 1 % of its level), so the model sees shapes, not levels,
and the trend of co2 past the training part is no extrapolation. Training windows are every window of length
context + horizon inside the series' training part (``ForecastSeries.train_end``) that ends before the validation
windows (``validation_windows``: as many windows as the test split has, at the end of the training part;
``data.holdout = false`` trains on them too); the test windows (``ForecastSeries.windows``) are never seen. A pool
(``data.pool``: other yearly series, ``condiff.data.series.POOLS``) adds every window of those series, standardised
the same way, as a share ``data.pool_fraction`` of each batch, which is TSDiff's setting (sec. 5: one model over a
dataset of many series) for a series too short to train on alone (nile: 36 training windows); ``data.flip`` negates
each drawn window with probability 1/2 (a series' law is assumed symmetric under x -> -x after standardisation, which
doubles the shapes seen). Forecast
settings (guidance scale, observation std, refinement step size) live in the recipe's [forecast] table; they were
chosen on the validation windows, which the network never trained on, never on the test split.

A recipe (``family = "tsdiff"``) has [model] (width, blocks, kernel), [data] (series), [diffusion] (the beta table),
[forecast] and [train] (condiff's ``TrainConfig``); unknown keys and bad values are one-line ConfigErrors. A saved
model is ``net.safetensors`` plus ``condiff.json`` with a "tsdiff" table; ``make_tsdiff_trainer`` trains one with
condiff's Trainer (EMA, atomic checkpoints, exact resume).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from condiff.core.denoiser import Eps, wrap
from condiff.core.files import atomic_dir, atomic_write_json, load_json, refuse_pickles, save_tensors
from condiff.core.grids import make_grid
from condiff.core.schedules import VPDiscrete
from condiff.data.series import POOLS, SERIES, ForecastSeries, load_series, pool_series
from condiff.errors import ConfigError, InputFileError, check_int, check_real, one_of
from condiff.evaluation.crps import crps_samples
from condiff.models.family import TaskModel, family_dir, load_fitting_weights
from condiff.solvers.ddpm import DDPM
from condiff.tasks.tsdiff import AdaptedScale, forecast_window, refine, self_guided_forecast
from condiff.training.objectives import UniformTime, diffusion_loss
from condiff.training.recipe import (
    ObjectiveConfig,
    TaskRecipeDict,
    TrainConfig,
    check_keys,
    check_name,
    check_objective_train,
)
from condiff.training.recipe import typed_table as _typed
from condiff.training.trainer import Trainer

FAMILY = "tsdiff"
WEIGHTS = "net.safetensors"
GUIDANCES = ("mse", "quantile")
REFINERS = ("ml", "langevin")
F32 = torch.float32
MIN_SCALE = 1e-6  # floor of a window's scale (relative to its level, or absolute for a level of 0)


# recipes --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TSDiffNetConfig:
    channels: int = 32
    blocks: int = 4  # dilations 1, 2, 4, ... (cycling every 6 blocks)
    kernel: int = 3
    time_dim: int = 64


@dataclass(frozen=True)
class TSDiffDataConfig:
    series: str = "co2"  # one of condiff.data.series.SERIES
    holdout: bool = True  # leave the validation windows (the end of the training part) out of training
    pool: str = ""  # comma-separated condiff.data.series.POOLS whose windows join training ("": none)
    pool_fraction: float = 0.5  # the share of each batch drawn from the pool's windows (with a pool)
    flip: bool = False  # augment: negate each drawn window with probability 1/2 (after standardisation)


@dataclass(frozen=True)
class TSDiffDiffusionConfig:
    num_steps: int = 100  # TSDiff's table: T = 100, linear beta from 1e-4 to 0.1
    beta_start: float = 1e-4
    beta_end: float = 0.1


@dataclass(frozen=True)
class TSDiffForecastConfig:
    samples: int = 100
    steps: int = 100  # DDPM steps of self-guided sampling
    guidance: str = "quantile"
    quantile_scale: float = 4.0  # quantile guidance's scale (constant)
    mse_weight: float = 1.0  # MSE guidance's AdaptedScale weight
    std: float = 0.1  # the observation likelihood's scale, in window units
    refine_steps: int = 20
    refine_lr: float = 0.1
    refine_tau: float = 20.0
    refine_weight: float = 1.0  # the weight of the context's squared error / 2 in the refinement energy
    refine_noise: float = 0.1  # Langevin's noise factor (the paper's 0.1)


@dataclass(frozen=True)
class TSDiffRecipe(TaskRecipeDict):
    name: str
    family: str = FAMILY
    model: TSDiffNetConfig = field(default_factory=TSDiffNetConfig)
    data: TSDiffDataConfig = field(default_factory=TSDiffDataConfig)
    diffusion: TSDiffDiffusionConfig = field(default_factory=TSDiffDiffusionConfig)
    forecast: TSDiffForecastConfig = field(default_factory=TSDiffForecastConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # unused: the Trainer's field


TABLES = {
    "model": TSDiffNetConfig,
    "data": TSDiffDataConfig,
    "diffusion": TSDiffDiffusionConfig,
    "forecast": TSDiffForecastConfig,
}


def check_forecast(f: TSDiffForecastConfig, where: str = "forecast") -> TSDiffForecastConfig:
    check_int(f"{where}.samples", f.samples, 1, 10_000)
    check_int(f"{where}.steps", f.steps, 1, 1000)
    if f.guidance not in GUIDANCES:
        raise one_of(f"{where}.guidance", f.guidance, GUIDANCES)
    check_real(f"{where}.quantile_scale", f.quantile_scale, 0, 1e3)
    check_real(f"{where}.mse_weight", f.mse_weight, 0, 1e3)
    check_real(f"{where}.std", f.std, 1e-4, 1e2)
    check_int(f"{where}.refine_steps", f.refine_steps, 0, 10_000)
    check_real(f"{where}.refine_lr", f.refine_lr, 0, 10, lo_open=True)
    check_real(f"{where}.refine_tau", f.refine_tau, 0, 1e6, lo_open=True)
    check_real(f"{where}.refine_weight", f.refine_weight, 0, 1e6)
    check_real(f"{where}.refine_noise", f.refine_noise, 0, 10)
    return f


def _check_tables(tables: dict) -> dict:
    m = tables["model"]
    check_int("model.channels", m.channels, 4, 512)
    check_int("model.blocks", m.blocks, 1, 32)
    check_int("model.kernel", m.kernel, 1, 15)
    if m.kernel % 2 == 0:
        raise ConfigError(f"model.kernel must be odd (the window keeps its length), got {m.kernel}")
    check_int("model.time_dim", m.time_dim, 2, 1024)
    if m.time_dim % 2:
        raise ConfigError(f"model.time_dim must be even, got {m.time_dim}")
    if tables["data"].series not in SERIES:
        raise one_of("data.series", tables["data"].series, sorted(SERIES))
    pool_names(tables["data"].pool)
    check_real("data.pool_fraction", tables["data"].pool_fraction, 0, 1, hi_open=True)
    d = tables["diffusion"]
    check_int("diffusion.num_steps", d.num_steps, 2, 10_000)
    check_real("diffusion.beta_start", d.beta_start, 1e-8, 0.5)
    check_real("diffusion.beta_end", d.beta_end, d.beta_start, 0.5)
    f = check_forecast(tables["forecast"])
    tau_max = d.num_steps - 1
    check_real("forecast.refine_tau", f.refine_tau, 0, tau_max, lo_open=True)
    return tables


def tsdiff_recipe_from_dict(data: dict) -> TSDiffRecipe:
    """A recipe from its TOML table; unknown keys and bad values are one-line ConfigErrors naming them."""
    check_keys(data, {"name", "family", *TABLES, "train"}, what="tsdiff recipe")
    if data["family"] != FAMILY:
        raise one_of("tsdiff recipe family", data["family"], [FAMILY])
    tables = _check_tables({k: _typed(cls, data.get(k, {}), k) for k, cls in TABLES.items()})
    r = TSDiffRecipe(data["name"], data["family"], **tables, train=_typed(TrainConfig, data.get("train", {}), "train"))
    check_name(r.name)
    check_objective_train(ObjectiveConfig(), r.train)
    return r


# the network ----------------------------------------------------------------------------------------------------
def step_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of the diffusion step t (B,) (Vaswani et al. 2017; DDPM's step input)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([arg.sin(), arg.cos()], 1)


class ResidualBlock(nn.Module):
    """Add the step embedding, a dilated conv to 2h, tanh * sigmoid gate, 1x1 convs to residual and skip."""

    def __init__(self, h: int, kernel: int, dilation: int):
        super().__init__()
        self.time = nn.Linear(h, h)
        self.conv = nn.Conv1d(h, 2 * h, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
        self.out = nn.Conv1d(h, 2 * h, 1)

    def forward(self, x, temb):
        y = self.conv(x + self.time(temb)[:, :, None])
        a, b = y.chunk(2, 1)
        res, skip = self.out(torch.tanh(a) * torch.sigmoid(b)).chunk(2, 1)
        return (x + res) / math.sqrt(2.0), skip


class TSDiffNet(nn.Module):
    """eps_hat (B, L) of noisy windows (B, L) at steps t (B,) (module docstring)."""

    def __init__(self, channels: int = 32, blocks: int = 4, kernel: int = 3, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Conv1d(1, channels, 1)
        self.temb = nn.Sequential(nn.Linear(time_dim, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.blocks = nn.ModuleList(ResidualBlock(channels, kernel, 2 ** (i % 6)) for i in range(blocks))
        self.skip_out = nn.Conv1d(channels, channels, 1)
        self.final = nn.Conv1d(channels, 1, 1)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ConfigError(f"a TSDiff network takes windows (batch, length), got shape {tuple(x.shape)}")
        h = torch.relu(self.inp(x[:, None]))
        temb = self.temb(step_embedding(t.reshape(-1).expand(x.shape[0]), self.time_dim))
        skips = 0
        for block in self.blocks:
            h, s = block(h, temb)
            skips = skips + s
        out = self.final(torch.relu(self.skip_out(skips / math.sqrt(len(self.blocks)))))
        return out[:, 0]


# windows --------------------------------------------------------------------------------------------------------
def window_scale(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) (B, 1) of contexts (B, C): their mean and standard deviation (population), the scale floored at
    MIN_SCALE * max(|loc|, 1)."""
    loc = context.mean(1, keepdim=True)
    scale = context.std(1, keepdim=True, correction=0)
    return loc, torch.maximum(scale, MIN_SCALE * loc.abs().clamp_min(1.0))


def validation_start(series: ForecastSeries) -> int:
    """Where the validation windows' horizons begin: as many windows as the test split has, back to back, ending
    at the end of the training part."""
    return series.train_end - series.num_windows * series.horizon


def training_windows(series: ForecastSeries, context: int, horizon: int, holdout: bool = True) -> torch.Tensor:
    """Every window (N, context + horizon) inside the training part (before ``validation_start`` with
    ``holdout``), each standardised by its context's ``window_scale`` (float32)."""
    L = context + horizon
    part = series.values[: validation_start(series) if holdout else series.train_end]
    if part.numel() < L:
        raise ConfigError(
            f"series {series.name!r}: the training part has {part.numel()} points, fewer than a window of {L}"
        )
    w = part.unfold(0, L, 1)
    loc, scale = window_scale(w[:, :context])
    return ((w - loc) / scale).to(F32)


def pool_names(pool: str) -> list[str]:
    """The names in a recipe's ``data.pool`` (comma-separated ``POOLS``; "" is none), each checked."""
    if not isinstance(pool, str):
        raise ConfigError(f"data.pool must be a string of comma-separated names, got {pool!r}")
    names = [n.strip() for n in pool.split(",")] if pool.strip() else []
    for n in names:
        if n not in POOLS:
            raise one_of("data.pool series", n, sorted(POOLS))
    if len(set(names)) != len(names):
        raise ConfigError(f"data.pool names a series twice: {pool!r}")
    return names


POOL_MAX_Z = 20.0  # pool windows with a standardised value beyond this (a near-constant context) are dropped


def pool_windows(pool: str, context: int, horizon: int, exclude: str) -> torch.Tensor:
    """Every window (N, context + horizon) of every series of the pool (``pool_names``), each standardised by its
    context's ``window_scale`` (float32); the series ``exclude`` (the model's own, whose windows come from
    ``training_windows`` alone, its validation and test windows held out) is skipped, and so are windows with a
    standardised value beyond ``POOL_MAX_Z``."""
    L = context + horizon
    out = []
    for name in pool_names(pool):
        if name == exclude:
            continue
        for v in pool_series(name):
            if v.numel() < L:
                continue
            w = v.unfold(0, L, 1)
            loc, scale = window_scale(w[:, :context])
            z = (w - loc) / scale
            out.append(z[z.abs().amax(1) <= POOL_MAX_Z])
    if not out or sum(z.shape[0] for z in out) == 0:
        raise ConfigError(f"data.pool {pool!r} has no window of length {L} besides the series {exclude!r}")
    return torch.cat(out).to(F32)


def validation_windows(series: ForecastSeries, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts (W, C), targets (W, H)) of rolling windows at the end of the training part, horizons back to back,
    ``count`` of them (default: as many as the test split has): where forecast settings are chosen."""
    C, H = series.context_length, series.horizon
    W = series.num_windows if count is None else count
    origins = [series.train_end - (W - w) * H for w in range(W)]  # from validation_start (count None)
    if origins[0] < C:
        raise ConfigError(f"series {series.name!r} has too short a training part for {W} validation windows")
    v = series.values
    return torch.stack([v[o - C : o] for o in origins]), torch.stack([v[o : o + H] for o in origins])


# the model ------------------------------------------------------------------------------------------------------
@dataclass
class TSDiffModel(TaskModel):
    """A saved or trained TSDiffModel: module {"net": TSDiffNet}; config {"model", "data", "diffusion", "forecast",
    "context", "horizon", "period"}."""

    @property
    def forecast_config(self) -> TSDiffForecastConfig:
        return TSDiffForecastConfig(**self.config["forecast"])

    @property
    def series_name(self) -> str:
        return self.config["data"]["series"]

    @property
    def context(self) -> int:
        return self.config["context"]

    @property
    def horizon(self) -> int:
        return self.config["horizon"]

    @property
    def length(self) -> int:
        return self.context + self.horizon

    @property
    def schedule(self):
        d = self.config["diffusion"]
        return VPDiscrete.from_betas("linear", d["num_steps"], d["beta_start"], d["beta_end"])

    @property
    def denoiser(self):
        return wrap(self.module["net"], self.schedule, Eps(), call=lambda net, x, t_in, cond: net(x, t_in))

    def series(self) -> ForecastSeries:
        return load_series(self.series_name)

    def _contexts(self, contexts: torch.Tensor, horizon: int):
        """Checked contexts (B, L - horizon) in float64, and horizon."""
        H = check_int("horizon", horizon, 1, self.length - 1, accepted=f"an integer in [1, {self.length - 1}]")
        if not torch.is_tensor(contexts) or contexts.dim() != 2 or contexts.shape[1] != self.length - H:
            got = tuple(contexts.shape) if torch.is_tensor(contexts) else type(contexts).__name__
            raise ConfigError(f"contexts must be (batch, {self.length - H}) for horizon {H}, got {got}")
        return contexts.to(torch.float64), H

    @torch.no_grad()
    def forecast(
        self,
        contexts: torch.Tensor,
        horizon: int | None = None,
        samples: int | None = None,
        guidance: str | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Self-guided forecast samples (S, B, H) (original units, float64) of the ``horizon`` points after each
        context (B, L - horizon), by ``guidance`` (mse | quantile) with the [forecast] settings."""
        f = self.forecast_config
        ctx, H = self._contexts(contexts, self.horizon if horizon is None else horizon)
        S = check_int("samples", f.samples if samples is None else samples, 1, 10_000)
        guidance = f.guidance if guidance is None else guidance
        if guidance not in GUIDANCES:
            raise one_of("guidance", guidance, GUIDANCES)
        loc, scale = window_scale(ctx)
        z = ((ctx - loc) / scale).to(F32)
        den = self.denoiser
        if guidance == "mse":
            weight = AdaptedScale(den.schedule, f.std, f.mse_weight)
        else:
            weight = f.quantile_scale
        grid = make_grid(den.schedule, f.steps)
        g = torch.Generator().manual_seed(seed)
        out = self_guided_forecast(den, z, H, S, DDPM(), grid, scale=weight, loss=guidance, std=f.std, generator=g)
        return out.double() * scale[None] + loc[None]

    @torch.no_grad()
    def refine(self, contexts: torch.Tensor, base: torch.Tensor, method: str = "ml", seed: int = 0) -> torch.Tensor:
        """Refined samples (S, B, H) of a base forecaster's samples ``base`` (S, B, H) after contexts (B, L - H)
        (original units): each placed after its context, scaled by the context, refined by ML or Langevin steps on
        the diffusion energy at tau plus the MSE to the context (``tasks.tsdiff.refine``)."""
        if method not in REFINERS:
            raise one_of("refinement method", method, REFINERS)
        if not torch.is_tensor(base) or base.dim() != 3:
            raise ConfigError("base samples must be a tensor (samples, batch, horizon)")
        S, B, H = base.shape
        ctx, H = self._contexts(contexts, H)
        if ctx.shape[0] != B:
            raise ConfigError(f"base samples have {B} series but there are {ctx.shape[0]} contexts")
        f = self.forecast_config
        loc, scale = window_scale(ctx)
        zc = (ctx - loc) / scale
        zb = (base.double() - loc[None]) / scale[None]
        init = torch.cat([zc[None].expand(S, -1, -1), zb], 2).reshape(S * B, -1).to(F32)
        _, mask = forecast_window(zc.to(F32), H)
        g = torch.Generator().manual_seed(seed)
        y = refine(
            self.denoiser,
            init,
            init,
            mask,
            tau=f.refine_tau,
            method=method,
            steps=f.refine_steps,
            lr=f.refine_lr,
            weight=f.refine_weight,
            noise=f.refine_noise,
            generator=g,
        )
        return y.reshape(S, B, -1)[:, :, -H:].double() * scale[None] + loc[None]

    def save(self, directory, extra: dict | None = None):
        with atomic_dir(Path(directory)) as tmp:
            save_tensors(tmp / WEIGHTS, {k: v.detach().contiguous() for k, v in self.module.state_dict().items()})
            atomic_write_json(tmp / "condiff.json", {FAMILY: self.config, **(extra or {})})


def _build(config: dict) -> TSDiffModel:
    m = TSDiffNetConfig(**config["model"])
    return TSDiffModel(nn.ModuleDict({"net": TSDiffNet(m.channels, m.blocks, m.kernel, m.time_dim)}), config)


def _config(tables: dict) -> dict:
    name = tables["data"].series
    _, season, context, horizon, _ = SERIES[name]
    return {
        **{k: dataclasses.asdict(v) for k, v in tables.items()},
        "context": context,
        "horizon": horizon,
        "period": season,
    }


def build_tsdiff_model(r: TSDiffRecipe) -> TSDiffModel:
    return _build(_config({k: getattr(r, k) for k in TABLES}))


def model_dir(path) -> Path | None:
    """The model folder ``path`` names: itself when its condiff.json has a "tsdiff" table, or its ``model``
    sub-folder (a training run's --out); None otherwise."""
    return family_dir(path, FAMILY)


ACCEPTED = "a tsdiff model folder or a training run's folder holding one as model/ (condiff train tsdiff-co2)"


def load_tsdiff_model(path, what: str = "--model") -> TSDiffModel:
    """A saved model (a model folder, or a run folder holding ``model/``). Pickled files are refused before
    anything is read; so is a condiff.json whose "tsdiff" table is not a valid recipe's, or weights that do not
    fit it."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise InputFileError(f"{what} {str(path)!r} does not exist; accepted: {ACCEPTED}")
    if not path.is_dir():
        raise InputFileError(f"{what} {str(path)!r} is not a folder; accepted: {ACCEPTED}")
    refuse_pickles(path, what)
    directory = model_dir(path)
    if directory is None:
        raise InputFileError(f"{what} {str(path)!r} holds no tsdiff model; accepted: {ACCEPTED}")
    info = load_json(directory / "condiff.json", what)
    cfg = info[FAMILY]
    try:
        if not isinstance(cfg, dict) or not set(TABLES) <= set(cfg):
            raise ConfigError(f"the 'tsdiff' table needs the tables {', '.join(TABLES)}")
        tables = _check_tables({k: _typed(cls, cfg[k], k) for k, cls in TABLES.items()})
    except (ConfigError, TypeError) as e:
        raise InputFileError(f"{what} {str(directory)!r}: condiff.json: {e}") from None
    model = _build(_config(tables))
    load_fitting_weights(model.module, directory, WEIGHTS, what)
    model.module.eval()
    model.module.requires_grad_(False)
    model.path, model.info = directory, info
    return model


# training and evaluation ----------------------------------------------------------------------------------------
def tsdiff_loss_fn(model: TSDiffModel, r: TSDiffRecipe):
    """The Trainer's loss: a batch of training windows drawn with replacement by the step's generator (a share
    ``data.pool_fraction`` of it from the pool's windows, ``pool_windows``; each negated with probability 1/2 under
    ``data.flip``), the eps-MSE at uniform t."""
    schedule = model.schedule
    windows = training_windows(model.series(), model.context, model.horizon, r.data.holdout)
    pool = pool_windows(r.data.pool, model.context, model.horizon, r.data.series) if pool_names(r.data.pool) else None
    B = r.train.batch_size
    n_pool = int(round(r.data.pool_fraction * B)) if pool is not None else 0

    def fn(step, g):
        idx = torch.randint(windows.shape[0], (B - n_pool,), generator=g)
        x0 = windows[idx]
        if n_pool:
            x0 = torch.cat([x0, pool[torch.randint(pool.shape[0], (n_pool,), generator=g)]])
        if r.data.flip:
            x0 = x0 * (1 - 2 * torch.randint(2, (B, 1), generator=g)).to(x0.dtype)
        t = UniformTime().sample(schedule, x0.shape[0], g)
        eps = torch.randn(x0.shape, generator=g)
        call = lambda x, t_in, c: model.module["net"](x, t_in.to(x.dtype))  # noqa: E731
        return diffusion_loss(call, x0, None, t, eps, schedule, Eps()).mean(), {}

    return fn


def crps(samples: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean CRPS over all points of samples (S, W, H) at targets (W, H) (plug-in energy form)."""
    return float(crps_samples(samples, targets).mean())


def _eval_fn(r: TSDiffRecipe):
    def run(model: TSDiffModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        ctx, tgt = validation_windows(m.series())
        s = m.forecast(ctx, samples=min(r.forecast.samples, 32), guidance="mse", seed=0)
        return {"valid_crps_mse": crps(s, tgt)}

    return run


def make_tsdiff_trainer(r: TSDiffRecipe, out_dir, progress: bool = True) -> Trainer:
    """The Trainer for ``r`` (weights seeded by train.seed; train.threads threads), with the validation windows'
    CRPS (MSE guidance, 32 samples) every train.eval_every steps."""
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)  # deterministic initial weights
    model = build_tsdiff_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=tsdiff_loss_fn(model, r))


# forecasting the test split -------------------------------------------------------------------------------------
BASES = ("seasonal-naive", "ets", "arima")
QUANTILE_BANDS = ((0.05, 0.95), (0.25, 0.75))


def split_windows(model: TSDiffModel, horizon: int | None = None, series: ForecastSeries | None = None):
    """(contexts (W, L - h), targets (W, h), origins) of the series' test windows for horizon h (default the
    model's): each test origin's first h points, forecast from the L - h points before it."""
    s = model.series() if series is None else series
    h = model.horizon if horizon is None else check_int("horizon", horizon, 1, model.horizon)
    C = model.length - h
    v = s.values
    contexts = torch.stack([v[o - C : o] for o in s.origins])
    targets = torch.stack([v[o : o + h] for o in s.origins])
    return contexts, targets, list(s.origins)


def end_context(model: TSDiffModel, horizon: int | None = None, series: ForecastSeries | None = None):
    """The context (1, L - h) at the end of the series: what forecasts past its last point condition on."""
    s = model.series() if series is None else series
    h = model.horizon if horizon is None else check_int("horizon", horizon, 1, model.horizon)
    return s.values[-(model.length - h) :][None]


def base_forecast(series: ForecastSeries, method: str, horizon: int | None = None):
    """A classical forecaster's Gaussian predictive (``evaluation.forecast_baselines``) on the test windows, its
    first ``horizon`` points."""
    from condiff.evaluation.forecast_baselines import GaussianForecast, forecast

    if method not in BASES:
        raise one_of("base forecaster", method, BASES)
    fc = forecast(series, method)
    h = series.horizon if horizon is None else horizon
    return GaussianForecast(fc.mean[:, :h].clone(), fc.std[:, :h].clone())


def gaussian_samples(fc, samples: int, seed: int = 0) -> torch.Tensor:
    """``samples`` draws (S, W, H) from a GaussianForecast, by a generator seeded ``seed``."""
    S = check_int("samples", samples, 1, 10_000)
    z = torch.randn((S, *fc.mean.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return fc.mean[None] + fc.std[None] * z


def fan_chart_png(panels: list[dict], title: str | None = None) -> bytes:
    """PNG bytes of fan charts, one panel per dict {"title", "history": (x, y), "fans": [(x (h,), samples (S, h))],
    "truth": [(x, y)] or []}: the history line, each fan's 5-95 % and 25-75 % bands and median, the truth dots."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, p in zip(axes[:, 0], panels):
        hx, hy = p["history"]
        ax.plot(hx, hy, color="0.3", lw=1, label="series")
        for i, (x, s) in enumerate(p["fans"]):
            s = torch.as_tensor(s, dtype=torch.float64)
            for (lo, hi), alpha in zip(QUANTILE_BANDS, (0.25, 0.45)):
                q = torch.quantile(s, torch.tensor([lo, hi], dtype=torch.float64), dim=0)
                ax.fill_between(
                    x,
                    q[0],
                    q[1],
                    color="tab:blue",
                    alpha=alpha,
                    lw=0,
                    label=f"{int(lo * 100)}-{int(hi * 100)} %" if i == 0 else None,
                )
            ax.plot(x, s.median(0).values, color="tab:blue", lw=1.2, label="median" if i == 0 else None)
        for i, (x, y) in enumerate(p.get("truth", [])):
            ax.plot(x, y, "o", ms=2.5, color="tab:red", label="truth" if i == 0 else None)
        ax.set_title(p["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", ncol=5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def forecast_panel(
    series: ForecastSeries, samples: torch.Tensor, h: int, title: str, history: int | None = None
) -> dict:
    """A fan-chart panel of forecast samples (S, W, h) at the test origins: the last ``history`` points before the
    first origin (default 3 context lengths), the series through the test part and each window's truth."""
    v = series.values
    first = series.origins[0]
    start = max(0, first - (3 * series.context_length if history is None else history))
    x = torch.arange(v.numel(), dtype=torch.float64)
    fans = [(x[o : o + h], samples[:, w]) for w, o in enumerate(series.origins)]
    truth = [(x[o : o + h], v[o : o + h]) for o in series.origins]
    return {"title": title, "history": (x[start : first + 1], v[start : first + 1]), "fans": fans, "truth": truth}
