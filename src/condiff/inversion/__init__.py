"""Inversion and editing: the sampler's steps run backwards (DDIM), recorded noise (edit-friendly DDPM),
optimised null conditions (null-text), fixed-point refinement (DCI) and SDEdit, all over any denoiser."""

from condiff.inversion.dci import DCIResult, correction, dci_invert, fixed_point_residual
from condiff.inversion.ddim import DestinationLabel, Inversion, ddim_inversion_step, invert
from condiff.inversion.edit_friendly import NoiseMaps, extract_noise_maps, noisy_latents, replay
from condiff.inversion.injection import FeatureInjection, parse_layers, resolve_layers
from condiff.inversion.methods import (
    METHODS,
    DCIInversion,
    DDIMInversion,
    EditFriendly,
    EditMethod,
    Inverted,
    NullTextInversion,
    PlugAndPlay,
    SDEdit,
    get_method,
    load_inverted,
    save_inverted,
)
from condiff.inversion.null_text import NullText, StepwiseNull, learning_rate, null_text_inversion
from condiff.inversion.sdedit import sdedit

__all__ = [
    "DestinationLabel",
    "Inversion",
    "ddim_inversion_step",
    "invert",
    "DCIResult",
    "correction",
    "dci_invert",
    "fixed_point_residual",
    "NoiseMaps",
    "extract_noise_maps",
    "noisy_latents",
    "replay",
    "METHODS",
    "DCIInversion",
    "DDIMInversion",
    "EditFriendly",
    "EditMethod",
    "Inverted",
    "NullTextInversion",
    "SDEdit",
    "get_method",
    "load_inverted",
    "save_inverted",
    "NullText",
    "StepwiseNull",
    "learning_rate",
    "null_text_inversion",
    "sdedit",
    "FeatureInjection",
    "parse_layers",
    "resolve_layers",
    "PlugAndPlay",
]
