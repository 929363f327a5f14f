"""Run a recipe end to end: build, (resume,) train with learning-curve evaluations, export. Launched by torchrun or
accelerate launch (``RANK`` / ``WORLD_SIZE`` in the environment), the same command trains data-parallel
(condiff.training.distributed; docs/scale.md)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from condiff.cli.recipe_kinds import kind_of
from condiff.errors import ConfigError, Interrupted
from condiff.models.tokens import TokenRecipe
from condiff.training import distributed
from condiff.training.recipe import Recipe
from condiff.training.trainer import CKPT_RE, Trainer


def make_trainer(recipe: Recipe, out_dir, progress: bool = True) -> Trainer:
    from condiff.models.base import build_model, silence_diffusers

    silence_diffusers()
    torch.set_num_threads(recipe.train.threads)
    torch.manual_seed(recipe.train.seed)  # deterministic initial weights
    from condiff.solvers.pfgmpp import noise_for_D

    model = build_model(
        recipe.family,
        recipe.model,
        recipe.schedule,
        recipe.objective.prediction,
        noise_for_D(recipe.objective.pfgmpp_D),
    )
    if recipe.train.init_from:
        init_weights(model, recipe.train.init_from)
    trainer_loss = None
    if recipe.objective.context_weight > 0:
        trainer_loss = add_context_head(model, recipe)
    return Trainer(
        model, recipe, Path(out_dir), progress=progress, evaluate=_learning_curve_eval(recipe), loss_fn=trainer_loss
    )


def add_context_head(model, recipe: Recipe):
    """ConPreDiff (``objective.context_weight`` > 0): a context head on the UNet's last features (the output of its
    final normalisation and activation, ``conv_act``), kept in the model's ModuleDict as ``context_head`` so the
    optimizer, the EMA and the checkpoints hold it (exact resume), and left out of the exported model (the family
    saves its own networks only). Returns the Trainer's loss function."""
    from condiff.training.conprediff import ContextHead, ContextObjective, attach

    unet = model.module["unet"]
    layer = getattr(unet, "conv_act", None)
    if layer is None:
        raise ConfigError(f"objective.context_weight needs a diffusers UNet (conv_act), got {type(unet).__name__}")
    f = int(model.model_cfg.get("pixel_unshuffle", 1))
    channels = model.family.image_shape[0] * f * f
    head = ContextHead(unet.config.block_out_channels[0], channels)
    model.module["context_head"] = head
    attach(layer, head)
    t = recipe.train
    return ContextObjective(model, head, recipe.objective.context_weight, recipe.objective, t.batch_size, t.seed, f)


def init_weights(model, init_from: str):
    """Start ``model`` from the weights of a bundled model or model directory (``[train] init_from``): same
    networks, prediction and schedule required. It runs before the Trainer copies the weights into its EMA, and a
    resume then overwrites them with the checkpoint's, so resume stays exact."""
    from condiff.models.base import load_model

    src = load_model(init_from, "train.init_from")
    if src.prediction.name != model.prediction.name or src.info.get("schedule_cfg") != model.info.get("schedule_cfg"):
        raise ConfigError(
            f"train.init_from {init_from!r} has prediction {src.prediction.name!r} and schedule "
            f"{src.info.get('schedule_cfg')}; the recipe needs {model.prediction.name!r} and "
            f"{model.info.get('schedule_cfg')}"
        )
    try:
        model.module.load_state_dict(src.module.state_dict())
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0][:150]
        raise ConfigError(
            f"train.init_from {init_from!r}: its networks do not match the recipe's [model] ({first})"
        ) from None


def _learning_curve_eval(recipe: Recipe):
    t = recipe.train
    if not t.eval_every:
        return None

    def run(model, ema_module):
        if hasattr(model.family, "learning_curve"):  # classifiers: accuracy on fresh renders
            return model.family.learning_curve(ema_module, model.schedule)
        from condiff.evaluation.evaluate import evaluate
        from condiff.solvers import DPMSolverPP2M

        m = dataclasses.replace(model, module=ema_module)
        res = evaluate(m, DPMSolverPP2M(), t.eval_steps, t.eval_cfg, t.eval_n, seed=12345)
        return {"accuracy": res["accuracy"], "eval_seconds": res["seconds"]}

    return run


def interrupted_note(trainer: Trainer) -> str:
    """What an interrupted run leaves: its newest checkpoint (each one on disk either verified on resume or
    written by this run; corrupt ones were renamed away) and that --resume continues from it."""
    kept = trainer.list_checkpoints()
    if not kept:
        return (
            f"nothing was written (the first checkpoint comes at step {trainer.recipe.train.ckpt_every}); "
            f"nothing to resume"
        )
    step = int(CKPT_RE.match(kept[-1].name).group(1))
    return f"kept checkpoint {kept[-1]} (step {step}); the same command with --resume continues from it"


def train_recipe(
    recipe: Recipe,
    out_dir,
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    allow_changes: bool = False,
    ddp_backend: str = "auto",
    data_shards: int | None = None,
) -> Trainer:
    """Train ``recipe`` into ``out_dir``; ``resume`` continues from its newest valid checkpoint (other recipe
    values refused unless ``allow_changes``). A run already at its last step trains nothing and exports again.
    Interrupted (SIGINT, SIGTERM under the CLI), it names the checkpoint --resume continues from.

    Under torchrun / accelerate launch this process is one rank of a data-parallel job (``ddp_backend``: auto,
    gloo or nccl): ``recipe.train.batch_size`` rows per rank, checkpoints and the model written by rank 0.
    ``data_shards`` (default: the number of ranks) cuts each step's global batch of ``data_shards x batch_size``
    rows into that many shards, a multiple of the number of ranks: one process with ``data_shards=2`` trains as
    two ranks do."""
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be a positive integer, got {steps}")
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=steps))
    world = _check_launch(ddp_backend, data_shards)
    parallel = distributed.setup(ddp_backend)
    try:
        if isinstance(recipe, TokenRecipe):
            from condiff.cli.tokens import make_token_trainer

            trainer = make_token_trainer(recipe, out_dir, progress)
        elif (kind := kind_of(recipe)) is not None:
            trainer = kind.trainer(recipe, out_dir, progress)
        else:
            trainer = make_trainer(recipe, out_dir, progress)
        return run_trainer(trainer, resume, allow_changes, stop_after, progress, parallel, data_shards or world)
    finally:
        if parallel is not None:
            parallel.close()


def _check_launch(ddp_backend, data_shards) -> int:
    """The number of ranks the launcher's environment names (1 without one), once the backend, the environment and
    ``data_shards`` are valid: before any model is built."""
    from condiff.errors import check_int, one_of

    if not isinstance(ddp_backend, str) or ddp_backend not in distributed.BACKENDS:
        raise one_of("--ddp-backend", ddp_backend, distributed.BACKENDS)
    env = distributed.launch_env()
    world = env.world_size if env is not None else 1
    if data_shards is not None:
        check_int("--data-shards", data_shards, 1, 4096)
        if data_shards % world:
            raise ConfigError(f"--data-shards must be a multiple of the number of ranks ({world}), got {data_shards}")
    return world


def run_trainer(
    trainer: Trainer,
    resume: bool = False,
    allow_changes: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    parallel=None,
    data_shards: int = 1,
) -> Trainer:
    """Resume (or refuse an --out that holds checkpoints without --resume), train to the recipe's last step and
    export; interrupted, the error names the checkpoint --resume continues from. ``parallel``: this rank's
    condiff.training.distributed.DataParallel (None: one process); ``data_shards``: the global batch's shards.
    When another rank of the job dies, the error names the checkpoint the same launch with --resume continues
    from."""
    out_dir, steps = trainer.out_dir, trainer.recipe.train.steps
    trainer.parallel, trainer.data_shards = parallel, data_shards
    main = trainer.writes
    trainer.progress = trainer.progress and main
    progress = progress and main
    if trainer.list_checkpoints() and not resume:
        raise ConfigError(
            f"{str(out_dir)!r} already holds checkpoints; pass --resume to continue, or choose another --out"
        )
    if main:
        trainer.clear_stale_temps()
    try:
        if resume:
            had = trainer.list_checkpoints()
            path = trainer.resume(allow_changes)
            if path is None and had and main:
                print(
                    f"notice: no checkpoint in {str(trainer.ckpt_root)!r} verifies ({len(had)} corrupt, renamed to "
                    f"*.corrupt); starting from scratch at step 0",
                    file=sys.stderr,
                )
            elif path is not None and progress:
                print(f"resumed from {path} (step {trainer.step})")
        if trainer.step < steps:
            trainer.run(stop_after=stop_after)
        if trainer.step >= steps:
            trainer.export()
        if parallel is not None:
            parallel.barrier()  # every rank ends with rank 0's export (or learns that a rank failed)
    except Interrupted as e:
        e.kept = interrupted_note(trainer)
        raise
    except distributed.RankStopped as e:
        raise distributed.RankStopped(f"{e}; {interrupted_note(trainer)}") from None
    return trainer
