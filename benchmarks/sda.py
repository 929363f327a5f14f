"""SDA test-time adaptation on digits-C (Guo et al., CVPR 2025; condiff.tasks.sda, condiff.models.sda_digits: the
API behind ``condiff adapt``): the digits scorer (source), plain diffusion purification (DDA / DiffPure style: the
scorer on the projected image), purification ensembled with the source, and SDA (the scorer fine-tuned on
class-conditional synthetic digits passed through the same projection, on the projected image, ensembled with the
source on the original), per corruption x severity and averaged.

Protocol (fixed seeds): the class-conditional synthetic set is drawn once (``--synthetic`` digits,
``--synthesis-steps`` DDIM steps). On the 150 validation digits (sda_digits.split; disjoint from the 300 test
digits, and neither seen by the scorer or the diffusion model) every projection of the grid (t* x steps x DDA
structure guidance D:w, ``--projections``) is scored for purification, and every projection x fine-tuning variant
(lr:epochs:mix, ``--variants``; mix 1 adds the scorer's real training digits, projected the same way, to the
synthetic ones) for SDA. Purification and SDA each get the setting with the best validation average (ties: fewer
steps, then no/weaker guidance, then the smaller t*, then the listed variant order). Then the 300 test digits are
scored once with those settings: that is the reported table. CPU seconds (process time, 1 thread) of each stage
are recorded.

Usage: OMP_NUM_THREADS=1 python benchmarks/sda.py [--json F] [--workers 3] [--projections 100/1/0/0,300/5/4/4,...]
       [--variants 1e-3:30:0,1e-4:30:1] [--synthetic 2000] [--figure docs/tasks_sda.png]
       [--examples docs/tasks_sda_examples.png] [--no-plot]
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.data import digits_c
from condiff.models import sda_digits as sd
from condiff.models.base import load_model, silence_diffusers

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "tasks_sda.png"
EXAMPLES = ROOT / "docs" / "tasks_sda_examples.png"
PROJECTIONS = "100/1/0/0,200/5/4/0.5,300/5/4/0.5,400/5/4/0.5,300/5/2/0.5,300/5/4/2,400/5/4/2"
VARIANTS = "1e-3:30:0,1e-4:30:0,1e-3:30:1,1e-4:30:1"
CORRUPTIONS = tuple(digits_c.CORRUPTIONS)


def parse_projections(text: str) -> list[tuple[float, int, int, float]]:
    """'t*/steps/D/w,...' -> [(t*, steps, D, w), ...] (D 0: no structure guidance)."""
    out = []
    for part in text.split(","):
        t, steps, d, w = part.split("/")
        out.append((float(t), int(steps), int(d), float(w)))
    return out


def parse_variants(text: str) -> list[tuple[float, int, bool]]:
    """'lr:epochs:mix,...' -> [(lr, epochs, mix_real), ...]."""
    out = []
    for part in text.split(","):
        lr, epochs, mix = part.split(":")
        out.append((float(lr), int(epochs), bool(int(mix))))
    return out


def tie_key(projection, variant_index: int = 0):
    """Smaller is preferred among equal validation scores: fewer steps, no/weaker guidance, smaller t*, earlier
    variant."""
    t, steps, d, w = projection
    return (steps, 0 if d == 0 else 1, w, t, variant_index)


def best(scores: dict, key: str, order=lambda c: c):
    """The configuration with the highest validation average of ``key``; ties by ``order`` (smallest wins)."""
    return max(scores, key=lambda c: (round(scores[c][key], 12), tuple(-v for v in order(c))))


_WORKER = {}


def validate(job):
    """One projection of the validation grid: purification's averages, and (averages, stage-1 info) of SDA for each
    fine-tuning variant; the model is loaded once per process."""
    projection, variants, base, synthetic = job
    torch.set_num_threads(1)
    if "m" not in _WORKER:
        silence_diffusers()
        _WORKER["m"] = load_model("digits")
        _WORKER["m"].module.requires_grad_(False)
        _WORKER["source"], _WORKER["split"] = sd.scorer_net(), sd.split()
    m, source, split = _WORKER["m"], _WORKER["source"], _WORKER["split"]
    t0 = time.process_time()
    x_val, y_val = split["x_val"], split["y_val"]
    cells = sd.corrupt_and_project(m, settings_of(base, projection), x_val, CORRUPTIONS, digits_c.SEVERITIES)
    purified = sd.averages(sd.score_cells(source, None, cells, y_val))
    print(f"validation {projection}: " + ", ".join(f"{k} {v:.4f}" for k, v in purified.items()), flush=True)
    cache, per_variant = {}, []
    for variant in variants:
        adapted, info = sd.adapt(m, source, settings_of(base, projection, variant), synthetic, cache=cache)
        scores = sd.averages(sd.score_cells(source, adapted, cells, y_val))
        per_variant.append((scores, info))
        print(f"  {projection} {variant}: sda {scores['sda']:.4f} (alone {scores['sda_adapted']:.4f})", flush=True)
    return purified, per_variant, time.process_time() - t0


def settings_of(base, projection, variant=None):
    t, steps, d, w = projection
    s = replace(base, t_star=t, steps=steps, structure_factor=d, structure_weight=w)
    if variant is not None:
        s = replace(s, lr=variant[0], epochs=variant[1], mix_real=variant[2])
    return s


def examples_figure(m, settings, path: Path, n: int = 6, strong=(400.0, 5)) -> None:
    """Rows of ``n`` test digits: clean, then each corruption at severity 3 and at 5; each followed by its
    projection with ``settings`` (the chosen t*, steps, structure guidance), by a stronger projection (t*, steps =
    ``strong``) with the same guidance, and by that stronger projection without guidance."""
    from dataclasses import replace

    from condiff.data.images import grid_image, save_png

    x = sd.split()["x_test"][:n]
    projections = [sd.projection_of(settings), sd.projection_of(replace(settings, t_star=strong[0], steps=strong[1]))]
    projections.append(sd.projection_of(replace(settings, t_star=strong[0], steps=strong[1], structure_factor=0)))
    inputs = [x] + [digits_c.corrupt(name, x, s, settings.seed) for name in CORRUPTIONS for s in (3, 5)]
    rows = []
    for xc in inputs:
        rows += [xc] + [sd.project_images(m, xc, p, 1) for p in projections]
    save_png(grid_image(torch.cat(rows), n, scale=4), path)


def plot(test_rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(14, 3.4))
    for ax, name in zip(axes, CORRUPTIONS):
        sub = [r for r in test_rows if r["corruption"] == name]
        for k in ("source", "purified", "purified_ensemble", "sda"):
            ax.plot([r["severity"] for r in sub], [r[k] for r in sub], marker="o", label=sd.METHOD_LABELS[k])
        ax.set_title(name)
        ax.set_xlabel("severity")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (300 test digits)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--projections", default=PROJECTIONS, help="t*/steps/D/w,... (D 0: no structure guidance)")
    ap.add_argument("--variants", default=VARIANTS, help="lr:epochs:mix_real,... (fine-tuning variants of SDA)")
    ap.add_argument("--workers", type=int, default=1, help="processes for the validation grid (1 thread each)")
    ap.add_argument("--synthetic", type=int, default=sd.Settings().synthetic)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", type=Path, default=FIGURE)
    ap.add_argument("--examples", type=Path, default=EXAMPLES)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    silence_diffusers()
    m = load_model("digits")
    m.module.requires_grad_(False)
    source = sd.scorer_net()
    split = sd.split()
    base = sd.Settings(synthetic=args.synthetic, seed=args.seed)
    severities = digits_c.SEVERITIES
    cpu = {}

    t0 = time.process_time()
    synthetic = sd.synthesize(m, base, progress=True)
    cpu["synthesis"] = time.process_time() - t0
    print(f"synthesis: {args.synthetic} digits, {cpu['synthesis']:.0f} CPU s", flush=True)

    projections, variants = parse_projections(args.projections), parse_variants(args.variants)
    purified_val, sda_val, stage1, grid_cpu = {}, {}, {}, {}
    jobs = [(projection, variants, base, synthetic) for projection in projections]
    if args.workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            results = pool.map(validate, jobs, chunksize=1)
    else:
        results = [validate(job) for job in jobs]
    for projection, (pur, per_variant, cpu_s) in zip(projections, results):
        purified_val[projection] = pur
        grid_cpu[f"{'/'.join(f'{v:g}' for v in projection)}"] = cpu_s
        for vi, (scores, info) in enumerate(per_variant):
            sda_val[(projection, vi)], stage1[(projection, vi)] = scores, info
    cpu["validation_grid"] = sum(grid_cpu.values())  # each projection's process time, in whichever worker

    chosen_pur = best(purified_val, "purified", tie_key)
    chosen_sda = best(sda_val, "sda", lambda c: tie_key(*c))
    pur_settings = settings_of(base, chosen_pur)
    sda_settings = settings_of(base, chosen_sda[0], variants[chosen_sda[1]])
    print(f"chosen on validation: purification {chosen_pur}, SDA {chosen_sda[0]} {variants[chosen_sda[1]]}", flush=True)
    t0 = time.process_time()
    x, y = split["x_test"], split["y_test"]
    adapted, sda_info = sd.adapt(m, source, sda_settings, synthetic)  # the same seeds: the validated classifier
    sda_rows = sd.evaluate(m, source, adapted, sda_settings, x, y, CORRUPTIONS, severities)
    if sd.projection_of(pur_settings) == sd.projection_of(sda_settings):
        pur_rows = sda_rows  # the same projected test images
    else:
        pur_rows = sd.evaluate(m, source, None, pur_settings, x, y, CORRUPTIONS, severities)
    cpu["test"] = time.process_time() - t0
    test_rows = [
        {
            "corruption": p["corruption"],
            "severity": p["severity"],
            "source": p["source"],
            "purified": p["purified"],
            "purified_ensemble": p["purified_ensemble"],
            "sda_adapted": s["sda_adapted"],
            "sda": s["sda"],
        }
        for p, s in zip(pur_rows, sda_rows)
    ]
    averages = sd.averages(test_rows)
    table = sd.format_table(test_rows, averages)
    print(table)
    cpu["total"] = sum(cpu.values())
    print("CPU seconds:", {k: round(v, 1) for k, v in cpu.items()})
    if not args.no_plot:
        title = (
            f"digits-C, 300 test digits; purification t*/steps/D/w = {'/'.join(f'{v:g}' for v in chosen_pur)}, "
            f"SDA {'/'.join(f'{v:g}' for v in chosen_sda[0])} (chosen on validation); average: "
            + ", ".join(f"{k} {averages[k]:.3f}" for k in ("source", "purified", "purified_ensemble", "sda"))
        )
        plot(test_rows, args.figure, title)
        examples_figure(m, sda_settings, args.examples)
        print(f"wrote {args.figure} and {args.examples}")
    if args.json is not None:
        report = {
            "benchmark": "sda",
            "settings": base.as_dict(),
            "projections": [list(c) for c in projections],
            "variants": [list(v) for v in variants],
            "validation_purification": [
                dict(zip(("t_star", "steps", "D", "w"), c), **v) for c, v in purified_val.items()
            ],
            "validation_sda": [
                {**dict(zip(("t_star", "steps", "D", "w"), c)), "variant": list(variants[vi]), **v}
                for (c, vi), v in sda_val.items()
            ],
            "chosen": {"purified": pur_settings.as_dict(), "sda": sda_settings.as_dict()},
            "stage1": {f"{'/'.join(f'{v:g}' for v in c)} {variants[vi]}": info for (c, vi), info in stage1.items()},
            "stage1_test": sda_info,
            "test_rows": test_rows,
            "test_average": averages,
            "table": table,
            "cpu_seconds": cpu,
            "validation_cpu_seconds": grid_cpu,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
