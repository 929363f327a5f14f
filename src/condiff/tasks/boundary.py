"""Optimal boundary conditions for diffusion-ODE restoration (Ma, Yang, Yang, Fu, Liu, "Solving Diffusion ODEs with
Optimal Boundary Conditions for Better Image Super-Resolution", ICLR 2024).

A conditional diffusion model with a deterministic ODE solver is a map ``x_0 = F_theta(x_T, y)`` of the start noise
x_T (the boundary condition) and the input y (the low-resolution image), and its quality fluctuates with x_T. The
paper's claim is that one x_T, shared by all inputs, is (approximately) optimal:

    x_T* = argmax_{x_T} E_y [ Q(F_theta(x_T, y), y) ],

and its practical construction estimates it by search: draw K candidates x_T^(k) ~ the prior, run the solver from
each on a reference set of R (input, target) pairs, score each candidate by the mean quality against the targets,
keep the best, and reuse that single tensor for every later input (``search_boundary``). ``quality_of`` scores any
start (one shared x_T, or one per input) on a set of pairs, which is how the searched x_T is compared with random
starts on held-out inputs.

The method is model-agnostic: a Denoiser, a deterministic solver and its grid, a condition builder (inputs -> the
cond mapping), the pairs and a per-sample quality (higher is better, e.g. PSNR). Oracle: for x_0 | y ~ N(A y, S) the
exact PF-ODE map is affine in x_T, ``F = A y + M (x_T - alpha_T A y)`` with ``M = S^{1/2} (alpha_T^2 S +
sigma_T^2 I)^{-1/2}``, so the expected squared error is ``tr S + ||M x_T||^2 + alpha_T^2 E||M A y||^2`` and the search
picks the candidate of smallest M-weighted norm (tests/tasks/test_boundary.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from condiff.core.sampling import sample
from condiff.errors import ConfigError, check_int

Condition = Callable[[torch.Tensor], Mapping[str, Any] | None]
Quality = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BoundarySearch:
    """The searched start ``x_T`` (one sample's shape), its ``index`` among the candidates, ``scores`` (K,) the mean
    validation quality of each candidate, ``per_pair`` (K, R) the quality of each candidate on each pair, and the
    network calls the search took (each on a batch of up to ``batch`` runs)."""

    x_T: torch.Tensor
    index: int
    scores: torch.Tensor
    per_pair: torch.Tensor
    nfe: int


def check_deterministic(solver) -> None:
    """A stochastic solver's output is not a function of x_T; the search needs an ODE solver."""
    if getattr(solver, "stochastic", False):
        raise ConfigError(
            f"the boundary condition determines the output only under a deterministic solver; "
            f"{getattr(solver, 'name', type(solver).__name__)} is stochastic (use e.g. DDIM with eta 0 or DPM-Solver++)"
        )


def _check_pairs(inputs: torch.Tensor, targets: torch.Tensor) -> int:
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] < 1:
        raise ConfigError(
            f"inputs and targets must be non-empty with one target per input, got {inputs.shape[0]} inputs and "
            f"{targets.shape[0]} targets"
        )
    return inputs.shape[0]


@torch.no_grad()
def run_pairs(
    denoiser,
    solver,
    grid: torch.Tensor,
    condition: Condition,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    quality: Quality,
    starts: torch.Tensor,
    pairs: torch.Tensor,
    batch: int = 256,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """(quality (P,), NFE) of the solver run from ``starts[pairs[:, 0]]`` on input ``pairs[:, 1]``, in chunks of
    ``batch`` rows; ``progress(n)`` after each chunk of n rows."""
    batch = check_int("batch", batch, lo=1)
    out, nfe = torch.empty(pairs.shape[0], dtype=torch.float64), 0
    for i in range(0, pairs.shape[0], batch):
        s, r = pairs[i : i + batch, 0], pairs[i : i + batch, 1]
        res = sample(denoiser, solver, grid, starts[s].contiguous(), condition(inputs[r]))
        q = quality(res.x, targets[r])
        if q.shape != (s.shape[0],):
            raise ConfigError(f"quality must give one score per sample, shape ({s.shape[0]},), got {tuple(q.shape)}")
        out[i : i + s.shape[0]] = q.double()
        nfe += res.nfe
        if progress is not None:
            progress(s.shape[0])
    return out, nfe


def search_boundary(
    denoiser,
    solver,
    grid: torch.Tensor,
    condition: Condition,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    quality: Quality,
    candidates: torch.Tensor,
    batch: int = 256,
    progress: Callable[[int], None] | None = None,
) -> BoundarySearch:
    """The shared boundary condition of Ma et al. (2024): each of the K ``candidates`` (K, *sample shape) run from
    ``grid[0]`` with the deterministic ``solver`` on every validation pair (``inputs``, ``targets``), scored by the
    mean of ``quality(output, target)`` (higher is better); the best candidate is returned (the first on a tie)."""
    check_deterministic(solver)
    r = _check_pairs(inputs, targets)
    k = candidates.shape[0]
    if k < 1:
        raise ConfigError("search_boundary needs at least one candidate x_T")
    pairs = torch.cartesian_prod(torch.arange(k), torch.arange(r))
    q, nfe = run_pairs(denoiser, solver, grid, condition, inputs, targets, quality, candidates, pairs, batch, progress)
    per_pair = q.reshape(k, r)
    scores = per_pair.mean(1)
    best = int(torch.argmax(scores))
    return BoundarySearch(candidates[best].clone(), best, scores, per_pair, nfe)


def quality_of(
    denoiser,
    solver,
    grid: torch.Tensor,
    condition: Condition,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    quality: Quality,
    x_T: torch.Tensor,
    batch: int = 256,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(R,) the quality on each pair of the solver run from ``x_T``: one start shared by every input (a sample's
    shape, ``targets.shape[1:]``) or one per input (``targets``' shape)."""
    check_deterministic(solver)
    r = _check_pairs(inputs, targets)
    shape = tuple(targets.shape[1:])
    if tuple(x_T.shape) == shape:
        starts, which = x_T.unsqueeze(0), torch.zeros(r, dtype=torch.long)
    elif tuple(x_T.shape) == (r, *shape):
        starts, which = x_T, torch.arange(r)
    else:
        raise ConfigError(f"x_T must be {shape} (shared) or {(r, *shape)} (one per input), got {tuple(x_T.shape)}")
    pairs = torch.stack([which, torch.arange(r)], 1)
    return run_pairs(denoiser, solver, grid, condition, inputs, targets, quality, starts, pairs, batch, progress)[0]


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) of a 1-D sample (n >= 2)."""
    v = values.double().reshape(-1)
    if v.numel() < 2:
        raise ConfigError(f"a standard error needs at least 2 values, got {v.numel()}")
    return float(v.mean()), float(v.std(unbiased=True) / v.numel() ** 0.5)
