"""Searched time grids (condiff.solvers.grid_search, condiff.core.grids.Tabulated): the parametrisation covers
every descending grid and only those, the search never ends worse than its start and, on the exact GMM
oracle, a grid searched on some starts lowers the terminal error on other starts; grids files round-trip and
bad ones are one-line errors."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condiff.core.fitted import FittedFor, FitWarning
from condiff.core.grids import Tabulated, make_grid
from condiff.core.sampling import sample
from condiff.core.schedules import VPDiscrete
from condiff.errors import ConfigError, InputFileError
from condiff.evaluation import bench
from condiff.solvers import get_solver
from condiff.solvers.grid_search import (
    FORMAT,
    SearchedGrid,
    SearchedGrids,
    check_grids_fit,
    grid_of,
    increments_of,
    load_grids,
    parse_grids,
    save_grids,
    search_grid,
    terminal_error,
    trailing_times,
)

SCH = VPDiscrete.from_betas("linear")


def test_trailing_times_are_diffusers_trailing_grid():
    from condiff.evaluation.peers import trailing_grid

    for steps in (1, 5, 8, 10, 20):
        assert torch.allclose(trailing_times(SCH, 999.0, steps), trailing_grid(1000, steps), atol=1e-9)


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_increments_round_trip(steps):
    g = trailing_times(SCH, 999.0, steps)
    back = grid_of(SCH, increments_of(SCH, g), 999.0)
    assert back.shape == g.shape and torch.allclose(back, g, rtol=1e-9, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=1, max_size=12), st.floats(50.0, 999.0))
def test_every_z_gives_a_descending_grid_inside_the_schedule(z, t_start):
    g = grid_of(SCH, np.array(z), t_start)
    assert g.numel() == len(z) + 1 and g[0] == t_start and g[-1] == SCH.t_clean
    assert bool((g[1:] < g[:-1]).all()) and bool((g[1:-1] >= SCH.t_min).all())


@pytest.fixture(scope="module")
def gmm():
    fit = bench.gmm_problem(dim=3, components=4, classes=2, seed=2, n=48, cfg=2.0, ref_steps=512)
    held = bench.gmm_problem(dim=3, components=4, classes=2, seed=2, n=256, cfg=2.0, ref_steps=512)
    # the same mixture (seed 2); the starts differ (the generator draws n labels before the starts)
    assert float(torch.cdist(fit.x_T, held.x_T).min()) > 1e-6
    return fit, held


def test_a_grid_searched_on_some_starts_helps_on_others(gmm):
    """DDIM, 4 steps, on the exact mixture denoiser: the searched grid lowers the fitting error and the error on
    256 starts the search never saw."""
    fit, held = gmm
    solver = get_solver("ddim")
    init = trailing_times(SCH, 999.0, 4)
    res = search_grid(fit.denoiser, fit.cond, fit.x_T, fit.x_ref, solver, init, max_evals=120)
    assert res.evaluations <= 120 and res.steps == 4 and res.error < 0.8 * res.initial_error
    grid = torch.tensor(res.times, dtype=torch.float64)

    def err(g):
        return terminal_error(sample(held.denoiser, solver, g, held.x_T.clone(), held.cond).x, held.x_ref)

    assert err(grid) < 0.9 * err(init)


def test_the_search_keeps_its_start_when_nothing_is_better(gmm):
    fit, _ = gmm
    init = trailing_times(SCH, 999.0, 3)
    calls = []
    res = search_grid(
        fit.denoiser,
        fit.cond,
        fit.x_T,
        fit.x_ref,
        get_solver("ddim"),
        init,
        max_evals=1,
        progress=lambda *a: calls.append(a),
    )
    assert res.times == tuple(init.tolist()) and res.error == res.initial_error and res.evaluations == 1
    assert calls == [(1, 1, res.error)]


def _grids(weights="ab" * 32, cfg=3.0):
    g5 = SearchedGrid((999.0, 900.0, 700.0, 400.0, 150.0, -1.0), 0.2, 0.1, 200)
    g2 = SearchedGrid((999.0, 500.0, -1.0), 0.5, 0.4, 80)
    return SearchedGrids({5: g5, 2: g2}, "dpmpp-2m", FittedFor("shapes", weights, cfg), {"n": 16})


def test_grids_file_round_trip(tmp_path):
    path = save_grids(tmp_path / "g.json", _grids())
    back = load_grids(path)
    assert back.grids == _grids().grids and back.solver == "dpmpp-2m" and back.fitted == _grids().fitted
    assert back.search == {"n": 16}


def test_tabulated_spacing_gives_the_stored_grids():
    tab = _grids().tabulated("--grid 'g.json'")
    g = make_grid(SCH, 5, tab)
    assert g.tolist() == [999.0, 900.0, 700.0, 400.0, 150.0, -1.0]
    with pytest.raises(ConfigError, match=r"--grid 'g.json' has no grid of 4 steps \(it has 2, 5\)"):
        make_grid(SCH, 4, tab)
    with pytest.raises(ConfigError, match="starts at t=999, but this run starts at t=500"):
        make_grid(SCH, 5, tab, t_start=500.0)
    with pytest.raises(ConfigError, match="must share their first time"):
        Tabulated({2: (999.0, 10.0), 3: (998.0, 500.0, 10.0)})


def test_fit_checks_name_the_file_and_the_mismatch():
    g = _grids()
    assert isinstance(check_grids_fit(g, SCH, "ab" * 32, 3.0, "shapes"), Tabulated)
    with pytest.raises(
        ConfigError, match=r"--grid 'g.json' was searched for cfg 3, but this run uses cfg 5; search it"
    ):
        check_grids_fit(g, SCH, cfg=5.0, where="--grid 'g.json'")
    with pytest.raises(ConfigError, match="weights cdcdcdcdcdcd"):
        check_grids_fit(g, SCH, "cd" * 32, 3.0, "other")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_grids_fit(g, SCH, "cd" * 32, 3.0, "other", allow_mismatch=True)
    assert any(issubclass(x.category, FitWarning) for x in w)
    short = VPDiscrete.from_betas("linear", num_steps=100)
    with pytest.raises(ConfigError, match="outside this model's schedule"):
        check_grids_fit(g, short)


def _good():
    return _grids().to_json()


def _with(**changes):
    obj = _good()
    obj.update(changes)
    return obj


def _entry(**changes):
    obj = _good()
    obj["grids"][0].update(changes)
    return obj


@pytest.mark.parametrize(
    "obj, needle",
    [
        ([], "expected a JSON object"),
        (_with(format="x"), f"format must be {FORMAT!r}"),
        (_with(version=9), "version 9 is not supported"),
        (_with(extra=1), "unknown keys ['extra']"),
        (_with(solver=3), "solver must be a solver name"),
        (_with(grids=[]), "grids must be a non-empty list"),
        (_entry(steps=0), "steps must be an integer in [1,"),
        (_entry(steps=True), "steps must be an integer"),
        (_entry(times=[999.0, 1.0]), "times must be a list of 3 finite numbers"),
        (_entry(times=[999.0, 1.0, 2.0]), "strictly descending"),
        (_entry(times=[999.0, math.nan, -1.0]), "finite numbers"),
        (_entry(error="x"), "error must be a number"),
        (_entry(evaluations=-1), "evaluations must be a non-negative integer"),
        (_with(grids=[_good()["grids"][0], _good()["grids"][0]]), "two grids of 2 steps"),
        (_with(fitted_for=[]), "fitted-for record must be a JSON object"),
    ],
)
def test_bad_grids_files_are_one_line_input_errors(obj, needle):
    with pytest.raises(InputFileError) as e:
        parse_grids(json.loads(json.dumps(obj)), "g.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("'g.json'"), msg
    assert needle in msg, msg


def test_a_diverging_trial_counts_as_infinite_error(gmm, monkeypatch):
    """A trial grid on which the solver blows up (the loop's NonFiniteError) is the worst trial, not the end of
    the search: the search goes on and keeps a finite grid."""
    import condiff.solvers.grid_search as gs
    from condiff.errors import NonFiniteError

    fit, _ = gmm
    real, calls = gs.sample, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise NonFiniteError("non-finite x at step 1")
        return real(*a, **k)

    monkeypatch.setattr(gs, "sample", flaky)
    init = trailing_times(SCH, 999.0, 3)
    res = search_grid(fit.denoiser, fit.cond, fit.x_T, fit.x_ref, get_solver("ddim"), init, max_evals=20)
    assert res.evaluations == 20 and math.isfinite(res.error) and res.error <= res.initial_error
