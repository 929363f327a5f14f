"""The k-sparse autoencoder over h-space vectors, gradient x activation attribution of its latents, the edit of
chosen latents during sampling and the features file (DiffLens: Shi et al., "Dissecting and Mitigating Diffusion
Bias via Mechanistic Interpretability", CVPR 2025; TopK: Makhzani & Frey 2013, Gao et al. 2024). The overview
and the equations are in condiff.tasks.bias_features.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from condiff.core.denoiser import Wrapper
from condiff.core.files import load_tensors, save_tensors
from condiff.core.sampling import sample
from condiff.errors import ConfigError, InputFileError, check_int, check_real, one_of
from condiff.tasks.features_hspace import (
    MAX_EDIT,
    active_rows,
    check_layout,
    check_rows,
    check_window,
    describe,
    find_layer,
    from_vectors,
    output_hook,
    row_times,
    to_vectors,
)

FORMAT = "condiff-features-1"

# ---- the k-sparse autoencoder ------------------------------------------------------------------------------


def topk(a: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of the last dimension, zero the rest (exactly k kept; ties go to the lower
    index, as torch.topk orders them)."""
    idx = a.topk(k, dim=-1).indices
    return torch.zeros_like(a).scatter(-1, idx, a.gather(-1, idx))


class TopKSAE(nn.Module):
    """k-sparse autoencoder (condiff.tasks.bias_features, item 2) over ``d``-dimensional vectors with ``m`` latents."""

    def __init__(
        self,
        d: int,
        m: int,
        k: int,
        scale: float = 1.0,
        layout: str = "position",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.layout = check_layout(layout)
        self.d = check_int("SAE input dimension", d, 1)
        self.m = check_int("SAE latents", m, 1)
        self.k = check_int("SAE k", k, 1, self.m, f"an integer in [1, {self.m}] (the number of latents)")
        check_real("SAE scale", scale, 0, math.inf, "a finite number > 0", lo_open=True)
        w = torch.randn(d, m, generator=generator)
        w = w / w.norm(dim=0, keepdim=True)
        self.W_d = nn.Parameter(w)  # (d, m): unit-norm columns, the dictionary
        self.W_e = nn.Parameter(w.t().clone())  # (m, d): tied at initialisation (Gao et al. sec. 2.3)
        self.b_e = nn.Parameter(torch.zeros(m))
        self.b = nn.Parameter(torch.zeros(d))
        self.register_buffer("s", torch.tensor(float(scale)))

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.b) / self.s @ self.W_e.t() + self.b_e

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., m) sparse codes: TopK(ReLU(W_e (h - b) / s + b_e))."""
        self._check(h)
        return topk(torch.relu(self.pre(h)), self.k)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.s * (z @ self.W_d.t()) + self.b

    def delta(self, dz: torch.Tensor) -> torch.Tensor:
        """The change of h_hat for a change dz of the codes: s W_d dz (no bias)."""
        return self.s * (dz @ self.W_d.t())

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(h)
        return self.decode(z), z

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_d.div_(self.W_d.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def _check(self, h):
        if not isinstance(h, torch.Tensor) or h.dim() < 1 or h.shape[-1] != self.d:
            raise ConfigError(f"the SAE takes vectors of {self.d} values (last dimension), got {describe(h)}")

    def config(self) -> dict:
        return {"d": self.d, "m": self.m, "k": self.k, "layout": self.layout}


@dataclass(frozen=True)
class SAEFit:
    """What ``train_sae`` returns: the autoencoder, the normalized MSE (MSE / variance of the data) of each
    logged step, and the fraction of latents that never fired on the last ``dead_window`` vectors."""

    sae: TopKSAE
    nmse: list[float]
    dead: float


def train_sae(
    vectors: torch.Tensor,
    m: int,
    k: int,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 100,
    layout: str = "position",
) -> SAEFit:
    """Fit a TopKSAE to ``vectors`` (N, d) with Adam on the MSE (Gao et al. sec. 2): b starts at the data mean,
    s is the RMS of the centred data, decoder columns are renormalised after every step. Deterministic for a
    seed (one thread)."""
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] < 2:
        raise ConfigError(f"train_sae needs vectors of shape (N >= 2, d), got {describe(vectors)}")
    if not vectors.is_floating_point() or not torch.isfinite(vectors).all():
        raise ConfigError("train_sae needs finite floating-point vectors")
    check_int("SAE steps", steps, 1)
    check_int("SAE batch size", batch_size, 1)
    check_real("SAE learning rate", lr, 0, 1, "a finite number in (0, 1]", lo_open=True)
    v = vectors.float()
    g = torch.Generator().manual_seed(seed)
    mean = v.mean(0)
    scale = float((v - mean).pow(2).mean().sqrt().clamp_min(1e-12))
    sae = TopKSAE(v.shape[1], m, k, scale, layout, generator=g)
    with torch.no_grad():
        sae.b.copy_(mean)
    var = float((v - mean).pow(2).sum(1).mean())
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    nmse, fired = [], torch.zeros(m, dtype=torch.bool)
    window = max(1, min(v.shape[0], 20 * batch_size))
    seen = 0
    for step in range(steps):
        idx = torch.randint(v.shape[0], (min(batch_size, v.shape[0]),), generator=g)
        hb = v[idx]
        h_hat, z = sae(hb)
        loss = (h_hat - hb).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        if steps - step <= window // hb.shape[0] + 1:
            fired |= (z > 0).any(0)
            seen += hb.shape[0]
        if step % log_every == 0 or step == steps - 1:
            nmse.append(float(loss.detach()) / var)
    return SAEFit(sae, nmse, float(1 - fired.float().mean()))


@torch.no_grad()
def sae_nmse(sae: TopKSAE, vectors: torch.Tensor, batch: int = 65536) -> float:
    """Normalized MSE of the reconstruction over ``vectors`` (N, d): sum |h - h_hat|^2 / sum |h - mean|^2."""
    err = sum(float((sae(c)[0] - c).pow(2).sum()) for c in vectors.float().split(batch))
    return err / float((vectors.float() - vectors.float().mean(0)).pow(2).sum())


# ---- attribution -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    """Gradient x activation of every SAE latent: ``per_call`` (calls, m), the mean over rows of
    sum_positions z_j * d score / d z_j at each network call; ``times`` the call times; ``total`` (m,) their
    sum over calls (DiffLens aggregates over timesteps)."""

    per_call: torch.Tensor
    times: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.per_call.sum(0)

    def top(self, n: int, sign: int = 1) -> list[int]:
        """The ``n`` latents with the largest ``sign * total`` (sign +1: those that raise the score)."""
        if sign not in (1, -1):
            raise ConfigError(f"sign must be 1 or -1, got {sign!r}")
        n = check_int("number of latents", n, 1, self.total.numel())
        return [int(i) for i in (sign * self.total).argsort(descending=True)[:n]]


def steering(attribution: Attribution, n: int, scale: float, sign: int = 1) -> tuple[list[int], list[float]]:
    """The latents and per-latent scales of an edit that pushes the score up (sign +1) or down (-1): the ``n``
    latents with the largest ``sign * A_j`` are multiplied by ``scale`` and the ``n`` with the smallest are set to
    0 (DiffLens sec. 3.3 scales the attributed features; ablating the opposing ones is the same edit with
    lambda = 0). Returns (latents, scales) for ``FeatureEdit``."""
    check_real("steering scale", scale, -MAX_EDIT, MAX_EDIT)
    m = attribution.total.numel()
    check_int("number of latents per side", n, 1, m // 2, f"an integer in [1, {m // 2}] (half the {m} latents)")
    up, down = attribution.top(n, sign), attribution.top(n, -sign)
    return up + down, [float(scale)] * n + [0.0] * n


@dataclass
class _Attributing(Wrapper):
    """At every call, the SAE edit h + s W_d (z - stopgrad z) (= h) in the layer with z a leaf that requires grad.
    ``through='step'``: the gradient of score(x0_hat).sum() with respect to z at once, x0_hat detached;
    ``'trajectory'``: z is kept and x0_hat carries the graph (the caller backpropagates from the final sample)."""

    denoiser: Any
    module: nn.Module = field(repr=False)
    sae: TopKSAE = field(repr=False)
    score: Callable = field(repr=False)
    through: str = "step"
    out: list = field(default_factory=list, repr=False)

    def __call__(self, x, t, cond=None):
        held = []

        def edit(h):
            layout = self.sae.layout
            z0 = self.sae.encode(to_vectors(h.detach().float(), layout).to(self.sae.W_d.device))
            z = z0.clone().requires_grad_(True)
            held.append(z)
            return h + from_vectors(self.sae.delta(z - z0).to(h.device, h.dtype), h, layout)

        with torch.enable_grad(), output_hook(self.module, edit):
            x0 = self.denoiser(x, t, cond)
            if len(held) != 1:
                raise ConfigError(f"attribution: the h-space layer ran {len(held)} times in one call, expected 1")
            if self.through == "trajectory":
                self.out.append((float(row_times(t, 1)[0]), held[0]))
                return x0
            (grad,) = torch.autograd.grad(_scores(self.score, x0).sum(), held[0])
        self.out.append((float(row_times(t, 1)[0]), _per_row(held[0].detach(), grad, x0.shape[0])))
        return x0.detach()


def _scores(score: Callable, x: torch.Tensor) -> torch.Tensor:
    s = score(x)
    if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.shape[0] != x.shape[0]:
        raise ConfigError(f"the attribute score must give one value per row ({x.shape[0]}), got {describe(s)}")
    return s


def _per_row(z: torch.Tensor, grad: torch.Tensor, rows: int) -> torch.Tensor:
    """sum over positions of z * grad, averaged over rows: (m,)."""
    return (z * grad).reshape(rows, -1, z.shape[-1]).sum(1).mean(0)


THROUGH = ("step", "trajectory")


def attribute(
    denoiser,
    solver,
    grid,
    x,
    cond,
    sae: TopKSAE,
    score: Callable,
    layer: str = "mid",
    noise=None,
    through: str = "step",
) -> Attribution:
    """Gradient x activation of every latent of ``sae`` at ``layer`` for ``score`` (images -> one value per row,
    differentiable), along a plain sampling run from ``x`` (condiff.tasks.bias_features, item 3). ``through``:
    'step' scores each call's own estimate x0_hat (one backward per call; memory of one call); 'trajectory' scores
    the final sample and backpropagates through the solver's remaining steps (the latent's whole effect; memory of
    the whole run)."""
    if not callable(score):
        raise ConfigError(f"score must be a function of the denoised images, got {type(score).__name__}")
    if through not in THROUGH:
        raise one_of("attribution path", through, THROUGH)
    att = _Attributing(denoiser, find_layer(denoiser, layer), sae, score, through)
    if through == "step":
        with torch.no_grad():
            sample(att, solver, grid, x, cond, noise=noise)
        per_call = [a for _, a in att.out]
    else:
        with torch.enable_grad():
            final = sample(att, solver, grid, x, cond, noise=noise).x
            zs = [z for _, z in att.out]
            grads = torch.autograd.grad(_scores(score, final).sum(), zs, allow_unused=True)
        per_call = [
            _per_row(z.detach(), torch.zeros_like(z) if g is None else g, x.shape[0]) for z, g in zip(zs, grads)
        ]
    return Attribution(torch.stack(per_call), torch.tensor([t for t, _ in att.out], dtype=torch.float64))


# ---- interventions -----------------------------------------------------------------------------------------


def _check_latents(latents, m: int) -> tuple[int, ...]:
    ok = isinstance(latents, (list, tuple)) and len(latents) > 0
    ok = ok and all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < m for j in latents)
    if not ok or len(set(latents)) != len(latents):
        raise ConfigError(
            f"latents must be a non-empty list of distinct latent indices in [0, {m - 1}], got {latents!r}"
        )
    return tuple(latents)


def _per_latent(what: str, value, n: int) -> tuple[float, ...]:
    """A number for every latent, or one number per latent (a list of n)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{what} must be one number or {n} numbers (one per latent), got {len(value)}")
        return tuple(check_real(what, v, -MAX_EDIT, MAX_EDIT) for v in value)
    return (check_real(what, value, -MAX_EDIT, MAX_EDIT),) * n


@dataclass
class FeatureEdit(Wrapper):
    """Denoiser -> Denoiser: during each forward, the ``sae`` latents ``latents`` of every vector of ``layer``'s
    output become ``scale * z_j + add`` and h becomes h + s W_d (z' - z) (condiff.tasks.bias_features, item 4).
    ``active_only``: add ``add`` only where z_j > 0 (the positions where the feature fired). ``t_range``: act
    only at times in [low, high]. scale 1 and add 0 call the wrapped denoiser as it is (bit-identical)."""

    denoiser: Any
    sae: TopKSAE = field(repr=False)
    latents: Sequence[int] = ()
    scale: float | Sequence[float] = 1.0
    add: float | Sequence[float] = 0.0
    layer: str = "mid"
    active_only: bool = False
    t_range: tuple[float, float] | None = None
    net: nn.Module | None = field(default=None, repr=False)
    module: nn.Module = field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.sae, TopKSAE):
            raise ConfigError(f"FeatureEdit needs a TopKSAE, got {type(self.sae).__name__}")
        self.latents = _check_latents(list(self.latents), self.sae.m)
        self.scale = _per_latent("feature scale", self.scale, len(self.latents))
        self.add = _per_latent("feature addition", self.add, len(self.latents))
        self._window = check_window(self.t_range)
        self.module = find_layer(self.net if self.net is not None else self.denoiser, self.layer)

    @property
    def trivial(self) -> bool:
        return all(v == 1.0 for v in self.scale) and all(v == 0.0 for v in self.add)

    def edit(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """h with the latents rewritten (rows: a bool mask of the rows to edit; all when None)."""
        v = to_vectors(h.float(), self.sae.layout).to(self.sae.W_d.device)
        z = self.sae.encode(v)
        j = list(self.latents)
        zj = z[:, j]
        lam, c = torch.tensor(self.scale, device=z.device), torch.tensor(self.add, device=z.device)
        new = lam * zj + (c * (zj > 0) if self.active_only else c)
        dz = torch.zeros_like(z)
        dz[:, j] = new - zj
        d = from_vectors(self.sae.delta(dz), h, self.sae.layout)
        if rows is not None:
            d = d * rows.to(d.device).view(-1, *([1] * (h.dim() - 1)))
        return h + d.to(h.device, h.dtype)

    def __call__(self, x, t, cond=None):
        if self.trivial:
            return self.denoiser(x, t, cond)
        rows = active_rows(self._window, t, x.shape[0])
        if not rows.any():
            return self.denoiser(x, t, cond)
        with output_hook(self.module, lambda h: self.edit(h, None if rows.all() else check_rows(rows, h))):
            return self.denoiser(x, t, cond)


# ---- files -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """A fitted features file: the SAE, the latents chosen for the attribute (best first) with their total
    attribution, the Delta-h table (calls, C, ...) with its times, and ``meta`` (a JSON object: the layer, the
    attribute, what it was fitted for)."""

    sae: TopKSAE
    latents: tuple[int, ...]
    attribution: torch.Tensor
    delta_h: torch.Tensor
    times: torch.Tensor
    meta: Mapping[str, Any]

    def save(self, path):
        tensors = {
            "W_e": self.sae.W_e,
            "b_e": self.sae.b_e,
            "W_d": self.sae.W_d,
            "b": self.sae.b,
            "s": self.sae.s.reshape(1),
            "latents": torch.tensor(self.latents, dtype=torch.long),
            "attribution": self.attribution.float(),
            "delta_h": self.delta_h.float(),
            "times": self.times.double(),
        }
        meta = {"format": FORMAT, "sae": json.dumps(self.sae.config()), "meta": json.dumps(dict(self.meta))}
        return save_tensors(path, tensors, meta)


def load_features(path, what: str | None = None) -> Features:
    """Read a features file written by ``Features.save``; anything else is a one-line InputFileError naming it."""
    from safetensors import safe_open

    where = repr(str(path))
    tensors = load_tensors(path, what)
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # pragma: no cover - load_tensors already parsed it
        raise InputFileError(f"{where} is not a valid safetensors file ({type(e).__name__})") from None
    if header.get("format") != FORMAT:
        raise InputFileError(f"{where} is not a condiff features file (format {FORMAT!r}, from `condiff features fit`)")
    try:
        cfg = json.loads(header.get("sae", ""))
        meta = json.loads(header.get("meta", ""))
    except ValueError:
        raise InputFileError(f"{where}: its sae/meta metadata is not valid JSON") from None
    names = ("W_e", "b_e", "W_d", "b", "s", "latents", "attribution", "delta_h", "times")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise InputFileError(f"{where} lacks the tensor {missing[0]!r}")
    if not isinstance(cfg, dict) or not isinstance(meta, dict):
        raise InputFileError(f"{where}: its sae and meta metadata must be JSON objects")
    try:
        d, m, k = (check_int(f"sae {key}", cfg.get(key), 1) for key in ("d", "m", "k"))
        s = tensors["s"]
        if s.numel() != 1 or not s.is_floating_point():
            raise ConfigError(f"tensor 's' must hold one floating-point value, got shape {tuple(s.shape)}")
        sae = TopKSAE(d, m, k, float(s.reshape(-1)[0]), cfg.get("layout", "position"))
        expect = {"W_e": (m, d), "b_e": (m,), "W_d": (d, m), "b": (d,), "attribution": (m,)}
        for n, shape in expect.items():
            if tuple(tensors[n].shape) != shape:
                raise ConfigError(f"tensor {n!r} has shape {tuple(tensors[n].shape)}, expected {shape}")
        lat = tensors["latents"]
        if lat.dtype != torch.long or lat.dim() != 1:
            raise ConfigError("tensor 'latents' must be a 1-d int64 tensor")
        latents = _check_latents(lat.tolist(), m)
        dh, times = tensors["delta_h"], tensors["times"]
        if dh.dim() < 2 or dh.shape[1] != d or times.dim() != 1 or times.shape[0] != dh.shape[0]:
            raise ConfigError(f"delta_h {tuple(dh.shape)} and times {tuple(times.shape)} do not match ({d} channels)")
        for n in ("W_e", "b_e", "W_d", "b", "attribution", "delta_h", "times"):
            if not tensors[n].is_floating_point() or not torch.isfinite(tensors[n]).all():
                raise ConfigError(f"tensor {n!r} must hold finite floating-point values")
    except ConfigError as e:
        raise InputFileError(f"{where}: {e}") from None
    with torch.no_grad():
        for n in ("W_e", "b_e", "W_d", "b"):
            getattr(sae, n).copy_(tensors[n].float())
    sae.requires_grad_(False)
    return Features(sae, latents, tensors["attribution"], dh.float(), times.double(), meta)
