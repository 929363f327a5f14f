"""A loaded model: a family, its networks, schedule, prediction and configuration, with the Denoiser every solver
and guidance takes (``denoiser``), its conditions (``condition``) and an atomic ``save`` (safetensors, JSON and a
diffusers scheduler config). Its own module so that model families can build one without importing the registry of
families in condiff.models.base (which imports them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from condiff.core.denoiser import Prediction, wrap
from condiff.core.files import atomic_dir, atomic_write_json
from condiff.core.schedules import NoiseSchedule
from condiff.models.family import ModelFamily
from condiff.solvers.pfgmpp import GaussianNoise


@dataclass
class LoadedModel:
    family: ModelFamily
    module: nn.ModuleDict
    schedule: NoiseSchedule
    prediction: Prediction
    model_cfg: dict
    path: Path | None = None
    info: dict = field(default_factory=dict)
    noise: object = field(default_factory=GaussianNoise)  # the training noise family (GaussianNoise, PFGMPPNoise)

    def __repr__(self) -> str:  # one line, not the module tree
        params = sum(p.numel() for p in self.module.parameters())
        return (
            f"LoadedModel({self.family.name}, {self.prediction.name}, {self.schedule!r}, "
            f"{params / 1e6:.2f} M parameters, path={None if self.path is None else str(self.path)!r})"
        )

    @property
    def denoiser(self):
        fam, cfg = self.family, self.model_cfg
        return wrap(
            self.module,
            self.schedule,
            self.prediction,
            call=lambda net, x, t_in, cond: fam.forward(net, cfg, x, t_in, cond),
            channels=fam.image_shape[0],
        )

    def prior(self, shape, t_start: float, generator=None, dtype=torch.float32) -> torch.Tensor:
        """x_T at the first grid time: the noise family's prior at sigma(t_start) (Gaussian: exactly
        condiff.core.sampling.initial_noise; PFGM++: the kernel around 0 at r = sigma sqrt(D))."""
        sig = float(self.schedule.sigma(torch.tensor(float(t_start), dtype=torch.float64)))
        return self.noise.prior(shape, sig, generator, dtype)

    def data_batch(self, step: int, n: int, generator, seed: int) -> torch.Tensor:
        """``n`` clean training images x0 of the family (batch ``step`` of the data order), without the
        objective's condition dropout."""
        from condiff.training.recipe import ObjectiveConfig

        return self.family.training_batch(step, n, generator, seed, ObjectiveConfig())[0]

    def condition(self, raw: torch.Tensor) -> dict:
        """The cond mapping for raw conditions, with its 'null' variant for CFG."""
        with torch.no_grad():
            cond = self.family.encode(self.module, raw)
            cond["null"] = self.family.encode(self.module, self.family.null_raw(raw.shape[0]))
        return cond

    def save(self, directory, extra: dict | None = None):
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.family.save_parts(self.module, tmp)
            _save_scheduler_config(self.info.get("schedule_cfg", {}), self.prediction, tmp / "scheduler")
            atomic_write_json(
                tmp / "condiff.json",
                {
                    "family": self.family.name,
                    "prediction": self.prediction.name,
                    "schedule": self.info.get("schedule_cfg") or self.schedule.to_config(),
                    "model": self.model_cfg,
                    "noise": self.noise.to_config(),
                    **(extra or {}),
                },
            )


def _save_scheduler_config(schedule_cfg: dict, prediction, directory: Path):
    """A diffusers DDPMScheduler config matching a VP-discrete beta schedule, for diffusers users."""
    if schedule_cfg.get("type") != "vp_discrete" or "beta_schedule" not in schedule_cfg:
        return
    from diffusers import DDPMScheduler

    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}.get(prediction.name, "epsilon")
    DDPMScheduler(
        num_train_timesteps=schedule_cfg.get("num_steps", 1000),
        beta_schedule=schedule_cfg["beta_schedule"],
        beta_start=schedule_cfg.get("beta_start", 1e-4),
        beta_end=schedule_cfg.get("beta_end", 2e-2),
        prediction_type=pred,
        clip_sample=False,
    ).save_pretrained(directory)
