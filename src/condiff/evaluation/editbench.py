"""The editing benchmark: every editing method on held-out shapes renders, scored by the exact labeller.

For each source render (all four attributes known) there are three edits, each changing one attribute to
a different random value: color, shape and position. An edit succeeds when the labeller reads the target
value of the edited attribute, reads the source values of the other three, and, for color and shape
edits, the object mask has IoU >= 0.8 with the *expected* mask: the target attributes rendered at the
source's exact centre. (For color edits that is the source mask. For shape edits it cannot be the
source mask: a circle and a square of the same extent have IoU pi/4 = 0.785, a triangle and a square
0.5, so no correct shape edit would pass. ``literal_iou`` reports the rate against the source mask too.)
Reconstruction PSNR is the source condition sampled back from each method's inversion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from condiff.core.grids import make_grid
from condiff.data import labeller, shapes, text

KINDS = ("color", "shape", "position")
_COLUMN = {"shape": 0, "color": 1, "size": 2, "position": 3}
HELD_OUT_OFFSET = 1_000_003  # render seeds are offset so they never coincide with a training stream seed


@dataclass(frozen=True)
class EditCases:
    images: torch.Tensor  # (n, 3, 32, 32) source renders
    attrs: torch.Tensor  # (n, 4) source attributes (shape, color, size, position)
    targets: dict  # kind -> (n, 4) target attributes
    expected: dict  # kind -> (n, 32, 32) expected masks

    def captions(self, attrs: torch.Tensor) -> list[str]:
        return [shapes.caption(a) for a in attrs]


def _render(attrs: torch.Tensor, seed: int) -> shapes.ShapesBatch:
    g = torch.Generator().manual_seed(HELD_OUT_OFFSET + seed)
    shapes.random_attrs(attrs.shape[0], g)  # advance the stream as when the sources were drawn
    return shapes.render_batch(attrs, g)


def edit_cases(n: int, seed: int = 0) -> EditCases:
    """n held-out renders and, per kind, a target differing in that attribute only."""
    g = torch.Generator().manual_seed(HELD_OUT_OFFSET + seed)
    attrs = shapes.random_attrs(n, g)
    src = shapes.render_batch(attrs, g)
    pick = torch.Generator().manual_seed(seed)
    targets, expected = {}, {}
    for kind in KINDS:
        col, m = _COLUMN[kind], len(shapes.ATTRIBUTES[kind])
        shift = torch.randint(1, m, (n,), generator=pick)
        tgt = attrs.clone()
        tgt[:, col] = (attrs[:, col] + shift) % m
        targets[kind], expected[kind] = tgt, _render(tgt, seed).masks
    return EditCases(src.images, attrs, targets, expected)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def success(edited: torch.Tensor, cases: EditCases, kind: str) -> dict:
    """Per-sample success of one kind of edit, with the parts it is made of."""
    labels, masks = labeller.label(edited), labeller.masks(edited)
    tgt = cases.targets[kind]
    col = _COLUMN[kind]
    hit = labels[:, col] == tgt[:, col]
    others = torch.ones_like(hit)
    for c in range(4):
        if c != col:
            others &= labels[:, c] == cases.attrs[:, c]
    iou = labeller.iou(masks, cases.expected[kind])
    ok = hit & others & ((iou >= 0.8) if kind in ("color", "shape") else torch.ones_like(hit))
    return {"ok": ok, "hit": hit, "others": others, "iou": iou, "labels": labels, "masks": masks}


def literal_success(res: dict, source_masks: torch.Tensor, kind: str) -> torch.Tensor:
    """The same test with IoU against the source mask (the literal reading of the criterion)."""
    if kind == "position":
        return res["ok"]
    return res["hit"] & res["others"] & (labeller.iou(res["masks"], source_masks) >= 0.8)


def run_method(
    model, method, cases: EditCases, steps: int = 50, batch_size: int = 50, seed: int = 0, progress: bool = True
) -> dict:
    """Invert every source with ``method``, reconstruct it, and run the three edits; rates and timings."""
    grid = make_grid(model.schedule, steps)
    den = model.denoiser
    src_masks = labeller.masks(cases.images)
    n = cases.images.shape[0]
    recon, edits = [], {k: [] for k in KINDS}
    t_inv = t_edit = 0.0
    g = torch.Generator().manual_seed(seed)
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=method.label, leave=False)
    for lo in chunks:
        sl = slice(lo, min(n, lo + batch_size))
        x0 = cases.images[sl]
        cond = model.condition(text.attrs_to_tokens(cases.attrs[sl]))
        t0 = time.perf_counter()
        state = method.invert(den, grid, x0, cond, g)
        t_inv += time.perf_counter() - t0
        with torch.no_grad():
            recon.append(method.reconstruct(den, state, cond, g).clamp(-1, 1))
            for kind in KINDS:
                t0 = time.perf_counter()
                tcond = model.condition(text.attrs_to_tokens(cases.targets[kind][sl]))
                edits[kind].append(method.sample(den, state, tcond, g).clamp(-1, 1))
                t_edit += time.perf_counter() - t0
    recon = torch.cat(recon)
    p = psnr(recon, cases.images)
    out = {
        "method": method.label,
        "options": method.options(),
        "n": n,
        "steps": steps,
        "psnr": float(p.mean()),
        "psnr_median": float(p.median()),
        "seconds": (t_inv + t_edit / len(KINDS)) / n,
        "invert_seconds": t_inv / n,
        "edit_seconds": t_edit / (len(KINDS) * n),
        "edit_success": {},
        "edit_success_literal_iou": {},
        "target_hit": {},
        "others_kept": {},
    }
    images = {"reconstruction": recon}
    for kind in KINDS:
        e = torch.cat(edits[kind])
        images[kind] = e
        r = success(e, cases, kind)
        out["edit_success"][kind] = float(r["ok"].float().mean())
        out["edit_success_literal_iou"][kind] = float(literal_success(r, src_masks, kind).float().mean())
        out["target_hit"][kind] = float(r["hit"].float().mean())
        out["others_kept"][kind] = float(r["others"].float().mean())
    return out, images


def default_methods() -> list:
    """Every editing method at its defaults, SDEdit (the baseline) first, plus edit-friendly with
    plug-and-play feature injection (the best for color edits)."""
    from condiff.inversion.methods import METHODS, EditFriendly, PlugAndPlay, SDEdit

    rest = [METHODS[name]() for name in METHODS if name != "sdedit"]
    return [SDEdit(), *rest, EditFriendly(cfg=3.0, layers=PlugAndPlay.layers, inject=0.5)]


def table(results: list[dict]) -> str:
    """Markdown: one row per method."""
    lines = ["| method | recon. PSNR (dB) | color | shape | position | s / image |", "|---|---|---|---|---|---|"]
    for r in results:
        e = r["edit_success"]
        lines.append(
            f"| {r['method']} | {r['psnr']:.2f} | {e['color']:.3f} | {e['shape']:.3f} | {e['position']:.3f} "
            f"| {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def run_bench(
    model,
    methods: list,
    n: int = 200,
    seed: int = 0,
    steps: int = 50,
    batch_size: int = 50,
    progress: bool = True,
    examples: int = 6,
) -> tuple[dict, dict]:
    """Run every method on the same ``n`` held-out renders. Returns (report, images): report holds
    ``config``, ``results`` (one dict per method: method, options, psnr, edit_success, seconds, ...) and the
    markdown ``table``; images maps each method name to its first ``examples`` reconstructions and edits
    (for figures) and 'source' to the sources."""
    cases = edit_cases(n, seed)
    results, images = (
        [],
        {"source": cases.images[:examples], "targets": {k: cases.captions(cases.targets[k][:examples]) for k in KINDS}},
    )
    for method in methods:
        out, imgs = run_method(model, method, cases, steps, batch_size, seed, progress)
        results.append(out)
        images[method.label] = {k: v[:examples] for k, v in imgs.items()}
    config = {
        "n": n,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "held_out_offset": HELD_OUT_OFFSET,
        "methods": [m.label for m in methods],
    }
    return {"config": config, "results": results, "table": table(results)}, images
