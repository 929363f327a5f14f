"""``condiff guidance``: fit LinearAG's coefficients for a model (Castillo et al., AAAI 2025, arXiv 2312.12487,
"Adaptive Guidance"; condiff.guidance.linear_ag).

``condiff guidance fit-linear-ag --model shapes --cfg 3 --steps 20 --out coeffs.safetensors`` draws ``--n``
random conditions and start points as ``condiff eval`` draws them (one generator seeded with ``--seed``:
conditions first, then the start points of all rows, then any solver noise), records their CFG trajectories
with ``--solver`` on the ``--steps`` grid and fits the per-evaluation least-squares coefficients
(``fit_linear_ag``). The file is read back by ``load_linear_ag``. With ``--holdout M`` another M trajectories
(drawn after the fitting ones from the same generator) are recorded and the teacher-forced R^2 of the fitted
coefficients on them is reported (``predict_record``).

``condiff guidance train-ppap --classifier DIR --model shapes --experts 5 --out DIR`` trains PPAP's experts (Go
et al., CVPR 2023; condiff.guidance.ppap): ``--images`` unlabelled images sampled from the model with the empty
prompt (``--solver``, ``--gen-steps``), then N LoRA copies of the clean classifier, each distilled on its
interval of t (teacher: the clean classifier on x0; student: the expert on x_t), saved by ``save_ppap`` and read
back by ``load_ppap``. The last ``--holdout`` images are kept out of training to report each expert's KD loss
against the clean classifier's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.core.denoiser import Wrapper
from condiff.errors import ConfigError

app = typer.Typer(
    help="Guidance helpers: fit LinearAG coefficients (Castillo et al. 2025).",
    no_args_is_help=True,
    add_completion=False,
)


@dataclass
class _Progress(Wrapper):
    """Forwards every call to ``denoiser`` unchanged and ticks a progress bar (one tick per evaluation)."""

    denoiser: Any
    bar: Any

    def __call__(self, x, t, cond=None):
        out = self.denoiser(x, t, cond)
        self.bar.update(1)
        return out


def _summary(r2) -> str:
    """'min A, median B, first half mean C' of a per-evaluation R^2 vector."""
    import torch

    half = r2[: max(1, r2.numel() // 2)]
    return f"min {float(r2.min()):.4f}, median {float(torch.median(r2)):.4f}, first-half mean {float(half.mean()):.4f}"


def draw_starts(model, n: int, grid, generator):
    """(condition mapping, start points [n, ...]) drawn as ``condiff eval`` draws them: conditions first, then
    the start points from the model's prior at the first grid time."""
    raw, _ = model.family.random_conditions(n, generator)
    cond = model.condition(raw)
    x = model.prior((n, *model.family.image_shape), float(grid[0]), generator)
    return cond, x


@app.command("fit-linear-ag")
def fit_linear_ag_cmd(
    model: str = typer.Option(..., help="bundled model name (shapes, digits) or a model directory"),
    cfg: float = typer.Option(..., help="the CFG scale the coefficients are fitted for (LinearAG uses it)"),
    steps: int = typer.Option(..., help="number of solver steps of the grid the coefficients belong to"),
    out: Path = typer.Option(..., help="output coefficient file (.safetensors)"),
    n: int = typer.Option(256, help="CFG trajectories to fit on"),
    seed: int = typer.Option(0, help="random seed (conditions, start points, solver noise)"),
    solver: str = typer.Option("dpmpp-2m", help="solver name (see `condiff solvers`)"),
    spacing: Optional[str] = typer.Option(
        None,
        help="time grid: uniform-t, uniform-logsnr, karras, trailing (default: the solver's own, else uniform-t)",
    ),
    batch_size: int = typer.Option(256, help="trajectories recorded at once (bounds memory)"),
    holdout: int = typer.Option(
        0,
        help="also record this many held-out trajectories and report the "
        "teacher-forced R^2 on them (0: report the in-sample R^2 only)",
    ),
    threads: ThreadsOpt = None,
):
    """Record CFG trajectories of a model and fit LinearAG's per-evaluation coefficients to a safetensors file."""
    import torch
    from tqdm.auto import tqdm

    from condiff.core.denoiser import take_rows
    from condiff.core.fitted import weights_digest
    from condiff.core.grids import make_grid
    from condiff.core.sampling import Gaussian
    from condiff.guidance.linear_ag import CFGRecord, fit_linear_ag, predict_record, record_cfg, save_linear_ag

    common.check_common(steps, cfg, n, batch_size, seed)
    if not 0 <= holdout <= common.MAX_SAMPLES:
        raise ConfigError(f"--holdout must be an integer in [0, {common.MAX_SAMPLES}], got {holdout}")
    sol = common.make_solver(solver)
    common.note_fallback(sol)
    from condiff.core.grids import SAMPLING_SPACINGS

    spacing_name, spc = common.spacing_of(spacing, sol, SAMPLING_SPACINGS)
    common.check_out(out, "--out", ".safetensors")
    common.family_of(model)
    common.use_threads(threads)
    m = common.load_model(model)

    t0 = time.perf_counter()
    grid = make_grid(m.schedule, steps, spc)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(desc="fit-linear-ag (evaluations)", unit="eval", leave=False)
    try:
        den = _Progress(m.denoiser, bar)
        with torch.no_grad():
            cond, x = draw_starts(m, n, grid, g)
            coeffs = fit_linear_ag(
                den,
                sol,
                grid,
                x,
                cond,
                cfg,
                noise=Gaussian(g),
                batch_size=batch_size,
                model=model,
                weights=weights_digest(m.module),
                spacing=spacing_name,
            )
            held = None
            if holdout:
                hcond, hx = draw_starts(m, holdout, grid, g)
                records = []
                for index in torch.split(torch.arange(holdout), batch_size):
                    sub = take_rows(hcond, index, holdout)
                    records.append(record_cfg(den, sol, grid, hx[index], sub, cfg, noise=Gaussian(g))[1])
                held = predict_record(coeffs, CFGRecord.cat(records))[1]
    finally:
        bar.close()
    save_linear_ag(coeffs, out)
    seconds = time.perf_counter() - t0
    line = (
        f"fitted {coeffs.steps} evaluations ({solver}, {steps} steps, {spacing_name}, cfg {cfg:g}) on {n} "
        f"trajectories; in-sample R^2 {_summary(coeffs.r2)}"
    )
    if held is not None:
        line += f"; held-out ({holdout}) teacher-forced R^2 {_summary(held)}"
    typer.echo(f"{line}; wrote {out} in {seconds:.1f}s")


@app.command("train-ppap")
def train_ppap_cmd(
    classifier: str = typer.Option(
        ...,
        help="the clean (off-the-shelf) classifier: 'clean' (bundled) or a model "
        "directory from `condiff train shapes-clean-classifier`",
    ),
    model: str = typer.Option(
        ...,
        help="the diffusion model whose empty-prompt samples are the unlabelled data "
        "(bundled name or directory); its schedule defines t",
    ),
    out: Path = typer.Option(..., help="output directory for the experts (LoRA weights + ppap.json)"),
    experts: int = typer.Option(5, help="number of experts N: equal intervals of the model's noisy t range"),
    images: int = typer.Option(3072, help="unlabelled images to generate"),
    gen_steps: int = typer.Option(20, help="solver steps per generated image"),
    solver: str = typer.Option("dpmpp-2m", help="solver for the generation (see `condiff solvers`)"),
    rank: int = typer.Option(16, help="LoRA rank r of every conv / linear layer (PPAP: 16)"),
    alpha: float = typer.Option(8.0, help="LoRA alpha (the update is scaled by alpha / r; PPAP: 8)"),
    steps: int = typer.Option(800, help="distillation (AdamW) steps per expert"),
    batch_size: int = typer.Option(64, help="images per distillation step (and per generation batch x4)"),
    lr: float = typer.Option(3e-3, help="AdamW learning rate (cosine-annealed to 0)"),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay"),
    temperature: float = typer.Option(0.25, help="the teacher's softmax temperature T_kd"),
    holdout: int = typer.Option(256, help="generated images kept out of training to report the KD loss on"),
    seed: int = typer.Option(0, help="random seed (generation, then distillation)"),
    threads: ThreadsOpt = None,
):
    """PPAP (Go et al., CVPR 2023): distil N LoRA experts of a clean classifier on images the model generates."""
    import math

    import torch
    from tqdm.auto import tqdm

    from condiff.core.fitted import weights_digest
    from condiff.core.grids import make_grid
    from condiff.core.sampling import Gaussian, sample
    from condiff.guidance.ppap import save_ppap
    from condiff.models.classifiers import load_classifier
    from condiff.training.ppap import distill_experts

    common.check_common(gen_steps, 1.0, images, batch_size, seed)
    for name, value, lo, hi in (
        ("--experts", experts, 1, 1000),
        ("--rank", rank, 1, 4096),
        ("--steps", steps, 1, common.MAX_SAMPLES),
        ("--holdout", holdout, 0, images - 1),
    ):
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value}")
    for name, value in (("--alpha", alpha), ("--lr", lr), ("--temperature", temperature)):
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive finite number, got {value}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {weight_decay}")
    sol = common.make_solver(solver)
    common.note_fallback(sol)
    common.check_out(out, "--out", kind="dir")
    common.family_of(model)
    threads = common.use_threads(threads)
    net = load_classifier(classifier)
    if net.config.noise_aware:
        raise ConfigError(
            "--classifier is noise-aware; PPAP adapts an off-the-shelf clean classifier "
            "(`condiff train shapes-clean-classifier`)"
        )
    for p in net.parameters():
        p.requires_grad_(False)
    m = common.load_model(model)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    if tuple(m.family.image_shape) != shape:
        raise ConfigError(
            f"the classifier reads {shape} images but model {model!r} makes {tuple(m.family.image_shape)}"
        )

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    grid = make_grid(m.schedule, gen_steps)
    gen_batch = 4 * batch_size
    chunks = [len(c) for c in torch.split(torch.arange(images), gen_batch)]
    made = []
    bar = tqdm(total=len(chunks) * gen_steps, desc="train-ppap: generating", unit="step", leave=False)
    try:
        with torch.no_grad():
            for size in chunks:
                cond = m.condition(m.family.null_raw(size))
                cond.pop("null", None)
                x = m.prior((size, *m.family.image_shape), float(grid[0]), g)
                res = sample(m.denoiser, sol, grid, x, cond, Gaussian(g), callbacks=[lambda info: bar.update(1)])
                made.append(res.x.clamp(-1, 1).float())
    finally:
        bar.close()
    data = torch.cat(made)
    gen_seconds = time.perf_counter() - t0
    train, held = data[: images - holdout], data[images - holdout :]
    bar = tqdm(total=experts * steps, desc="train-ppap: distilling", unit="step", leave=False)

    def tick(k, step, loss):
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(expert=k, loss=f"{loss:.4f}")

    try:
        multi, _, report = distill_experts(
            net,
            train,
            m.schedule,
            experts,
            None,
            rank,
            alpha,
            steps,
            batch_size,
            lr,
            weight_decay,
            temperature,
            None,
            g,
            tick,
            held if holdout else None,
            seed,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    info = {
        "classifier": classifier,
        "model": model,
        "model_weights": weights_digest(m.module),
        "images": images,
        "holdout": holdout,
        "gen_steps": gen_steps,
        "solver": solver,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "temperature": temperature,
        "seed": seed,
        "threads": threads,
        "seconds": {"generate": round(gen_seconds, 1), "total": round(seconds, 1)},
        "experts": report,
    }
    save_ppap(multi, out, net, info=info)
    for r in report:
        extra = (
            f", held-out KD {r['heldout_kd_clean']:.4f} (clean classifier) -> {r['heldout_kd_expert']:.4f}"
            if holdout
            else ""
        )
        typer.echo(
            f"expert {r['expert']} t in [{r['interval'][0]:.1f}, {r['interval'][1]:.1f}): train loss "
            f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}{extra}"
        )
    typer.echo(
        f"trained {experts} PPAP experts (LoRA rank {rank}) on {images - holdout} generated images in "
        f"{seconds:.1f}s (generation {gen_seconds:.1f}s); wrote {out}"
    )


@app.command("fit-minority")
def fit_minority_cmd(
    model: str = typer.Option(
        ...,
        help="the diffusion model (bundled name or directory); its empty prompt is the "
        "unconditional denoiser that scores the data, and its schedule defines t",
    ),
    out: Path = typer.Option(
        ..., help="output directory (classifier/ safetensors + minority.json + scores.safetensors)"
    ),
    n: int = typer.Option(
        8192,
        help="training renders to score (drawn from the model family's training "
        "distribution: for shapes_imbalanced, cyan is 5%)",
    ),
    levels: int = typer.Option(10, help="number of minority levels L (quantile bins of the score)"),
    t: Optional[float] = typer.Option(
        None,
        help="perturbation time of the score, in the schedule's units "
        "(default: 6% of the way from t_min to t_max, the paper's t = 60 of 1000)",
    ),
    draws: int = typer.Option(5, help="Monte-Carlo noise draws per sample (the paper's n)"),
    steps: int = typer.Option(2000, help="classifier training (AdamW) steps"),
    batch_size: int = typer.Option(128, help="images per classifier step (and x4 rows per scoring call)"),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (cosine decay to lr/10)"),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay (the paper's 0.05)"),
    holdout: float = typer.Option(0.05, help="fraction of the renders held out to report level accuracy on"),
    seed: int = typer.Option(0, help="random seed (renders, score noise, split, classifier training)"),
    threads: ThreadsOpt = None,
):
    """Minority guidance (Um et al., ICLR 2024): score training renders, bin them into L levels and train the
    noise-aware minority classifier; guide with condiff.guidance.minority.MinorityGuidance."""
    import math

    import torch
    from tqdm.auto import tqdm

    from condiff.core.fitted import weights_digest
    from condiff.models.minority import save_minority
    from condiff.nets.classifier import AttributeClassifier
    from condiff.training.minority import fit_minority_classifier
    from condiff.training.recipe import ObjectiveConfig, check_seed

    check_seed(seed, "--seed")
    for name, value, lo, hi in (
        ("--n", n, 2, common.MAX_SAMPLES),
        ("--levels", levels, 2, 10000),
        ("--draws", draws, 1, 10000),
        ("--steps", steps, 1, common.MAX_SAMPLES),
        ("--batch-size", batch_size, 1, common.MAX_SAMPLES),
    ):
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value}")
    if levels > n:
        raise ConfigError(f"--levels ({levels}) cannot exceed --n ({n})")
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"--lr must be a positive finite number, got {lr}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {weight_decay}")
    if not 0 <= holdout < 1:  # NaN fails too
        raise ConfigError(f"--holdout must be a fraction in [0, 1), got {holdout}")
    common.check_out(out, "--out", kind="dir")
    fam = common.family_of(model)
    if tuple(fam.image_shape) != (3, 32, 32):
        raise ConfigError(
            f"fit-minority trains a classifier for (3, 32, 32) images; model {model!r} makes {tuple(fam.image_shape)}"
        )
    threads = common.use_threads(threads)
    m = common.load_model(model)
    sch = m.schedule
    if t is None:
        t = float(sch.t_min + 0.06 * (sch.t_max - sch.t_min))
    elif not (math.isfinite(t) and sch.t_min <= t <= sch.t_max):
        raise ConfigError(f"--t must be in the schedule's range [{sch.t_min}, {sch.t_max}], got {t}")

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x0, _ = m.family.training_batch(0, n, g, seed, ObjectiveConfig())
    with torch.no_grad():
        cond = m.condition(m.family.null_raw(n))
    cond.pop("null")
    bar = tqdm(total=steps, desc="fit-minority: classifier", unit="step", leave=False)
    try:
        mc, scores, held = fit_minority_classifier(
            m.denoiser,
            x0,
            levels,
            t,
            draws,
            cond,
            steps,
            batch_size,
            lr,
            weight_decay,
            g,
            net=AttributeClassifier(
                heads={"level": levels}, in_channels=x0.shape[1], noise_aware=True, sample_size=x0.shape[-1]
            ),
            progress=lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
            score_batch_size=4 * batch_size,
            holdout=holdout,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    mc.model, mc.weights = model, weights_digest(m.module)
    mc.info.update(
        {
            "model": model,
            "renders": n,
            "seed": seed,
            "threads": threads,
            "seconds": seconds,
            "command": common.reproduce(
                "guidance fit-minority",
                [
                    ("--model", model),
                    ("--out", out),
                    ("--n", n),
                    ("--levels", levels),
                    ("--t", t),
                    ("--draws", draws),
                    ("--steps", steps),
                    ("--batch-size", batch_size),
                    ("--lr", lr),
                    ("--weight-decay", weight_decay),
                    ("--holdout", holdout),
                    ("--seed", seed),
                ],
            ),
        }
    )
    save_minority(mc, out, {"scores": scores, "heldout": held.to(torch.uint8)})
    acc = mc.info.get("heldout_accuracy", {})
    extra = "; ".join(f"held-out level accuracy at {k}: {v['accuracy']:.3f}" for k, v in acc.items())
    typer.echo(
        f"scored {n} renders (t={t:g}, {draws} draws), {levels} levels, classifier loss "
        f"{mc.info['train_loss_first100']:.3f} -> {mc.info['train_loss_last100']:.3f}"
        f"{'; ' + extra if extra else ''}; wrote {out} in {seconds:.1f}s"
    )
