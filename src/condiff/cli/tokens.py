"""The discrete (token) side of ``condiff train``, ``sample`` and ``eval``: a recipe whose family is a token family
(chars, captions, dna) trains a RADD denoiser or its autoregressive baseline with the same Trainer (EMA, atomic
checkpoints, exact resume); token models sample text and are scored by their exact judges."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from condiff.data import captions
from condiff.errors import ConfigError
from condiff.models.tokens import (
    FAMILIES,
    Captions,
    TokenModel,
    TokenRecipe,
    bits_per_token,
    build_token_model,
    token_loss_fn,
    token_recipe_from_dict,
)
from condiff.training.recipe import load_recipe, read_toml
from condiff.training.trainer import Trainer


def load_any_recipe(path):
    """A training recipe: a token recipe where the family is a token family, a registered kind's
    (``cli.recipe_kinds``) for its family, else an image one."""
    data = read_toml(path)
    if isinstance(data, dict) and data.get("family") in FAMILIES:
        return token_recipe_from_dict(data)
    from condiff.cli.recipe_kinds import KINDS

    if isinstance(data, dict) and isinstance(data.get("family"), str) and data["family"] in KINDS:
        return KINDS[data["family"]].read(data)
    from condiff.training.recipe import FAMILIES as IMAGE_FAMILIES

    family = data.get("family") if isinstance(data, dict) else None
    if isinstance(family, str) and family not in IMAGE_FAMILIES:
        accepted = (*IMAGE_FAMILIES, *FAMILIES, *KINDS)
        raise ConfigError(f"family {family!r} is not accepted; accepted: {', '.join(accepted)}")
    return load_recipe(path)


def _eval_fn(r: TokenRecipe):
    """The learning curve's held-out score: bits per token (chars) or parsed-attribute accuracy (captions)."""

    def run(model: TokenModel, ema_module):
        m = dataclasses.replace(model, module=ema_module)
        if r.family == "chars":
            chunks = m.family.corpus.valid[: 64 * m.length].view(64, m.length)
            return {"valid_bits": bits_per_token(m, chunks, draws=2)["bits"]}
        if r.family == "captions" and m.kind != "ar":
            return {"attribute_accuracy": caption_accuracy(m, 256, seed=0)["accuracy"]}
        return {}

    return run


def make_token_trainer(r: TokenRecipe, out_dir, progress: bool = True) -> Trainer:
    torch.set_num_threads(r.train.threads)
    torch.manual_seed(r.train.seed)  # deterministic initial weights
    model = build_token_model(r)
    return Trainer(model, r, Path(out_dir), progress=progress, evaluate=_eval_fn(r), loss_fn=token_loss_fn(model, r))


TOKEN_SAMPLERS = ("tau-leaping", "euler", "ordered")
IMAGE_DEFAULT_SOLVER = "dpmpp-2m"  # --solver's default for images: a token model reads it as tau-leaping


def token_sampler(solver: str) -> str:
    """--solver for a token model: tau-leaping (the default), euler, or ordered (one position per step)."""
    solver = "tau-leaping" if solver == IMAGE_DEFAULT_SOLVER else solver
    if solver not in TOKEN_SAMPLERS:
        raise ConfigError(f"--solver {solver!r} is not a token sampler; accepted: {', '.join(TOKEN_SAMPLERS)}")
    return solver


def _step(sampler: str):
    from condiff.discrete import Euler, TweedieTauLeap

    return Euler() if sampler == "euler" else TweedieTauLeap()


def draw_tokens(
    model: TokenModel,
    n: int,
    steps: int | None,
    g,
    cond=None,
    start=None,
    cache: bool = True,
    sampler="tau-leaping",
    denoiser=None,
) -> tuple[torch.Tensor, int]:
    """(tokens, network rows) of n sequences from a token model: RADD's cached tau-leaping (or Euler) sampler with
    ``steps`` steps, or the ordered sampler (one position per step) where ``sampler`` is "ordered" or ``steps`` is
    None; block diffusion block by block with the previous blocks' keys and values cached, ``steps`` per block (one
    per token of a block for "ordered" or None); the AR baseline left to right. ``denoiser`` replaces a RADD
    model's own (a guided one)."""
    from condiff.discrete import NetworkDenoiser, sample, sample_blocks_cached, sample_ordered

    ordered = steps is None or sampler == "ordered"
    if model.kind == "ar":
        ar = NetworkDenoiser(_ArLogits(model), model.family.vocab_size)
        return sample_ordered(ar, n, model.length, generator=g, cond=cond, start=start)
    if model.kind == "block":
        per_block = model.block_size if ordered else steps
        tokens, rows, _ = sample_blocks_cached(
            model.denoiser,
            n,
            model.length,
            model.block_size,
            per_block,
            generator=g,
            cond=cond,
            start=start,
            cache=cache,
            step=_step(sampler),
        )
        return tokens, rows
    den = model.denoiser if denoiser is None else denoiser
    if ordered:
        return sample_ordered(den, n, model.length, generator=g, cond=cond, start=start)
    return sample(den, n, model.length, steps, generator=g, cond=cond, start=start, cache=cache, step=_step(sampler))


@torch.no_grad()
def caption_accuracy(model: TokenModel, n: int, seed: int, steps: int | None = None, sampler="tau-leaping") -> dict:
    """Sample captions for n random full attribute conditions; the exact parser reads the attributes back. ``steps``
    None: RADD's ordered sampler (one position per step, left to right: L network calls); else the cached
    tau-leaping sampler with that many steps."""
    from condiff.data import shapes

    g = torch.Generator().manual_seed(seed)
    attrs = shapes.random_attrs(n, g)
    tokens, _ = draw_tokens(model, n, steps, g, cond=attrs, sampler=sampler)
    ok = captions.parses(tokens)
    right = (captions.parse(tokens) == attrs).all(1) & ok
    return {"accuracy": float(right.float().mean()), "parses": float(ok.float().mean())}


def is_token_model_arg(model: str | None) -> bool:
    from condiff.models.tokens import is_token_model

    return model is not None and Path(model).is_dir() and is_token_model(model)


def prompt_condition(m: TokenModel, prompt: str | None, n: int):
    """(start tokens or None, condition or None) of a prompt: captions read attributes from it (the shapes prompt
    language); chars and dna take it as the text's first characters."""
    from condiff.discrete import mask_id

    if m.family.name == "captions":
        from condiff.data import text

        if prompt is None:
            return None, torch.full((n, 4), Captions.NULL)
        attrs = text.tokens_to_attrs(torch.tensor([text.tokenize(prompt)]))
        return None, torch.where(attrs < 0, torch.full_like(attrs, Captions.NULL), attrs).expand(n, 4)
    if not prompt:
        return None, None
    ids = m.family.encode(prompt)
    if len(ids) >= m.length:
        raise ConfigError(f"--prompt has {len(ids)} tokens; this model writes {m.length}, so at most {m.length - 1}")
    start = torch.full((n, m.length), mask_id(m.family.vocab_size))
    start[:, : len(ids)] = ids
    return start, None


@torch.no_grad()
def guided(m: TokenModel, guide: str | None, scale: float):
    """The denoiser --guide asks for: RADD's c_theta tilted towards an attribute by a noisy classifier fitted on the
    fly (a few seconds), or None without --guide."""
    if guide is None:
        return None
    import math

    from condiff.discrete import ClassifierGuided, ExactTilt
    from condiff.models.tokens import attribute_of, fit_attribute_classifier

    if m.family.name != "captions" or m.kind != "radd":
        raise ConfigError(f"--guide needs a RADD model of captions, got a {m.kind} model of {m.family.name}")
    if not (math.isfinite(guide_scale := scale) and guide_scale >= 0):
        raise ConfigError(f"--guide-scale must be a finite number >= 0, got {scale}")
    col, val = attribute_of(guide)
    clf = fit_attribute_classifier(col, val, m.info.get("recipe", {}).get("data", {}).get("p_drop", 0.3), seed=1)
    return ClassifierGuided(m.denoiser, clf.log_prob, ExactTilt(guide_scale))


def sample_text(
    m: TokenModel, prompt, n: int, steps: int, seed: int, cache: bool = True, guide=None, sampler="tau-leaping"
) -> dict:
    """n texts from a token model (RADD: the cached tau-leaping sampler; block diffusion: ``steps`` per block with the
    previous blocks cached; AR: left to right), with the counts."""
    import time

    start, cond = prompt_condition(m, prompt, n)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    tokens, rows = draw_tokens(m, n, steps, g, cond, start, cache, sampler, denoiser=guide)
    out = {
        "texts": m.family.text(tokens),
        "network_rows": rows,
        "nfe_per_sample": rows / n,
        "seconds": time.perf_counter() - t0,
        "tokens": tokens.tolist(),
    }
    if m.family.name == "captions":
        out["parsed"] = captions.parse(tokens).tolist()
        out["parses"] = captions.parses(tokens).tolist()
    return out


class _ArLogits(torch.nn.Module):
    """The AR baseline as a logit network for ``sample_ordered`` (left to right): position i's logits from the
    tokens before it."""

    def __init__(self, m: TokenModel):
        super().__init__()
        self.net, self.v = m.net, m.family.vocab_size

    def forward(self, onehot, cond=None):
        hard = onehot.argmax(-1)
        masked = hard == self.v
        clean = torch.where(masked, torch.zeros_like(hard), hard)  # positions after i never reach position i
        return self.net(torch.nn.functional.one_hot(clean, self.v + 1).float(), cond)


@torch.no_grad()
def evaluate_tokens(m: TokenModel, n: int, seed: int, steps: int, draws: int = 4, sampler="tau-leaping") -> dict:
    """chars and dna: bits per token on n test chunks (AR exact; RADD the k-DCE bound); captions: sampled captions'
    parsed-attribute accuracy and parse rate (``sampler``, ``steps``)."""
    if m.family.name == "captions":
        return caption_accuracy(m, n, seed, steps, sampler)
    if m.family.name == "chars":
        data = m.family.corpus.test
        chunks = data[: (len(data) // m.length) * m.length].view(-1, m.length)[:n]
    else:
        from condiff.data import dna

        share = m.config.get("promoter_share", 0.0)
        chunks = dna.dataset(n, m.length, torch.Generator().manual_seed(10_000 + seed), share)
    return {**bits_per_token(m, chunks, draws=draws, seed=seed), "chunks": len(chunks)}


def refuse_image_options(options: dict) -> None:
    """Options of image models that a token model does not take: a one-line error naming them."""
    given = [name for name, value in options.items() if value not in (None, False, [], ())]
    if given:
        raise ConfigError(
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to a token model "
            f"(it takes --prompt, --n, --steps, --seed, --out FILE.json, --threads)"
        )


def _check_counts(n: int, steps: int, seed: int):
    from condiff.training.recipe import check_seed

    if n < 1:
        raise ConfigError(f"--n must be a positive integer, got {n}")
    if steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {steps}")
    check_seed(seed, "--seed")


def sample_cmd(
    model: str, prompt, n: int, steps: int, seed: int, out, guide=None, guide_scale: float = 2.0, solver="tau-leaping"
) -> None:
    """Print n texts from a token model; --out FILE.json writes them with the settings and counts."""
    import typer

    from condiff.cli import common
    from condiff.core.files import atomic_write_json
    from condiff.models.tokens import load_token_model

    _check_counts(n, steps, seed)
    if out is not None:
        common.check_out(out, "--out", ".json")
    sampler = token_sampler(solver)
    m = load_token_model(model)
    res = sample_text(m, prompt, n, steps, seed, guide=guided(m, guide, guide_scale), sampler=sampler)
    for text in res["texts"]:
        typer.echo(text)
    what = {
        "radd": f"{res['nfe_per_sample']:.1f} network calls per text over {steps} steps",
        "block": f"{res['nfe_per_sample']:.1f} network calls per text, {steps} steps per block of {m.block_size}",
        "ar": f"{m.length} network calls per text (autoregressive)",
    }[m.kind]
    if sampler == "ordered" and m.kind == "radd":
        what = f"{res['nfe_per_sample']:.1f} network calls per text (ordered: one position per step)"
    typer.echo(f"{n} texts, {what}, {res['seconds']:.2f} s")
    if out is not None:
        atomic_write_json(
            out,
            {
                "command": "sample",
                "model": str(model),
                "prompt": prompt,
                "n": n,
                "steps": steps,
                "seed": seed,
                "kind": m.kind,
                "family": m.family.name,
                **res,
            },
        )
        typer.echo(f"wrote {out}")


def eval_cmd(model: str, n: int, seed: int, steps: int, json_out, solver="tau-leaping") -> None:
    """Score a token model with its exact judge: bits per token (chars, dna) or parsed attributes (captions)."""
    import typer

    from condiff.cli import common
    from condiff.core.files import atomic_write_json
    from condiff.models.tokens import load_token_model

    _check_counts(n, steps, seed)
    if json_out is not None:
        common.check_out(json_out, "--json", ".json")
    sampler = token_sampler(solver)
    m = load_token_model(model)
    res = evaluate_tokens(m, n, seed, steps, sampler=sampler)
    for key, value in res.items():
        typer.echo(f"  {key:<22}{value:.4f}" if isinstance(value, float) else f"  {key:<22}{value}")
    if json_out is not None:
        atomic_write_json(
            json_out,
            {
                "command": "eval",
                "model": str(model),
                "kind": m.kind,
                "family": m.family.name,
                "n": n,
                "seed": seed,
                "steps": steps,
                **res,
            },
        )


__all__ = ["Captions", "caption_accuracy", "load_any_recipe", "make_token_trainer"]
