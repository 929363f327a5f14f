"""DiT-MoE against a dense DiT on shapes, measured: the labeller's per-attribute and ``all`` accuracy of samples from
shapes-dit-moe (8 SwiGLU experts of 4d, top-2 gates without renormalisation, 2 shared experts as one SwiGLU of 2d)
and shapes-dit-dense (one SwiGLU of 10d: the same active parameters and training compute per token: same steps,
batch, data and schedule), at fixed seeds; and where the MoE's tokens go: the share of the top-K assignments each
expert takes, per layer and sampling step (one heat map per layer, and the overall share per layer).

    OMP_NUM_THREADS=1 python benchmarks/dit_moe.py [--json F] [--plot P] [--n 256] [--steps 20] [--cfg 3]

The models are read from runs/shapes-dit-moe/model and runs/shapes-dit-dense/model (`condiff train shapes-dit-moe
--out runs/shapes-dit-moe`, and the same for shapes-dit-dense). Both models sample the same --n random captions
(generator seeded --seed, default 0) with DPM-Solver++(2M) in --steps steps under CFG --cfg; the MoE's expert
counts come from forward hooks that draw no random numbers, so they change no sample. --plot writes the usage
figure (a PNG: one row of panels per MoE layer), one PNG per layer beside it (<stem>_layerN.png) and the first
8 samples of each model under their captions (<stem>_samples.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from condiff.core.files import atomic_write_json  # noqa: E402
from condiff.data.images import labelled_grid, save_png  # noqa: E402
from condiff.evaluation.evaluate import generate_counted  # noqa: E402
from condiff.models.dit_moe import active_parameters, load_dit_model  # noqa: E402
from condiff.solvers import DPMSolverPP2M  # noqa: E402

NAMES = ("shapes-dit-moe", "shapes-dit-dense")
CMD = "OMP_NUM_THREADS=1 python benchmarks/dit_moe.py"
SHOWN = 8  # samples per model in the samples figure


class UsageCounter:
    """Forward hooks on every SparseMoE layer of a DiT-MoE: the assignments per expert of each network call
    (rows: calls in order, so with one sampling batch, call k is solver step k)."""

    def __init__(self, net):
        self.layers = net.moe_layers()
        self.counts = [[] for _ in self.layers]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i):
        def hook(module, args, output):
            self.counts[i].append(module.last_counts.clone())

        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def table(self) -> torch.Tensor:
        """(layers, calls, experts) shares of the assignments."""
        c = torch.stack([torch.stack(rows) for rows in self.counts]).double()
        return c / c.sum(-1, keepdim=True)


def measure(args) -> dict:
    torch.set_num_threads(1)
    out = {"n": args.n, "steps": args.steps, "cfg": args.cfg, "seed": args.seed, "solver": "DPM-Solver++(2M)"}
    out["models"], usage, shown, captions = {}, None, [], []
    for name in NAMES:
        path = args.runs / name / "model"
        if not (path / "condiff.json").is_file():
            out.setdefault("missing", []).append(name)
            continue
        m = load_dit_model(path)
        net = m.module["unet"]
        counter = UsageCounter(net) if net.moe_layers() else None
        t0 = time.perf_counter()
        # as condiff.evaluation.evaluate draws them: the conditions, then the samples, from one generator
        g = torch.Generator().manual_seed(args.seed)
        raw, targets = m.family.random_conditions(args.n, g)
        images, _, _ = generate_counted(m, raw, DPMSolverPP2M(), args.steps, args.cfg, g, batch_size=args.n)
        secs = time.perf_counter() - t0
        shown.append(images[:SHOWN])
        captions = m.family.captions(raw[:SHOWN])
        row = {
            "accuracy": m.family.score(images, targets),
            "parameters": active_parameters(m.model_cfg),
            "trained_steps": m.info.get("trained_steps"),
            "train_minutes": m.info.get("train_minutes"),
            "batch_size": (m.info.get("recipe") or {}).get("train", {}).get("batch_size"),
            "sample_seconds": secs,
            "model": m.model_cfg,
        }
        if counter is not None:
            counter.close()
            row["train_vs_inference_max_abs"] = paths_gap(m, args.seed)
            usage = counter.table()  # (layers, calls, experts)
            share = usage.mean(1)
            row["expert_share"] = share.tolist()  # per layer: the share of the assignments per expert
            row["expert_share_min_max"] = [[float(s.min()), float(s.max())] for s in share]
            row["experts_unused"] = [int((s == 0).sum()) for s in share]
            row["expert_share_per_call"] = usage.tolist()  # (layers, network calls = solver steps, experts)
        out["models"][name] = row
    if usage is not None and args.plot is not None:
        out["plots"] = plot(usage, args.plot)
    if shown and args.plot is not None:
        path = args.plot.with_name(f"{args.plot.stem}_samples{args.plot.suffix}")
        names = [n for n in NAMES if n in out["models"]]
        save_png(
            labelled_grid(
                torch.cat(shown), names, [c.removeprefix("a ").removeprefix("an ") for c in captions], scale=3
            ),
            path,
        )
        out.setdefault("plots", []).append(str(path))
    return out


def paths_gap(m, seed: int) -> float:
    """The largest |difference| between the network's training path (repeat-interleave, grad enabled) and its
    inference path (sorted scatter-add) on 16 noisy training renders at random times."""
    g = torch.Generator().manual_seed(seed)
    x0, raw = m.family.training_batch(0, 16, g, seed, _objective())
    t = torch.randint(0, 1000, (16,), generator=g).float()
    x = x0 + torch.randn(x0.shape, generator=g)
    net = m.module["unet"]
    cond = net.embed_caption(raw).detach()
    net.train()
    a = net(x, t, cond).detach()
    net.eval()
    with torch.no_grad():
        b = net(x, t, cond)
    return float((a - b).abs().max())


def _objective():
    from condiff.training.recipe import ObjectiveConfig

    return ObjectiveConfig()


def plot(usage: torch.Tensor, path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, calls, experts = usage.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []

    def panel(ax_map, ax_bar, i):
        im = ax_map.imshow(usage[i].T.numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0)
        ax_map.set_xlabel("sampling step (t from 1 to 0)")
        ax_map.set_ylabel("expert")
        ax_map.set_title(f"layer {i}: share of the top-K assignments")
        plt.colorbar(im, ax=ax_map)
        share = usage[i].mean(0).numpy()
        ax_bar.bar(range(experts), share)
        ax_bar.axhline(1 / experts, color="k", lw=0.8, ls="--", label="uniform")
        ax_bar.set_xlabel("expert")
        ax_bar.set_ylabel("share over all steps")
        ax_bar.legend(fontsize=7)

    fig, axes = plt.subplots(layers, 2, figsize=(9, 2.4 * layers), squeeze=False)
    for i in range(layers):
        panel(axes[i, 0], axes[i, 1], i)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(str(path))
    for i in range(layers):
        fig, axes = plt.subplots(1, 2, figsize=(9, 2.6), squeeze=False)
        panel(axes[0, 0], axes[0, 1], i)
        fig.tight_layout()
        p = path.with_name(f"{path.stem}_layer{i}{path.suffix}")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        written.append(str(p))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "dit_moe" / "dit_moe.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "outputs" / "dit_moe" / "dit_moe_usage.png")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        ap.error(f"--n and --steps must be positive, got {args.n} and {args.steps}")
    t0 = time.perf_counter()
    out = measure(args)
    out["seconds"] = time.perf_counter() - t0
    out["command"] = CMD
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, json.loads(json.dumps(out, default=str)))
    for name, row in out["models"].items():
        acc = row["accuracy"]
        print(
            f"{name}: all {acc['all']:.3f}  shape {acc['shape']:.3f}  color {acc['color']:.3f}  size {acc['size']:.3f}"
            f"  position {acc['position']:.3f}  active params {row['parameters']['active']}"
            f"  train {row['train_minutes']} min"
        )
    if out.get("missing"):
        print(f"missing models: {', '.join(out['missing'])}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
