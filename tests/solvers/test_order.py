"""Measured order of convergence (specs/sampling_guidance.md sec. 0.3) on the exact GMM and Gaussian oracles.

The protocol lives in benchmarks/solver_order.py (which also prints the table and writes JSON); this test
runs it and asserts each slope is within 0.3 of -order.
"""

import importlib.util
from pathlib import Path

import pytest

from condiff.solvers import get_solver

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "solver_order.py"
_spec = importlib.util.spec_from_file_location("solver_order", _PATH)
solver_order = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(solver_order)

TOL = 0.3


@pytest.fixture(scope="module", params=["gmm", "gaussian"])
def measured(request):
    problem = solver_order.setup(request.param)
    return problem, solver_order.measure(problem)


def test_reference_is_far_more_accurate_than_the_solvers(measured):
    problem, rows = measured
    smallest = min(min(r["err"]) for r in rows.values())
    assert problem["ref_err"] < 1e-4 * smallest


@pytest.mark.parametrize("name", sorted(solver_order.THEORY))
def test_order_of_convergence(measured, name, capsys):
    problem, rows = measured
    row = rows[name]
    with capsys.disabled():
        errs = " ".join(f"{e:.2e}" for e in row["err"])
        print(f"\n[order] {problem['problem']} {name}: slope {row['slope']:.3f} (theory {row['theory']}); "
              f"NFE {row['nfe']} err {errs}")
    assert abs(row["slope"] - row["theory"]) <= TOL
    assert get_solver(name).order == -row["theory"]
