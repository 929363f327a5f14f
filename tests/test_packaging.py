"""Packaging: pyproject.toml's dependencies and extras agree with requirements.txt (the pins the suite runs on,
the source of truth), every third-party import of the package is declared, and the wheel's package data covers
the bundled models and the recipes. The wheel itself is built and installed by scripts/check_wheel.py
(tests/test_check_wheel.py, slow)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "condiff"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
ONLY_PYPROJECT = {"torch"}  # installed first, on its own (the CPU wheel), by the Makefile; pinned in pyproject
UI_DIR = SRC / "cli" / "ui"  # the web UI: the only code that may import the ui extra
NOT_DEPENDENCIES = {"click": "cli/app.py's fallback import for typer < 0.25; typer==0.29.1 vendors click"}


def norm(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines, where: str) -> dict[str, str]:
    """{normalized name: version} of ``name==version`` lines; anything else fails, naming it."""
    out = {}
    for line in lines:
        m = PIN.match(line.strip())
        assert m, f"{where}: {line!r} is not pinned as name==version"
        assert norm(m.group(1)) not in out, f"{where}: {m.group(1)} is listed twice"
        out[norm(m.group(1))] = m.group(2)
    return out


def requirements() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return pins([line for line in lines if line], "requirements.txt")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def groups() -> dict[str, dict[str, str]]:
    """{"dependencies": pins, "ui": pins, "test": pins, ...} of pyproject.toml."""
    p = project()
    out = {"dependencies": pins(p["dependencies"], "pyproject dependencies")}
    for extra, items in p.get("optional-dependencies", {}).items():
        out[extra] = pins(items, f"pyproject extra {extra!r}")
    return out


def test_every_pyproject_dependency_and_extra_is_pinned_as_in_requirements():
    req = requirements()
    for group, declared in groups().items():
        for name, version in declared.items():
            if name in ONLY_PYPROJECT:
                continue
            assert name in req, f"pyproject {group}: {name} is missing from requirements.txt"
            assert req[name] == version, f"{name}: pyproject {group} pins {version}, requirements.txt {req[name]}"


def test_every_requirement_is_declared_once_in_pyproject():
    declared = {}
    for group, items in groups().items():
        for name, version in items.items():
            assert name not in declared, f"{name} is in pyproject's {declared[name][0]} and {group}"
            declared[name] = (group, version)
    missing = sorted(set(requirements()) - set(declared))
    assert missing == [], f"in requirements.txt but not in pyproject.toml (dependencies or an extra): {missing}"


def test_the_groups_hold_what_they_are_for():
    g = groups()
    runtime = g["dependencies"]
    assert {"torch", "transformers", "tokenizers", "huggingface-hub", "diffusers", "rich", "pillow"} <= set(runtime)
    assert set(g["ui"]) == {"gradio"}
    test = {"pytest", "hypothesis", "pytest-xdist", "grimp", "import-linter", "ruff", "selenium", "build"}
    assert test <= set(g["test"])
    assert runtime["pillow"] == "12.3.0"  # gradio 6 needs pillow < 13


def test_the_benchmark_peers_are_pinned_and_installed_without_their_dependencies():
    """k-diffusion is a peer of the benchmarks, not a dependency: pinned in requirements-peers.txt, installed with
    --no-deps by the Makefile (its training stack would pull a torchvision that does not load beside this torch)."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-peers.txt").read_text().splitlines()]
    peers = pins([line for line in lines if line], "requirements-peers.txt")
    assert {"k-diffusion", "torchsde", "torchdiffeq", "trampoline"} <= set(peers)
    assert not set(peers) & set(requirements()), "a peer is also a requirement"
    assert "pip install -q --no-deps -r requirements-peers.txt" in (ROOT / "Makefile").read_text()
    declared = {name for group in groups().values() for name in group}
    assert not set(peers) & declared, "a peer is declared in pyproject.toml"


def test_torch_is_pinned_alike_in_pyproject_the_makefile_and_check_wheel():
    torch = groups()["dependencies"]["torch"]
    assert f"pip install -q torch=={torch}" in (ROOT / "Makefile").read_text()
    assert f'TORCH = "torch=={torch}"' in (ROOT / "scripts" / "check_wheel.py").read_text()
    assert "torch" not in requirements()


def _imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return {t for t in tops if t not in sys.stdlib_module_names and t not in ("condiff", "__future__")}


def test_every_third_party_import_is_a_declared_dependency():
    """Each module the package imports comes from a runtime dependency; the web UI (cli/ui) may also use the
    ui extra. Imports are mapped to distributions by what is installed (importlib.metadata)."""
    dists = packages_distributions()
    g = groups()
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        allowed = set(g["dependencies"]) | (set(g["ui"]) if UI_DIR in path.parents else set())
        for top in sorted(_imports(path)):
            if top in NOT_DEPENDENCIES:
                continue
            names = {norm(d) for d in dists.get(top, [])}
            if not names & allowed:
                bad.append(f"{path.relative_to(ROOT)}: {top} ({', '.join(sorted(names)) or 'not installed'})")
    assert bad == []


def test_package_data_covers_the_bundled_models_and_recipes():
    """The globs of [tool.setuptools.package-data] match every file of bundled/ and recipes/ (so the wheel holds
    them; scripts/check_wheel.py lists a built one) and py.typed."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["condiff"]
    matched = {p for pattern in data for p in SRC.glob(pattern) if p.is_file()}
    wanted = {p for p in (SRC / "bundled").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    wanted |= set((SRC / "recipes").rglob("*.toml")) | {SRC / "py.typed"}
    assert sorted(str(p.relative_to(SRC)) for p in wanted - matched) == []
    assert len(list((SRC / "recipes").glob("*.toml"))) >= 7
    assert {p.name for p in (SRC / "bundled").iterdir() if p.is_dir()} >= {"shapes", "digits", "shapes-ppap"}


def test_build_outputs_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "dist/" in ignored and "build/" in ignored
