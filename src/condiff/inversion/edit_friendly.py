"""Edit-friendly DDPM noise space (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024, eq. 5-6).

Extraction draws every noisy latent *independently*, x_k = alpha_k x0 + sigma_k eps_k (not a Markov
chain), then walks the grid downwards and solves the stochastic step x_s = mu(x_t) + c_t z for the map z
that lands on the drawn x_s. The stored latent is then overwritten by the step's own recomputation
mu + c_t z (the numerical correction), so replaying the maps through the very same ``solver.step``, as a
``Recorded`` noise source, rebuilds every latent exactly. The last step into sigma = 0 is deterministic in
condiff's grid. With ``exact=True`` its residual x0 - D(x_1) is kept and added back, which makes the
reconstruction exact; ``exact=False`` drops it, which is the official code's choice.

Editing replays the maps with a new condition and guidance scale, starting ``skip`` sampler steps in, at
the stored latent of that step.

Any solver whose step is affine in the injected noise works: ``DDPM()`` (the default, the eta = 1 posterior
the paper uses) or ``DDIM(eta)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from condiff.core.denoiser import start_trajectory
from condiff.core.sampling import CountingDenoiser, NoiseSource, Recorded, SampleOutput, sample
from condiff.errors import ConfigError
from condiff.inversion.ddim import check_grid


@dataclass(frozen=True)
class NoiseMaps:
    """``latents[k]`` is x at ``grid[k]`` (k < N), ``maps[k]`` the noise the step grid[k] -> grid[k+1] injects,
    ``residual`` the correction after the final deterministic step (zeros with exact=False)."""

    grid: torch.Tensor
    latents: tuple[torch.Tensor, ...]
    maps: tuple[torch.Tensor, ...]
    residual: torch.Tensor
    nfe: int

    @property
    def steps(self) -> int:
        return self.grid.numel() - 1


class _Constant(NoiseSource):
    """Returns a fixed tensor (zeros, ones or a map) and remembers whether the step asked for noise."""

    def __init__(self, value):
        self.value, self.used = value, False

    def sample(self, like):
        self.used = True
        return (
            (torch.zeros_like(like) + self.value) if not isinstance(self.value, torch.Tensor) else self.value.to(like)
        )


@dataclass
class _Memo:
    """Evaluates the network once per (x, t): the three probes of one step share it (1 NFE per step)."""

    denoiser: Any
    key: tuple | None = None
    value: torch.Tensor | None = None

    @property
    def schedule(self):
        return self.denoiser.schedule

    def __call__(self, x, t):
        key = (id(x), float(t))
        if key != self.key:
            self.key, self.value = key, self.denoiser(x, t)
        return self.value


def noisy_latents(schedule, grid, x0: torch.Tensor, generator: torch.Generator | None) -> list[torch.Tensor]:
    """x_k = alpha_k x0 + sigma_k eps_k with independent eps_k, for every grid point but the last."""
    out = []
    for k in range(grid.numel() - 1):
        t = torch.tensor(float(grid[k]), dtype=torch.float64)
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        out.append(a * x0 + s * torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
    return out


def extract_noise_maps(
    denoiser,
    solver,
    grid,
    x0: torch.Tensor,
    cond: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    exact: bool = True,
    progress: bool | str = False,
) -> NoiseMaps:
    """The maps z_k that make ``solver`` on ``grid`` reproduce ``x0`` from the drawn x_N."""
    grid = check_grid(grid)
    if not solver.stochastic:
        raise ConfigError(
            f"edit-friendly inversion needs a stochastic solver (ddpm, or ddim with eta > 0), got {solver.name!r}"
        )
    drawn = noisy_latents(denoiser.schedule, grid, x0, generator)
    D = CountingDenoiser(start_trajectory(denoiser), cond)
    memo = _Memo(D)
    x, state = drawn[0], solver.init_state(grid)
    latents, maps = [x], []
    residual = torch.zeros_like(x0)
    steps = range(grid.numel() - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=progress if isinstance(progress, str) else "edit-friendly inversion", leave=False)
    for k in steps:
        t, s = float(grid[k]), float(grid[k + 1])
        zero = _Constant(0.0)
        mu, new_state = solver.step(memo, x, t, s, state, zero)
        if not zero.used:  # a deterministic step (into sigma = 0): keep its residual
            if k != grid.numel() - 2:
                raise ConfigError(
                    f"solver {solver.name!r} injects no noise at step {k} of {grid.numel() - 1}; "
                    f"edit-friendly inversion needs noise at every step but the last"
                )
            if exact:
                residual = x0 - mu
            state = new_state
            break
        c = solver.step(memo, x, t, s, state, _Constant(1.0))[0] - mu
        z = (drawn[k + 1] - mu) / c
        x, state = solver.step(memo, x, t, s, state, _Constant(z))  # the stored, corrected latent
        maps.append(z)
        if k + 1 < grid.numel() - 1:
            latents.append(x)
    return NoiseMaps(grid, tuple(latents), tuple(maps), residual, D.nfe)


def replay(
    denoiser,
    solver,
    maps: NoiseMaps,
    cond: Mapping[str, Any] | None = None,
    skip: int = 0,
    progress: bool | str = False,
) -> SampleOutput:
    """Sample with the recorded maps from step ``skip`` (the edit; spec A3 step 4). Same condition, scale and
    ``skip = 0`` reconstruct the image exactly (with exact maps)."""
    n = maps.steps
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < n:
        raise ConfigError(f"skip must be an integer in [0, {n - 1}] (sampler steps out of {n}), got {skip!r}")
    out = sample(
        denoiser,
        solver,
        maps.grid[skip:],
        maps.latents[skip],
        cond,
        Recorded(list(maps.maps[skip:])),
        progress=progress,
    )
    return SampleOutput(out.x + maps.residual, out.nfe)
