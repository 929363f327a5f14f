"""The Diffusion Classifier (Li et al., ICCV 2023; condiff.tasks.diffusion_classifier) on the bundled models.

(a) Zero-shot on the bundled shapes model (caption-conditioned, v-prediction): --images fresh renders
    (condiff.data.shapes.sample_batch from a generator seeded 12345, a seed no training used), classified among the
    6 single-word color captions ("red", ..., "cyan") and, separately, the 3 shape captions ("circle", "square",
    "triangle"). Full evaluation scores every candidate on the same --pairs stratified (t, eps) pairs (noise from a
    generator seeded --seed, shared by both tasks); adaptive pruning (--stages / --keep) runs on the same grid and
    is compared with it: agreement rate and network evaluations (NFE, rows through the network). The other
    schedules of the table are replayed from the full run's errors (``prune``: the same pairs, the decisions the
    run would make; the benchmark checks the replay of --stages against the real run).
(b) The bundled digits model (class-conditional, eps-prediction) on the 450 held-out digits (the split neither the
    diffusion model nor the scorer was trained on), with --digits-pairs pairs, against the discriminative scorer
    condiff uses to judge digits samples (condiff.data.digits.scorer(), an MLP on the pixels).

Accuracy against the number of pairs (full evaluation on the centred stride subset of n pairs, replayed) goes into
the figure (docs/tasks_classifier.png), with the color confusion matrix.

Usage: OMP_NUM_THREADS=1 python benchmarks/diffusion_classifier.py [--json F] [--docs] [--images 512] [--pairs 100]
       [--error l1] [--stages 10,25 --keep 2,1] [--digits-pairs 25] [--parts shapes,digits] [--seed 0]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from condiff.core.files import atomic_write_json
from condiff.data import digits, shapes
from condiff.models.base import load_model, silence_diffusers
from condiff.tasks.diffusion_classifier import ClassifierConfig, classify, describe_config, prune

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = "tasks.md"
FIGURE = ROOT / "docs" / "tasks_classifier.png"
RENDER_SEED = 12345
CHUNK = 32  # images per classify call (bounds the noise tensor: CHUNK x pairs x image)
REPLAYED = [((20, 100), (2, 1)), ((10, 100), (2, 1)), ((20, 50), (2, 1)), ((10, 25), (2, 1)), ((5, 20), (2, 1))]
CURVE = (1, 2, 5, 10, 20, 50, 100)


def conds_of(m, words):
    out = []
    for w in words:
        c = m.condition(m.family.parse_prompt(w))
        c.pop("null", None)
        out.append(c)
    return out


def run_chunks(den, x, conds, config, seed):
    """``classify`` over CHUNK-image slices with one generator: runs with one grid size draw the same noise."""
    g = torch.Generator().manual_seed(seed)
    parts = [classify(den, x[i : i + CHUNK], conds, config, g) for i in range(0, x.shape[0], CHUNK)]
    cat = {f: torch.cat([getattr(p, f) for p in parts]) for f in ("errors", "scores", "evaluated", "ranking", "nfe")}
    return type(parts[0])(prediction=cat["ranking"][:, 0].clone(), times=parts[0].times, **cat)


def accuracy(pred, y) -> float:
    return float((pred == y).double().mean())


def confusion(pred, y, k) -> list[list[int]]:
    m = torch.zeros(k, k, dtype=torch.long)
    m.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    return m.tolist()


def curve(full, y, config) -> list[dict]:
    """Full evaluation on the stride subset of n of the grid's pairs, replayed from the full errors."""
    out = []
    for n in [n for n in CURVE if n <= config.grid_size]:
        r = prune(full, ClassifierConfig(stages=(n,), keep=(1,), pairs=config.grid_size, error=config.error))
        out.append({"pairs": n, "nfe_per_image": r.total_nfe / len(y), "accuracy": accuracy(r.prediction, y)})
    return out


def schedules(full, y, grid, error) -> list[dict]:
    out = []
    for st, kp in [s for s in REPLAYED if s[0][-1] <= grid]:
        r = prune(full, ClassifierConfig(stages=st, keep=kp, pairs=grid, error=error))
        out.append(
            {
                "stages": list(st),
                "keep": list(kp),
                "agreement": accuracy(r.prediction, full.prediction),
                "accuracy": accuracy(r.prediction, y),
                "nfe_per_image": r.total_nfe / len(y),
                "nfe_ratio": full.total_nfe / r.total_nfe,
            }
        )
    return out


def shapes_part(args, full_cfg, adaptive_cfg) -> dict:
    m = load_model("shapes")
    den = m.denoiser
    batch = shapes.sample_batch(args.images, torch.Generator().manual_seed(RENDER_SEED))
    out = {"images": args.images, "render_seed": RENDER_SEED, "tasks": {}}
    for name, words, y in [("color", shapes.COLORS, batch.attrs[:, 1]), ("shape", shapes.SHAPES, batch.attrs[:, 0])]:
        conds = conds_of(m, words)
        t0 = time.perf_counter()
        full = run_chunks(den, batch.images, conds, full_cfg, args.seed)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        ada = run_chunks(den, batch.images, conds, adaptive_cfg, args.seed)
        t_ada = time.perf_counter() - t0
        replay = prune(full, adaptive_cfg)
        res = {
            "candidates": list(words),
            "full": {
                "accuracy": accuracy(full.prediction, y),
                "nfe_per_image": full.total_nfe / len(y),
                "seconds": t_full,
                "ms_per_row": 1e3 * t_full / full.total_nfe,
            },
            "adaptive": {
                "accuracy": accuracy(ada.prediction, y),
                "agreement": accuracy(ada.prediction, full.prediction),
                "nfe_per_image": ada.total_nfe / len(y),
                "nfe_ratio": full.total_nfe / ada.total_nfe,
                "seconds": t_ada,
                "replay_matches_run": accuracy(replay.prediction, ada.prediction),
                "replay_nfe_matches_run": bool(torch.equal(replay.nfe, ada.nfe)),
            },
            "schedules": schedules(full, y, full_cfg.grid_size, full_cfg.error),
            "curve": curve(full, y, full_cfg),
            "confusion": confusion(full.prediction, y, len(words)),
        }
        out["tasks"][name] = res
        f, a = res["full"], res["adaptive"]
        print(
            f"shapes {name}: full accuracy {f['accuracy']:.4f} ({f['nfe_per_image']:.0f} NFE/image, "
            f"{f['seconds']:.0f}s) | adaptive {list(adaptive_cfg.stages)}|{list(adaptive_cfg.keep)} accuracy "
            f"{a['accuracy']:.4f}, agreement {a['agreement']:.4f}, {a['nfe_per_image']:.0f} NFE/image "
            f"({a['nfe_ratio']:.2f}x fewer, {a['seconds']:.0f}s); replay = run on {a['replay_matches_run']:.4f}",
            flush=True,
        )
    both_full = sum(out["tasks"][k]["full"]["nfe_per_image"] for k in out["tasks"])
    both_ada = sum(out["tasks"][k]["adaptive"]["nfe_per_image"] for k in out["tasks"])
    out["nfe_ratio_both_tasks"] = both_full / both_ada
    return out


def digits_part(args, error) -> dict:
    m = load_model("digits")
    s = digits.load_split()
    x, y = s["x_test"], s["y_test"]
    cfg = ClassifierConfig.full(args.digits_pairs, error=error)
    conds = conds_of(m, [str(c) for c in range(digits.NUM_CLASSES)])
    t0 = time.perf_counter()
    full = run_chunks(m.denoiser, x, conds, cfg, args.seed)
    sec = time.perf_counter() - t0
    sc = digits.scorer()
    pred_sc = sc.predict(x)
    out = {
        "images": int(len(y)),
        "config": describe_config(cfg),
        "diffusion_classifier": {
            "accuracy": accuracy(full.prediction, y),
            "nfe_per_image": full.total_nfe / len(y),
            "seconds": sec,
            "ms_per_row": 1e3 * sec / full.total_nfe,
        },
        "scorer": {"accuracy": accuracy(pred_sc, y), "what": "condiff.data.digits.scorer(): MLP(256) on the pixels"},
        "both_right": accuracy(torch.where(full.prediction == y, pred_sc, -1), y),
        "agreement_with_scorer": accuracy(full.prediction, pred_sc),
        "schedules": schedules(full, y, cfg.grid_size, error),
        "curve": curve(full, y, cfg),
        "confusion": confusion(full.prediction, y, digits.NUM_CLASSES),
    }
    d = out["diffusion_classifier"]
    print(
        f"digits: diffusion classifier accuracy {d['accuracy']:.4f} ({d['nfe_per_image']:.0f} NFE/image, "
        f"{d['seconds']:.0f}s) | scorer {out['scorer']['accuracy']:.4f} | agree {out['agreement_with_scorer']:.4f}",
        flush=True,
    )
    return out


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = report["results"]
    fig, axes = plt.subplots(1, 2 + ("shapes" in parts), figsize=(5.2 * (2 + ("shapes" in parts)), 4.2))
    ax = axes[0]
    markers = iter("os^D")
    if "shapes" in parts:
        for name, res in parts["shapes"]["tasks"].items():
            c = res["curve"]
            mk = next(markers)
            ax.plot([p["nfe_per_image"] for p in c], [p["accuracy"] for p in c], f"-{mk}", label=f"shapes {name}: full")
            a = res["adaptive"]
            ax.plot(
                a["nfe_per_image"],
                a["accuracy"],
                mk,
                ms=11,
                mfc="none",
                label=f"shapes {name}: adaptive {report['stages']}",
            )
    if "digits" in parts:
        c = parts["digits"]["curve"]
        ax.plot([p["nfe_per_image"] for p in c], [p["accuracy"] for p in c], "-D", label="digits: full")
        ax.axhline(parts["digits"]["scorer"]["accuracy"], color="grey", ls="--", label="digits: discriminative scorer")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("accuracy")
    ax.set_title(f"accuracy vs NFE ({report['config']['error']} error)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    mats = []
    if "shapes" in parts:
        mats.append(("shapes color", parts["shapes"]["tasks"]["color"]["confusion"], shapes.COLORS))
    if "digits" in parts:
        mats.append(("digits", parts["digits"]["confusion"], [str(i) for i in range(10)]))
    for ax, (title, mat, labels) in zip(axes[1:], mats):
        mat = torch.tensor(mat, dtype=torch.float64)
        rate = mat / mat.sum(1, keepdim=True).clamp(min=1)
        ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if mat[i, j] > 0:
                    shade = "white" if rate[i, j] > 0.5 else "black"
                    ax.text(j, i, int(mat[i, j]), ha="center", va="center", fontsize=6, color=shade)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: confusion (full evaluation)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def docs_body(report: dict, command: str) -> str:
    r = report["results"]
    lines = [
        f"Measured with `{command}` ({report['platform']}, torch {report['torch']}, 1 thread; "
        f"{report['minutes']:.1f} min on a shared 2-core machine under load). Error {report['config']['error']}, "
        "stratified t over the whole range, one noise per pair shared by every candidate (paired).",
        "",
    ]
    if "shapes" in r:
        s = r["shapes"]
        lines += [
            f"Shapes: {s['images']} fresh renders (seed {s['render_seed']}), single-word captions as candidates, "
            f"full evaluation on {report['config']['pairs']} pairs vs adaptive pruning "
            f"(stages {report['stages']}, keep {report['keep']}) on the same grid:",
            "",
            "| task | candidates | full: accuracy | full: NFE / image | adaptive: accuracy | agreement with full "
            "| adaptive: NFE / image | NFE ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in s["tasks"].items():
            f, a = t["full"], t["adaptive"]
            lines.append(
                f"| {name} | {len(t['candidates'])} | {f['accuracy']:.4f} | {f['nfe_per_image']:.0f} | "
                f"{a['accuracy']:.4f} | {a['agreement']:.4f} | {a['nfe_per_image']:.0f} | {a['nfe_ratio']:.2f}x |"
            )
        lines += [
            "",
            f"Both tasks together: {s['nfe_ratio_both_tasks']:.2f}x fewer network evaluations. Other pruning "
            "schedules on the same grid (replayed from the full run's errors; the replay of the schedule above "
            "reproduces the real run's decisions on "
            + ", ".join(f"{t['adaptive']['replay_matches_run']:.4f}" for t in s["tasks"].values())
            + " of the images):",
            "",
            "| task | stages | keep | agreement with full | accuracy | NFE / image | NFE ratio |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for name, t in s["tasks"].items():
            for q in t["schedules"]:
                lines.append(
                    f"| {name} | {','.join(map(str, q['stages']))} | {','.join(map(str, q['keep']))} | "
                    f"{q['agreement']:.4f} | {q['accuracy']:.4f} | {q['nfe_per_image']:.0f} | {q['nfe_ratio']:.2f}x |"
                )
        lines.append("")
    if "digits" in r:
        d = r["digits"]
        dc = d["diffusion_classifier"]
        lines += [
            f"Digits: the {d['images']} held-out digits, candidates the classes 0-9, full evaluation on "
            f"{d['config']['pairs']} pairs:",
            "",
            "| classifier | accuracy | NFE / image |",
            "|---|---:|---:|",
            f"| diffusion classifier (bundled digits model) | {dc['accuracy']:.4f} | {dc['nfe_per_image']:.0f} |",
            f"| discriminative scorer (condiff.data.digits.scorer) | {d['scorer']['accuracy']:.4f} | - |",
            "",
            f"They agree on {d['agreement_with_scorer']:.4f} of the digits.",
        ]
    return "\n".join(lines)


def command_of(report: dict) -> str:
    """The command line that reproduces ``report`` (its options, not its output paths)."""
    r = report["results"]
    words = ["OMP_NUM_THREADS=1 python benchmarks/diffusion_classifier.py"]
    if "shapes" in r:
        words += [f"--images {r['shapes']['images']}", f"--pairs {report['config']['pairs']}"]
        words += [f"--stages {','.join(map(str, report['stages']))}", f"--keep {','.join(map(str, report['keep']))}"]
    if "digits" in r:
        words.append(f"--digits-pairs {r['digits']['config']['pairs']}")
    words += [f"--error {report['config']['error']}", f"--seed {report['seed']}"]
    if len(r) < 2:
        words.append(f"--parts {','.join(r)}")
    return " ".join(words)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "diffusion_classifier.json")
    ap.add_argument("--docs", action="store_true", help=f"write the tables into docs/{DOCS_PAGE} and the figure")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=100, help="the shapes grid (full evaluation's pairs)")
    ap.add_argument("--digits-pairs", type=int, default=25)
    ap.add_argument("--error", default="l1", help="l2, l1 or huber")
    ap.add_argument("--stages", default="10,25")
    ap.add_argument("--keep", default="2,1")
    ap.add_argument("--parts", default="shapes,digits")
    ap.add_argument("--seed", type=int, default=0, help="the noise's seed")
    ap.add_argument("--figure", type=Path, default=None, help=f"default: {FIGURE.relative_to(ROOT)} with --docs")
    ap.add_argument("--report", type=Path, default=None, help="write the figure / docs from this JSON, no new run")
    args = ap.parse_args(argv)
    if args.report is not None:
        import json

        return publish(json.loads(args.report.read_text()), args)
    torch.set_num_threads(1)
    silence_diffusers()
    stages = tuple(int(v) for v in args.stages.split(","))
    keep = tuple(int(v) for v in args.keep.split(","))
    full_cfg = ClassifierConfig.full(args.pairs, error=args.error)
    adaptive_cfg = ClassifierConfig(stages=stages, keep=keep, pairs=args.pairs, error=args.error)
    parts = [p.strip() for p in args.parts.split(",")]
    t0 = time.perf_counter()
    results = {}
    if "shapes" in parts:
        results["shapes"] = shapes_part(args, full_cfg, adaptive_cfg)
    if "digits" in parts:
        results["digits"] = digits_part(args, args.error)
    report = {
        "config": describe_config(full_cfg),
        "stages": list(stages),
        "keep": list(keep),
        "seed": args.seed,
        "results": results,
        "minutes": (time.perf_counter() - t0) / 60,
        "platform": f"{platform.machine()}, {platform.system()}",
        "torch": torch.__version__,
    }
    report["command"] = command_of(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, report)
    print(f"wrote {args.json}")
    publish(report, args)


def publish(report: dict, args) -> None:
    """The figure (--figure, or docs/tasks_classifier.png with --docs) and, with --docs, the docs section."""
    fig_path = args.figure or (FIGURE if args.docs else None)
    if fig_path is not None:
        figure(report, fig_path)
        print(f"wrote {fig_path}")
    if args.docs:
        from sampling_speed import write_docs_section

        body = docs_body(report, command_of(report) + " --docs")
        write_docs_section("diffusion_classifier", body, "Measured", page=DOCS_PAGE)
        print(f"wrote docs/{DOCS_PAGE}")


if __name__ == "__main__":
    main()
