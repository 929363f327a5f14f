"""Every command of README.md and docs/*.md runs as written and gives the result the docs state.

scripts/docs_commands.py extracts the commands, groups those that read each other's files into chains, and runs
a chain in a scratch copy of the working tree. The fast chains run here by default (about a minute on one
thread); the slow ones (training, benchmarks, ``--n 512`` evaluations) are marked slow: ``make test-slow``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_commands", ROOT / "scripts" / "docs_commands.py")
dc = importlib.util.module_from_spec(_spec)
sys.modules["docs_commands"] = dc
_spec.loader.exec_module(dc)

CHAINS = dc.build_chains()


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return dc.scratch_copy(tmp_path_factory.mktemp("docs") / "clone")


def _params():
    for ch in CHAINS:
        marks = [pytest.mark.slow] if ch.tier == "slow" else []
        yield pytest.param(ch, id=ch.id, marks=marks)


@pytest.mark.parametrize("chain", list(_params()))
def test_docs_command_runs_as_written(chain, clone):
    results = dc.run_chain(chain, clone)
    bad = [r for r in results if r.status != "pass"]
    if bad:
        tails = "\n".join(f"--- {r.step.where} ({r.status}): {r.detail}\n{r.tail}" for r in bad if r.tail or r.detail)
        pytest.fail(f"{dc.table(results)}\n{tails}")


# ---- the runner itself ----------------------------------------------------------------------------------------


def test_every_page_has_commands_and_the_fast_set_is_not_empty():
    pages = {s.page for ch in CHAINS for s in ch.commands}
    assert {"README.md", "docs/solvers.md", "docs/guidance.md", "docs/editing.md"} <= pages
    assert any(ch.tier == "fast" for ch in CHAINS) and any(ch.tier == "slow" for ch in CHAINS)


def test_every_tier_pattern_matches_a_docs_command():
    """A pattern that matches nothing is stale (the command changed): fix the pattern, or the command loses its
    place in the default run (DEFAULT_RUN) or its timeout (TIERS)."""
    commands = [s for ch in CHAINS for s in ch.commands]
    stale = [p for _, p, *_ in dc.TIERS if not any(re.search(p, f"{s.shown}  # {s.comment}") for s in commands)]
    stale += [p for page, p in dc.DEFAULT_RUN if not any(s.page == page and re.search(p, s.shown) for s in commands)]
    assert stale == []


def test_the_readme_eval_headlines_are_checked():
    evals = [s for ch in CHAINS for s in ch.commands if s.page == "README.md" and s.shown.startswith("condiff eval")]
    assert evals and all(s.checks for s in evals), [s.where for s in evals if not s.checks]


def test_split_comment_ignores_hashes_in_quotes():
    assert dc.split_comment('condiff sample --prompt "a # b" --out x.png   # note') == (
        'condiff sample --prompt "a # b" --out x.png',
        "note",
    )
    assert dc.split_comment("echo a#b") == ("echo a#b", "")


def test_checks_are_parsed_and_evaluated():
    checks = dc.parse_checks('all == 0.994, nfe >= 5, exit 0, "wrote"')
    assert [c.kind for c in checks] == ["number", "number", "exit", "text"]
    data = {"accuracy": {"all": 0.99414}, "nfe": 5}
    assert dc.evaluate_checks(checks, 0, "wrote x", "", data) == []
    failed = dc.evaluate_checks(dc.parse_checks("all == 0.995, exit 2"), 0, "", "", data)
    assert len(failed) == 2 and "exit code 0, expected 2" in failed[0]
    # printed tables: "all attributes right  0.994" answers "all"
    assert dc.evaluate_checks(dc.parse_checks("all ~ 0.99 +- 0.01"), 0, "  all attributes right  0.994\n", "", {}) == []
    with pytest.raises(ValueError):
        dc.parse_checks("all is fine")


def test_chains_follow_the_files_commands_write(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.toml").write_text("")
    (tmp_path / "README.md").write_text(
        "```bash\n"
        "condiff models\n"
        "condiff ems compute --model shapes --out ems.safetensors\n"
        "condiff sample --model shapes --ems ems.safetensors \\\n    --out v3.png   # expect: exit 0\n"
        "condiff train recipes/r.toml --out runs/x\n"
        "SD=runs/x\n"
        "condiff eval --model $SD/model\n"
        "```\n"
    )
    chains = dc.build_chains(tmp_path)
    got = [[s.line for s in ch.commands] for ch in chains]
    assert got == [[2], [3, 4], [6, 8]]
    assert chains[1].commands[1].shown == "condiff sample --model shapes --ems ems.safetensors --out v3.png"
    assert chains[1].commands[1].checks[0].text == "exit 0"


def test_a_python_block_that_writes_a_folder_chains_with_the_commands_that_read_it(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "```python\n"
        'out = "runs/lora"\n'
        "save(out)\n"
        "```\n\n"
        "```bash\n"
        "condiff sample --model shapes --lora runs/lora --out a.png\n"
        "condiff models\n"
        "```\n"
    )
    chains = dc.build_chains(tmp_path)
    assert [[s.line for s in ch.commands] for ch in chains] == [[2, 7], [8]]  # a python block: its first code line
