"""condiff's DDIM and DPM-Solver++(2M) against diffusers' schedulers, driven by the same exact GMM eps model.

diffusers is given its own float32 ``alphas_cumprod`` table; condiff uses the same table in float64
(``VPDiscrete(alphas_cumprod=scheduler.alphas_cumprod.double())``), and the grid is diffusers' timesteps
followed by the clean point t = -1. Everything else (samples, model) is float64, so the remaining gap is
diffusers' float32 arithmetic: its tables are float32, and DPMSolverMultistepScheduler.step also casts the
sample itself to float32 (its "upcast" line), so for DPM-Solver++ ~1e-6 is the floor whatever the tables.
DDIMScheduler computes in the sample's dtype, so a second test hands it a float64 ``alphas_cumprod`` and
checks that the formulas agree to float64 round-off.
"""

import pytest
import torch

from condiff.core.denoiser import wrap
from condiff.core.sampling import sample
from condiff.core.schedules import VPDiscrete
from condiff.data.gmm import GMM
from condiff.solvers import DDIM, DPMSolverPP2M, DPMSolverPP3M, UniPC

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
TOL_F64 = 1e-10


def eps_model(gmm: GMM, alphas_cumprod: torch.Tensor):
    """The exact eps of the GMM as a function of an integer-valued timestep tensor (like a UNet)."""
    ac = alphas_cumprod.double()

    def net(x, t, y=None):
        a_bar = ac[torch.as_tensor(t).round().long().reshape(-1)]
        return gmm.eps(x, a_bar.sqrt(), (1 - a_bar).sqrt(), y)

    return net


def run_diffusers(scheduler, net, x, steps, cond):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = net(x, t.expand(x.shape[0]), **cond)
        x = scheduler.step(out, t, x).prev_sample
    return x, scheduler.timesteps


def run_condiff(solver, scheduler, net, x, timesteps, cond):
    sch = VPDiscrete(alphas_cumprod=scheduler.alphas_cumprod.double())
    den = wrap(net, sch, prediction="eps")
    grid = torch.cat([timesteps.double(), torch.tensor([-1.0], dtype=torch.float64)])
    return sample(den, solver, grid, x, cond)


def schedulers():
    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2)
    return {
        "ddim": (lambda: diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common), DDIM(eta=0.0)),
        "dpmpp-2m": (
            lambda: diffusers.DPMSolverMultistepScheduler(
                algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero", **common
            ),
            DPMSolverPP2M(),
        ),
        "dpmpp-3m": (
            lambda: diffusers.DPMSolverMultistepScheduler(
                algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="zero", lower_order_final=True, **common
            ),
            DPMSolverPP3M(),
        ),
        "unipc": (
            lambda: diffusers.UniPCMultistepScheduler(
                solver_type="bh2", solver_order=2, final_sigmas_type="zero", **common
            ),
            UniPC(order=2, variant="bh2"),
        ),
    }


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "dpmpp-3m", "unipc"])
def test_matches_diffusers(name, steps, conditional, gmm, capsys):
    make, solver = schedulers()[name]
    scheduler = make()
    net = eps_model(gmm, scheduler.alphas_cumprod)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(64, gmm.dim, generator=g, dtype=torch.float64)
    cond = {"y": torch.arange(64) % 2} if conditional else {}
    ref, timesteps = run_diffusers(scheduler, net, x.clone(), steps, cond)
    out = run_condiff(solver, scheduler, net, x.clone(), timesteps, cond)
    assert out.nfe == steps
    err = float((out.x - ref).abs().max())
    with capsys.disabled():
        print(f"\n[diffusers match] {name} steps={steps} cond={conditional}: max |diff| = {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_diffusers_with_float64_table(steps, gmm, capsys):
    make, solver = schedulers()["ddim"]
    scheduler = make()
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(64, gmm.dim, generator=g, dtype=torch.float64)
    net = eps_model(gmm, scheduler.alphas_cumprod)
    ref, timesteps = run_diffusers(scheduler, net, x.clone(), steps, {})
    out = run_condiff(solver, scheduler, net, x.clone(), timesteps, {})
    err = float((out.x - ref).abs().max())
    with capsys.disabled():
        print(f"\n[diffusers match, float64 table] ddim steps={steps}: max |diff| = {err:.2e}")
    assert err <= TOL_F64
