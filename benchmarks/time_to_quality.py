"""Time to quality: the least wall time to a target quality, condiff against diffusers and k-diffusion, in one run.

Targets (cfg 3, 512 samples, the same random conditions and starting noise for every configuration):
shapes: the labeller's ``all`` accuracy >= 0.98; digits: the scorer's class accuracy >= 0.99.

A configuration is one way to sample the bundled model:
- condiff: a solver on a grid (its default uniform-t grid from the default start, or grids searched on the model
  by `condiff grid search`, given with --grid), optionally with adaptive guidance (AG, Castillo et al. 2023) or
  LinearAG (the same paper: every evaluation's unconditional branch predicted by least-squares coefficients
  fitted on 256 other conditions and starts, so one network row per step);
- diffusers: a scheduler (DPM-Solver++(2M), UniPC, Euler, DDIM; 'trailing' and 'leading' timesteps, and
  DPM-Solver++(2M) with Karras sigmas), driven in diffusers' pipeline pattern with batched CFG on the network's
  raw output;
- k-diffusion: a sampler (DPM-Solver++(2M), Euler, Heun, LMS, DPM-2) on its Karras sigmas (rho 7) from
  sigma / alpha = 20, with the same batched-CFG network wrapped as its denoiser.

Every configuration starts from the same unit noise z, scaled to its first time (x_T = sigma(t0) z): the
diffusers schedulers at their first timestep, k-diffusion and condiff's default grid at condiff's default start
(sigma / alpha = 20), searched grids at theirs. For each configuration the step count is swept upward
(--steps-list) until the target is met; the first such count is its operating point. Then every operating
point is timed in rotation (generating the 512 images at --batch, conditions encoded, on --threads), best of
--rounds. The ``ratio`` of a target is condiff's best time over the best peer's with the network run as the peers
run it (float32, eager); ``ratios`` gives it for each faster way of running condiff's network that was asked for
(--bf16: bfloat16 autocast; --compile: torch.compile with channels_last; both: the two together), each on a
separately loaded copy, and ``ratio_best`` the least of them. The JSON holds every sweep point; the table and a
time-vs-accuracy plot go into docs/benchmarks.md.

    python benchmarks/time_to_quality.py [--models shapes,digits] [--grid shapes=outputs/grids/shapes_unipc.json]
        [--threads 2] [--rounds 2] [--bf16] [--compile] [--json outputs/bench/time_to_quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from condiff.core.grids import Trailing, UniformT, make_grid  # noqa: E402
from condiff.evaluation.evaluate import generate_counted  # noqa: E402
from condiff.evaluation.kdiffusion import KPeer, karras_sigmas, run_kpeer  # noqa: E402
from condiff.evaluation.peers import Peer, betas_from_alphas_cumprod, run_peer  # noqa: E402
from condiff.guidance.build import GuidanceOptions  # noqa: E402
from condiff.guidance.cfg import NAMES, batch_cond  # noqa: E402
from condiff.guidance.linear_ag import fit_linear_ag  # noqa: E402
from condiff.models import runtime  # noqa: E402
from condiff.models.base import load_model, silence_diffusers  # noqa: E402
from condiff.solvers import get_solver  # noqa: E402
from condiff.solvers.grid_search import check_grids_fit, load_grids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"shapes": ("all", 0.98), "digits": ("class", 0.99)}
STEPS = (3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40)
CFG = 3.0


@dataclass
class Config:
    impl: str  # condiff, diffusers, k-diffusion
    label: str
    run: Callable  # run(model, raw chunk, x_T chunk, steps) -> (images, nfe)
    steps_list: tuple = STEPS
    sweep: list = field(default_factory=list)
    best: dict | None = None


def raw_fn(m, chunk):
    """f(x, t) -> the guided raw network output for the conditions ``chunk`` (batched CFG, [null, cond])."""
    cond = m.condition(chunk)
    null = cond.pop("null")
    both = batch_cond([null, cond], chunk.shape[0], NAMES)

    def f(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        out = m.family.forward(m.module, m.model_cfg, torch.cat([x, x]), t.expand(2 * x.shape[0]), both)
        u, c = out.chunk(2)
        return u + CFG * (c - u)

    return f


def start_at(m, z, t: float) -> torch.Tensor:
    """The starting sample sigma(t) z at time t (the VP prior, as condiff's own runs draw it)."""
    return float(m.schedule.sigma(torch.tensor(t, dtype=torch.float64))) * z


def x0_of(m, raw_out, x, t):
    """x0 from a VP sample and the network's raw output (eps or v) at time t."""
    tt = torch.tensor(float(t), dtype=torch.float64)
    a, s = float(m.schedule.alpha(tt)), float(m.schedule.sigma(tt))
    return (x - s * raw_out) / a if m.prediction.name == "eps" else a * x - s * raw_out


def diffusers_config(label: str, cls_name: str, spacing: str, **kwargs) -> Config:
    """A diffusers scheduler with ``timestep_spacing`` ``spacing`` ('trailing' starts at t = 999, 'leading' at
    (N - 1) 1000 / N + 1, as Stable Diffusion's pipelines), from sigma(first timestep) z."""

    def run(m, chunk, z, steps):
        import diffusers

        pred = {"eps": "epsilon", "v": "v_prediction"}[m.prediction.name]
        betas = betas_from_alphas_cumprod(m.schedule.alphas_cumprod).float().tolist()
        extra = {"steps_offset": 1} if spacing == "leading" else {}
        sched = getattr(diffusers, cls_name)(
            num_train_timesteps=len(betas),
            trained_betas=betas,
            prediction_type=pred,
            timestep_spacing=spacing,
            **extra,
            **kwargs,
        )
        sched.set_timesteps(steps)
        t0 = float(sched.timesteps[0])
        return run_peer(Peer(label, cls_name), sched, raw_fn(m, chunk), start_at(m, z, t0), steps)

    return Config("diffusers", f"{label} ({spacing})", run)


def kdiffusion_config(label: str, fn: str, evals: int = 1) -> Config:
    """A k-diffusion sampler on its Karras sigmas from condiff's default start (sigma / alpha = 20)."""

    def run(m, chunk, z, steps):
        f = raw_fn(m, chunk)
        t0 = float(m.schedule.default_t_start())
        return run_kpeer(
            KPeer(label, fn, evals=evals),
            m.schedule,
            lambda x, t: x0_of(m, f(x, t), x, t),
            start_at(m, z, t0),
            karras_sigmas(m.schedule, steps, t0),
        )

    return Config("k-diffusion", f"{label} (karras)", run)


def condiff_config(
    label: str,
    solver: str,
    spacing=UniformT(),
    ag: float | None = None,
    steps_list=STEPS,
    t_start: float | None = None,
    centre: bool = False,
    faster=None,
    linear_ag: Callable | None = None,
) -> Config:
    """condiff's ``generate_counted`` with a solver, a spacing, AG, a start (None: the default) and
    --centre-subpixels; ``linear_ag``: steps -> LinearAG coefficients for that many steps (used at every
    evaluation); ``faster``: a separately loaded copy of the model whose network runs another way
    (--bf16, --compile --channels-last)."""

    def run(m, chunk, z, steps):
        m = faster if faster is not None else m
        g = torch.Generator().manual_seed(0)  # unused: deterministic solvers, the starting noise is given
        if linear_ag is None:
            guidance = GuidanceOptions(cfg=CFG, ag=ag)
        else:  # every evaluation predicts the unconditional branch: one network row per step
            guidance = GuidanceOptions(cfg=CFG, linear_ag=linear_ag(steps), linear_ag_steps=steps)
        images, nfe, _ = generate_counted(
            m,
            chunk,
            get_solver(solver),
            steps,
            CFG,
            g,
            spacing,
            chunk.shape[0],
            guidance=guidance,
            start_noise=z,
            t_start=t_start,
            centre_subpixels=int(m.model_cfg.get("pixel_unshuffle", 1)) if centre else 1,
        )
        return images, nfe

    return Config("condiff", label, run, steps_list)


AG = 0.999
WAYS = {  # the faster networks, longest name first: way -> (--compile --channels-last, --bf16)
    "bf16 + compile + channels-last": (True, True),
    "compile + channels-last": (True, False),
    "bf16": (False, True),
}


def linear_ag_fitter(m, solver: str, t_start: float, n: int = 256, seed: int = 12345) -> Callable:
    """steps -> LinearAG coefficients (Castillo et al. 2025) for ``solver`` on the trailing grid of that many
    steps from ``t_start``, fitted on ``n`` CFG trajectories whose conditions and starts come from ``seed``
    (never the benchmark's); fitted once per step count (a few seconds), not counted in the timed runs."""
    cache = {}

    def fit(steps: int):
        if steps not in cache:
            grid = make_grid(m.schedule, steps, Trailing(), t_start=t_start)
            g = torch.Generator().manual_seed(seed)
            raw, _ = m.family.random_conditions(n, g)
            x = m.prior((n, *m.family.image_shape), float(grid[0]), g)
            with torch.no_grad():
                cache[steps] = fit_linear_ag(m.denoiser, get_solver(solver), grid, x, m.condition(raw), CFG)
        return cache[steps]

    return fit


def configs(m, grids: list[Path], steps_list=STEPS, faster: dict | None = None) -> list[Config]:
    """condiff's configurations (``faster``: {way: a separately loaded copy of the model with that way of running
    its network}) and the peers'."""
    t_max = float(m.schedule.t_max)
    lag = linear_ag_fitter(m, "dpmpp-2m", t_max)
    out = [
        condiff_config("dpmpp-2m", "dpmpp-2m", steps_list=steps_list),
        condiff_config("dpmpp-2m + trailing", "dpmpp-2m", Trailing(), None, steps_list, t_max),
        condiff_config(f"dpmpp-2m + trailing + AG {AG}", "dpmpp-2m", Trailing(), AG, steps_list, t_max),
        condiff_config(
            f"dpmpp-2m + trailing + AG {AG} + centre-subpixels", "dpmpp-2m", Trailing(), AG, steps_list, t_max, True
        ),
        condiff_config("unipc + trailing", "unipc", Trailing(), None, steps_list, t_max),
        condiff_config(
            "dpmpp-2m + trailing + LinearAG", "dpmpp-2m", Trailing(), None, steps_list, t_max, linear_ag=lag
        ),
    ]
    for path in grids:
        gr = load_grids(path)
        tab = check_grids_fit(gr, m.schedule, cfg=CFG, where=str(path))
        steps = tuple(sorted(tab.grids))
        out.append(condiff_config(f"{gr.solver} + grid {path.stem}", gr.solver, tab, steps_list=steps))
        out.append(condiff_config(f"{gr.solver} + grid {path.stem} + AG {AG}", gr.solver, tab, AG, steps))
    for way, fast in (faster or {}).items():  # condiff's fastest configurations on a faster network
        label = f"dpmpp-2m + trailing + AG {AG} + {way}"
        out.append(condiff_config(label, "dpmpp-2m", Trailing(), AG, steps_list, t_max, faster=fast))
    peers = [
        diffusers_config(label, cls, spacing, **kw)
        for label, cls, kw in DIFFUSERS
        for spacing in ("trailing", "leading")
    ]
    peers.append(
        diffusers_config(
            "DPM++ 2M Karras", "DPMSolverMultistepScheduler", "trailing", use_karras_sigmas=True, **PEER_MS
        )
    )
    peers += [kdiffusion_config(label, label, evals) for label, evals in KDIFFUSION]
    for p in peers:
        p.steps_list = steps_list
    return out + peers


PEER_MS = dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", lower_order_final=True)
DIFFUSERS = (
    ("DPM++ 2M", "DPMSolverMultistepScheduler", PEER_MS),
    ("UniPC", "UniPCMultistepScheduler", dict(solver_type="bh2", final_sigmas_type="zero")),
    ("Euler", "EulerDiscreteScheduler", dict(final_sigmas_type="zero")),
    ("DDIM", "DDIMScheduler", dict(set_alpha_to_one=True, clip_sample=False)),
)
KDIFFUSION = (("dpmpp_2m", 1), ("euler", 1), ("heun", 2), ("lms", 1), ("dpm_2", 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="shapes,digits")
    ap.add_argument("--grid", action="append", default=[], help="MODEL=FILE: searched grids for a model")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-list", default=",".join(map(str, STEPS)), help="step counts swept, ascending")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "bench" / "time_to_quality.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "time_to_quality.png")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument(
        "--compile", action="store_true", help="add condiff's fastest configuration run with --compile --channels-last"
    )
    ap.add_argument(
        "--bf16", action="store_true", help="add condiff's fastest configuration with its network in bfloat16 (--bf16)"
    )
    args = ap.parse_args()
    runtime.keep_freed_memory()
    silence_diffusers()
    torch.set_num_threads(args.threads)
    grid_files: dict[str, list[Path]] = {}
    for item in args.grid:
        name, _, path = item.partition("=")
        grid_files.setdefault(name, []).append(Path(path))
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": args.threads,
        "n": args.n,
        "batch": args.batch,
        "cfg": CFG,
        "models": {},
    }
    for name in args.models.split(","):
        m = load_model(name)
        key, target = TARGETS[name]
        g = torch.Generator().manual_seed(args.seed)
        raw, targets = m.family.random_conditions(args.n, g)
        z = torch.randn((args.n, *m.family.image_shape), generator=g)  # every configuration's starting noise
        chunks = list(zip(torch.split(raw, args.batch), torch.split(z, args.batch)))

        def generate(cfg: Config, steps: int):
            with torch.no_grad():
                outs = [cfg.run(m, c, x, steps) for c, x in chunks]
            return torch.cat([o[0] for o in outs]).clamp(-1, 1), outs[0][1]

        # separate copies of the model: changing the shared one would change the peers' network too
        faster = {
            way: runtime.run_faster(load_model(name), compile_net, compile_net, bf16)  # compile with channels_last
            for way, (compile_net, bf16) in WAYS.items()
            if (args.compile or not compile_net) and (args.bf16 or not bf16)
        }
        steps_list = tuple(int(k) for k in args.steps_list.split(","))
        cases = configs(m, grid_files.get(name, []), steps_list, faster)
        for cfg in cases:
            for steps in cfg.steps_list:
                t0 = time.perf_counter()
                try:
                    images, nfe = generate(cfg, steps)
                except Exception as e:  # a peer that fails at this step count (a diffusers IndexError): not reached
                    cfg.sweep.append({"steps": steps, "failed": f"{type(e).__name__}: {e}"[:200]})
                    print(f"{name} {cfg.impl:11s} {cfg.label:36s} steps {steps:3d} failed: {e}", flush=True)
                    break
                acc = float(m.family.score(images, targets)[key])
                cfg.sweep.append({"steps": steps, "nfe": nfe, key: acc, "sweep_seconds": time.perf_counter() - t0})
                print(
                    f"{name} {cfg.impl:11s} {cfg.label:36s} steps {steps:3d} nfe {nfe:3d} {key} {acc:.4f}", flush=True
                )
                if acc >= target:
                    cfg.best = dict(cfg.sweep[-1])
                    break
        reached = [c for c in cases if c.best is not None]
        best_time = {c.label: float("inf") for c in reached}
        for r in range(args.rounds):
            order = reached[r % len(reached) :] + reached[: r % len(reached)]
            for c in order:
                t0 = time.perf_counter()
                generate(c, c.best["steps"])
                best_time[c.label] = min(best_time[c.label], time.perf_counter() - t0)
        for c in reached:
            c.best["seconds"] = best_time[c.label]
        rows = [
            {"impl": c.impl, "config": c.label, **(c.best or {}), "reached": c.best is not None, "sweep": c.sweep}
            for c in cases
        ]
        by_impl = {}
        for r in rows:  # condiff's float32 eager network (as the peers run it), and each faster way on its own
            impl = next((f"condiff {w}" for w in WAYS if r["config"].endswith(f" + {w}")), r["impl"])
            if r["reached"] and (impl not in by_impl or r["seconds"] < by_impl[impl]["seconds"]):
                by_impl[impl] = r
        peer = min((by_impl[i] for i in ("diffusers", "k-diffusion") if i in by_impl), key=lambda r: r["seconds"])
        ratios = {i: r["seconds"] / peer["seconds"] for i, r in by_impl.items() if i.startswith("condiff")}
        report["models"][name] = {
            "target": {key: target},
            "rows": rows,
            "best": {
                i: {"config": r["config"], "steps": r["steps"], "seconds": r["seconds"]} for i, r in by_impl.items()
            },
            "ratio": ratios.get("condiff"),
            "ratios": {("condiff float32" if i == "condiff" else i): v for i, v in ratios.items()},
            "ratio_best": min(ratios.values()) if ratios else None,
        }
        print(f"{name}: ratios {report['models'][name]['ratios']}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    text = table(report)
    print(text)
    plot(report, args.plot)
    if not args.no_docs:
        from sampling_speed import write_docs_section

        flags = [f"--threads {args.threads}", f"--rounds {args.rounds}", f"--steps-list {args.steps_list}"]
        flags += ["--compile"] * args.compile + ["--bf16"] * args.bf16 + [f"--grid {g}" for g in args.grid]
        cmd = "python benchmarks/time_to_quality.py " + " ".join(flags)
        block = f"`{cmd.strip()}`\n\n{text}\n\n![time vs accuracy]({args.plot.name})"
        write_docs_section("time_to_quality", block, "Time to quality: condiff vs diffusers and k-diffusion")


def table(report: dict) -> str:
    lines = [
        f"{report['n']} samples, cfg {report['cfg']:g}, batch {report['batch']}, {report['threads']} threads "
        f"({report['machine']}); time: generating the {report['n']} images at the first step count that meets "
        "the target, best of the timing rounds, taken in rotation.",
        "",
    ]
    for name, r in report["models"].items():
        ((key, target),) = r["target"].items()
        ways = "; ".join(f"{i}: {v:.2f}" for i, v in r["ratios"].items())
        lines += [
            f"**{name}** ({key} >= {target}): condiff / best peer = **{r['ratio_best']:.2f}** ({ways})",
            "",
        ]
        lines += ["| impl | configuration | steps | NFE | accuracy | seconds |", "|---|---|---:|---:|---:|---:|"]
        for row in sorted(r["rows"], key=lambda x: x.get("seconds", float("inf"))):
            if row["reached"]:
                lines.append(
                    f"| {row['impl']} | {row['config']} | {row['steps']} | {row['nfe']} | {row[key]:.3f} | "
                    f"{row['seconds']:.2f} |"
                )
            else:
                last = row["sweep"][-1]
                got = f"fails at {last['steps']} steps" if "failed" in last else f"{last[key]:.3f} (not reached)"
                lines.append(f"| {row['impl']} | {row['config']} | > {last['steps']} | | {got} | |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
    colors = {"condiff": "black", "diffusers": "tab:blue", "k-diffusion": "tab:orange"}
    for ax, name in zip(axes[0], names):
        r = report["models"][name]
        ((key, target),) = r["target"].items()
        reached = [row for row in r["rows"] if row["reached"]]
        fastest = {}
        for row in sorted(reached, key=lambda x: x["seconds"]):
            fastest.setdefault(row["impl"], row)
            ax.scatter(row["seconds"], row[key], color=colors[row["impl"]], s=28, alpha=0.6)
        for row in fastest.values():  # each library's fastest configuration, named
            ax.scatter(row["seconds"], row[key], color=colors[row["impl"]], s=60, edgecolor="black")
            ax.annotate(f" {row['config']} ({row['steps']} steps)", (row["seconds"], row[key]), fontsize=7)
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("seconds for the samples (at the first step count meeting the target)")
        ax.set_ylabel(f"{key} accuracy")
        ax.set_title(f"{name}: condiff / best peer = {r['ratio_best']:.2f} (float32: {r['ratio']:.2f})")
        for impl, c in colors.items():
            ax.scatter([], [], color=c, label=impl)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
