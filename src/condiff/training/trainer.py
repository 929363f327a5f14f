"""The Trainer: seeded data order, EMA, gradient clipping, progress bar, NaN guards, atomic safetensors
checkpoints with a JSON sidecar (config, checksums), and exact resume.

Every step's randomness (batch, time, noise, dropout) comes from a generator seeded by (seed, step), and
the learning rate is a pure function of the step, so a resumed run repeats an uninterrupted one bit for
bit on CPU (same thread count).

Data parallel (``parallel``: a condiff.training.distributed.DataParallel, or ``data_shards`` > 1 on one process):
the step's global batch of ``data_shards x batch_size`` rows is drawn from the (seed, step) generator, as one
process draws it, and cut into ``data_shards`` shards of ``batch_size`` rows; rank r of N computes the shards
[r S / N, (r + 1) S / N), each shard's time, noise and dropout drawn from its own (seed, step, shard) generator
(``shard_generator``), its loss scaled by 1 / S before the backward pass; one all-reduce sums the gradients (and
the loss), and every rank takes the same step (Li et al. 2020, Sec. 3; DistributedSampler's split of one global
order over the ranks). So N ranks reproduce one process with ``data_shards = N`` (gradient accumulation over the
same shards) up to the order of float sums, and a job resumes exactly on any number of ranks that divides S.
Checkpoints, the EMA model and the learning curve are written by rank 0 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from condiff.core.files import (
    atomic_dir,
    atomic_write_json,
    load_json,
    load_tensors,
    remove_dir,
    remove_stale_temps,
    save_tensors,
    sha256_file,
)
from condiff.errors import CondiffError, ConfigError, InputFileError, NonFiniteError
from condiff.training.recipe import Recipe, recipe_changes

CKPT_RE = re.compile(r"^step-(\d{8})$")


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def shard_generator(seed: int, step: int, shard: int) -> torch.Generator:
    """The generator of shard ``shard`` of step ``step``'s global batch (data parallel): its time, noise and
    dropout, independent of the (seed, step) stream the global batch's rows come from."""
    digest = hashlib.blake2b(f"condiff-shard {seed} {step} {shard}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def rows(batch, start: int, stop: int):
    """Rows [start, stop) of a training batch: a tensor, or a dict / list / tuple of them (other values as is)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: rows(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(rows(v, start, stop) for v in batch)
    return batch


def learning_rate(cfg, step: int) -> float:
    """Linear warm-up, then cosine (or constant) decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_decay == "constant":
        return cfg.lr
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _flatten_optimizer(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, scalars, sd["param_groups"]


def _unflatten_optimizer(tensors, scalars, groups):
    state: dict = {}
    for key, v in list(tensors.items()) + list(scalars.items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": groups}


def _describe(changes: dict, most: int = 8) -> str:
    """'train.seed 3 -> 5, train.lr 0.001 -> 0.002' (the first ``most`` changed keys, then how many more)."""
    items = [f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()]
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _move_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to ``step-N.corrupt`` (``step-N.corrupt-2``, ... when taken)."""
    aside, k = path.with_name(path.name + ".corrupt"), 1
    while os.path.lexists(aside):
        k += 1
        aside = path.with_name(f"{path.name}.corrupt-{k}")
    os.replace(path, aside)
    return aside


@dataclass
class Trainer:
    """Train ``model`` (a LoadedModel built from ``recipe``) into ``out_dir``."""

    model: object
    recipe: Recipe
    out_dir: Path
    progress: bool = True
    log: list = field(default_factory=list)
    evaluate: object = None  # callable(model, ema_module) -> dict, run every train.eval_every steps
    # callable(step, generator) -> (0-d loss tensor, {name: float}); None: the family's loss on its training batches
    loss_fn: object = None
    # an adaptation method (condiff.training.finetune): which weights train, what it does before each step, how a
    # checkpoint's structure is restored and the plain network exported; None: every parameter of the model trains
    adaptation: object = None

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.module = self.model.module
        self.module.train()
        self.rebuild_optimizer()
        self.step = 0
        self.start_step = 0  # the step this trainer started from: 0, or the resumed checkpoint's
        self.train_seconds = 0.0
        self.recipe_changes: list = []  # what --allow-changes let a resume change: [{step, changes: {key: [old, new]}}]
        self.parallel = None  # a condiff.training.distributed.DataParallel when launched by torchrun / accelerate
        self.data_shards = 1  # the shards of the global batch (data parallel: a multiple of the world size)
        self.step_losses: list = []  # the loss of every step this trainer ran (the global batch's mean)

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints and the model: one process, or rank 0 of a job."""
        return self.parallel is None or self.parallel.is_main

    def rebuild_optimizer(self):
        """The optimizer and the EMA over the parameters that now require gradients (at the start, and after an
        adaptation changed the trainable set, e.g. SaRA's re-selection: Adam's moments and the EMA start afresh)."""
        cfg = self.recipe.train
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        # train.fast: AdamW's fused kernel and one multi-tensor EMA update per step (same maths, other rounding),
        # and the forward in bfloat16 autocast (``autocast``)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fast or None)
        from diffusers.training_utils import EMAModel  # here, not at the top: it costs every CLI command seconds

        self.ema = EMAModel(self.params, decay=cfg.ema_decay, foreach=cfg.fast)

    # checkpoints -------------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self):
        path = self.ckpt_root / f"step-{self.step:08d}"
        with atomic_dir(path) as tmp:
            save_tensors(tmp / "model.safetensors", self.module.state_dict())
            save_tensors(tmp / "ema.safetensors", dict(zip(self.names, self.ema.shadow_params)))
            tens, scal, groups = _flatten_optimizer(self.opt)
            save_tensors(tmp / "optim.safetensors", tens)
            ema_sd = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
            files = ("model.safetensors", "ema.safetensors", "optim.safetensors")
            atomic_write_json(
                tmp / "trainer.json",
                {
                    "step": self.step,
                    "train_seconds": self.train_seconds,
                    "recipe": self.recipe.to_dict(),
                    "optimizer_scalars": scal,
                    "param_groups": groups,
                    "ema": ema_sd,
                    "log": self.log,
                    "recipe_changes": self.recipe_changes,
                    "threads": torch.get_num_threads(),
                    "data_shards": self.data_shards,
                    "sha256": {f: sha256_file(tmp / f) for f in files},
                },
            )
        keep = self.recipe.train.keep_checkpoints
        for old in sorted(self.list_checkpoints())[:-keep]:
            remove_dir(old)  # renamed away first: a kill never leaves a half-deleted checkpoint
        return path

    def clear_stale_temps(self) -> list[Path]:
        """Delete what interrupted atomic writes of this run left behind (``.*.tmp`` in OUT and
        OUT/checkpoints): half-built checkpoints, half-exported models, half-deleted old checkpoints."""
        return remove_stale_temps(self.out_dir) + remove_stale_temps(self.ckpt_root)

    def list_checkpoints(self) -> list[Path]:
        if not self.ckpt_root.is_dir():
            return []
        return sorted(p for p in self.ckpt_root.iterdir() if p.is_dir() and CKPT_RE.match(p.name))

    @staticmethod
    def verify(path: Path) -> dict:
        """The checkpoint's trainer.json, once every file it lists matches its SHA-256; else InputFileError."""
        meta = load_json(path / "trainer.json")
        digests = meta.get("sha256") if isinstance(meta, dict) else None
        if not isinstance(digests, dict) or not digests:
            raise InputFileError(f"checkpoint {str(path)!r}: trainer.json lacks the checksums of its files")
        for name, digest in digests.items():
            if not (path / name).is_file() or sha256_file(path / name) != digest:
                raise InputFileError(f"checkpoint {str(path)!r}: {name} is missing or fails its checksum")
        return meta

    def resume(self, allow_changes: bool = False) -> Path | None:
        """See ``_resume``. Data parallel: rank 0 chooses the checkpoint (and refuses or renames as one process
        does), every other rank restores the same one from the shared OUT, or raises rank 0's error."""
        par = self.parallel
        if par is None:
            return self._resume(allow_changes)
        if not par.is_main:
            chosen = par.broadcast_object(None)
            if isinstance(chosen, dict):
                raise ConfigError(chosen["error"])
            if chosen is None:
                return None
            path = self.ckpt_root / chosen
            self._restore(path, load_json(path / "trainer.json"))
            return path
        try:
            path = self._resume(allow_changes)
        except CondiffError as e:  # the other ranks stop with the same line
            par.broadcast_object({"error": str(e)})
            raise
        par.broadcast_object(None if path is None else path.name)
        return path

    def _resume(self, allow_changes: bool = False) -> Path | None:
        """Restore the newest valid checkpoint; None if there is none. A corrupt one is renamed to
        ``step-N.corrupt`` (kept for inspection, out of the way of new checkpoints and of pruning) with a notice on
        stderr. A checkpoint written with other recipe values (any key: seed, lr, batch size, objective, schedule,
        steps, threads) is refused with a ConfigError naming each as old -> new; with ``allow_changes`` the run
        goes on with the new values and ``recipe_changes`` records them (in later checkpoints and the exported
        model's condiff.json)."""
        self.clear_stale_temps()
        for path in reversed(self.list_checkpoints()):
            try:
                meta = self.verify(path)
            except (InputFileError, KeyError, json.JSONDecodeError) as e:
                aside = _move_aside(path)
                print(f"notice: skipping checkpoint {path.name}: {e} (renamed to {aside.name})", file=sys.stderr)
                continue
            changes = recipe_changes(meta.get("recipe"), self.recipe.to_dict())
            if meta.get("data_shards", 1) != self.data_shards:
                old = meta.get("data_shards", 1)
                if not allow_changes:
                    raise ConfigError(
                        f"--resume: {str(self.out_dir)!r} was trained with its global batch in {old!r} data shard(s) "
                        f"and this run has {self.data_shards}; launch as many ranks (torchrun --nproc_per_node) or "
                        f"pass --data-shards {old!r}, or pass --allow-changes to go on with {self.data_shards}"
                    )
                changes = {**changes, "data_shards": (old, self.data_shards)}
            if changes and not allow_changes:
                raise ConfigError(
                    f"--resume: {str(self.out_dir)!r} was trained with other recipe values ({_describe(changes)}); "
                    f"resume with the values it was trained with, or pass --allow-changes to go on with the new ones"
                )
            try:
                self._restore(path, meta)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
                first = (str(e).strip().splitlines() or [""])[0][:150]
                raise ConfigError(
                    f"checkpoint {str(path)!r} does not fit this recipe's model and optimizer "
                    f"({type(e).__name__}: {first}); resume with the recipe that wrote it, or "
                    f"choose another --out"
                ) from None
            if changes:
                entry = {"step": self.step, "changes": {k: list(v) for k, v in changes.items()}}
                self.recipe_changes = [*self.recipe_changes, entry]
                print(f"notice: --allow-changes: from step {self.step}, {_describe(changes)}", file=sys.stderr)
            return path
        return None

    def _restore(self, path: Path, meta: dict):
        weights = load_tensors(path / "model.safetensors")
        if self.adaptation is not None:
            self.adaptation.restore_structure(self, weights)
        self.module.load_state_dict(weights)
        ema_t = load_tensors(path / "ema.safetensors")
        self.ema.load_state_dict({**meta["ema"], "shadow_params": [ema_t[n] for n in self.names]})
        self.opt.load_state_dict(
            _unflatten_optimizer(
                load_tensors(path / "optim.safetensors"), meta["optimizer_scalars"], meta["param_groups"]
            )
        )
        self.step = self.start_step = meta["step"]
        self.train_seconds = meta["train_seconds"]
        self.log = meta["log"]
        self.recipe_changes = list(meta.get("recipe_changes") or [])

    # training ----------------------------------------------------------------------------------------
    def train_step(self):
        cfg, obj = self.recipe.train, self.recipe.objective
        if self.adaptation is not None:
            self.adaptation.before_step(self)
        if self.parallel is not None or self.data_shards > 1:
            return self._sharded_step()
        g = step_generator(cfg.seed, self.step)
        with self.autocast():
            if self.loss_fn is None:
                fam = self.model.family
                x0, raw = fam.training_batch(self.step, cfg.batch_size, g, cfg.seed, obj)
                loss = fam.loss(self.module, self.model.model_cfg, self.model.schedule, obj, x0, raw, g)
                loss, self.metrics = loss.float().mean(), {}
            else:
                loss, self.metrics = self.loss_fn(self.step, g)
                loss = loss.float()
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"non-finite loss ({loss.item()}) at step {self.step}; the last good "
                f"checkpoint is kept in {str(self.ckpt_root)!r}"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return self._update(loss)

    def _sharded_step(self):
        """One data-parallel step: this rank's shards of the global batch, their gradients summed over the ranks
        (the module docstring)."""
        cfg, obj, par, shards = self.recipe.train, self.recipe.objective, self.parallel, self.data_shards
        rank, world = (par.rank, par.world_size) if par is not None else (0, 1)
        self.opt.zero_grad(set_to_none=True)
        total, sums = torch.zeros((), dtype=torch.float32), {}
        fam, n = (self.model.family if self.loss_fn is None else None), cfg.batch_size
        if self.loss_fn is None:
            with self.autocast():  # the global batch's rows, as one process draws them
                x0, raw = fam.training_batch(self.step, n * shards, step_generator(cfg.seed, self.step), cfg.seed, obj)
        for k in range(rank * shards // world, (rank + 1) * shards // world):
            g = shard_generator(cfg.seed, self.step, k)
            with self.autocast():
                if self.loss_fn is None:
                    xk, rk = rows(x0, k * n, (k + 1) * n), rows(raw, k * n, (k + 1) * n)
                    loss, metrics = fam.loss(self.module, self.model.model_cfg, self.model.schedule, obj, xk, rk, g), {}
                    loss = loss.float().mean()
                else:
                    loss, metrics = self.loss_fn(self.step, g)
                    loss = loss.float()
            (loss / shards).backward()
            total = total + loss.detach() / shards
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) / shards
        keys = sorted(sums)
        scalars = torch.cat([total.reshape(1), torch.tensor([sums[k] for k in keys], dtype=torch.float32)])
        if par is not None:
            scalars = par.reduce_gradients(self.params, scalars)
        loss, self.metrics = scalars[0], dict(zip(keys, scalars[1:].tolist()))
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"non-finite loss ({loss.item()}) at step {self.step}; the last good "
                f"checkpoint is kept in {str(self.ckpt_root)!r}"
            )
        return self._update(loss)

    def _update(self, loss):
        """The optimizer step on the gradients in place: the non-finite guard, clipping, the learning rate, AdamW,
        the EMA; returns the loss as a float."""
        cfg = self.recipe.train
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)  # one reduction: non-finite where any gradient is
        if not torch.isfinite(norm):
            name = next(
                n for n, p in zip(self.names, self.params) if p.grad is not None and not p.grad.isfinite().all()
            )
            raise NonFiniteError(
                f"non-finite gradient in {name} at step {self.step}; the last good "
                f"checkpoint is kept in {str(self.ckpt_root)!r}"
            )
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.grad_clip, norm)
        lr = learning_rate(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.ema.step(self.params)
        self.step += 1
        return loss.item()

    def autocast(self):
        """train.fast: the forward and the loss in bfloat16 autocast (weights, gradients, optimizer and EMA stay
        float32: mixed precision, Micikevicius et al. 2018); otherwise no change."""
        if not self.recipe.train.fast:
            return contextlib.nullcontext()
        return torch.autocast(self.params[0].device.type, dtype=torch.bfloat16)

    def ema_module(self, plain: bool = False):
        """A copy of the module with the EMA weights; ``plain``: as the base family's networks (an adaptation's
        adapters folded into the weights)."""
        import copy

        m = copy.deepcopy(self.module)
        ema_params = [p for p in m.parameters() if p.requires_grad]
        self.ema.copy_to(ema_params)
        if plain and self.adaptation is not None:
            m = self.adaptation.plain(self.model, m)
        return m.eval()

    def run(self, steps: int | None = None, stop_after: int | None = None):
        """Train until ``steps`` (default: the recipe's); ``stop_after`` ends early after that many steps
        (used for kill/resume tests). Data parallel: rank 0's weights are broadcast first (as PyTorch's
        DistributedDataParallel does), so every rank starts from the same ones."""
        cfg = self.recipe.train
        total = steps or cfg.steps
        torch.set_num_threads(cfg.threads)
        if self.parallel is not None:
            self.parallel.broadcast_([*self.module.parameters(), *self.module.buffers()])
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=self.step,
            desc=f"train {self.recipe.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            self._run(bar, total, stop_after)
        finally:
            bar.close()
        return self

    def _run(self, bar, total: int, stop_after: int | None):
        cfg = self.recipe.train
        done = 0
        loss_avg = None
        window: dict[str, list] = {}  # the loss function's own metrics (DPO's implicit accuracy) since the last entry
        while self.step < total:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.train_seconds += time.perf_counter() - t0
            self.step_losses.append(loss)
            loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            for key, value in self.metrics.items():
                window.setdefault(key, []).append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            if (self.evaluate or window) and cfg.eval_every and self.step % cfg.eval_every == 0:
                metrics = {k: sum(v) / len(v) for k, v in window.items()}
                window = {}
                if self.evaluate and self.writes:
                    metrics.update(self.evaluate(self.model, self.ema_module()))
                entry = {"step": self.step, "train_minutes": self.train_seconds / 60, "loss": loss_avg, **metrics}
                self.log.append(entry)
                if self.writes:
                    bar.write(json.dumps(entry))
            if self.writes and (self.step % cfg.ckpt_every == 0 or self.step == total):
                self.save_checkpoint()
            done += 1
            if stop_after is not None and done >= stop_after:
                break

    def export(self, directory=None):
        """Write the EMA weights as a loadable model directory (diffusers layout); rank 0 only."""
        directory = Path(directory or self.out_dir / "model")
        if not self.writes:
            return directory
        m = self.ema_module(plain=True)
        orig = self.model.module
        self.model.module = m
        try:
            self.model.save(
                directory,
                {
                    "trained_steps": self.step,
                    "train_minutes": self.train_seconds / 60,
                    "recipe": self.recipe.to_dict(),
                    **({"recipe_changes": self.recipe_changes} if self.recipe_changes else {}),
                },
            )
        finally:
            self.model.module = orig
        atomic_write_json(self.out_dir / "learning_curve.json", self.log)
        return directory
