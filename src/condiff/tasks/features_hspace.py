"""Where h-space is, and what is done to it without a dictionary: scoped hooks on a named layer, collecting its
outputs along a sampling run, and the Asyrp-style Delta-h edit (Kwon, Jeong & Uh, "Diffusion Models Already Have
a Semantic Latent Space", ICLR 2023). The overview is condiff.tasks.bias_features.

h-space (Kwon et al. sec. 3.2) is the output of the UNet's bottleneck (diffusers' ``mid_block``); a layer is named
by its dotted module name in the network (``'mid'`` is an alias of ``mid_block``; condiff's families keep the UNet
at ``net['unet']``). Every hook is registered for one network call and removed in ``finally``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from condiff.core.denoiser import Wrapper
from condiff.core.sampling import sample
from condiff.errors import ConfigError, check_real, one_of

ALIASES = {"mid": "mid_block"}
MAX_EDIT = 1e4

# ---- where h-space is --------------------------------------------------------------------------------------


def hook_root(denoiser_or_net) -> nn.Module:
    """The network whose module names a layer name refers to: ``net['unet']`` when the denoiser's network is a
    ModuleDict with a 'unet' (condiff's model families), else the network itself. Wrappers are looked through
    (their ``.denoiser``), so edits stack."""
    d = denoiser_or_net
    for _ in range(64):  # through Denoiser -> Denoiser wrappers (their .denoiser) to the network
        if isinstance(d, nn.Module) or isinstance(getattr(d, "net", None), nn.Module) or not hasattr(d, "denoiser"):
            break
        d = d.denoiser
    net = d if isinstance(d, nn.Module) else getattr(d, "net", None)
    if not isinstance(net, nn.Module):
        raise ConfigError(
            f"h-space needs a denoiser over a torch network (a .net module), got {type(denoiser_or_net).__name__}"
        )
    if isinstance(net, nn.ModuleDict) and "unet" in net:
        return net["unet"]
    return net


def find_layer(denoiser_or_net, layer: str) -> nn.Module:
    """The module named ``layer`` (dotted name, or 'mid' for 'mid_block') in ``hook_root``; an unknown name is a
    one-line error listing the network's top-level modules."""
    if not isinstance(layer, str) or not layer.strip():
        raise ConfigError(f"h-space layer must be a module name such as 'mid' or 'mid_block', got {layer!r}")
    root = hook_root(denoiser_or_net)
    table = dict(root.named_modules())
    name = ALIASES.get(layer.strip(), layer.strip())
    if name not in table or not name:
        raise one_of("h-space layer", layer, list(ALIASES) + [n for n in table if n and "." not in n])
    return table[name]


@contextmanager
def output_hook(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Within the block, ``module``'s output goes through ``fn`` (a returned tensor replaces it; None keeps it);
    the hook is removed on exit, also on an exception."""

    def hook(_mod, _inputs, out):
        first = out[0] if isinstance(out, tuple) and out else out  # diffusers blocks may return (h, ...)
        if not isinstance(first, torch.Tensor) or first.dim() < 2:
            raise ConfigError(
                f"the h-space layer must output a tensor of shape (batch, channels, ...) (or a tuple that starts "
                f"with one), got {describe(first)}"
            )
        new = fn(first)
        if new is None or first is out:
            return new
        return (new, *out[1:])

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def describe(v) -> str:
    """'a tensor of shape (...)' or 'a TYPE', for one-line errors."""
    return f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


def row_times(t, rows: int) -> torch.Tensor:
    """t (a number, a 0-d tensor or one time per row) as a float64 tensor of ``rows`` times."""
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
    if tt.numel() == 1:
        return tt.expand(rows)
    if tt.numel() != rows:
        raise ConfigError(f"h-space: the layer saw {rows} rows but t has {tt.numel()} values")
    return tt


def check_window(t_range) -> tuple[float, float] | None:
    """An edit's time window [low, high] (None: every time), checked."""
    if t_range is None:
        return None
    if not isinstance(t_range, (tuple, list)) or len(t_range) != 2:
        raise ConfigError(f"t_range must be None or two times (low, high), got {t_range!r}")
    lo = check_real("t_range low", t_range[0])
    hi = check_real("t_range high", t_range[1])
    if lo > hi:
        raise ConfigError(f"t_range must have low <= high, got {t_range!r}")
    return lo, hi


def early_window(grid: torch.Tensor, fraction: float) -> tuple[float, float] | None:
    """The ``t_range`` of the first ``fraction`` of a sampling grid's steps (``grid`` from make_grid, high t
    first; the network calls of step i are at grid[i]): the first round(fraction * steps) steps, at least one.
    fraction 1 is None (every step, the edit's default)."""
    fraction = check_real("the window's fraction of the steps", fraction, 0.0, 1.0, "a number in (0, 1]", lo_open=True)
    g = [float(v) for v in grid]
    steps = len(g) - 1
    m = max(1, round(fraction * steps))
    if m >= steps:
        return None
    return (g[m - 1] + g[m]) / 2, 2 * abs(g[0]) + 1.0


def active_rows(window, t, rows: int) -> torch.Tensor:
    """Per row: t inside the window (all rows without a window)."""
    tt = row_times(t, rows)
    if window is None:
        return torch.ones(rows, dtype=torch.bool)
    return (tt >= window[0]) & (tt <= window[1])


# ---- collecting --------------------------------------------------------------------------------------------


@dataclass
class Recorder(Wrapper):
    """A transparent Denoiser wrapper that appends ``(t, h)`` to ``records`` at every call, h the detached output
    of ``module`` during that call (every row the network sees: [uncond, cond] under CFG)."""

    denoiser: Any
    module: nn.Module = field(repr=False)
    records: list = field(default_factory=list, repr=False)

    def __call__(self, x, t, cond=None):
        seen = []
        with output_hook(self.module, lambda h: seen.append(h.detach().clone())):
            out = self.denoiser(x, t, cond)
        for h in seen:
            self.records.append((row_times(t, h.shape[0]).clone(), h))
        return out


@dataclass(frozen=True)
class HSpace:
    """What ``collect_hspace`` recorded: ``h`` (calls, rows, C, ...) and ``times`` (calls, rows), one entry per
    network call in order; ``x`` the final samples."""

    h: torch.Tensor
    times: torch.Tensor
    x: torch.Tensor

    def vectors(self, layout: str = "position") -> torch.Tensor:
        """Every recorded vector (``to_vectors``): (calls * rows * positions, C) or (calls * rows, C * positions)."""
        return to_vectors(self.h.flatten(0, 1), layout)


LAYOUTS = ("position", "flat")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise one_of("SAE layout", layout, LAYOUTS)
    return layout


def to_vectors(h: torch.Tensor, layout: str = "position") -> torch.Tensor:
    """(B, C, ...) -> 'position': (B * positions, C), one vector per spatial position (channels last);
    'flat': (B, C * positions), one vector per row."""
    if check_layout(layout) == "flat":
        return h.reshape(h.shape[0], -1)
    return h.movedim(1, -1).reshape(-1, h.shape[1])


def from_vectors(v: torch.Tensor, like: torch.Tensor, layout: str = "position") -> torch.Tensor:
    """The inverse of ``to_vectors``: back to the layout of ``like`` (B, C, ...)."""
    if check_layout(layout) == "flat":
        return v.reshape(like.shape)
    shape = (like.shape[0], *like.shape[2:], like.shape[1])
    return v.reshape(shape).movedim(-1, 1)


def collect_hspace(denoiser, solver, grid, x, cond=None, layer: str = "mid", noise=None) -> HSpace:
    """Sample (without gradients) and record the output of ``layer`` at every network call."""
    rec = Recorder(denoiser, find_layer(denoiser, layer))
    with torch.no_grad():
        out = sample(rec, solver, grid, x, cond, noise=noise)
    if not rec.records:
        raise ConfigError(f"h-space layer {layer!r} was never called while sampling")
    shapes = {tuple(h.shape) for _, h in rec.records}
    if len(shapes) != 1:
        raise ConfigError(f"h-space layer {layer!r} gave outputs of several shapes {sorted(shapes)}")
    return HSpace(torch.stack([h for _, h in rec.records]), torch.stack([t for t, _ in rec.records]), out.x)


def mean_difference(h: torch.Tensor, group_a: torch.Tensor, group_b: torch.Tensor) -> torch.Tensor:
    """Kwon et al.'s Delta-h as a difference of means: for every recorded call (dimension 0 of ``h``, shape
    (calls, rows, C, ...)), the mean h of the rows in ``group_a`` minus the mean of those in ``group_b``
    (two bool masks over rows) -> (calls, C, ...)."""
    if h.dim() < 3:
        raise ConfigError(f"mean_difference needs h of shape (calls, rows, channels, ...), got {tuple(h.shape)}")
    for name, g in (("group_a", group_a), ("group_b", group_b)):
        if not isinstance(g, torch.Tensor) or g.dtype != torch.bool or g.shape != (h.shape[1],):
            raise ConfigError(f"{name} must be a bool tensor of {h.shape[1]} rows, got {describe(g)}")
        if not g.any():
            raise ConfigError(f"{name} selects no row")
    return h[:, group_a].mean(1) - h[:, group_b].mean(1)


def check_rows(rows: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``rows`` (one flag per row of the call), checked against the rows the layer saw."""
    if rows.shape[0] != h.shape[0]:
        raise ConfigError(f"h-space: the layer saw {h.shape[0]} rows but the call has {rows.shape[0]}")
    return rows


@dataclass
class HShift(Wrapper):
    """Denoiser -> Denoiser: h <- h + scale * dh(t) at ``layer`` during each forward (Kwon et al.'s Delta-h;
    condiff.tasks.bias_features, item 4). ``direction``: one (C, ...) tensor for every time, or a table (calls, C, ...)
    with ``times`` (calls,): each row uses the entry at the nearest time. scale 0 is bit-identical."""

    denoiser: Any
    direction: torch.Tensor = field(repr=False)
    scale: float = 1.0
    times: torch.Tensor | None = None
    layer: str = "mid"
    t_range: tuple[float, float] | None = None
    net: nn.Module | None = field(default=None, repr=False)
    module: nn.Module = field(init=False, repr=False)

    def __post_init__(self):
        d = self.direction
        if not isinstance(d, torch.Tensor) or not d.is_floating_point() or d.dim() < 1:
            raise ConfigError(f"the h-space direction must be a floating tensor, got {describe(d)}")
        if not torch.isfinite(d).all():
            raise ConfigError("the h-space direction must be finite")
        if self.times is not None:
            tt = self.times
            if not isinstance(tt, torch.Tensor) or tt.dim() != 1 or d.dim() < 2 or tt.shape[0] != d.shape[0]:
                raise ConfigError(
                    f"times must be a 1-d tensor with one time per direction ({d.shape[0]}), got {describe(tt)}"
                )
        self.scale = check_real("h-space shift scale", self.scale, -MAX_EDIT, MAX_EDIT)
        self._window = check_window(self.t_range)
        self.module = find_layer(self.net if self.net is not None else self.denoiser, self.layer)

    def shift(self, h: torch.Tensor, t, rows: torch.Tensor) -> torch.Tensor:
        d = self.direction.to(h.device)
        if self.times is None:
            per_row = d.unsqueeze(0).expand(h.shape[0], *d.shape)
        else:
            tt = row_times(t, h.shape[0])
            idx = (tt.view(-1, 1) - self.times.double().cpu().view(1, -1)).abs().argmin(1)
            per_row = d[idx.to(d.device)]
        if per_row.shape[1:] != h.shape[1:]:
            raise ConfigError(
                f"the h-space direction has shape {tuple(per_row.shape[1:])} but the layer outputs "
                f"{tuple(h.shape[1:])} per row"
            )
        per_row = per_row * rows.to(per_row.device, per_row.dtype).view(-1, *([1] * (h.dim() - 1)))
        return h + (self.scale * per_row).to(h.dtype)

    def __call__(self, x, t, cond=None):
        if self.scale == 0.0:
            return self.denoiser(x, t, cond)
        rows = active_rows(self._window, t, x.shape[0])
        if not rows.any():
            return self.denoiser(x, t, cond)
        with output_hook(self.module, lambda h: self.shift(h, t, check_rows(rows, h))):
            return self.denoiser(x, t, cond)
