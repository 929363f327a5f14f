"""Measured order of convergence (specs/sampling_guidance.md sec. 0.3) on the exact GMM and Gaussian oracles.

The protocol lives in benchmarks/solver_order.py (which also prints the table and writes JSON); this test
runs it and asserts each slope is within 0.3 of -order (cases, NFE ranges and skips are explained there).
"""

import functools
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "solver_order.py"
_spec = importlib.util.spec_from_file_location("solver_order", _PATH)
solver_order = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(solver_order)

TOL = 0.3


PROBLEMS = ("gmm", "gaussian")
# Cases not measured on a problem are left out of the parametrization (not skipped); the reasons are in
# benchmarks/solver_order.py (SKIP): 3M converges faster than third order on a single Gaussian.
CASES = [(p, n) for p in PROBLEMS for n in sorted(solver_order.THEORY) if n not in solver_order.SKIP.get(p, ())]


@functools.lru_cache(maxsize=None)
def measured(problem_name):
    problem = solver_order.setup(problem_name)
    return problem, solver_order.measure(problem)


@pytest.mark.parametrize("problem_name", PROBLEMS)
def test_reference_is_far_more_accurate_than_the_solvers(problem_name):
    problem, rows = measured(problem_name)
    smallest = min(min(r["err"]) for r in rows.values())
    assert problem["ref_err"] < 1e-4 * smallest


@pytest.mark.parametrize("problem_name, name", CASES)
def test_order_of_convergence(problem_name, name, capsys):
    problem, rows = measured(problem_name)
    row = rows[name]
    with capsys.disabled():
        errs = " ".join(f"{e:.2e}" for e in row["err"])
        print(
            f"\n[order] {problem['problem']} {name}: slope {row['slope']:.3f} (theory {row['theory']}); "
            f"NFE {row['nfe']} err {errs}"
        )
    assert abs(row["slope"] - row["theory"]) <= TOL
    assert solver_order.case_solver(name).convergence_order == -row["theory"]
