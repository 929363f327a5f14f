"""``condiff finetune RECIPE --out DIR [--resume]``: adapt a model with the Trainer (EMA, atomic checkpoints,
exact resume, progress bar). The recipe's names are resolved here: the base model, the method and objective
objects (condiff.training.finetune) and the data (condiff.models.finetune_data).

OUT holds ``checkpoints/``, ``model/`` (the adapted model with any adapter folded in: every command takes it as
``--model OUT/model``), the method's own files (``lora/`` in diffusers' format for ``--lora``; SaRA's
``sara.safetensors`` and ``sara.json``), ``pairs.safetensors`` for DPO, and ``finetune.json`` (trainable
parameters, optimizer-state bytes, wall time).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import typer

from condiff.cli.options import ThreadsOpt
from condiff.core.files import atomic_write_json, load_json, load_tensors, save_tensors
from condiff.errors import ConfigError
from condiff.training import finetune as ft
from condiff.training.finetune_recipe import FinetuneRecipe
from condiff.training.trainer import Trainer


def resolve_finetune_recipe(arg: str) -> Path:
    """A packaged fine-tuning recipe's file, or the path given (condiff.cli.recipes.resolve_recipe)."""
    from condiff.cli.recipes import resolve_recipe

    return resolve_recipe(arg, "finetune")


def load_any_finetune_recipe(path):
    """A fine-tuning recipe: DRAKES's (objective "drakes", a token model's reward fine-tuning) or an image one."""
    from condiff.models import drakes_finetune as drakes
    from condiff.training.finetune_recipe import load_finetune_recipe
    from condiff.training.recipe import read_toml

    data = read_toml(path)
    return drakes.drakes_recipe_from_dict(data) if drakes.is_drakes(data) else load_finetune_recipe(path)


def method_of(r: FinetuneRecipe):
    if r.method == "full":
        return ft.Full()
    if r.method == "lora":
        return ft.Lora(r.lora.rank, r.lora.alpha)
    return ft.Sara(r.sara.theta, r.sara.lambda_rank, r.sara.reselect_at, r.sara.min_dim)


PREFERENCES = ("preferences:larger", "preferences:larger-prompted")
DATA = ("striped", "striped:K (a K-image few-shot set, K from 2 to 100000)", *PREFERENCES)


def check_data(r: FinetuneRecipe) -> None:
    """The recipe's ``data`` is one of ``DATA`` and fits its objective; one line otherwise (before any model loads)."""
    k = r.data.split(":", 1)[1] if r.data.startswith("striped:") else None
    if r.data not in ("striped", *PREFERENCES) and not (k and k.isascii() and k.isdigit() and 2 <= int(k) <= 100_000):
        raise ConfigError(f"data {r.data!r} is not accepted; accepted: {', '.join(DATA)}")
    pairs = r.data in PREFERENCES
    if r.objective == "dpo" and not pairs:
        raise ConfigError(f"objective 'dpo' needs preference data ({', '.join(PREFERENCES)}), got {r.data!r}")
    if r.objective == "domainstudio" and pairs:
        raise ConfigError(f"objective 'domainstudio' needs images (striped, striped:K), got {r.data!r}")


def data_of(r: FinetuneRecipe, model, out_dir: Path, progress: bool):
    """The recipe's ``data`` (checked by ``check_data``): fresh striped renders, a K-image striped set, or DPO's
    preference pairs (the winners for the denoising objective: the SFT baseline)."""
    from condiff.models import finetune_data as fd

    if model.family.name != "shapes":
        raise ConfigError(f"data {r.data!r} is shapes data; base {r.base!r} is a {model.family.name} model")
    if r.data == "striped":
        return fd.StripedShapes()
    if r.data in PREFERENCES:
        return preference_pairs(r, model, out_dir, progress)
    return fd.FewShot.striped(int(r.data.split(":", 1)[1]))


def preference_pairs(r: FinetuneRecipe, model, out_dir: Path, progress: bool):
    """The pairs of ``r``, generated once into ``dpo.pairs_file`` (default OUT/pairs.safetensors; atomically, with a
    JSON sidecar) and read back, on resume or by another recipe, when they were made with the same base and [dpo]
    settings."""
    from condiff.models import finetune_data as fd

    reward = r.data.split(":", 1)[1]
    key = {"base": r.base, "prompts": r.dpo.prompts, "margin": r.dpo.margin, "pair_seed": r.dpo.pair_seed}
    if reward != "larger":  # (pairs files made before the prompt-aware reward carry no reward in their key)
        key["reward"] = reward
    path = Path(r.dpo.pairs_file) if r.dpo.pairs_file else out_dir / "pairs.safetensors"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and load_json(meta).get("key") == key:
        t = load_tensors(path)
        return ft.PreferencePairs(t["raw"], t["winners"], t["losers"])
    if progress:
        print(f"making preference pairs: {r.dpo.prompts} prompts, 2 samples each", file=sys.stderr)
    pairs, stats = fd.preference_pairs(
        model, r.dpo.prompts, r.dpo.pair_seed, r.dpo.margin, progress=progress, reward=reward
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"raw": pairs.raw, "winners": pairs.winners, "losers": pairs.losers})
    atomic_write_json(meta, {"key": key, **stats})
    return pairs


def make_finetune_trainer(r: FinetuneRecipe, out_dir, progress: bool = True) -> Trainer:
    from condiff.models.base import load_model, silence_diffusers

    check_data(r)
    silence_diffusers()
    torch.set_num_threads(r.train.threads)
    out_dir = Path(out_dir)
    model = load_model(r.base, "base")
    # the denoising objective predicts what the base model predicts
    r = dataclasses.replace(r, loss=dataclasses.replace(r.loss, prediction=model.prediction.name))
    # the reference / source model, frozen; in train mode like the model being trained, so both run the same kernels
    # (an eval-mode transformer layer without gradients takes torch's fused fast path, which rounds differently):
    # at the start the two then agree bit for bit (DPO: loss log 2 and implicit accuracy 0 exactly)
    frozen = copy.deepcopy(model.module).train().requires_grad_(False)
    data = data_of(r, model, out_dir, progress)
    torch.manual_seed(r.train.seed)  # LoRA's random A matrices
    method = method_of(r)
    method.prepare(model)
    n = r.train.batch_size
    if r.objective == "denoise":
        objective = ft.Denoise(model, data, r.loss, n)
    elif r.objective == "dpo":
        objective = ft.DPO(model, frozen, data, r.dpo.beta, r.loss, n)
    else:
        d = r.domainstudio
        objective = ft.DomainStudio(model, frozen, data, d.lambda_img, d.lambda_hf, d.lambda_hfmse, r.loss, n)
    trainer = Trainer(model, r, out_dir, progress=progress)
    trainer.adaptation = method
    trainer.loss_fn = ft.with_penalty(objective, method, model.module)
    return trainer


def finetune(r: FinetuneRecipe, out_dir, resume=False, allow_changes=False, progress=True, stop_after=None):
    """Fine-tune ``r`` into ``out_dir``; returns the Trainer. After the last step: OUT/model, the method's files
    and OUT/finetune.json."""
    from condiff.cli.train import run_trainer

    t0 = time.perf_counter()
    trainer = make_finetune_trainer(r, out_dir, progress)
    setup = time.perf_counter() - t0
    trainable = ft.trainable_count(trainer.module)
    run_trainer(trainer, resume, allow_changes, stop_after, progress)
    if trainer.step >= trainer.recipe.train.steps:
        out_dir = Path(out_dir)
        files = trainer.adaptation.save(trainer.ema_module(), out_dir)
        base_params = sum(p.numel() for p in ft.plain_copy(trainer.model, trainer.module).parameters())
        atomic_write_json(
            out_dir / "finetune.json",
            {
                "recipe": trainer.recipe.to_dict(),
                "method": trainer.recipe.method,
                "objective": trainer.recipe.objective,
                "trainable_parameters": trainable,
                "trainable_parameters_final": ft.trainable_count(trainer.module),  # after SaRA's re-selection
                "model_parameters": base_params,
                "trainable_share": trainable / base_params,
                "optimizer_state_bytes": ft.optimizer_state_bytes(trainer.opt),
                "train_minutes": trainer.train_seconds / 60,
                "setup_minutes": setup / 60,
                "steps": trainer.step,
                "threads": trainer.recipe.train.threads,
                "files": ["model", *files],
            },
        )
    return trainer


def finetune_cmd(
    recipe: str = typer.Argument(
        ...,
        help="a packaged fine-tuning recipe's name (listed by `condiff recipes`) or a path to a .toml file",
    ),
    out: Optional[Path] = typer.Option(None, help="output directory (default runs/<recipe name>)"),
    resume: bool = typer.Option(False, help="continue from the newest valid checkpoint in --out"),
    steps: Optional[int] = typer.Option(None, help="override the recipe's number of steps"),
    seed: Optional[int] = typer.Option(None, help="override the recipe's seed (data order, noise, LoRA init)"),
    threads: ThreadsOpt = None,
    allow_changes: bool = typer.Option(
        False, "--allow-changes", help="with --resume: go on although recipe values differ from the checkpoint's"
    ),
):
    """Fine-tune a model (LoRA, SaRA or every weight; denoising, Diffusion-DPO or DomainStudio) from a recipe;
    checkpoints go to OUT/checkpoints, the adapted model to OUT/model."""
    from condiff.cli import common
    from condiff.models import drakes_finetune as drakes
    from condiff.training.recipe import check_seed

    r = load_any_finetune_recipe(resolve_finetune_recipe(recipe))
    train = r.train
    if seed is not None:
        train = dataclasses.replace(train, seed=check_seed(seed, "--seed"))
    if threads is not None:
        train = dataclasses.replace(train, threads=common.thread_count(threads))
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be a positive integer, got {steps}")
        train = dataclasses.replace(train, steps=steps)
    r = dataclasses.replace(r, train=train)
    if not isinstance(r, drakes.DrakesRecipe):
        check_data(r)
    if allow_changes and not resume:
        raise ConfigError("--allow-changes goes with --resume (it lets a resume change recipe values)")
    out = out or Path("runs") / r.name
    common.check_out(out, "--out", kind="dir")
    if isinstance(r, drakes.DrakesRecipe):
        from condiff.cli.train import run_trainer

        tr = run_trainer(drakes.make_drakes_trainer(r, out), resume, allow_changes)
    else:
        tr = finetune(r, out, resume=resume, allow_changes=allow_changes)
    if tr.start_step >= tr.recipe.train.steps:
        typer.echo(f"finished at step {tr.start_step}: nothing to train; model at {out / 'model'}")
    else:
        typer.echo(f"trained {tr.step} steps in {tr.train_seconds / 60:.1f} min; model at {out / 'model'}")
