"""``condiff features``: bias features of a bottleneck layer (condiff.tasks.bias_features; DiffLens, Shi et al.
CVPR 2025, and Asyrp's Delta-h, Kwon et al. ICLR 2023).

``condiff features fit --model shapes --attribute size --value large --out feats.safetensors`` samples --n random
captions (the attribute named in half of them) with dpmpp-2m, records the --layer output at every step, fits a
k-sparse autoencoder on it (one vector per spatial position), takes Delta-h as the mean h of the captions that name
--value minus those that name another value, and attributes every latent by gradient x activation of
score = logit(value) - mean(other logits) of --classifier on each step's x0_hat, over --n-attr captions without
the attribute. It writes the file (safetensors) and a JSON sidecar beside it (``feats.json``).
``condiff features edit feats.safetensors --prompt "red circle" --out grid.png`` samples with the edit: --method sae
scales the --latents latents that raise the score by --scale and sets the --latents that lower it to 0 (--away:
the reverse), --method delta-h adds --scale x Delta-h (--away: subtracts it); --t-window f edits only the first
fraction f of the steps (1: every step). ``condiff features show`` prints a
file's record. Shapes models only (the attribute classifiers are shapes classifiers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from condiff.cli import common
from condiff.cli.options import ThreadsOpt
from condiff.errors import ConfigError, check_int, check_real

app = typer.Typer(
    help="Bias features: a k-sparse autoencoder over a bottleneck layer, attribution of its latents to an "
    "attribute, and edits while sampling (DiffLens; Asyrp's Delta-h).",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_LAYER = "up_blocks.0.upsamplers.0"  # shapes: after the decoder's last cross-attention (docs/tasks.md)
METHODS = ("sae", "delta-h")
MAX_N = 100_000
MAX_LATENTS = 65_536
MAX_SAE_STEPS = 1_000_000
MAX_STEPS = 1000


def _attribute(family, attribute: str, value: str) -> tuple[int, int, tuple[str, ...]]:
    """(column, value index, value names) of a shapes attribute, checked before any weights are read."""
    from condiff.data.shapes import ATTRIBUTES

    if family.name != "shapes":
        raise ConfigError(
            f"--model: features need a shapes model (its attribute classifiers read shapes), got a {family.name} model"
        )
    if attribute not in ATTRIBUTES:
        raise ConfigError(f"unknown --attribute {attribute!r}; accepted: {', '.join(ATTRIBUTES)}")
    names = ATTRIBUTES[attribute]
    if value not in names:
        raise ConfigError(f"unknown --value {value!r} for --attribute {attribute}; accepted: {', '.join(names)}")
    return list(ATTRIBUTES).index(attribute), names.index(value), names


def _captions(n: int, generator, column: int, p_name: float):
    """(attrs, tokens, named): random shapes captions, the attribute ``column`` named with probability p_name."""
    import torch

    from condiff.data import shapes, text

    attrs = shapes.random_attrs(n, generator)
    keep = torch.ones(n, 4, dtype=torch.bool)
    keep[:, column] = torch.rand(n, generator=generator) < p_name
    return attrs, text.attrs_to_tokens(attrs, keep), keep[:, column]


@app.command("fit")
def fit_cmd(
    model: str = typer.Option("shapes", help="bundled model name (shapes) or a shapes model directory"),
    attribute: str = typer.Option("size", help="the attribute: shape, color, size or position"),
    value: str = typer.Option("large", help="the attribute's value the features push toward (e.g. large)"),
    layer: str = typer.Option(DEFAULT_LAYER, help="the bottleneck module's name in the UNet ('mid' = mid_block)"),
    classifier: str = typer.Option("clean", help="attribute classifier of the score: clean, noisy or a directory"),
    n: int = typer.Option(512, help="sampled captions whose layer outputs train the autoencoder"),
    n_attr: int = typer.Option(64, help="captions without the attribute that the attribution averages over"),
    steps: int = typer.Option(20, help="dpmpp-2m steps of every sampling run"),
    latents: int = typer.Option(256, help="latents of the autoencoder"),
    k: int = typer.Option(8, help="latents kept per vector (TopK)"),
    sae_steps: int = typer.Option(2000, help="Adam steps of the autoencoder (batch 2048)"),
    seed: int = typer.Option(0, help="seed of the captions, noise and autoencoder"),
    out: Path = typer.Option(..., help="output features file (.safetensors); a .json sidecar is written beside it"),
    threads: ThreadsOpt = None,
):
    """Collect a layer's outputs, fit a k-sparse autoencoder, take Delta-h and attribute the latents to an attribute."""
    check_int("--n", n, 2, MAX_N)
    check_int("--n-attr", n_attr, 1, MAX_N)
    check_int("--steps", steps, 1, MAX_STEPS)
    check_int("--latents", latents, 2, MAX_LATENTS)
    check_int("--k", k, 1, latents, f"an integer in [1, {latents}] (at most --latents)")
    check_int("--sae-steps", sae_steps, 1, MAX_SAE_STEPS)
    common.check_seed(seed)
    if not layer.strip():
        raise ConfigError("--layer must name a module of the UNet, such as mid or up_blocks.0.attentions.1, got ''")
    common.check_out(out, "--out", ".safetensors")
    common.check_out(out.with_suffix(".json"), "--out (its JSON sidecar)")
    common.refuse_pickled_inputs({"--classifier": classifier})
    family = common.family_of(model)
    column, target, names = _attribute(family, attribute, value)
    if len(names) < 2:  # pragma: no cover - every shapes attribute has two or more values
        raise ConfigError(f"--attribute {attribute} has one value only")
    common.use_threads(threads)

    import torch

    from condiff import __version__
    from condiff.core.fitted import weights_digest
    from condiff.core.grids import make_grid
    from condiff.core.sampling import initial_noise
    from condiff.models.classifiers import load_classifier
    from condiff.solvers import get_solver
    from condiff.tasks import bias_features as bf

    m = common.loaded_model(model)
    clf = load_classifier(classifier).requires_grad_(False)
    bf.find_layer(m.denoiser, layer)  # a bad name fails before any sampling
    den, solver, grid = m.denoiser, get_solver("dpmpp-2m"), make_grid(m.schedule, steps)
    g = torch.Generator().manual_seed(seed)
    attrs, tokens, named = _captions(n, g, column, 0.5)
    _, a_tokens, _ = _captions(n_attr, g, column, 0.0)
    shape = (*m.family.image_shape,)
    x = initial_noise(m.schedule, float(grid[0]), (n, *shape), g)
    x_a = initial_noise(m.schedule, float(grid[0]), (n_attr, *shape), g)
    t0 = time.perf_counter()
    hs = bf.collect_hspace(den, solver, grid, x, m.condition(tokens), layer=layer)
    fit = bf.train_sae(hs.vectors(), latents, k, steps=sae_steps, batch_size=2048, lr=2e-3, seed=seed)
    sae = fit.sae.requires_grad_(False)
    is_value = attrs[:, column] == target
    if not (named & is_value).any() or not (named & ~is_value).any():
        raise ConfigError(f"--n {n} is too few: no caption named {value!r} or none named another {attribute}")
    dh = bf.mean_difference(hs.h, named & is_value, named & ~is_value)
    others = [i for i in range(len(names)) if i != target]

    def score(x0):
        logits = clf.head(clf(x0.clamp(-1, 1)), attribute)
        return logits[:, target] - logits[:, others].mean(1)

    att = bf.attribute(den, solver, grid, x_a, m.condition(a_tokens), sae, score, layer=layer)
    seconds = time.perf_counter() - t0
    top = att.top(min(16, latents // 2))
    bottom = att.top(min(16, latents // 2), -1)
    options = [
        ("--model", model),
        ("--attribute", attribute),
        ("--value", value),
        ("--layer", layer),
        ("--classifier", classifier),
        ("--n", n),
        ("--n-attr", n_attr),
        ("--steps", steps),
        ("--latents", latents),
        ("--k", k),
        ("--sae-steps", sae_steps),
        ("--seed", seed),
        ("--out", str(out)),
    ]
    meta = {
        "model": model,
        "model_weights": weights_digest(m.module),
        "attribute": attribute,
        "value": value,
        "values": list(names),
        "layer": layer,
        "classifier": classifier,
        "steps": steps,
        "solver": "dpmpp-2m",
        "seed": seed,
        "sae": {**sae.config(), "nmse": bf.sae_nmse(sae, hs.vectors()), "dead": fit.dead, "vectors": len(hs.vectors())},
        "top_raising": top,
        "top_lowering": bottom,
        "seconds": round(seconds, 2),
        "condiff_version": __version__,
        "reproduce": common.reproduce("features fit", options),
    }
    bf.Features(sae, tuple(top), att.total, dh, hs.times[:, 0], meta).save(out)
    from condiff.core.files import atomic_write_json

    atomic_write_json(out.with_suffix(".json"), {**meta, "attribution": att.total.tolist()})
    typer.echo(
        f"wrote {out} and {out.with_suffix('.json')} ({layer}: {len(hs.vectors())} vectors, SAE nmse "
        f"{meta['sae']['nmse']:.4f}; latents raising {attribute}={value}: {top[:8]}; {seconds:.1f}s)"
    )


def _load(path: Path):
    from condiff.tasks.bias_features import load_features

    common.refuse_pickled_inputs({"FEATURES": path})
    return load_features(path, "FEATURES")


@app.command("edit")
def edit_cmd(
    features: Path = typer.Argument(..., help="a features file written by `condiff features fit`"),
    prompt: str = typer.Option(..., help="the caption to sample, e.g. 'red circle top-left'"),
    model: Optional[str] = typer.Option(None, help="the model (default: the one the features were fitted on)"),
    method: str = typer.Option("sae", help="sae (scale the attributed latents) or delta-h (add the mean difference)"),
    scale: float = typer.Option(6.0, help="sae: lambda of the raising latents; delta-h: alpha"),
    latents: int = typer.Option(16, help="sae: latents scaled (and as many set to 0)"),
    away: bool = typer.Option(False, "--away", help="push away from the fitted value instead of toward it"),
    t_window: float = typer.Option(
        1.0, "--t-window", help="edit only the first fraction of the steps, in (0, 1] (1: every step)"
    ),
    n: int = typer.Option(16, help="samples"),
    steps: int = typer.Option(20, help="dpmpp-2m steps"),
    seed: int = typer.Option(0, help="seed of the initial noise"),
    out: Path = typer.Option(Path("features.png"), help="output grid (.png); a .json sidecar is written beside it"),
    threads: ThreadsOpt = None,
):
    """Sample a prompt with the features' edit (and without it, for the sidecar's comparison)."""
    if method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}; accepted: {', '.join(METHODS)}")
    check_real("--scale", scale, -1e4, 1e4, "a finite number with |scale| <= 10000")
    check_real("--t-window", t_window, 0.0, 1.0, "a fraction of the steps in (0, 1]", lo_open=True)
    check_int("--n", n, 1, MAX_N)
    check_int("--steps", steps, 1, MAX_STEPS)
    common.check_seed(seed)
    common.check_out(out, "--out", ".png")
    common.check_out(out.with_suffix(".json"), "--out (its JSON sidecar)")
    feats = _load(features)
    check_int("--latents", latents, 1, feats.sae.m // 2, f"an integer in [1, {feats.sae.m // 2}] (half the latents)")
    meta = feats.meta
    for key, kind in (("model", str), ("model_weights", str), ("layer", str), ("attribute", str), ("value", str)):
        if not isinstance(meta.get(key), kind):
            raise ConfigError(f"FEATURES {str(features)!r} lacks its {key!r} record (not from `condiff features fit`)")
    model = model if model is not None else meta["model"]
    family = common.family_of(model)
    _attribute(family, meta["attribute"], meta["value"])
    raw = common.parse_prompt(family, prompt, "--prompt")
    common.use_threads(threads)

    import torch

    from condiff.core.fitted import weights_digest
    from condiff.core.grids import make_grid
    from condiff.core.sampling import initial_noise, sample
    from condiff.solvers import get_solver
    from condiff.tasks import bias_features as bf

    m = common.loaded_model(model)
    if weights_digest(m.module) != meta["model_weights"]:
        raise ConfigError(
            f"FEATURES {str(features)!r} was fitted on model {meta['model']!r} (weights {meta['model_weights'][:12]}), "
            f"not on --model {model!r}"
        )
    den, grid = m.denoiser, make_grid(m.schedule, steps)
    sign, window = -1 if away else 1, bf.early_window(grid, t_window)
    if method == "sae":
        att = bf.Attribution(feats.attribution.reshape(1, -1), torch.zeros(1))
        lat, sc = bf.steering(att, latents, scale, sign)
        edited = bf.FeatureEdit(den, feats.sae, lat, scale=sc, layer=meta["layer"], t_range=window)
    else:
        edited = bf.HShift(den, feats.delta_h, sign * scale, times=feats.times, layer=meta["layer"], t_range=window)
    cond = m.condition(raw.repeat(n, *([1] * (raw.dim() - 1))))
    x = initial_noise(m.schedule, float(grid[0]), (n, *m.family.image_shape), torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    with torch.no_grad():
        plain = sample(den, get_solver("dpmpp-2m"), grid, x, cond).x.clamp(-1, 1)
        images = sample(edited, get_solver("dpmpp-2m"), grid, x, cond).x.clamp(-1, 1)
    seconds = time.perf_counter() - t0
    layout = common.write_samples(images, out, None)
    sidecar = {
        "features": str(features),
        "prompt": prompt,
        "method": method,
        "scale": scale,
        "latents": latents if method == "sae" else None,
        "toward": ("not " if away else "") + f"{meta['attribute']}={meta['value']}",
        "t_window": t_window,
        "n": n,
        "steps": steps,
        "seed": seed,
        "out_layout": layout["out_layout"],
        "seconds": round(seconds, 2),
        "reproduce": common.reproduce(
            "features edit",
            [
                ("--prompt", prompt),
                ("--model", model),
                ("--method", method),
                ("--scale", scale),
                ("--latents", latents),
                ("--away", away),
                ("--t-window", t_window),
                ("--n", n),
                ("--steps", steps),
                ("--seed", seed),
                ("--out", str(out)),
            ],
            str(features),
        ),
    }
    from condiff.data import labeller

    before, after = labeller.label(plain), labeller.label(images)
    col = ("shape", "color", "size", "position").index(meta["attribute"])
    sidecar["readings"] = {
        "plain": [common.attribute_names(r.tolist()) for r in before],
        "edited": [common.attribute_names(r.tolist()) for r in after],
    }
    sidecar["changed"] = float((before[:, col] != after[:, col]).float().mean())
    from condiff.core.files import atomic_write_json

    atomic_write_json(out.with_suffix(".json"), sidecar)
    typer.echo(
        f"wrote {out} and {out.with_suffix('.json')} ({method}, {meta['attribute']} changed in "
        f"{sidecar['changed']:.0%} of {n} samples; {seconds:.1f}s)"
    )


@app.command("show")
def show_cmd(features: Path = typer.Argument(..., help="a features file written by `condiff features fit`")):
    """Print what a features file records."""
    feats = _load(features)
    typer.echo(json.dumps({**feats.meta, "latents": list(feats.latents)}, indent=2, sort_keys=True))
