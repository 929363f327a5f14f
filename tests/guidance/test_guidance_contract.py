"""The contract every guidance in condiff.guidance keeps under every solver in condiff.solvers.SOLVERS
(issue 4, acceptance 7). Bases: the exact GMM denoiser (float64 and float32) and, for PAG (which needs
self-attention layers), a tiny random diffusers UNet2DConditionModel (float64 and a float32 copy).

- shape, dtype, finiteness: the sample has the start's shape and dtype and is finite;
- batch independence: sample i of a batch run equals the same sample run inside another batch (same start,
  same condition rows, the same noise sliced to its rows), to BATCH_TOL;
- no state between calls: one guided denoiser object, reused after unrelated runs (another start and labels,
  another batch size, a mid-grid start), gives bit for bit what a fresh object gives; a mid-grid start after a
  full run equals a fresh mid-grid start (AG's switch state): every sample() call starts its own trajectory.
  LinearAG refuses a mid-grid start (its coefficient rows belong to the fitted evaluations from the top).

Combinations a guidance refuses by design (REFUSED) are asserted to raise a one-line ConfigError.
The cases and bases live in tests/guidancekit.py (shared with scripts/compat_matrix.py): to cover a new
guidance, add a Case to its CASES (test_every_exported_guidance_has_a_case fails until then).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import condiff.guidance as G
from condiff.core.sampling import initial_noise, sample
from condiff.errors import ConfigError
from condiff.solvers import SOLVERS, get_solver
from guidancekit import CASE, CASES, F32, F64, GRID, NOT_GUIDANCE, REFUSED, SCH, STEPS, Case, contract_kit
from noisekit import SlicedNoise

N, ROWS = 5, torch.tensor([3, 0])  # batch size, and the rows (reordered) of the sub-batch
OTHER_N = 3  # batch size of the unrelated run in the state test
MID = 2  # the mid-grid start: GRID[MID:]
# Sample i of a batch vs. the same sample in another batch: max |diff| <= BATCH_TOL * max(1, max |sample|).
# Measured: 0 (bit-identical) on the GMM in both dtypes for every combination; on the tiny UNet (whose conv
# and attention kernels round differently per batch size) 4e-15 relative in float64, 2.5e-6 in float32.
BATCH_TOL = {F64: 1e-12, F32: 1e-5}
# Cases that refuse a mid-grid start by design, with the phrase of their one-line ConfigError.
MID_GRID_REFUSED = {"linear-ag": "fitted at"}

SUPPORTED = [(c, s) for c in CASES for s in sorted(SOLVERS) if (c.name, s) not in REFUSED]


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
    def kit(self):
        return contract_kit(self.case.base, self.dtype)

    def fresh(self):
        return self.case.make(self.kit, self.solver)

    def start(self, n, seed, grid=GRID):
        shape = (n, *self.kit.shape)
        x = initial_noise(SCH, float(grid[0]), shape, torch.Generator().manual_seed(seed), dtype=F64)
        cond = self.kit.cond(n, seed, self.case.extras)
        g = torch.Generator().manual_seed(1000 + seed)
        draws = [torch.randn(shape, generator=g, dtype=F64) for _ in range(4 * STEPS + 2)]
        return x.to(self.dtype), cond, draws

    def run(self, guided, x, cond, draws, rows=slice(None), grid=GRID, whole=False):
        """The sample (``whole``: the SampleOutput, whose ``denoiser`` is the run's started stack)."""
        solver = get_solver(self.solver)
        if self.case.solver_wrap is not None:
            solver = self.case.solver_wrap(solver)
        with torch.no_grad():
            out = sample(guided, solver, grid, x[rows], take(cond, rows), noise=SlicedNoise(draws, rows))
        return out if whole else out.x


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
        if (
            "denoiser" in fields
            or name.endswith("Scale")
            or issubclass(obj, (LinearOperator, Solver))
            or obj in (G.Forward, G.Backward)
        ):
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
    for A and C: each sample() call starts a fresh trajectory (AG's switches, LinearAG's history), whatever the
    previous one was. A case that refuses mid-grid starts (MID_GRID_REFUSED) raises its one-line ConfigError
    for C, fresh or reused, and the runs after it are unaffected."""
    st = Setup(*combo, F64)
    x, cond, draws = st.start(N, 0)
    xo, condo, drawso = st.start(OTHER_N, 1)
    mid = GRID[MID:]
    xc, condc, drawsc = st.start(N, 2, grid=mid)
    a = st.run(st.fresh(), x, cond, draws)
    refused = MID_GRID_REFUSED.get(st.case.name)

    def run_c(guided):
        if refused is None:
            return st.run(guided, xc, condc, drawsc, grid=mid)
        with pytest.raises(ConfigError, match=refused) as info:
            st.run(guided, xc, condc, drawsc, grid=mid)
        assert "\n" not in str(info.value)

    c = run_c(st.fresh())
    guided = st.fresh()
    assert torch.equal(st.run(guided, x, cond, draws), a)
    assert torch.equal(st.run(guided, x, cond, draws), a)
    c_again = run_c(guided)
    assert refused is not None or torch.equal(c_again, c)
    assert torch.equal(st.run(guided, x, cond, draws), a)
    st.run(guided, xo, condo, drawso)
    assert torch.equal(st.run(guided, x, cond, draws), a)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("case", ["ag-x0", "stack-ag-classifier"])
def test_adaptive_guidance_switch_is_exercised(case, solver):
    """The AG cases above switch some rows during run A (so the state test checks a non-trivial state): the
    AG trajectory that sample() started (inside the started stack it returns) holds the switches, and the
    configuration object holds no state."""
    from condiff.guidance.adaptive import AGTrajectory

    st = Setup(CASE[case], solver, F64)
    x, cond, draws = st.start(N, 0)
    guided = st.fresh()
    run = st.run(guided, x, cond, draws, whole=True).denoiser
    ag = run if isinstance(run, AGTrajectory) else run.denoiser
    assert isinstance(ag, AGTrajectory) and bool(ag.state.switched.any()), ag.state
    assert not hasattr(guided, "state") and not hasattr(getattr(guided, "denoiser", None), "state")


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("case", ["ag-x0", "linear-ag"])
def test_a_run_that_stopped_mid_grid_does_not_leak_into_the_next(case, solver):
    """A run stopped mid-grid (GRID[:3]) followed by a new one (AG: starting lower, GRID[2:], which continues
    the falling t at the same batch size, the case no heuristic can tell from one trajectory; LinearAG, which
    refuses mid-grid starts: the full grid) gives bit for bit what a fresh object gives, with no reset: each
    sample() call is its own trajectory."""
    st = Setup(CASE[case], solver, F64)
    x, cond, draws = st.start(N, 0)
    grid = GRID if case in MID_GRID_REFUSED else GRID[MID:]
    xc, condc, drawsc = st.start(N, 2, grid=grid)
    guided = st.fresh()
    st.run(guided, x, cond, draws, grid=GRID[: MID + 1])
    assert torch.equal(st.run(guided, xc, condc, drawsc, grid=grid), st.run(st.fresh(), xc, condc, drawsc, grid=grid))


@pytest.mark.parametrize("pair", sorted(REFUSED))
def test_refused_combinations_raise_one_line_config_errors(pair):
    """A combination refused by design raises a ConfigError whose message is one line and says why."""
    st = Setup(CASE[pair[0]], pair[1], F64)
    x, cond, draws = st.start(N, 0)
    with pytest.raises(ConfigError, match=REFUSED[pair]) as info:
        st.run(st.fresh(), x, cond, draws)
    assert "\n" not in str(info.value)
