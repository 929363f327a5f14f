"""Build condiff's wheel and check that it works on its own: a fresh virtual environment holding only torch and
the wheel (pip resolves the pinned dependencies), then, from an empty directory, ``condiff models`` (every
bundled model listed), ``condiff recipes`` (every packaged recipe listed), ``condiff demo`` (writes
outputs/demo/index.html there) and ``condiff sample --model shapes --prompt "small blue square" --out x.png``.

    .venv/bin/python scripts/check_wheel.py                        # build, fresh venv in a temp dir, check, remove
    .venv/bin/python scripts/check_wheel.py --keep                 # keep the venv (its path is printed)
    .venv/bin/python scripts/check_wheel.py --venv /tmp/wheelvenv  # create it there, or reuse it (kept)

Prints the wheel's size and file count, what it holds, one PASS/FAIL line per command with its wall time, and
exits 1 when anything failed. The wheel is built with ``python -m build --wheel --no-isolation`` by the Python
that runs this script (it needs ``build`` and setuptools: ``pip install condiff[test]`` or requirements.txt).
Installing takes a few minutes (torch, then the pinned dependencies from the configured index); the demo 1-3
minutes on one thread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the Makefile's pin: torch is installed first, on its own
SAMPLE = ["condiff", "sample", "--model", "shapes", "--prompt", "small blue square", "--out", "x.png"]


def build_wheel(outdir: Path) -> Path:
    """Build the wheel from a clean build/ folder (setuptools reuses build/lib, so a stale one could ship
    files that no longer exist) into ``outdir``; return its path."""
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob("condiff-*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    if res.returncode != 0:
        sys.exit(f"FAIL build: {' '.join(cmd)}\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    wheels = sorted(outdir.glob("condiff-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"FAIL build: expected one condiff wheel in {outdir}, found {[w.name for w in wheels]}")
    return wheels[0]


def bundled_names(names: list[str]) -> list[str]:
    """The bundled models and classifiers a wheel holds (a folder of condiff/bundled with condiff.json or ppap.json),
    by the name `condiff models` lists them under."""
    folders = sorted(
        {
            n.split("/")[2]
            for n in names
            if n.startswith("condiff/bundled/") and n.endswith(("/condiff.json", "/ppap.json"))
        }
    )
    aliases = {"shapes-clean-classifier": "clean", "shapes-noisy-classifier": "noisy", "shapes-ppap": "ppap"}
    return [aliases.get(f, f) for f in folders]


def wheel_contents(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    return {
        "files": len(names),
        "python": sum(n.endswith(".py") for n in names),
        "bundled_files": sum(n.startswith("condiff/bundled/") for n in names),
        "bundled": bundled_names(names),
        "recipes": sorted(Path(n).stem for n in names if n.startswith("condiff/recipes/") and n.endswith(".toml")),
        "py.typed": "condiff/py.typed" in names,
    }


CHECKOUT_VARIABLES = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")  # what could make this checkout importable


def pip(venv: Path, *args: str) -> None:
    """pip of the venv, with nothing of this checkout importable: a PYTHONPATH to a source tree holding
    condiff.egg-info (the build writes one) would make pip skip installing the wheel as 'already satisfied'."""
    cmd = [str(venv / "bin" / "python"), "-m", "pip", *args]
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in CHECKOUT_VARIABLES}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"FAIL pip: {' '.join(cmd)}\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    print(f"  pip {' '.join(args)}  ({time.perf_counter() - t0:.0f} s)", flush=True)


def make_venv(venv: Path, wheel: Path) -> None:
    """A fresh venv with torch, then the wheel (its pinned dependencies resolved by pip); an existing one is
    reused, with the wheel reinstalled."""
    fresh = not (venv / "bin" / "python").exists()
    if fresh:
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        pip(venv, "install", "-q", TORCH)
    pip(venv, "install", "-q", str(wheel))
    if not fresh:
        pip(venv, "install", "-q", "--no-deps", "--force-reinstall", str(wheel))


def environment(venv: Path, cache: Path) -> dict:
    """The venv's bin first on PATH, nothing of this checkout importable, one thread, offline."""
    env = {k: v for k, v in os.environ.items() if k not in CHECKOUT_VARIABLES}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *(p for p in env.get("PATH", "").split(os.pathsep) if p)])
    env["VIRTUAL_ENV"] = str(venv)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CONDIFF_CACHE=str(cache))
    return env


def run(argv: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    try:
        res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        code, out, err = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = 124, str(e.stdout or ""), f"timed out after {timeout:.0f} s"
    return code, out, err, time.perf_counter() - t0


def checks(venv: Path, work: Path, contents: dict) -> list[tuple[str, bool, str, float]]:
    """(command, passed, detail, seconds) for each command, run from the empty directory ``work``."""
    env = environment(venv, work / ".cache")
    results = []

    code, out, err, s = run(["python", "-c", "import condiff; print(condiff.__file__)"], work, env, 120)
    where = out.strip()
    ok = code == 0 and where.startswith(str(venv)) and not where.startswith(str(ROOT))
    results.append(("import condiff (from the venv, not the checkout)", ok, where or err.strip()[-300:], s))

    exe = shutil.which("condiff", path=env["PATH"])
    if exe is None or not Path(exe).resolve().is_relative_to(venv.resolve()):
        results.append(("condiff on PATH is the venv's", False, f"found {exe}", 0.0))
    code, out, err, s = run(["condiff", "models"], work, env, 300)
    listed = [line.split()[0] for line in out.splitlines()[1:] if line.strip() and not line.startswith(" ")]
    missing = [n for n in contents["bundled"] if n not in listed]
    ok = code == 0 and not missing and "missing" not in out and len(contents["bundled"]) >= 5
    detail = f"lists {', '.join(n for n in listed if n in contents['bundled'])}" if ok else f"missing {missing}: {err}"
    results.append(("condiff models", ok, detail, s))

    code, out, err, s = run(["condiff", "recipes"], work, env, 300)
    missing = [n for n in contents["recipes"] if not any(line.split()[:1] == [n] for line in out.splitlines())]
    ok = code == 0 and not missing and len(contents["recipes"]) >= 7
    results.append(("condiff recipes", ok, f"{len(contents['recipes'])} recipes" if ok else f"{missing} {err}", s))

    code, out, err, s = run(["condiff", "demo"], work, env, 3600)
    index = work / "outputs" / "demo" / "index.html"
    pngs = sorted(p.name for p in index.parent.glob("*.png")) if index.parent.is_dir() else []
    ok = code == 0 and index.is_file() and len(pngs) >= 5
    detail = f"wrote outputs/demo/index.html and {len(pngs)} PNGs" if ok else (err or out).strip()[-600:]
    results.append(("condiff demo", ok, detail, s))

    code, out, err, s = run(SAMPLE, work, env, 1200)
    png = work / "x.png"
    size = None
    if png.is_file():
        from PIL import Image

        with Image.open(png) as im:
            size = im.size
    ok = code == 0 and png.is_file() and (work / "x.json").is_file()
    detail = f"wrote x.png ({size[0]}x{size[1]}) and x.json" if ok else (err or out).strip()[-600:]
    shown = " ".join(a if " " not in a else f'"{a}"' for a in SAMPLE)
    results.append((shown, ok, detail, s))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the fresh venv and the work directory")
    ap.add_argument("--venv", type=Path, help="create the venv here, or reuse it if it exists (kept)")
    ap.add_argument("--outdir", type=Path, default=ROOT / "dist", help="where the wheel goes (default dist/)")
    ap.add_argument("--wheel", type=Path, help="check this wheel instead of building one")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    wheel = args.wheel.resolve() if args.wheel else build_wheel(args.outdir.resolve())
    contents = wheel_contents(wheel)
    size = wheel.stat().st_size
    print(f"wheel {wheel}: {size} bytes ({size / 1e6:.1f} MB, {size / 2**20:.1f} MiB)", flush=True)
    print(
        f"  {contents['files']} files: {contents['python']} Python modules, {contents['bundled_files']} files of "
        f"bundled models ({', '.join(contents['bundled'])}), recipes ({', '.join(contents['recipes'])}), "
        f"py.typed {'yes' if contents['py.typed'] else 'NO'}",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="condiff-wheel-"))
    venv = args.venv.resolve() if args.venv else scratch / "venv"
    work = scratch / "work"
    work.mkdir()
    try:
        print(f"venv {venv}", flush=True)
        make_venv(venv, wheel)
        print(f"running from the empty directory {work}", flush=True)
        results = checks(venv, work, contents)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if not args.venv:
                shutil.rmtree(scratch, ignore_errors=True)
    passed = True
    for name, ok, detail, seconds in results:
        passed &= ok
        print(f"{'PASS' if ok else 'FAIL'} {name}  ({seconds:.1f} s): {detail}", flush=True)
    if not contents["py.typed"] or len(contents["bundled"]) < 5:
        passed = False
        print("FAIL the wheel lacks py.typed or a bundled model", flush=True)
    if args.keep:
        print(f"kept {venv} and {work}", flush=True)
    print(f"{'PASS' if passed else 'FAIL'} check_wheel ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
