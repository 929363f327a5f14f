"""The compatibility matrix of docs/guidance.md ("What composes with what") cannot drift from the code: the table
is what scripts/compat_matrix.py renders from docs/compatibility.json, the JSON covers every case, solver and model
kind there is now, and a subset of its cells (every cell that is not ok, and one solver per case and model kind,
rotating) is recomputed here. After a change, regenerate with ``python scripts/compat_matrix.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from condiff.solvers import SOLVERS
from guidancekit import CASES

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "stale: run `OMP_NUM_THREADS=1 python scripts/compat_matrix.py` and keep its output"


def _load_script():
    spec = importlib.util.spec_from_file_location("compat_matrix", ROOT / "scripts" / "compat_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CM = _load_script()
DATA = json.loads(CM.JSON_PATH.read_text())


def _key(cell):
    """What must agree: the status and the key phrase of the reason (not the run's exact numbers)."""
    return cell["status"], CM.phrase(cell["reason"]) if "reason" in cell else None


def test_docs_table_is_what_the_script_renders():
    assert CM.doc_block(CM.DOC_PATH.read_text()) == CM.render(DATA), REGENERATE


def test_json_covers_every_case_solver_and_kind():
    assert DATA["cases"] == [c.name for c in CASES], REGENERATE
    assert DATA["solvers"] == sorted(SOLVERS), REGENERATE
    assert DATA["kinds"] == CM.KINDS and list(DATA["cells"]) == list(CM.KINDS), REGENERATE
    for kind in CM.KINDS:
        assert list(DATA["cells"][kind]) == DATA["cases"], REGENERATE
        assert all(list(cells) == DATA["solvers"] for cells in DATA["cells"][kind].values()), REGENERATE


def test_option_composition_is_current(tmp_path):
    """Every pair of guidance options and every option with --pipeline (both cheap: nothing samples)."""
    assert {k: _key(v) for k, v in CM.option_pairs().items()} == {
        k: _key(v) for k, v in DATA["options"]["pairs"].items()
    }, REGENERATE
    assert {k: _key(v) for k, v in CM.with_pipeline(tmp_path).items()} == {
        k: _key(v) for k, v in DATA["options"]["with_pipeline"].items()
    }, REGENERATE


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return CM.build_kits(tmp_path_factory.mktemp("compat"))


def test_a_subset_of_the_cells_is_current(kits):
    """Every cell that is not ok, and for each case and model kind one solver (rotating), sampled again."""
    solvers = DATA["solvers"]
    subset = set()
    for j, kind in enumerate(CM.KINDS):
        for i, case in enumerate(DATA["cases"]):
            subset.add((kind, case, solvers[(i + 5 * j) % len(solvers)]))
            subset |= {(kind, case, s) for s, cell in DATA["cells"][kind][case].items() if cell["status"] != "ok"}
    got = CM.model_matrix(kits, cells=subset)
    stale = [
        f"{k}/{c}/{s}: {_key(got[k][c][s])} != {_key(DATA['cells'][k][c][s])}"
        for k, c, s in sorted(subset)
        if _key(got[k][c][s]) != _key(DATA["cells"][k][c][s])
    ]
    assert not stale, f"{REGENERATE}: {stale[:5]}"
