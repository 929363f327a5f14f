"""A local diffusers pipeline folder, loaded offline, as condiff parts.

``load_pipeline(DIR)`` reads ``model_index.json`` and loads each part with its own class's
``from_pretrained(..., local_files_only=True)`` (no hub name is ever resolved, so nothing reaches the network;
weights from safetensors only, ``use_safetensors=True``, and a folder holding any pickled file is refused
before anything in it is read, by ``condiff.core.files.refuse_pickles``):
the denoising network (``unet`` or ``transformer``), ``scheduler``, and where present ``vae``,
``text_encoder`` + ``tokenizer`` (CLIP-style text conditioning as Stable Diffusion v1/v2 use it) and
DiT's ``id2label``. The result gives:

- ``denoiser``: the network as a condiff Denoiser (``interop.denoiser.wrap_diffusers``);
- ``condition(prompts, n, negative)``: the ``cond`` mapping with its ``null`` entry, computed as diffusers'
  ``encode_prompt`` does (padded to the tokenizer's max length, the text encoder's last hidden state,
  ``n`` copies of each prompt in a row; the empty prompt, or ``negative``, as the null condition);
- ``initial_latents`` / ``decode`` / ``encode``: in ``interop.latents``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from condiff.core.files import refuse_pickles
from condiff.errors import ConfigError, InputFileError
from condiff.interop.denoiser import SUPPORTED, wrap_diffusers
from condiff.interop.schedule import grid_from_scheduler

NETWORK_KEYS = ("unet", "transformer")


@dataclass
class DiffusersPipeline:
    """The parts of a diffusers pipeline folder (module docstring). ``kind`` is the pipeline class name."""

    kind: str
    network: Any
    scheduler: Any
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    labels: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def denoiser(self):
        return wrap_diffusers(self.network, self.scheduler)

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def text_conditioned(self) -> bool:
        return self.text_encoder is not None and self.tokenizer is not None

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.network.config.in_channels)

    def grid(self, steps: int) -> torch.Tensor:
        """The time grid this pipeline's scheduler visits in ``steps`` steps (``interop.schedule``)."""
        return grid_from_scheduler(self.scheduler, steps)

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder's last hidden state for ``prompts`` padded to the tokenizer's max length."""
        tok = self.tokenizer
        ids = tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        )
        mask = ids.attention_mask if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        with torch.no_grad():
            return self.text_encoder(ids.input_ids, attention_mask=mask)[0]

    def class_index(self, prompt: str) -> int:
        """A DiT class from a label name (any of id2label's comma-separated synonyms) or an index."""
        names = {name.strip(): int(k) for k, v in self.labels.items() for name in str(v).split(",")}
        if prompt in names:
            return names[prompt]
        count = int(self.network.config.get("num_embeds_ada_norm") or 0)
        if prompt.strip().isdigit() and int(prompt) < count:
            return int(prompt)
        shown = sorted(names)
        accepted = ", ".join(shown[:12]) + (f" ... ({len(shown)} names)" if len(shown) > 12 else "")
        raise ConfigError(
            f"prompt {prompt!r} is not a class of this pipeline; accepted: a class index in "
            f"[0, {count - 1}]" + (f" or a name: {accepted}" if shown else "")
        )

    def condition(self, prompts: Sequence[str], n: int = 1, negative: str | Sequence[str] | None = None) -> dict:
        """The cond mapping for ``n`` samples of each prompt (``[p0]*n + [p1]*n + ...``), with ``null``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.text_conditioned:
            emb = self.encode_prompt(prompts).repeat_interleave(n, 0)
            neg = (
                [""] * len(prompts)
                if negative is None
                else ([negative] * len(prompts) if isinstance(negative, str) else list(negative))
            )
            null = self.encode_prompt(neg).repeat_interleave(n, 0)
            return {"encoder_hidden_states": emb, "null": {"encoder_hidden_states": null}}
        if self.network.config.get("num_embeds_ada_norm"):
            labels = torch.tensor([self.class_index(p) for p in prompts]).repeat_interleave(n)
            if negative is None:  # DiT's null class is the last row of its label table
                null = torch.full_like(labels, int(self.network.config.num_embeds_ada_norm))
            else:
                neg = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
                null = torch.tensor([self.class_index(p) for p in neg]).repeat_interleave(n)
            return {"class_labels": labels, "null": {"class_labels": null}}
        if negative is not None:
            raise ConfigError("a negative prompt needs a text- or class-conditioned pipeline")
        return {}


def _load_index(path: Path) -> dict:
    if not path.exists():
        raise InputFileError(f"pipeline folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise InputFileError(f"--pipeline must be a diffusers pipeline folder, got the file {str(path)!r}")
    refuse_pickles(path, "--pipeline")  # before any file in it is read
    index = path / "model_index.json"
    if not index.is_file():
        raise InputFileError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json)")
    try:
        meta = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"cannot read {str(index)!r}: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise InputFileError(f"{str(index)!r} must hold a JSON object")
    return meta


def _load_part(path: Path, name: str, entry):
    """``library.Class.from_pretrained(path/name, local_files_only=True)`` for a model_index entry, with
    ``use_safetensors=True`` for the parts with weights (schedulers and tokenizers hold JSON and text only)."""
    import importlib

    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        return None
    library, cls_name = entry
    if library not in ("diffusers", "transformers"):
        raise InputFileError(
            f"part {name!r} of {str(path)!r} is a {library}.{cls_name}; condiff loads "
            f"diffusers and transformers parts only"
        )
    cls = getattr(importlib.import_module(library), cls_name, None)
    if cls is None:
        raise InputFileError(f"part {name!r}: {library} has no class {cls_name!r}")
    if not (path / name).is_dir():
        raise InputFileError(f"part {name!r} of {str(path)!r} is missing (no folder {str(path / name)!r})")
    try:
        if name in ("scheduler", "tokenizer"):
            return cls.from_pretrained(path / name, local_files_only=True)
        # safetensors only: a folder with pickled .bin weights is refused rather than unpickled
        part = cls.from_pretrained(path / name, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError, KeyError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputFileError(f"cannot load part {name!r} of {str(path)!r} ({type(e).__name__}: {first})") from None
    return part.eval() if hasattr(part, "eval") else part


def size_multiple(path) -> int:
    """What image sizes must be a multiple of (VAE factor x patch size), from the folder's config files
    alone, so that a bad --height is refused before any weights are read."""
    path = Path(path)
    meta = _load_index(path)
    key = next((k for k in NETWORK_KEYS if k in meta), None)

    def config(part):
        try:
            return json.loads((path / part / "config.json").read_text())
        except (OSError, ValueError):
            return {}

    vae = config("vae") if "vae" in meta else {}
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1) if vae else 1
    return factor * int((config(key) if key else {}).get("patch_size") or 1)


def _quiet():
    """No progress bars or info logs from diffusers / transformers (CLI errors must stay one line)."""
    from condiff.models.base import silence_diffusers

    silence_diffusers()
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def load_pipeline(path, dtype: torch.dtype = torch.float32) -> DiffusersPipeline:
    """Load a local diffusers pipeline folder offline (module docstring)."""
    _quiet()
    path = Path(path)
    meta = _load_index(path)
    key = next((k for k in NETWORK_KEYS if k in meta), None)
    if key is None or "scheduler" not in meta:
        raise InputFileError(
            f"{str(path)!r}: model_index.json names no unet/transformer and scheduler; condiff needs both"
        )
    entry = meta[key]
    cls_name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else entry
    if cls_name not in SUPPORTED:
        raise InputFileError(f"{str(path)!r}: its {key} is a {cls_name}; condiff wraps {', '.join(SUPPORTED)}")
    parts = {
        name: _load_part(path, name, meta[name])
        for name in (key, "scheduler", "vae", "text_encoder", "tokenizer")
        if name in meta
    }
    extra = parts[key].config.get("addition_embed_type")
    if extra is not None:
        raise InputFileError(
            f"{str(path)!r}: the UNet takes added conditions ({extra!r}, SDXL-style: two text "
            f"encoders and size conditioning), which condiff's pipeline loader does not build yet"
        )
    for name in (key, "vae", "text_encoder"):
        if parts.get(name) is not None:
            parts[name] = parts[name].to(dtype)
    labels = meta.get("id2label") or {}
    return DiffusersPipeline(
        str(meta.get("_class_name", "?")),
        parts[key],
        parts["scheduler"],
        parts.get("vae"),
        parts.get("text_encoder"),
        parts.get("tokenizer"),
        dict(labels),
        path,
    )
