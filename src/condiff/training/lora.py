"""LoRA adapters for a model's denoising network, through peft (Hu et al. 2022, "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR: W x + (alpha / r) B A x with A random and B zero at the start, so an adapted
network starts exactly at the base).

condiff writes no LoRA layers: ``add_lora`` gives the network a peft ``LoraConfig`` adapter (diffusers'
``add_adapter``), ``save_lora`` writes it with diffusers' ``save_lora_adapter`` (safetensors, the layout
diffusers' ``load_lora_adapter`` and peft read), ``load_lora`` reads one back into a network, and ``set_scales``
weights several stacked adapters. ``merged`` folds every adapter into the base weights for the duration of a
block and restores the base weights bit for bit after.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from condiff.core.files import load_tensors
from condiff.errors import ConfigError, InputFileError, check_int, is_real

WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name for LoRA weights
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2")


def _check_network(net: nn.Module, what: str) -> nn.Module:
    if not callable(getattr(net, "add_adapter", None)):
        raise ConfigError(
            f"{what} needs a diffusers network with adapter support (UNet2DConditionModel), got {type(net).__name__}"
        )
    return net


def add_lora(net: nn.Module, rank: int = 8, alpha: float | None = None, targets=TARGETS, name: str = "default") -> int:
    """Add a LoRA adapter ``name`` of rank ``rank`` (scale alpha / rank; alpha defaults to rank) on the modules
    whose names end with one of ``targets``; freeze everything else. Returns the number of trainable scalars."""
    from peft import LoraConfig

    _check_network(net, "LoRA")
    rank = check_int("LoRA rank", rank, 1, 4096)
    alpha = float(rank if alpha is None else alpha)
    if not is_real(alpha) or alpha <= 0:
        raise ConfigError(f"LoRA alpha must be a positive finite number, got {alpha!r}")
    for p in net.parameters():
        p.requires_grad_(False)
    net.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True), adapter_name=name
    )
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def save_lora(net: nn.Module, directory, name: str = "default") -> Path:
    """Write adapter ``name`` in diffusers' LoRA format (``pytorch_lora_weights.safetensors``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net.save_lora_adapter(str(directory), adapter_name=name, safe_serialization=True)
    return directory


def check_lora(directory) -> dict[str, torch.Tensor]:
    """The weights of a LoRA folder, checked without a network: the file exists, is safetensors (never a pickle)
    and every key names LoRA weights; InputFileError otherwise."""
    path = Path(directory)
    if not (path / WEIGHTS).is_file():
        raise InputFileError(f"{str(path)!r} holds no {WEIGHTS} (a LoRA folder from condiff finetune)")
    weights = load_tensors(path / WEIGHTS, "--lora")  # one-line errors for anything else
    if not weights or not all("lora" in k for k in weights):
        raise InputFileError(f"{str(path / WEIGHTS)!r} holds no LoRA weights (its keys name no lora_A / lora_B)")
    return weights


def load_lora(net: nn.Module, directory, name: str = "default") -> None:
    """Read a LoRA written by ``save_lora`` (or by diffusers) into ``net`` as adapter ``name``."""
    _check_network(net, "--lora")
    path = Path(directory)
    check_lora(path)
    try:
        net.load_lora_adapter(str(path), adapter_name=name, prefix=None, use_safetensors=True, weight_name=WEIGHTS)
    except (ValueError, RuntimeError, KeyError) as e:  # keys or shapes of another network
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputFileError(f"{str(path)!r} is not a LoRA for this network: {first}") from None


def set_scales(net: nn.Module, scales: dict[str, float]) -> None:
    """Activate the adapters ``scales`` names, each weighted by its scale (stacked adapters add up)."""
    names, weights = list(scales), [float(v) for v in scales.values()]
    if not names or not all(is_real(w) for w in weights):
        raise ConfigError(f"adapter scales must be finite numbers, got {scales!r}")
    net.set_adapters(names, weights=weights)


@contextlib.contextmanager
def merged(net: nn.Module):
    """Every active adapter folded into its base weights inside the block, unfolded after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    saved = [{k: v.detach().clone() for k, v in m.get_base_layer().state_dict().items()} for m in layers]
    with torch.no_grad():
        for m in layers:
            m.merge()
    try:
        yield net
    finally:
        with torch.no_grad():  # unmerge (peft's bookkeeping), then the saved weights: W + dW - dW is not W
            for m, state in zip(layers, saved):
                m.unmerge()
                m.get_base_layer().load_state_dict(state)
