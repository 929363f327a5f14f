"""The skeleton's rules, checked on the source: one dependency direction (import-linter's contract in
pyproject.toml), no private name imported across modules, and no import cycle between files."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parent.parent / "src" / "condiff"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path):
    """(target module, name, line) of every ``from condiff... import name`` in the file, relative ones resolved."""
    mod, is_pkg = module_name(path), path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target == "condiff" or target.startswith("condiff."):
            for alias in node.names:
                yield target, alias.name, node.lineno


def private_imports() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        for target, name, line in imported_names(path):
            if name.startswith("_") and not name.startswith("__") and target != module_name(path):
                out.append(f"{path.relative_to(SRC.parent)}:{line}: {target}.{name}")
    return out


def file_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module in the import graph (grimp, all imports)."""
    graph = grimp.build_graph("condiff", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(edges):
        if m not in index:
            visit(m)
    return groups


def test_import_contracts_are_kept():
    """lint-imports (no cache) keeps the layers contract: core <- solvers, guidance <- inversion, training,
    evaluation, data <- models, interop, nets <- cli."""
    exe = Path(sys.executable).parent / "lint-imports"
    res = subprocess.run([str(exe), "--no-cache"], capture_output=True, text=True, cwd=SRC.parent.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_no_private_name_is_imported_across_modules():
    assert private_imports() == []


def test_no_import_cycle_between_files():
    assert file_cycles() == []


def test_only_init_errors_and_main_at_the_top_level():
    """``__main__`` is the ``python -m condiff`` / ``torchrun -m condiff`` entry: the CLI's, nothing else."""
    assert sorted(p.name for p in SRC.glob("*.py")) == ["__init__.py", "__main__.py", "errors.py"]
    assert [(t, n) for t, n, _ in imported_names(SRC / "__main__.py")] == [("condiff.cli.app", "main")]


def test_nothing_outside_cli_imports_cli():
    offenders = [
        f"{path.relative_to(SRC.parent)}:{line}"
        for path in SRC.rglob("*.py")
        if "cli" not in path.relative_to(SRC).parts[:1] and path != SRC / "__main__.py"
        for target, _, line in imported_names(path)
        if target.startswith("condiff.cli")
    ]
    assert offenders == []


def test_the_cli_starts_without_diffusers_or_peft():
    """Importing the CLI, all that ``condiff --help`` needs, loads torch but not diffusers or peft (seconds): the
    trainer imports diffusers' EMAModel where it builds one."""
    code = "import sys, condiff.cli; print(sorted(m for m in ('diffusers', 'peft') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
