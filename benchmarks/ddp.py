"""Measure data-parallel training on gloo (proposed as benchmarks/ddp.py): 2 ranks under torchrun against one
process with the doubled batch (in 2 shards, and plain), on the digits recipe with per-rank batch B.

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddp.py --steps 30 --batch 64 --out runs/bench-ddp

writes OUT/ddp.json and prints the markdown table of docs/scale.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def recipe(steps: int, batch: int):
    from condiff.cli.recipes import resolve_recipe
    from condiff.training.recipe import load_recipe

    r = load_recipe(resolve_recipe("digits"))
    t = dataclasses.replace(r.train, steps=steps, batch_size=batch, eval_every=0, ckpt_every=steps, threads=1)
    return dataclasses.replace(r, train=t)


def train(steps, batch, out, **kwargs) -> dict:
    from condiff.cli.train import train_recipe
    from condiff.data import digits

    digits.load_split()  # the data set read before the clock starts, in every process

    t0 = time.perf_counter()
    tr = train_recipe(recipe(steps, batch), out, progress=False, **kwargs)
    wall = time.perf_counter() - t0
    res = {"losses": tr.step_losses, "train_seconds": tr.train_seconds, "wall_seconds": wall, "steps": tr.step}
    if tr.parallel is not None:
        res["comm"] = tr.parallel.counter.as_dict()
        res["world_size"] = tr.parallel.world_size
        res["wire_bytes"] = tr.parallel.counter.wire_bytes(tr.parallel.world_size)
    return res


def weights(out: Path, steps: int) -> dict:
    from condiff.core.files import load_tensors

    return load_tensors(out / "checkpoints" / f"step-{steps:08d}" / "model.safetensors")


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    return num / sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64, help="per-rank batch B (one process: 2B)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-ddp"))
    p.add_argument("--rounds", type=int, default=2, help="repeat the three runs, interleaved; median steps/s")
    p.add_argument("--rank-job", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.rank_job:  # one rank under torchrun
        res = train(a.steps, a.batch, a.out / "ddp")
        if int(os.environ["RANK"]) == 0:
            (a.out / "ddp_rank0.json").write_text(json.dumps(res))
        return
    import shutil

    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    rounds = {"ddp": [], "shards": [], "plain": []}
    for k in range(a.rounds):
        out = a.out / f"round-{k}"
        cmd = [str(torchrun), "--nproc_per_node", "2", __file__, "--rank-job", "--steps", str(a.steps)]
        cmd += ["--batch", str(a.batch), "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rounds["ddp"].append(json.loads((out / "ddp_rank0.json").read_text()))
        rounds["shards"].append(train(a.steps, a.batch, out / "one-shards", data_shards=2))
        rounds["plain"].append(train(a.steps, 2 * a.batch, out / "one-plain"))
    ddp, shards, plain = rounds["ddp"][-1], rounds["shards"][-1], rounds["plain"][-1]
    a.out = a.out / f"round-{a.rounds - 1}"
    dl = max(abs(x - y) / abs(y) for x, y in zip(ddp["losses"], shards["losses"]))
    w = weights(a.out / "ddp", a.steps)
    res = {
        "steps": a.steps,
        "batch_per_rank": a.batch,
        "ddp": ddp,
        "one_process_2_shards": shards,
        "one_process_plain": plain,
        "loss_curve_max_rel_diff": dl,
        "weights_rel_diff_vs_2_shards": rel(w, weights(a.out / "one-shards", a.steps)),
        "weights_rel_diff_vs_plain": rel(w, weights(a.out / "one-plain", a.steps)),
        "all_reduce_bytes_per_step": ddp["comm"]["bytes"]["all_reduce"] / a.steps,
        "parameters": sum(t.numel() for t in w.values()),
        "threads": 1,
        "cpu": os.cpu_count(),
    }
    import statistics

    res["steps_per_second"] = {k: sorted(r["steps"] / r["train_seconds"] for r in v) for k, v in rounds.items()}
    (a.out.parent / "ddp.json").write_text(json.dumps(res, indent=1))
    med = {k: statistics.median(v) for k, v in res["steps_per_second"].items()}
    sps = lambda r: med["ddp" if r is ddp else "shards" if r is shards else "plain"]  # noqa: E731
    mean = lambda r: sum(r["losses"]) / len(r["losses"])  # noqa: E731
    print(
        "| run | global batch | steps/s | mean loss | loss curve vs 1 process, 2 shards | final weights vs it "
        "| all-reduce per step |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| gloo, 2 ranks x {a.batch} | {2 * a.batch} | {sps(ddp):.2f} | {mean(ddp):.4f} | max rel {dl:.1e} | "
        f"rel {res['weights_rel_diff_vs_2_shards']:.1e} | {res['all_reduce_bytes_per_step'] / 1e6:.3f} MB |"
    )
    print(
        f"| 1 process, {2 * a.batch} in 2 shards | {2 * a.batch} | {sps(shards):.2f} | {mean(shards):.4f} | - | - | 0 |"
    )
    print(
        f"| 1 process, {2 * a.batch} plain | {2 * a.batch} | {sps(plain):.2f} | {mean(plain):.4f} | (other noise "
        f"draws) | rel {res['weights_rel_diff_vs_plain']:.1e} | 0 |"
    )


if __name__ == "__main__":
    main()
