"""What a model family is (``ModelFamily``) and the safe loader its parts use (``load_pretrained``).

A ModelFamily knows one conditional task: its networks (diffusers classes), how a raw condition (token ids,
class labels) is encoded into the ``cond`` mapping the denoiser takes, how to make training batches, how to draw
random evaluation conditions and how to score samples with an exact (or fixed) judge. The families
(``shapes``, ``digits``, ...) subclass it; ``condiff.models.base`` registers them and loads models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from condiff.core.denoiser import as_prediction
from condiff.core.files import load_json, load_tensors, refuse_pickles
from condiff.errors import InputFileError, one_of
from condiff.solvers.pfgmpp import noise_for_D
from condiff.training.conditioning import cep, cfg_dropout
from condiff.training.objectives import TIME_SAMPLERS, WEIGHTINGS, diffusion_loss


class ModelFamily:
    name = "?"
    attributes: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] = (3, 32, 32)

    # networks --------------------------------------------------------------------------------------
    def build(self, model_cfg: dict) -> nn.ModuleDict:
        raise NotImplementedError

    def forward(self, module: nn.ModuleDict, model_cfg: dict, x, t_in, cond) -> torch.Tensor:
        raise NotImplementedError

    # conditions ------------------------------------------------------------------------------------
    def encode(self, module, raw: torch.Tensor) -> dict:
        raise NotImplementedError

    def null_raw(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def parse_prompt(self, text: str) -> torch.Tensor:
        raise NotImplementedError

    def captions(self, raw: torch.Tensor) -> list[str]:
        """Each raw condition as the prompt that names it (what a sample's sidecar records per tile)."""
        raise NotImplementedError

    def random_conditions(self, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw conditions, target attributes) for evaluation."""
        raise NotImplementedError

    def score(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def quality(self, images: torch.Tensor) -> dict:
        """How close the samples' distribution is to real data, beside ``score``'s per-sample accuracy:
        {"frechet", "precision", "recall", "features"} where the family has a feature space and held-out
        real images (digits), else {}."""
        return {}

    # training --------------------------------------------------------------------------------------
    def training_batch(self, step: int, n: int, generator, seed: int, objective) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, module, model_cfg, schedule, objective, x0, raw, generator) -> torch.Tensor:
        """Per-sample loss: encode, CFG dropout, optional CEP, then the diffusion objective."""
        cond = self.encode(module, raw)
        null = self.encode(module, self.null_raw(1))
        cond = cfg_dropout(cond, null, objective.cond_dropout, generator)
        if objective.cep_gamma > 0:
            cond = {
                k: cep(v, objective.cep_gamma, objective.cep_kind, generator)
                if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v
                for k, v in cond.items()
            }
        pred = as_prediction(objective.prediction)
        if objective.time_sampler not in TIME_SAMPLERS:
            raise one_of("time sampler", objective.time_sampler, TIME_SAMPLERS)
        if objective.weighting not in WEIGHTINGS:
            raise one_of("weighting", objective.weighting, WEIGHTINGS)
        t = TIME_SAMPLERS[objective.time_sampler]().sample(schedule, x0.shape[0], generator)
        # Gaussian (torch.randn) unless objective.pfgmpp_D > 0: PFGM++ kernel noise (condiff.solvers.pfgmpp)
        eps = noise_for_D(getattr(objective, "pfgmpp_D", 0)).unit(x0.shape, generator)
        fn = lambda x, tt, c: self.forward(module, model_cfg, x, tt.to(x.dtype), c)  # noqa: E731
        return diffusion_loss(fn, x0, cond, t, eps, schedule, pred, WEIGHTINGS[objective.weighting]())

    # saving ----------------------------------------------------------------------------------------
    def save_parts(self, module, directory: Path):
        module["unet"].save_pretrained(directory / "unet")

    def load_parts(self, directory: Path, model_cfg: dict) -> nn.ModuleDict:
        raise NotImplementedError


def load_pretrained(cls, directory: Path, what: str | None = None):
    """``cls.from_pretrained(directory)`` offline and from safetensors only (a folder holding pickled weights is
    refused first, by ``refuse_pickles``; ``what`` names the option in that refusal), refusing weights that leave
    parameters missing, mismatched or unused (diffusers only warns, and fills missing parameters with random
    values)."""
    refuse_pickles(directory, what)
    module, info = cls.from_pretrained(directory, output_loading_info=True, use_safetensors=True, local_files_only=True)
    bad = [f"missing {k}" for k in info.get("missing_keys", [])]
    bad += [f"mismatched {k[0] if isinstance(k, tuple) else k}" for k in info.get("mismatched_keys", [])]
    bad += [f"unexpected {k}" for k in info.get("unexpected_keys", [])]
    if bad:
        raise InputFileError(
            f"the weights in {str(directory)!r} do not match its config: {len(bad)} tensor(s) wrong, e.g. {bad[0]}"
        )
    return module


@dataclass
class TaskModel:
    """A trained model of a task family (the ``condiff.cli.recipe_kinds`` families): its networks, the tables of the
    recipe it was built from (as its condiff.json records them), the folder it was loaded from and that condiff.json.
    Each family subclasses it with the properties and methods it needs."""

    module: nn.ModuleDict
    config: dict
    path: Path | None = None
    info: dict = field(default_factory=dict)


def family_dir(path, family: str) -> Path | None:
    """The model folder ``path`` names for a task family: itself when its condiff.json has a ``family`` table, or
    its ``model`` sub-folder (a training run's --out); None otherwise."""
    path = Path(path)
    for d in (path, path / "model"):
        f = d / "condiff.json"
        try:
            info = load_json(f) if f.is_file() else None
        except (OSError, ValueError, InputFileError):
            continue
        if isinstance(info, dict) and family in info:
            return d
    return None


def load_fitting_weights(module: nn.Module, directory: Path, weights: str, what: str) -> None:
    """Load ``directory / weights`` (safetensors) into ``module``; weights that do not fit it are one
    InputFileError naming the folder."""
    tensors = load_tensors(directory / weights, what)
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0][:150]
        raise InputFileError(f"{what} {str(directory)!r}: {weights} does not fit its condiff.json ({first})") from None
