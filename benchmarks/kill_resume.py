"""Kill/resume: SIGKILL a real `condiff train` process K times, resume each time, compare bitwise.

It trains the tiny recipe (tests/fixtures/tiny_digits.toml) once without interruption (the reference), then
again in a second directory, killing the process with SIGKILL at K seeded moments and resuming it with
`--resume` after each kill, until the run finishes. Some kills are timed to land while a checkpoint (or the
final model export) is being written: the script polls for a temporary `.*.tmp` entry in OUT/checkpoints
(or OUT) and kills as soon as one exists. At the end it compares the final checkpoint's model and EMA
weights with the reference (tensors and file bytes), verifies every remaining checkpoint's checksums with
`Trainer.verify` (after every kill and at the end), counts corrupt ones and stray temporary entries, prints a
table and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/kill_resume.py [--kills 20] [--seed 0] [--steps 60] [--ckpt-every 2]
        [--write-fraction 0.4] [--work outputs/bench/kill_resume_work] [--json outputs/bench/kill_resume.json]

Not part of the test suite (tests/training/test_trainer.py has one SIGKILL test).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests" / "fixtures" / "tiny_digits.toml"
STEP_RE = re.compile(r"^step-(\d{8})$")
BAR_RE = re.compile(r"\|\s*(\d+)/(\d+) \[")  # tqdm: "train tiny-digits:  42%|####   | 10/24 [..."


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="number of SIGKILLs (K)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--steps", type=int, default=60, help="training steps (overrides the recipe's 24)")
    p.add_argument("--ckpt-every", type=int, default=2, help="override the recipe's ckpt_every (4); 0 keeps it")
    p.add_argument("--write-fraction", type=float, default=0.4, help="share of kills aimed at checkpoint writes")
    p.add_argument("--recipe", type=Path, default=RECIPE)
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench" / "kill_resume_work")
    p.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "kill_resume.json")
    return p.parse_args()


# ---- processes ------------------------------------------------------------------------------------------


def launch(recipe: Path, out: Path, steps: int, resume: bool, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "condiff.cli", "train", str(recipe), "--steps", str(steps), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd + (["--resume"] if resume else []), env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT
        )


def temp_entries(out: Path) -> set[str]:
    """Temporary entries of atomic writes: OUT/.*.tmp and OUT/checkpoints/.*.tmp (files or directories),
    not counting the CLI's instant writability probe (.condiff-probe.*.tmp)."""
    found = set()
    for d in (out, out / "checkpoints"):
        try:
            found |= {
                str(d / e.name)
                for e in os.scandir(d)
                if e.name.startswith(".") and e.name.endswith(".tmp") and not e.name.startswith(".condiff-probe.")
            }
        except FileNotFoundError:
            pass
    return found


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)) if root.is_dir() else []


def bar_step(log: Path) -> int | None:
    """The last step the process's progress bar showed (None before training started)."""
    try:
        found = BAR_RE.findall(log.read_text(errors="replace"))
    except FileNotFoundError:
        return None
    return int(found[-1][0]) if found else None


def newest_step(out: Path) -> int:
    dirs = checkpoint_dirs(out)
    return int(STEP_RE.match(dirs[-1].name).group(1)) if dirs else 0


# ---- the two runs ---------------------------------------------------------------------------------------


def reference_run(recipe: Path, out: Path, steps: int, logs: Path) -> dict:
    """Uninterrupted run; also measures (from its progress bar) when training starts and how long a step takes."""
    log = logs / "reference.txt"
    t0 = time.perf_counter()
    proc = launch(recipe, out, steps, False, log)
    bar_start = bar_end = None
    while proc.poll() is None:
        step = bar_step(log)
        now = time.perf_counter() - t0
        if step is not None and bar_start is None:
            bar_start = now
        if step == steps and bar_end is None:
            bar_end = now
        time.sleep(0.005)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"reference run failed (exit {proc.returncode}); see {log}")
    bar_start = bar_start or 0.0
    bar_end = bar_end or total
    return {
        "seconds": round(total, 2),
        "startup_s": round(bar_start, 2),
        "step_s": round(max((bar_end - bar_start) / steps, 1e-3), 4),
    }


def kill_once(
    i: int, kills: int, mode: str, rng: random.Random, recipe: Path, out: Path, steps: int, timing: dict, logs: Path
) -> dict:
    """Launch (resuming), kill at the chosen moment, report what was left behind.

    mode "write": as soon as a new temporary entry of an atomic write exists (a checkpoint being built, or
    the final export), after 0-1 ms. mode "time": at a uniform moment within twice this kill's share of the
    steps left (so the kills spread over the whole run), counted from when the progress bar first appears
    (so they do not all land in the start-up imports)."""
    before_step, before_tmp = newest_step(out), temp_entries(out)
    log = logs / f"kill-{i + 1:02d}.txt"
    t0 = time.perf_counter()
    proc = launch(recipe, out, steps, resume=i > 0, log=log)
    deadline = t0 + timing["seconds"] * 3
    if mode == "write":
        while proc.poll() is None and time.perf_counter() < deadline:
            if temp_entries(out) - before_tmp:
                time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.001)]))
                break
            time.sleep(0.0005)
    else:
        while proc.poll() is None and time.perf_counter() < deadline and bar_step(log) is None:
            time.sleep(0.005)
        share = max(steps - before_step, 1) / (kills - i)
        delay = rng.uniform(0.0, 2.0 * share * timing["step_s"])
        t_kill = time.perf_counter() + delay
        while proc.poll() is None and time.perf_counter() < t_kill:
            time.sleep(0.002)
    when = time.perf_counter() - t0
    finished = proc.poll() is not None
    if not finished:
        proc.kill()  # SIGKILL
    proc.wait()
    new_tmp = sorted(temp_entries(out) - before_tmp)
    return {
        "kill": i + 1,
        "mode": mode,
        "when_s": round(when, 3),
        "killed": not finished,
        "exit_code": proc.returncode,
        "ckpt_before": before_step,
        "bar_step": bar_step(log),
        "ckpt_after": newest_step(out),
        "during_write": bool(new_tmp) and not finished,
        "temp_left": [Path(p).name for p in new_tmp],
        "corrupt_after_kill": [c["checkpoint"] for c in verify_all(out)["corrupt"]],
    }


def finish(recipe: Path, out: Path, steps: int, logs: Path) -> dict:
    t0 = time.perf_counter()
    proc = launch(recipe, out, steps, True, logs / "final.txt")
    proc.wait()
    return {"exit_code": proc.returncode, "seconds": time.perf_counter() - t0}


# ---- checks ---------------------------------------------------------------------------------------------


def compare(ref: Path, run: Path, steps: int) -> dict:
    import torch

    from condiff.core.files import load_tensors

    res = {}
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (d / "checkpoints" / f"step-{steps:08d}" / name for d in (ref, run))
        if not (a.is_file() and b.is_file()):
            res[name] = {"present": False, "tensors_equal": False, "bytes_equal": False}
            continue
        ta, tb = load_tensors(a), load_tensors(b)
        same = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        res[name] = {"present": True, "tensors_equal": same, "bytes_equal": a.read_bytes() == b.read_bytes()}
    exported = [d / "model" / "unet" / "diffusion_pytorch_model.safetensors" for d in (ref, run)]
    res["exported_model_bytes_equal"] = (
        all(p.is_file() for p in exported) and exported[0].read_bytes() == exported[1].read_bytes()
    )
    return res


def verify_all(out: Path) -> dict:
    from condiff.errors import CondiffError
    from condiff.training.trainer import Trainer

    ok, corrupt = [], []
    for path in checkpoint_dirs(out):
        try:
            Trainer.verify(path)
            ok.append(path.name)
        except (CondiffError, KeyError, TypeError, ValueError) as e:
            corrupt.append({"checkpoint": path.name, "error": str(e)})
    return {"verified": ok, "corrupt": corrupt, "stray_temp_entries": sorted(Path(p).name for p in temp_entries(out))}


# ---- main -----------------------------------------------------------------------------------------------


def derived_recipe(args, work: Path) -> Path:
    if not args.ckpt_every:
        return args.recipe
    text = re.sub(r"(?m)^ckpt_every\s*=\s*\d+", f"ckpt_every = {args.ckpt_every}", args.recipe.read_text())
    path = work / "recipe.toml"
    path.write_text(text)
    return path


def main():
    args = parse_args()
    t_start = time.perf_counter()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    recipe = derived_recipe(args, work)
    ref_dir, run_dir, logs = work / "reference", work / "killed", work / "logs"

    print(f"reference run: {recipe.name}, {args.steps} steps ...", flush=True)
    timing = reference_run(recipe, ref_dir, args.steps, logs)
    from condiff.training.recipe import load_recipe

    ckpt_every = load_recipe(recipe).train.ckpt_every
    print(
        f"  {timing['seconds']:.1f} s; training starts after ~{timing['startup_s']:.1f} s, "
        f"~{1000 * timing['step_s']:.0f} ms a step (checkpoint every {ckpt_every})",
        flush=True,
    )

    rng = random.Random(args.seed)
    n_write = round(args.kills * args.write_fraction)
    write_set = set(rng.sample(range(args.kills), n_write))
    rows = []
    header = (
        f"{'kill':>4} {'mode':>5} {'when s':>7} {'ckpt before':>11} {'step reached':>12} {'ckpt after':>10} "
        f"{'during write':>12} {'corrupt':>7}  temp left"
    )
    print(header)
    for i in range(args.kills):
        mode = "write" if i in write_set else "time"
        row = kill_once(i, args.kills, mode, rng, recipe, run_dir, args.steps, timing, logs)
        rows.append(row)
        status = "" if row["killed"] else "  (finished before the kill)"
        reached = "-" if row["bar_step"] is None else row["bar_step"]
        print(
            f"{row['kill']:>4} {mode:>5} {row['when_s']:>7.2f} {row['ckpt_before']:>11} {reached:>12} "
            f"{row['ckpt_after']:>10} {'yes' if row['during_write'] else 'no':>12} "
            f"{len(row['corrupt_after_kill']):>7}  "
            f"{', '.join(row['temp_left']) or '-'}{status}",
            flush=True,
        )

    final = finish(recipe, run_dir, args.steps, logs)
    stray_before_final = sorted({t for r in rows for t in r["temp_left"]})
    checks = verify_all(run_dir)
    cmp = compare(ref_dir, run_dir, args.steps)
    notices = sum(f.read_text().count("notice: skipping checkpoint") for f in logs.glob("*.txt"))
    bitwise = all(cmp[n]["tensors_equal"] and cmp[n]["bytes_equal"] for n in ("model.safetensors", "ema.safetensors"))
    summary = {
        "kills": sum(r["killed"] for r in rows),
        "kills_during_writes": sum(r["during_write"] for r in rows),
        "kills_aimed_at_writes": n_write,
        "corrupt_checkpoints": len(checks["corrupt"]),
        "corrupt_checkpoints_seen_after_kills": sum(len(r["corrupt_after_kill"]) for r in rows),
        "verified_checkpoints": len(checks["verified"]),
        "resume_notices_skipping_corrupt": notices,
        "final_exit_code": final["exit_code"],
        "bitwise_match": bitwise,
        "exported_model_bytes_equal": cmp["exported_model_bytes_equal"],
        "temp_entries_left_by_kills": stray_before_final,
        "stray_temp_entries_at_end": checks["stray_temp_entries"],
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    result = {
        "command": "python benchmarks/kill_resume.py " + " ".join(sys.argv[1:]),
        "recipe": str(recipe),
        "steps": args.steps,
        "ckpt_every": ckpt_every,
        "seed": args.seed,
        "reference": timing,
        "kills": rows,
        "final_run": final,
        "checks": checks,
        "comparison": cmp,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print()
    for k, v in summary.items():
        print(f"{k:38s} {v}")
    print(f"wrote {args.json}")
    return 0 if bitwise and not checks["corrupt"] and final["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
