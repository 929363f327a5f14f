"""A condiff model written as a diffusers-format folder (``condiff export``).

The folder holds what diffusers can load with its own classes, plus what it cannot, said plainly:

- ``unet/``: the network (``UNet2DConditionModel`` for shapes, ``UNet2DModel`` for digits), written by
  ``save_pretrained``; diffusers' ``<Class>.from_pretrained(DIR/unet)`` loads it;
- ``scheduler/``: a ``DDPMScheduler`` config with the model's beta schedule and ``prediction_type`` (v_prediction
  for shapes); any diffusers DDPM-family scheduler loads it (``DDIMScheduler.from_pretrained(DIR/scheduler)``);
- ``text_encoder/`` (shapes): condiff's ``SlotTextEncoder`` in diffusers' ModelMixin format. It is not a
  diffusers or transformers class: load it with ``condiff.nets.SlotTextEncoder.from_pretrained``;
- ``condiff_export.json``: what each part is and how the network is called. The shapes UNet runs on a
  2x pixel-unshuffled image (32x32x3 -> 16x16x12) and takes the encoder's pooled vector as ``class_labels``;
  a diffusers pipeline class does neither, so there is no ``model_index.json`` and
  ``DiffusionPipeline.from_pretrained`` is not expected to load the folder.
"""

from __future__ import annotations

from pathlib import Path

from condiff.core.files import atomic_dir, atomic_write_json
from condiff.errors import ConfigError

DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def scheduler_config(schedule_cfg: dict, prediction: str) -> dict:
    """DDPMScheduler keyword arguments for a VP-discrete beta schedule and a prediction type."""
    if schedule_cfg.get("type") != "vp_discrete" or "beta_schedule" not in schedule_cfg:
        raise ConfigError(
            f"export needs a VP-discrete beta schedule (as diffusers' schedulers have), got "
            f"{schedule_cfg.get('type')!r}"
        )
    if prediction not in DIFFUSERS_PREDICTION:
        raise ConfigError(f"export supports the prediction types {', '.join(DIFFUSERS_PREDICTION)}, got {prediction!r}")
    return dict(
        num_train_timesteps=schedule_cfg.get("num_steps", 1000),
        beta_schedule=schedule_cfg["beta_schedule"],
        beta_start=schedule_cfg.get("beta_start", 1e-4),
        beta_end=schedule_cfg.get("beta_end", 2e-2),
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        clip_sample=False,
        timestep_spacing="trailing",
    )


def export_model(model, out) -> Path:
    """Write the loaded condiff ``model`` (``LoadedModel``) into ``out`` (module docstring), atomically."""
    from diffusers import DDPMScheduler

    cfg = scheduler_config(model.info.get("schedule_cfg") or model.schedule.to_config(), model.prediction.name)
    out = Path(out)
    parts = {"unet": f"diffusers.{type(model.module['unet']).__name__}", "scheduler": "diffusers.DDPMScheduler"}
    if "text_encoder" in model.module:
        parts["text_encoder"] = f"condiff.nets.{type(model.module['text_encoder']).__name__} (not a diffusers class)"
    with atomic_dir(out) as tmp:
        model.family.save_parts(model.module, tmp)
        DDPMScheduler(**cfg).save_pretrained(tmp / "scheduler")
        atomic_write_json(
            tmp / "condiff_export.json",
            {
                "family": model.family.name,
                "parts": parts,
                "prediction": model.prediction.name,
                "pixel_unshuffle": model.model_cfg.get("pixel_unshuffle", 1),
                "call": (
                    "unet(pixel_unshuffle(x, f), t, encoder_hidden_states=hidden, class_labels=pooled), output "
                    "pixel_shuffle(., f); (hidden, pooled) = text_encoder(tokens)"
                )
                if "text_encoder" in model.module
                else "unet(x, t, class_labels=y)",
                "loads_in_diffusers": ["unet", "scheduler"],
                "not_loadable_in_diffusers": [p for p in parts if p not in ("unet", "scheduler")]
                + ["the folder as a DiffusionPipeline (no pipeline class calls the UNet this way)"],
            },
        )
    return out
