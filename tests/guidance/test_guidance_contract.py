"""The contract every guidance in condiff.guidance keeps under every solver in condiff.solvers.SOLVERS
(issue 4, acceptance 7). Bases: the exact GMM denoiser (float64 and float32) and, for PAG (which needs
self-attention layers), a tiny random diffusers UNet2DConditionModel (float64 and a float32 copy).

- shape, dtype, finiteness: the sample has the start's shape and dtype and is finite;
- batch independence: sample i of a batch run equals the same sample run inside another batch (same start,
  same condition rows, the same noise sliced to its rows), to BATCH_TOL;
- no state between calls: one guided denoiser object, reused after unrelated runs (another start and labels,
  another batch size, a mid-grid start), gives bit for bit what a fresh object gives; a mid-grid start after a
  full run equals a fresh mid-grid start (AG's switch state, LinearAG's history).

Combinations a guidance refuses by design (REFUSED) are asserted to raise a one-line ConfigError.
To cover a new guidance, add a Case to CASES (test_every_exported_guidance_has_a_case fails until then).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn

import condiff.guidance as G
from condiff.data.gmm import GMM
from condiff.core.denoiser import X0, Eps, wrap
from condiff.errors import ConfigError
from condiff.core.grids import UniformLogSNR, make_grid
from condiff.guidance.classifier import exact_gmm_classifier
from condiff.core.sampling import Gaussian, initial_noise, sample
from condiff.core.schedules import VPLinear
from condiff.solvers import SOLVERS, get_solver
from noisekit import SlicedNoise

F64, F32 = torch.float64, torch.float32
SCH = VPLinear()
STEPS = 5
GRID = make_grid(SCH, STEPS, UniformLogSNR())
N, ROWS = 5, torch.tensor([3, 0])  # batch size, and the rows (reordered) of the sub-batch
OTHER_N = 3  # batch size of the unrelated run in the state test
MID = 2  # the mid-grid start: GRID[MID:]
# Sample i of a batch vs. the same sample in another batch: max |diff| <= BATCH_TOL * max(1, max |sample|).
# Measured: 0 (bit-identical) on the GMM in both dtypes for every combination; on the tiny UNet (whose conv
# and attention kernels round differently per batch size) 4e-15 relative in float64, 2.5e-6 in float32.
BATCH_TOL = {F64: 1e-12, F32: 1e-5}


# ---- bases -------------------------------------------------------------------------------------------------

CTX, LEN = 8, 3  # cross-attention width and token count of the tiny UNet


@functools.lru_cache(maxsize=None)
def tiny_unet_denoiser(dtype):
    """A tiny random UNet2DConditionModel (two levels, self- and cross-attention in the lower one), eps
    prediction on VPLinear, t fed as 1000 t; weights perturbed so that every path matters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, cross_attention_dim=CTX,
        attention_head_dim=4)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net = nn.ModuleDict({"unet": (unet.double() if dtype == F64 else unet).eval()})

    def call(net, x, t_in, cond):
        return net["unet"](x, t_in, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    return wrap(net, SCH, "eps", time_input=lambda t: 1000 * t, call=call)


def gmm_cond(n, seed, dtype):
    """Labels per row, the null condition (label -1) and a negative condition (the other class)."""
    y = (torch.arange(n) + seed) % 2
    return {"y": y, "null": GMM.null_cond(n), "negative": {"y": 1 - y}}


def unet_cond(n, seed, dtype):
    g = torch.Generator().manual_seed(100 + seed)
    return {"encoder_hidden_states": torch.randn(n, LEN, CTX, generator=g, dtype=F64).to(dtype),
            "null": {"encoder_hidden_states": torch.zeros(n, LEN, CTX, dtype=dtype)}}


def clean_logits(gmm):
    """Exact clean-classifier logits z_c(x0) = log sum_{k in c} pi_k N(x0; mu_k, Sigma_k) (for EluCD)."""

    def logits(x0):
        joint = torch.log(gmm.weights)[None] + gmm.component_log_prob(x0.to(F64), 1.0, 0.0)
        return torch.stack([torch.logsumexp(joint[:, gmm.classes == c], 1) for c in range(gmm.num_classes)], 1)

    return logits


def level_logits(x, t):
    """A fixed minority-level classifier for the contract: linear logits over 3 levels (t is ignored)."""
    return x @ torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]], dtype=x.dtype)


class LinearExpert(nn.Module):
    """A fixed linear 2-class classifier (x, t) -> logits for the PPAP case; ``k`` makes each expert differ."""

    def __init__(self, k):
        super().__init__()
        self.register_buffer("w", torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=F64) * (1.0 + 0.5 * k))

    def forward(self, x, t):
        return x @ self.w.to(x.dtype)


def ppap_experts():
    """Three experts routed over VPLinear's t range (PPAP's multi-expert classifier)."""
    from condiff.guidance.ppap import MultiExpert

    return MultiExpert([LinearExpert(k) for k in range(3)], SCH.t_min, SCH.t_max)


@functools.lru_cache(maxsize=None)
def linear_ag_coefficients(solver: str):
    """LinearAG coefficients fitted (float64, scale 3) on 16 CFG trajectories of this solver on GRID."""
    gmm = _gmm()
    g = torch.Generator().manual_seed(77)
    x = initial_noise(SCH, float(GRID[0]), (16, 2), g, dtype=F64)
    return G.fit_linear_ag(gmm.denoiser(SCH), get_solver(solver), GRID, x, gmm_cond(16, 0, F64), 3.0,
                           noise=Gaussian(torch.Generator().manual_seed(78)))


@functools.lru_cache(maxsize=None)
def _gmm():
    """The mixture of tests/conftest.py's ``gmm`` fixture (needed at collection time, hence not the fixture)."""
    return GMM.random(dim=2, components=4, num_classes=2, seed=0, spread=1.5, var_range=(0.1, 1.0))


# ---- the registry ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """``make(base, solver_name)`` builds a fresh guided denoiser; ``covers`` the guidance classes it checks."""

    name: str
    make: Callable[[Any, str], Any]
    covers: tuple = ()
    base: str = "gmm"  # or "unet"
    solver_wrap: Callable | None = None  # wraps the solver (self-recurrence)


MU = torch.tensor([[1.5, 0.5], [-1.0, -1.5]], dtype=F64)  # a target point per class for the universal losses


def target_loss(x0, cond):
    """||x0 - MU[y]||^2 per sample (one value per row, to minimise)."""
    return (x0 - MU[cond["y"]].to(x0.dtype)).square().sum(1)


def _stack(den, solver):  # CFG + AG + classifier guidance, nested
    return G.ClassifierGuidance(G.AdaptiveGuidance(den, 3.0, gamma_bar=0.98, space=X0()),
                                exact_gmm_classifier(den), 1.5, drop=())


def _pag_ag(den):  # PAG's term over AG, x0_c read through a Tap (what --pag --ag builds)
    tap = G.Tap(den)
    return G.PAGTerm(G.AdaptiveGuidance(tap, 3.0, gamma_bar=0.98, space=X0()), den, 2.0, layers="down", tap=tap)


CASES = [
    Case("cfg", lambda d, s: G.CFG(d, 3.0), (G.CFG,)),
    Case("cfg-linear-scale", lambda d, s: G.CFG(d, G.LinearScale(5.0, 1.0, 1.0, 0.0)), (G.LinearScale,)),
    Case("cfg-cosine-scale", lambda d, s: G.CFG(d, G.CosineScale(1.0, 4.0, 1.0, 0.0, power=2.0)),
         (G.CosineScale,)),
    Case("cfg-interval-scale", lambda d, s: G.CFG(d, G.IntervalScale(3.0, 0.3, 0.8)), (G.IntervalScale,)),
    Case("interval", lambda d, s: G.GuidanceInterval(d, 3.0, t_lo=0.3, t_hi=0.8), (G.GuidanceInterval,)),
    Case("rescale-x0", lambda d, s: G.GuidanceRescale(d, 3.0, 0.7), (G.GuidanceRescale,)),
    Case("rescale-eps", lambda d, s: G.GuidanceRescale(d, G.LinearScale(4.0, 1.0, 1.0, 0.0), 0.5, space=Eps())),
    Case("negative", lambda d, s: G.NegativeGuidance(d, 3.0), (G.NegativeGuidance,)),
    Case("negation", lambda d, s: G.Negation(d, 3.0, 1.0), (G.Negation,)),
    Case("thresholding", lambda d, s: G.DynamicThresholding(G.CFG(d, 3.0), ratio=0.9), (G.DynamicThresholding,)),
    Case("ag-eps", lambda d, s: G.AdaptiveGuidance(d, 3.0), (G.AdaptiveGuidance,)),
    Case("ag-x0", lambda d, s: G.AdaptiveGuidance(d, 3.0, gamma_bar=0.98, space=X0())),
    Case("linear-ag", lambda d, s: G.LinearAG(d, linear_ag_coefficients(s), steps=linear_ag_coefficients(s).steps),
         (G.LinearAG,)),  # every fitted evaluation predicted: the history is used at every step
    Case("classifier", lambda d, s: G.ClassifierGuidance(d, exact_gmm_classifier(d), 2.0), (G.ClassifierGuidance,)),
    Case("elucd", lambda d, s: G.EluCD(d, clean_logits(_gmm()), GRID, scale=0.5), (G.EluCD,)),
    Case("minority", lambda d, s: G.MinorityGuidance(d, level_logits, 2.0, levels=3), (G.MinorityGuidance,)),
    Case("ppap", lambda d, s: G.ppap_guidance(d, ppap_experts(), 2.0)),  # a ClassifierGuidance, routed by t
    Case("stack-ag-classifier", _stack),
    Case("inpaint", lambda d, s: G.inpaint(d, torch.tensor([1, 0]), torch.tensor([0.0, 0.7])),
         (G.Projection, G.Inpaint)),  # one known entry, shared by every row
    Case("super-resolution", lambda d, s: G.Projection(d, G.SuperResolution(2, dims=1), torch.tensor([0.3])),
         (G.SuperResolution,)),
    Case("colorize", lambda d, s: G.Projection(d, G.Colorize((0.3, 0.7), channel_dim=-1), torch.tensor([-0.4])),
         (G.Colorize,)),
    Case("universal-forward", lambda d, s: G.UniversalGuidance(d, [G.Forward(target_loss, 0.5)]),
         (G.UniversalGuidance, G.Forward)),
    Case("universal-both-recurrence", lambda d, s: G.UniversalGuidance(
        d, [G.Forward(target_loss, 0.3), G.Backward(target_loss, steps=2, lr=0.1)]), (G.Backward, G.SelfRecurrence),
        solver_wrap=lambda solver: G.SelfRecurrence(solver, k=2)),
    Case("pag-cfg", lambda d, s: G.PAG(d, 2.0, layers="down", cfg_scale=3.0), (G.PAG,), base="unet"),
    Case("pag", lambda d, s: G.PAG(d, 2.0, layers="up", batched=False), base="unet"),
    Case("pag-term-ag", lambda d, s: _pag_ag(d), (G.PAGTerm, G.Tap), base="unet"),  # --pag with --ag
]
# -- to extend: guidance modules not written yet (minority guidance, PPAP) get their Case here.

# Exported Denoiser -> Denoiser objects that are not guidance and need no case.
NOT_GUIDANCE = {"CountRows"}

# (case, solver) pairs refused by design, with the message they must raise. EluCD's x0 shift is defined per
# step of its grid (V_k / c_k), so a solver that evaluates between grid times cannot be guided by it.
REFUSED = {("elucd", "dpmpp-2s"): "grid times", ("elucd", "edm-sde"): "grid times"}

SUPPORTED = [(c, s) for c in CASES for s in sorted(SOLVERS) if (c.name, s) not in REFUSED]
CASE = {c.name: c for c in CASES}


def _id(param):
    c, s = param
    return f"{c.name}-{s}"


# ---- running -----------------------------------------------------------------------------------------------



def take(cond, rows):
    """The rows of every per-row tensor in a (nested) condition mapping."""
    if isinstance(cond, dict):
        return {k: take(v, rows) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.dim() > 0:
        return cond[rows]
    return cond


@dataclass
class Setup:
    case: Case
    solver: str
    dtype: torch.dtype

    @property
    def base(self):
        return _gmm().denoiser(SCH) if self.case.base == "gmm" else tiny_unet_denoiser(self.dtype)

    def fresh(self):
        return self.case.make(self.base, self.solver)

    def start(self, n, seed, grid=GRID):
        shape = (n, 2) if self.case.base == "gmm" else (n, 3, 8, 8)
        x = initial_noise(SCH, float(grid[0]), shape, torch.Generator().manual_seed(seed), dtype=F64)
        cond = (gmm_cond if self.case.base == "gmm" else unet_cond)(n, seed, self.dtype)
        g = torch.Generator().manual_seed(1000 + seed)
        draws = [torch.randn(shape, generator=g, dtype=F64) for _ in range(4 * STEPS + 2)]
        return x.to(self.dtype), cond, draws

    def run(self, guided, x, cond, draws, rows=slice(None), grid=GRID):
        solver = get_solver(self.solver)
        if self.case.solver_wrap is not None:
            solver = self.case.solver_wrap(solver)
        with torch.no_grad():
            return sample(guided, solver, grid, x[rows], take(cond, rows), noise=SlicedNoise(draws, rows)).x


# ---- the contract ------------------------------------------------------------------------------------------

def test_every_exported_guidance_has_a_case():
    """Every class exported by condiff.guidance that guides (a Denoiser -> Denoiser class, i.e. one with a
    ``denoiser`` field), every scale schedule, measurement operator, universal-guidance term and solver wrapper
    is covered by some Case."""
    from condiff.guidance.steered import LinearOperator
    from condiff.solvers import Solver

    covered = {cls.__name__ for c in CASES for cls in c.covers}
    exported = set()
    for name in G.__all__:
        obj = getattr(G, name)
        if not isinstance(obj, type):
            continue
        fields = getattr(obj, "__dataclass_fields__", {})
        if ("denoiser" in fields or name.endswith("Scale") or issubclass(obj, (LinearOperator, Solver))
                or obj in (G.Forward, G.Backward)):
            exported.add(name)
    assert exported - NOT_GUIDANCE <= covered, sorted(exported - NOT_GUIDANCE - covered)
    assert set(CASE) >= {c for c, _ in REFUSED} and set(SOLVERS) >= {s for _, s in REFUSED}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo", SUPPORTED, ids=_id)
def test_shape_dtype_and_finite(combo, dtype):
    """The guided sample has the start's shape and dtype and is finite."""
    st = Setup(*combo, dtype)
    x, cond, draws = st.start(N, 0)
    out = st.run(st.fresh(), x, cond, draws)
    assert out.shape == x.shape and out.dtype == dtype
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo", SUPPORTED, ids=_id)
def test_batch_elements_are_independent(combo, dtype):
    """Rows [3, 0] of a batch-of-5 run equal a run of just those rows (same starts, conditions and noise),
    each with a fresh guided object, to BATCH_TOL relative to the sample's magnitude."""
    st = Setup(*combo, dtype)
    x, cond, draws = st.start(N, 0)
    full = st.run(st.fresh(), x, cond, draws)
    part = st.run(st.fresh(), x, cond, draws, rows=ROWS)
    err = float((part - full[ROWS]).abs().max())
    assert err <= BATCH_TOL[dtype] * max(1.0, float(full.abs().max())), err


@pytest.mark.parametrize("combo", SUPPORTED, ids=_id)
def test_no_state_leaks_between_calls(combo):
    """One object reused for A, A again, a mid-grid start C (same batch size, right after a full run), A, an
    unrelated run (other starts and labels, batch 3) and A once more gives bit for bit what fresh objects give
    for A and C. Each reuse hits one of AG's resets (t back at the top, t rising, batch size) and LinearAG's
    history check (a mid-grid start after a full run of the same batch size)."""
    st = Setup(*combo, F64)
    x, cond, draws = st.start(N, 0)
    xo, condo, drawso = st.start(OTHER_N, 1)
    mid = GRID[MID:]
    xc, condc, drawsc = st.start(N, 2, grid=mid)
    a = st.run(st.fresh(), x, cond, draws)
    c = st.run(st.fresh(), xc, condc, drawsc, grid=mid)
    guided = st.fresh()
    assert torch.equal(st.run(guided, x, cond, draws), a)
    assert torch.equal(st.run(guided, x, cond, draws), a)
    assert torch.equal(st.run(guided, xc, condc, drawsc, grid=mid), c)
    assert torch.equal(st.run(guided, x, cond, draws), a)
    st.run(guided, xo, condo, drawso)
    assert torch.equal(st.run(guided, x, cond, draws), a)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("case", ["ag-x0", "stack-ag-classifier"])
def test_adaptive_guidance_switch_is_exercised(case, solver):
    """The AG cases above switch some rows during run A (so the state test checks a non-trivial state), and
    the switch is what a fresh object records (rows and times)."""
    st = Setup(CASE[case], solver, F64)
    x, cond, draws = st.start(N, 0)
    guided = st.fresh()
    ag = guided if isinstance(guided, G.AdaptiveGuidance) else guided.denoiser
    st.run(guided, x, cond, draws)
    assert bool(ag.state.switched.any()), ag.state


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("case", ["ag-x0", "linear-ag"])
def test_reset_separates_a_run_that_stopped_mid_grid(case, solver):
    """A run stopped mid-grid (GRID[:3]) and a new one starting lower (GRID[2:]) look to the object like one
    trajectory continued (t keeps falling, same batch size), so AG keeps its switches and LinearAG its history
    (measured: the second run then differs from a fresh object's by ~1.7-1.9 under ddim and dpmpp-2m). After
    ``reset()`` the second run equals a fresh object's bit for bit."""
    st = Setup(CASE[case], solver, F64)
    x, cond, draws = st.start(N, 0)
    mid = GRID[MID:]
    xc, condc, drawsc = st.start(N, 2, grid=mid)
    guided = st.fresh()
    st.run(guided, x, cond, draws, grid=GRID[:MID + 1])
    guided.reset()
    assert torch.equal(st.run(guided, xc, condc, drawsc, grid=mid), st.run(st.fresh(), xc, condc, drawsc, grid=mid))


@pytest.mark.parametrize("pair", sorted(REFUSED))
def test_refused_combinations_raise_one_line_config_errors(pair):
    """A combination refused by design raises a ConfigError whose message is one line and says why."""
    st = Setup(CASE[pair[0]], pair[1], F64)
    x, cond, draws = st.start(N, 0)
    with pytest.raises(ConfigError, match=REFUSED[pair]) as info:
        st.run(st.fresh(), x, cond, draws)
    assert "\n" not in str(info.value)
