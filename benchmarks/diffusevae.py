"""DiffuseVAE on shapes, measured (``condiff.tasks.diffusevae``; Pandey et al., TMLR 2022, Formulation 1): the
Fréchet distance of samples from the VAE alone (x_hat = Dec(z), z ~ N(0, I)) and from DiffuseVAE (the same z, x_hat
refined by the conditional DDPM), and the smoothness of straight paths in the VAE's latent between pairs of real
images, read by the exact labeller.

    OMP_NUM_THREADS=1 python benchmarks/diffusevae.py [--json F] [--n 1000] [--reference] [--guidance W]

--guidance is the refiner's classifier-free guidance weight against the null condition it trained on (x_hat = 0
with model.cond_drop, z's shape code zeroed with model.code_drop; default: the model's own; a weight other than 1
needs one of them > 0).

The model is read from runs/diffusevae/model (`condiff train diffusevae-vae --out runs/diffusevae-vae`, then
`condiff train diffusevae --out runs/diffusevae`); its folder holds the frozen VAE, so both rows use the same VAE.

Fréchet distance: ``condiff.evaluation.metrics.frechet_distance`` on the penultimate features (64-d) of the bundled
shapes classifier trained on clean renders (``load_classifier("clean")``, ``classifier_features``), of --n samples
(z from seed 0, the refiner's noise from seed 1) against --n held-out renders (the generator seeded 2**41 + 1,
apart from every training batch). The floor is the same distance between two independent sets of --n real renders
(seeds 2**41 + 1 and 2**41 + 2). --reference adds the bundled unconditional shapes model (the null caption, no
guidance, 20 DPM-Solver++(2M) steps). The rows "vae" and "diffusevae" draw z from the model's own prior (the fitted
mixture of the shipped recipe), "vae_normal" and "diffusevae_normal" from N(0, I). Condition-following: the labeller's
agreement between each x_hat and its refined sample, against the chance level (x_hat against another row's refined
sample), and "reconstructions": the refiner on the VAE's reconstructions of --n held-out renders (seed 2**41 + 4),
the labeller's accuracy against the true attributes before and after refining. "object" is the share of samples in
which the labeller finds an object,
"one_object" the share in which that object (its largest bright component) holds >= 95% of the bright pixels.

Interpolation: --pairs pairs of held-out renders (seed 2**41 + --pairs-seed, default 3), their latent means joined
by --frames points (ends included); every frame of a row is decoded (VAE) and refined with one shared noise per row
(DiffuseVAE). Per path, the labeller's attribute changes between consecutive frames against the minimum (the
attributes whose end labels differ): a path with changes == minimum flips each attribute at most once; and the
reversals, the changes that return an attribute to a value it left earlier on the path (0: monotone; passing through
an intermediate value, as a position does from top-left to bottom-right, is not one). The frames of a path sit
between pixels, where the labeller's area rule misreads small circles as triangles (``condiff.data.labeller``), so
the paths are also read with the shape column from ``labeller.fitted_shapes`` (template fitting, exact on objects
between pixels): the "fitted" entry. Paired on the same paths ("paired_fitted", ``paired_smoothness``): DiffuseVAE's
reversals per path minus the VAE's (fitted reading) with its standard error, and McNemar's exact test on the
monotone shares. The check "no_added_reversals" holds when refining adds no reversals beyond two standard errors:
difference <= 2 SE (for diffusevae-spatial-code it holds on the default pairs and on a second set, --pairs-seed 50;
for diffusevae-spatial, without the code's guidance, only on the default pairs). The picture (--png) has, for the
first --shown pairs, the VAE's row above DiffuseVAE's row.
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
from condiff.data import labeller, shapes  # noqa: E402
from condiff.data.images import labelled_grid, save_png  # noqa: E402
from condiff.evaluation.metrics import classifier_features, frechet_distance  # noqa: E402
from condiff.models.dense import EVAL_SEED_OFFSET  # noqa: E402
from condiff.models.diffusevae import find_model, load_diffusevae_model  # noqa: E402
from condiff.tasks.diffusevae import (  # noqa: E402
    MEASURES,
    excess_variation,
    object_measures,
    paired_smoothness,
    path_changes,
    smoothness,
)

CMD = "OMP_NUM_THREADS=1 python benchmarks/diffusevae.py --reference"


def real(n: int, k: int) -> torch.Tensor:
    return shapes.sample_batch(n, torch.Generator().manual_seed(EVAL_SEED_OFFSET + k)).images


def one_object(images: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the labeller's object (the largest 4-connected bright component) holds >= 95% of the bright
    pixels, i.e. the image shows one object and no second blob or speckle."""
    bright = (images.max(1).values > 0).flatten(1).sum(1)
    largest = labeller.masks(images).flatten(1).sum(1)
    return (bright > 0) & (largest >= 0.95 * bright)


def classifier_labels(images: torch.Tensor, net) -> torch.Tensor:
    """(B, 4) the bundled clean classifier's reading (argmax of each head), in the labeller's attribute order."""
    with torch.no_grad():
        logits = net(images)
    return torch.stack([net.head(logits, name).argmax(1) for name in shapes.ATTRIBUTES], 1)


def variation(paths: torch.Tensor) -> dict:
    """Per measure of ``object_measures``, over paths (P, frames, 3, H, W): the mean excess variation (0 for a path
    whose measure moves monotonically from its first value to its last) and the mean net change, for scale."""
    p, f = paths.shape[:2]
    m = object_measures(paths.flatten(0, 1)).view(p, f, -1)
    excess = torch.stack([excess_variation(v) for v in m])  # (P, M)
    net = (m[:, -1] - m[:, 0]).abs()
    out = {}
    for j, name in enumerate(MEASURES):
        out[name] = {"excess": float(excess[:, j].nanmean()), "net_change": float(net[:, j].nanmean())}
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of rows where the labeller reads every attribute of a[i] and b[i] the same."""
    return float((labeller.label(a) == labeller.label(b)).all(1).float().mean())


def following(x_hat: torch.Tensor, x: torch.Tensor) -> dict:
    """Condition-following: the labeller's agreement between each x_hat and its refined x, against the chance level
    of a refiner that ignores x_hat (x_hat against the refined sample of the next row)."""
    return {"agreement": agreement(x_hat, x), "agreement_chance": agreement(x_hat, x.roll(1, 0))}


def scores(images: torch.Tensor, real_feats: torch.Tensor, net) -> dict:
    feats = classifier_features(images, net)
    return {
        "fd": frechet_distance(feats, real_feats),
        "object": float((labeller.label(images)[:, 0] >= 0).float().mean()),
        "one_object": float(one_object(images).float().mean()),
    }


def reference_samples(n: int, steps: int, seed: int) -> torch.Tensor:
    """The bundled shapes model's unconditional samples (null caption, guidance scale 1)."""
    from condiff.core.grids import make_grid
    from condiff.core.sampling import initial_noise, sample
    from condiff.models.base import load_model, silence_diffusers
    from condiff.solvers import DPMSolverPP2M

    silence_diffusers()
    m = load_model("shapes")
    grid = make_grid(m.schedule, steps)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, n, 250):
        k = min(250, n - i)
        x = initial_noise(m.schedule, float(grid[0]), (k, *m.family.image_shape), g)
        with torch.no_grad():
            cond = m.family.encode(m.module, m.family.null_raw(k))
            outs.append(sample(m.denoiser, DPMSolverPP2M(), grid, x, cond).x.clamp(-1, 1))
    return torch.cat(outs)


def measure(args) -> dict:
    from condiff.models.classifiers import load_classifier

    torch.set_num_threads(args.threads)
    folder = find_model(args.model)
    m = load_diffusevae_model(folder)
    net = load_classifier("clean")
    w = m.guidance if args.guidance is None else args.guidance
    out = {
        "n": args.n,
        "steps": args.steps,
        "guidance": w,
        "threads": torch.get_num_threads(),
        "model": str(folder),
        "trained_steps": m.info.get("trained_steps"),
        "train_minutes": m.info.get("train_minutes"),
        "features": "penultimate features (64-d) of the bundled clean shapes classifier",
    }
    real_feats = classifier_features(real(args.n, 1), net)
    out["floor_real_vs_real"] = {"fd": frechet_distance(classifier_features(real(args.n, 2), net), real_feats)}
    out["prior"] = m.prior
    for prior, suffix in ((m.prior, ""), ("normal", "_normal")):
        if suffix and m.prior == "normal":
            continue
        t0 = time.perf_counter()
        x_hat, _, _ = m.sample(args.n, 0, args.steps, refine=False, prior=prior)
        out["vae" + suffix] = {**scores(x_hat, real_feats, net), "seconds": time.perf_counter() - t0, "nfe": 0}
        t0 = time.perf_counter()
        x_hat2, x, nfe = m.sample(args.n, 0, args.steps, prior=prior, guidance=w)
        assert torch.equal(x_hat, x_hat2)  # the same z
        out["diffusevae" + suffix] = {
            **scores(x, real_feats, net),
            **following(x_hat, x),
            "seconds": time.perf_counter() - t0,
            "nfe": nfe,
        }
        if not suffix:
            x_hat_model, x_model = x_hat, x
    x_hat, x = x_hat_model, x_model
    # the refiner on reconstructions of held-out renders: does it keep the attributes the VAE kept?
    held = shapes.sample_batch(args.n, torch.Generator().manual_seed(EVAL_SEED_OFFSET + 4))
    z_rec = m.encode_mean(held.images)
    rec = m.vae.decode(z_rec).clamp(-1, 1)
    noise = torch.randn(held.images.shape, generator=torch.Generator().manual_seed(1))
    refined, _ = m.refine(rec, noise, args.steps, z_rec, w)
    out["reconstructions"] = {
        "vae_accuracy": labeller.accuracy(labeller.label(rec), held.attrs)["all"],
        "diffusevae_accuracy": labeller.accuracy(labeller.label(refined), held.attrs)["all"],
        "vae_fd": frechet_distance(classifier_features(rec, net), real_feats),
        "diffusevae_fd": frechet_distance(classifier_features(refined, net), real_feats),
        **following(rec, refined),
    }
    if args.reference:
        t0 = time.perf_counter()
        ref = reference_samples(args.n, args.steps, 0)
        out["shapes_unconditional"] = {**scores(ref, real_feats, net), "seconds": time.perf_counter() - t0}
    out["accept_fd"] = out["diffusevae"]["fd"] < out["vae"]["fd"]

    # interpolation
    pairs = real(2 * args.pairs, args.pairs_seed)
    a, b = pairs[: args.pairs], pairs[args.pairs :]
    t0 = time.perf_counter()
    chunks = [  # 64 pairs at a time; row i's refiner noise comes from seed i either way
        m.interpolate(a[s : s + 64], b[s : s + 64], args.frames, s, args.steps, guidance=w)[:2]
        for s in range(0, args.pairs, 64)
    ]
    xh, xr = (torch.cat([c[k] for c in chunks]) for k in (0, 1))
    out["interpolation_seconds"] = time.perf_counter() - t0
    shape = (args.pairs, args.frames, 3, shapes.SIZE, shapes.SIZE)
    interp, fitted_paths = {}, {}
    for name, imgs in (("vae", xh.clamp(-1, 1)), ("diffusevae", xr)):
        labels = labeller.label(imgs).view(args.pairs, args.frames, -1)
        read = classifier_labels(imgs, net).view(args.pairs, args.frames, -1)
        fitted = labeller.label_fitted(imgs).view(args.pairs, args.frames, -1)
        fitted_paths[name] = list(fitted)
        interp[name] = {
            **smoothness(list(labels)),
            "fitted": smoothness(fitted_paths[name]),
            "classifier": smoothness(list(read)),
            "measures": variation(imgs.view(args.pairs, args.frames, *imgs.shape[1:])),
            "object": float((labels[..., 0] >= 0).float().mean()),
            "one_object": float(one_object(imgs).float().mean()),
            "paths": [{"changes_minimum": list(path_changes(p)), "labels": p.tolist()} for p in labels],
        }
    paired = paired_smoothness(fitted_paths["vae"], fitted_paths["diffusevae"])
    out["interpolation"] = {"pairs": args.pairs, "frames": args.frames, **interp, "paired_fitted": paired}
    out["no_added_reversals"] = paired["reversals_difference"] <= 2 * paired["reversals_difference_se"]
    shown = min(args.shown, args.pairs)
    tiles = torch.stack([xh.clamp(-1, 1).view(shape)[:shown], xr.view(shape)[:shown]], 1).flatten(0, 2)
    rows = [f"{k} {i + 1}" for i in range(shown) for k in ("VAE", "DiffuseVAE")]
    cols = [f"{j / (args.frames - 1):.2f}" for j in range(args.frames)]
    args.png.parent.mkdir(parents=True, exist_ok=True)
    save_png(labelled_grid(tiles, rows, cols), args.png)
    k = min(8, args.n)
    samples = torch.cat([x_hat[:k], x[:k]])
    save_png(labelled_grid(samples, ["VAE", "DiffuseVAE"], [f"z{i}" for i in range(k)]), args.samples_png)
    out["pictures"] = [str(args.png), str(args.samples_png)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "diffusevae")
    ap.add_argument("--json", type=Path, default=ROOT / "outputs" / "diffusevae" / "diffusevae.json")
    ap.add_argument("--png", type=Path, default=ROOT / "outputs" / "diffusevae" / "interpolation.png")
    ap.add_argument("--samples-png", type=Path, default=ROOT / "outputs" / "diffusevae" / "samples.png")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None, help="the refiner's guidance weight (default: the model's)")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument(
        "--pairs-seed", type=int, default=3, help="the pairs' renders come from seed 2**41 + this (50: a second set)"
    )
    ap.add_argument("--shown", type=int, default=8, help="pairs drawn in the interpolation picture (the first ones)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--reference", action="store_true", help="add the bundled unconditional shapes model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, json.loads(json.dumps(out)))
    keys = ("floor_real_vs_real", "vae", "diffusevae", "vae_normal", "diffusevae_normal", "shapes_unconditional")
    for k in (*keys, "reconstructions"):
        if k in out:
            print(f"{k:22s} " + "  ".join(f"{a} {v:.4g}" for a, v in out[k].items()))
    for k in ("vae", "diffusevae"):
        s = out["interpolation"][k]
        print(
            f"interpolation {k:10s} changes {s['changes']:.2f} minimum {s['minimum']:.2f} excess {s['excess']:.2f} "
            f"minimal {s['minimal_share']:.0%} reversals {s['reversals']:.2f} monotone {s['monotone_share']:.0%} "
            f"object {s['object']:.0%} one object {s['one_object']:.0%}"
        )
        for reader, c in (("the labeller, shape fitted", s["fitted"]), ("the clean classifier", s["classifier"])):
            print(f"  read by {reader}: reversals {c['reversals']:.2f} monotone {c['monotone_share']:.0%}")
        print(
            "  excess variation (net change): "
            + ", ".join(f"{k} {v['excess']:.3f} ({v['net_change']:.2f})" for k, v in s["measures"].items())
        )
    p = out["interpolation"]["paired_fitted"]
    print(
        f"paired, shape fitted ({p['paths']} paths): DiffuseVAE - VAE reversals per path "
        f"{p['reversals_difference']:+.3f} +- {p['reversals_difference_se']:.3f} (SE); monotone in the VAE's reading "
        f"only {p['monotone_base_only']}, in DiffuseVAE's only {p['monotone_other_only']} (McNemar exact p "
        f"{p['mcnemar_p']:.3g})"
    )
    print(
        f"accept (DiffuseVAE FD < VAE FD): {out['accept_fd']}; refining adds no reversals beyond 2 SE: "
        f"{out['no_added_reversals']}; wrote {args.json}, {args.png}, {args.samples_png}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
