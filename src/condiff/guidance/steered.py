"""Steered diffusion's implicit conditioning for linear measurements (Nair et al., ICCV 2023, "Steered
Diffusion: A Generalized Framework for Plug-and-Play Conditional Image Synthesis", sec. 3.2, linear
degradations), as a Denoiser -> Denoiser object.

With a linear measurement y = A x_0 and a right inverse A^+ (A A^+ = I on the measurement space), the clean
estimate is projected onto the measurement set {x : A x = y} before the solver sees it:

    x0_hat' = x0_hat - A^+ (A x0_hat - y)          so that   A x0_hat' = y   exactly, at every evaluation.

The map is idempotent (A^+ A is a projection) and the orthogonal projection when A^+ is the Moore-Penrose
pseudo-inverse A^T (A A^T)^{-1}. The operators here:

* ``Inpaint(mask)``: mask 1 = to fill, 0 = known (the diffusers convention, white = fill). A keeps the known
  entries (measurements are image-shaped with zeros at the filled entries); x0' = m * x0 + (1 - m) * y.
* ``SuperResolution(factor)``: A = average pooling by ``factor`` over the trailing ``dims`` axes, A^+ =
  nearest-neighbour upsampling (= A^T (A A^T)^{-1}, since A A^T = I / factor^dims). The paper's code uses
  bicubic down/up-sampling, which has no exact right inverse; average pooling makes A x0' = y exact.
* ``Colorize(weights)``: A = luminance Y = weights . RGB over the channel axis. The default right inverse
  adds the luminance change to every channel, A^+ y = 1 y / (weights . 1): exactly the paper's "convert to
  YCbCr, overwrite Y, convert back" (with BT.601 weights, which sum to 1, Cb and Cr are unchanged); pass
  ``direction=weights`` for the orthogonal (Moore-Penrose) projection.

Several operators given as a list are projected onto one after the other (one pass); that is the projection
onto the intersection when the projections commute (disjoint inpainting masks; super-resolution with
colorization, which act on different axes). The paper then takes a DDIM eta = 1 step with the projected
estimate; here any solver consumes it (solvers only see x0_hat), and a final step into sigma = 0 returns
the projected estimate, so the sample itself satisfies the measurement.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from condiff.core.denoiser import Wrapper
from condiff.errors import ConfigError

BT601 = (0.299, 0.587, 0.114)


def _measurement(y, like: torch.Tensor, message: str) -> torch.Tensor:
    """``y`` as a tensor of ``like``'s dtype and device that broadcasts against it; else a one-line error
    (``message`` gets y's shape and like's shape)."""
    y = torch.as_tensor(y).to(dtype=like.dtype, device=like.device)
    try:
        torch.broadcast_shapes(like.shape, y.shape)
    except RuntimeError:
        raise ConfigError(message.format(tuple(y.shape), tuple(like.shape))) from None
    return y


class LinearOperator:
    """A linear measurement A with a right inverse ``pinv`` (A pinv(y) = y for y in the range of A)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x - A^+ (A x - y): the nearest point (along A^+) with A x = y."""
        ax = self(x)
        y = _measurement(
            y, ax, f"measurement y of shape {{}} does not match A x of shape {{}} for {type(self).__name__}"
        )
        return x - self.pinv(ax - y)


def _binary_mask(mask) -> torch.Tensor:
    m = torch.as_tensor(mask)
    if m.dtype == torch.bool:
        return m
    if not (m.is_floating_point() or m.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ConfigError(f"inpainting mask must be a bool or 0/1 tensor, got dtype {m.dtype}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ConfigError(
            "inpainting mask must hold only 0 (known) and 1 (to fill); a soft mask has no exact projection"
        )
    return m == 1


@dataclass(frozen=True, eq=False)
class Inpaint(LinearOperator):
    """Keep the known entries (mask 0); fill the entries with mask 1. The mask broadcasts against x."""

    mask: Any

    def __post_init__(self):
        object.__setattr__(self, "mask", _binary_mask(self.mask))

    def _keep(self, x):
        return (~self.mask).to(device=x.device, dtype=x.dtype)

    def __call__(self, x):
        return self._keep(x) * x

    def pinv(self, y):
        return self._keep(y) * y

    def project(self, x, y):
        """m * x + (1 - m) * y, selected (not blended) so known entries equal y bit for bit."""
        y = _measurement(y, x, "known image of shape {} does not match x of shape {} for Inpaint")
        return torch.where(self.mask.to(x.device), x, y)


@dataclass(frozen=True)
class SuperResolution(LinearOperator):
    """A = average pooling by ``factor`` over the last ``dims`` axes (2 for images, 1 for vectors)."""

    factor: int = 2
    dims: int = 2

    def __post_init__(self):
        for name, v in [("factor", self.factor), ("dims", self.dims)]:
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"super-resolution {name} must be a positive integer, got {v!r}")

    def __call__(self, x):
        r, k = self.factor, self.dims
        if x.dim() < k or any(n % r for n in x.shape[-k:]):
            raise ConfigError(
                f"super-resolution by {r} needs the last {k} axes divisible by {r}, got shape {tuple(x.shape)}"
            )
        shape = list(x.shape[:-k])
        for n in x.shape[-k:]:
            shape += [n // r, r]
        return x.reshape(shape).mean(dim=tuple(range(-1, -2 * k, -2)))

    def pinv(self, y):
        for axis in range(-self.dims, 0):
            y = y.repeat_interleave(self.factor, dim=axis)
        return y


@dataclass(frozen=True, eq=False)
class Colorize(LinearOperator):
    """A x = sum_c weights[c] x[c] over ``channel_dim`` (kept as a size-1 axis). ``direction`` d gives the
    right inverse A^+ y = d y / (weights . d): None = all ones (the YCbCr overwrite), weights = orthogonal."""

    weights: Any = BT601
    direction: Any = None
    channel_dim: int = -3

    def __post_init__(self):
        w = torch.as_tensor(self.weights, dtype=torch.float64).reshape(-1)
        d = (
            torch.ones_like(w)
            if self.direction is None
            else torch.as_tensor(self.direction, dtype=torch.float64).reshape(-1)
        )
        if d.shape != w.shape or not bool(torch.isfinite(w).all() and torch.isfinite(d).all()):
            raise ConfigError(
                f"colorize weights and direction must be finite vectors of one length, got "
                f"{tuple(w.shape)} and {tuple(d.shape)}"
            )
        wd = float(w @ d)
        if not abs(wd) > 1e-12 or not math.isfinite(wd):
            raise ConfigError(
                f"colorize direction must not be orthogonal to the weights (weights . direction = {wd:g})"
            )
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "direction", d)

    def _along(self, v, x):
        if x.dim() < -self.channel_dim or x.shape[self.channel_dim] != v.numel():
            raise ConfigError(
                f"colorize expects {v.numel()} channels on axis {self.channel_dim}, got shape {tuple(x.shape)}"
            )
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return v.to(device=x.device, dtype=x.dtype).reshape(shape)

    def __call__(self, x):
        return (self._along(self.weights, x) * x).sum(dim=self.channel_dim, keepdim=True)

    def pinv(self, y):
        if y.dim() < -self.channel_dim or y.shape[self.channel_dim] != 1:
            raise ConfigError(
                f"colorize measurements have one channel on axis {self.channel_dim}, got shape {tuple(y.shape)}"
            )
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        d = self.direction / (self.weights @ self.direction)
        return d.to(device=y.device, dtype=y.dtype).reshape(shape) * y


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@dataclass
class Projection(Wrapper):
    """x0_hat -> x0_hat - A^+ (A x0_hat - y) after the wrapped denoiser (module docstring). ``operator`` and
    ``y`` may be lists of equal length (projected onto in order)."""

    denoiser: Any
    operator: LinearOperator | Sequence[LinearOperator]
    y: Any

    def __post_init__(self):
        ops, ys = _as_list(self.operator), _as_list(self.y)
        if not ops or len(ops) != len(ys):
            raise ConfigError(
                f"projection needs one measurement per operator, got {len(ops)} operators and {len(ys)} measurements"
            )
        for op in ops:
            if not isinstance(op, LinearOperator):
                raise ConfigError(
                    f"projection operators must be LinearOperator objects (Inpaint, "
                    f"SuperResolution, Colorize), got {op!r}"
                )
        self._pairs = list(zip(ops, ys))

    def __call__(self, x, t, cond=None):
        x0 = self.denoiser(x, t, cond)
        for op, y in self._pairs:
            x0 = op.project(x0, y)
        return x0


def inpaint(denoiser, mask, known) -> Projection:
    """Inpainting of ``known`` where ``mask`` is 0, filling the mask-1 entries: Projection with Inpaint."""
    op = Inpaint(mask)
    return Projection(denoiser, op, op(torch.as_tensor(known)))
