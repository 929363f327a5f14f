"""Training throughput: condiff's Trainer against a plain diffusers-style training loop, in one run.

Same UNet (the recipe's, built from the same seed), same batch size and batches (the family's training batches),
AdamW with the recipe's learning rate and weight decay, gradient clipping at the recipe's norm and diffusers'
EMAModel at the recipe's decay. The plain loop is what diffusers' training examples do per step: draw noise and
integer timesteps, ``DDPMScheduler.add_noise``, the UNet on the noisy batch with the labels (10% of them
replaced by the null label, as the Trainer's condition dropout), MSE to the target (``get_velocity`` for v),
backward, clip, AdamW step, EMA step. The Trainer runs its own ``train_step`` (seeded per-step generator,
finiteness checks, learning-rate schedule).

Variants (each from the same initial weights): ``plain``, ``condiff`` (eager, the default) and ``condiff fast``
(``train.fast = true``: the forward and loss in bfloat16 autocast, fused AdamW, one multi-tensor EMA update).
They are timed in rotation,
``--steps`` steps per round after a warm-up step, best of ``--rounds``; steps per second and the ratio to the
plain loop. The loss curves of the eager and fast Trainers over ``--curve-steps`` steps from the same seed are
compared: the mean and max difference of their running-mean losses against the loss's own step-to-step noise.

    python benchmarks/training_speed.py [--recipe digits] [--steps 20] [--rounds 3] [--threads 2]
        [--curve-steps 200] [--json outputs/bench/training_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from condiff.cli.recipes import resolve_recipe  # noqa: E402
from condiff.cli.train import make_trainer  # noqa: E402
from condiff.evaluation.peers import betas_from_alphas_cumprod  # noqa: E402
from condiff.models import runtime  # noqa: E402
from condiff.training.recipe import load_recipe  # noqa: E402
from condiff.training.trainer import step_generator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def plain_loop(model, recipe):
    """One step of a plain diffusers-style training loop over ``model``'s network (see the module docstring)."""
    cfg, obj, fam = recipe.train, recipe.objective, model.family
    module = model.module
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay)
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        trained_betas=betas_from_alphas_cumprod(model.schedule.alphas_cumprod).float().tolist(),
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[obj.prediction],
    )
    null = fam.encode(module, fam.null_raw(1))
    state = {"step": 0}

    def step():
        g = step_generator(cfg.seed, state["step"])
        x0, raw = fam.training_batch(state["step"], cfg.batch_size, g, cfg.seed, obj)
        cond = fam.encode(module, raw)
        drop = torch.rand(x0.shape[0], generator=g) < obj.cond_dropout
        cond = {
            k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), null[k].expand_as(v), v) if v.dim() else v
            for k, v in cond.items()
        }
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        noisy = sched.add_noise(x0, noise, t)
        target = noise if obj.prediction == "eps" else sched.get_velocity(x0, noise, t)
        pred = fam.forward(module, model.model_cfg, noisy, t, cond)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.step(params)
        state["step"] += 1
        return loss.item()

    return step


def trainer_step(recipe, out: Path):
    return make_trainer(recipe, out, progress=False).train_step


def time_rotated(fns: dict, steps: int, rounds: int) -> dict:
    """Best steps-per-second of each step function over ``rounds`` rounds of ``steps`` steps, the functions in
    turn within a round (the order rotating by one each round); one warm-up step each first."""
    names = list(fns)
    for k in names:
        fns[k]()
    best = dict.fromkeys(names, 0.0)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[k]()
            best[k] = max(best[k], steps / (time.perf_counter() - t0))
    return best


def running_mean(xs, w: int = 20):
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-w:]
        out.append(sum(acc) / len(acc))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="digits")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "training_speed.json")
    args = ap.parse_args()
    runtime.keep_freed_memory()  # as `condiff train` runs (the plain loop gets it too: the same process)
    base = load_recipe(resolve_recipe(args.recipe))
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, threads=args.threads))
    fast = dataclasses.replace(base, train=dataclasses.replace(base.train, fast=True))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain_model = make_trainer(base, tmp / "p", progress=False).model  # the same initial weights
        plain_model = dataclasses.replace(plain_model, module=copy.deepcopy(plain_model.module).train())
        torch.set_num_threads(args.threads)
        fns = {
            "plain": plain_loop(plain_model, base),
            "condiff": trainer_step(base, tmp / "e"),
            "condiff fast": trainer_step(fast, tmp / "f"),
        }
        speed = time_rotated(fns, args.steps, args.rounds)
        curves = {}
        for label, recipe in (("eager", base), ("fast", fast)):
            step = trainer_step(recipe, tmp / f"curve-{label}")
            curves[label] = [step() for _ in range(args.curve_steps)]
    e, f = running_mean(curves["eager"]), running_mean(curves["fast"])
    diffs = [abs(a - b) for a, b in zip(e, f)][20:]
    noise = sum(abs(a - b) for a, b in zip(curves["eager"][1:], curves["eager"][:-1])) / (len(curves["eager"]) - 1)
    rows = [{"loop": k, "steps_per_s": v, "ratio_vs_plain": v / speed["plain"]} for k, v in speed.items()]
    result = {
        "recipe": base.name,
        "batch_size": base.train.batch_size,
        "threads": args.threads,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "rows": rows,
        "loss_curve": {
            "steps": args.curve_steps,
            "mean_abs_diff_running_mean": sum(diffs) / len(diffs),
            "max_abs_diff_running_mean": max(diffs),
            "step_to_step_noise": noise,
            "final_running_mean": {"eager": e[-1], "fast": f[-1]},
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    table = ["| loop | steps/s | vs plain |", "|---|---:|---:|"]
    table += [f"| {r['loop']} | {r['steps_per_s']:.2f} | {r['ratio_vs_plain']:.2f}x |" for r in rows]
    lc = result["loss_curve"]
    text = "\n".join(
        [
            f"Recipe `{base.name}` (batch {base.train.batch_size}), {args.threads} threads, best of {args.rounds} "
            f"rounds of {args.steps} steps, in rotation ({result['machine']}):",
            "",
            *table,
            "",
            f"Loss curves, eager vs fast, {args.curve_steps} steps from the same seed: running-mean "
            f"(20 steps) difference {lc['mean_abs_diff_running_mean']:.4f} on average, "
            f"{lc['max_abs_diff_running_mean']:.4f} at most, against a step-to-step loss change of "
            f"{lc['step_to_step_noise']:.4f}; final running means "
            f"{lc['final_running_mean']['eager']:.4f} / {lc['final_running_mean']['fast']:.4f}.",
        ]
    )
    print(text)
    from sampling_speed import write_docs_section

    command = f"python benchmarks/training_speed.py --recipe {args.recipe} --threads {args.threads}"
    write_docs_section("training_speed", f"`{command}`\n\n{text}", "Training throughput")


if __name__ == "__main__":
    main()
