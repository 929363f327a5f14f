"""``condiff demo``: the main job. Uses the bundled models to write outputs/demo/index.html with
PNG grids (shapes by attribute, digits 0-9, a guidance sweep) and a metrics table."""

from __future__ import annotations

import html
import time
from pathlib import Path

import torch

from condiff.cli import common
from condiff.core.files import atomic_write_json, atomic_write_text
from condiff.data import shapes as S
from condiff.data.images import grid_image, save_png
from condiff.evaluation.evaluate import evaluate, generate
from condiff.solvers import DPMSolverPP2M

STEPS = 20
PER_ROW = 8


def _rows(model, prompts: list[str], cfg: float, seed: int):
    raw = torch.cat(
        [
            model.family.parse_prompt(p).expand(PER_ROW, -1)
            if model.family.name == "shapes"
            else model.family.parse_prompt(p).expand(PER_ROW)
            for p in prompts
        ]
    )
    g = torch.Generator().manual_seed(seed)
    images, _ = generate(model, raw, DPMSolverPP2M(), STEPS, cfg, g)
    return images, raw


FEW_STEPS = 5


def _few_step_solvers(model, steps: int):
    """(label, solver, analytic skip) rows of the few-step section: the standard multistep solvers, DC-Solver
    with ratios searched here on 10 other starts (about half a minute), and UniPC after the Gaussian skip."""
    from condiff.core.grids import make_grid
    from condiff.guidance import CFG
    from condiff.solvers import DCSolver, get_solver
    from condiff.solvers.analytic import AnalyticSkip
    from condiff.solvers.dc_search import search

    g = torch.Generator().manual_seed(123)
    raw, _ = model.family.random_conditions(10, g)
    grid = make_grid(model.schedule, steps)
    x_T = model.prior((10, *model.family.image_shape), float(grid[0]), g)
    with torch.enable_grad():
        ratios = search(CFG(model.denoiser, 3.0), model.condition(raw), x_T, grid).ratios
    return [
        ("ddim", get_solver("ddim"), None),
        ("dpmpp-2m", get_solver("dpmpp-2m"), None),
        ("unipc", get_solver("unipc"), None),
        ("dc-solver (ratios searched on 10 starts)", DCSolver(ratios), None),
        ("unipc + analytic skip 5%", get_solver("unipc"), AnalyticSkip.parse("5%", "skip")),
    ]


def run_demo(out: Path, n_eval: int = 256, progress: bool = True) -> Path:

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    shapes_m, digits_m = common.load_model("shapes"), common.load_model("digits")
    sections, metrics = [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=7, desc="demo", disable=not progress)

    # 1. shapes by attribute: one row per single-attribute prompt (partial captions)
    prompts = list(S.SHAPES) + list(S.COLORS) + list(S.SIZES) + list(S.POSITIONS)
    imgs, _ = _rows(shapes_m, prompts, 3.0, 0)
    save_png(grid_image(imgs, PER_ROW), out / "shapes_by_attribute.png")
    sections.append(
        (
            "Shapes, one attribute per row (partial captions, cfg 3, dpmpp-2m 20 steps)",
            "shapes_by_attribute.png",
            "rows: " + ", ".join(prompts),
        )
    )
    bar.update()

    # 2. full captions
    full = [
        "large red circle top-left",
        "small blue square center",
        "large green triangle bottom-right",
        "small yellow circle top-right",
        "large magenta square left",
        "small cyan triangle bottom",
    ]
    imgs, _ = _rows(shapes_m, full, 3.0, 1)
    save_png(grid_image(imgs, PER_ROW), out / "shapes_captions.png")
    sections.append(("Shapes, full captions (cfg 3)", "shapes_captions.png", "rows: " + "; ".join(full)))
    bar.update()

    # 3. digits 0-9
    imgs, _ = _rows(digits_m, [str(i) for i in range(10)], 3.0, 2)
    save_png(grid_image(imgs, PER_ROW, scale=6), out / "digits.png")
    sections.append(("Digits 0-9 (cfg 3, dpmpp-2m 20 steps)", "digits.png", "row k is class k"))
    bar.update()

    # 4. guidance sweep on one prompt, with its measured accuracy
    prompt, scales = "small red triangle top-left", [0.0, 1.0, 2.0, 3.0, 5.0, 8.0]
    rows = []
    for w in scales:
        im, _ = _rows(shapes_m, [prompt], w, 3)
        rows.append(im)
    sweep = torch.cat(rows)
    save_png(grid_image(sweep, PER_ROW), out / "guidance_sweep.png")
    from condiff.data import labeller

    attrs = torch.tensor([[S.SHAPES.index("triangle"), S.COLORS.index("red"), 0, 0]])
    sweep_acc = [labeller.accuracy(labeller.label(r), attrs.expand(PER_ROW, -1))["all"] for r in rows]
    sections.append(
        (
            f"Guidance sweep: '{prompt}', rows cfg = {scales}",
            "guidance_sweep.png",
            "fraction with all four attributes right: "
            + ", ".join(f"cfg {w}: {a:.2f}" for w, a in zip(scales, sweep_acc)),
        )
    )
    bar.update()

    # 5. metrics
    for name, m in (("shapes", shapes_m), ("digits", digits_m)):
        for w in (1.0, 3.0):
            res = evaluate(m, DPMSolverPP2M(), STEPS, w, n_eval, seed=0)
            metrics.append({"model": name, "cfg": w, **res})
        bar.update()

    # 6. few-step sampling: 5 NFE with the fast solvers (same prompts, same noise per row)
    few, few_rows, few_names = FEW_STEPS, [], []
    for label, solver, skip in _few_step_solvers(shapes_m, few):
        g = torch.Generator().manual_seed(4)
        raw = torch.cat([shapes_m.family.parse_prompt(p).expand(2, -1) for p in full[:4]])
        im, _ = generate(shapes_m, raw, solver, few, 3.0, g, analytic_skip=skip)
        few_rows.append(im)
        few_names.append(label)
        res = evaluate(shapes_m, solver, few, 3.0, n_eval, seed=0, analytic_skip=skip)
        metrics.append({"model": "shapes", "cfg": 3.0, **res, "solver": label})
    save_png(grid_image(torch.cat(few_rows), PER_ROW), out / "few_steps.png")
    sections.append(
        (
            f"Few-step sampling: {few} NFE, shapes, cfg 3 (one row per solver, same noise)",
            "few_steps.png",
            "rows: " + "; ".join(few_names) + ". Accuracies in the metrics table; "
            "docs/solvers.md compares every solver against diffusers. Why plain DDIM scores highest: 5 steps on "
            "this grid are steps of 0.8 to 4.2 units of lambda (half the log-SNR), too long for the second-order "
            "multistep updates (DPM-Solver++(2M), UniPC), which extrapolate from the previous step's estimate and "
            "overshoot. At 5 NFE they end farther from the exact ODE solution than DDIM (docs/solvers.md, shapes "
            "table: error 0.185 and 0.204 against 0.141) and leave ringing around small objects, which the labeller "
            "reads as a wrong shape (the small blue square comes out round or triangular in their rows). DDIM's "
            "first-order step lands on a smooth, clean object, and attribute accuracy rewards exactly that; "
            "DC-Solver's searched ratios correct the extrapolation. Higher order pays off from about 10 NFE.",
        )
    )
    bar.update()
    bar.close()
    atomic_write_json(out / "metrics.json", metrics)
    total = time.perf_counter() - t_start
    atomic_write_text(out / "index.html", _html(sections, metrics, total, n_eval))
    return out / "index.html"


def _number(value, fmt: str) -> str:
    """A table cell's number, or a dash where the family has no such metric."""
    return "-" if value is None else format(value, fmt)


def _html(sections, metrics, seconds, n_eval) -> str:
    rows = []
    for m in metrics:
        acc = " ".join(f"{k}={v:.3f}" for k, v in m["accuracy"].items())
        q = m.get("quality") or {}
        dist = "".join(
            f"<td>{_number(q.get(k), f)}</td>" for k, f in (("frechet", ".2f"), ("precision", ".3f"), ("recall", ".3f"))
        )
        rows.append(
            f"<tr><td>{m['model']}</td><td>{m['cfg']}</td><td>{m['solver']}</td><td>{m['steps']}</td>"
            f"<td>{m['nfe']}</td><td>{html.escape(acc)}</td>{dist}<td>{m['seconds']:.1f}</td></tr>"
        )
    body = "\n".join(
        f"<h2>{html.escape(t)}</h2><p>{html.escape(c)}</p><img src='{f}' alt='{html.escape(t)}'>"
        for t, f, c in sections
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>condiff demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto;background:#fafafa}}
img{{image-rendering:pixelated;max-width:100%;border:1px solid #ccc}}
table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:4px 8px}}</style></head><body>
<h1>condiff demo</h1><p>Bundled models, sampled with DPM-Solver++(2M), {STEPS} steps (and the fast solvers at
{FEW_STEPS} steps in the last section). Finished in {seconds:.0f} s.</p>
<h2>Metrics ({n_eval} random conditions each; shapes scored by the exact labeller, digits by the scorer)</h2>
<p>Digits also get the Fréchet distance (lower is better) and k-NN precision and recall (Kynkäänniemi et al.
2019, k = 3) against the 450 held-out real digits, in the scorer's hidden features: class accuracy alone
passes noisy digits that the scorer still assigns to the right class.</p>
<table><tr><th>model</th><th>cfg</th><th>solver</th><th>steps</th><th>NFE</th><th>accuracy</th><th>Fréchet</th>
<th>precision</th><th>recall</th><th>seconds</th></tr>
{"".join(rows)}</table>
{body}
<p>Reproduce: <code>make demo</code> (or <code>condiff demo</code>).</p></body></html>
"""
