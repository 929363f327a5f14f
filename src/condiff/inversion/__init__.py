"""Inversion and editing: the sampler's steps run backwards (DDIM), recorded noise (edit-friendly DDPM),
optimised null conditions (null-text), fixed-point refinement (DCI) and SDEdit, all over any denoiser."""

from .ddim import DestinationLabel, Inversion, ddim_inversion_step, invert
from .dci import DCIResult, correction, dci_invert, fixed_point_residual
from .injection import FeatureInjection, parse_layers, resolve_layers
from .edit_friendly import NoiseMaps, extract_noise_maps, noisy_latents, replay
from .methods import (METHODS, DCIInversion, DDIMInversion, EditFriendly, EditMethod, Inverted, NullTextInversion,
                      PlugAndPlay, SDEdit, get_method, load_inverted, save_inverted)
from .null_text import NullText, StepwiseNull, learning_rate, null_text_inversion
from .sdedit import sdedit

__all__ = ["DestinationLabel", "Inversion", "ddim_inversion_step", "invert", "DCIResult", "correction", "dci_invert",
           "fixed_point_residual", "NoiseMaps", "extract_noise_maps", "noisy_latents", "replay", "METHODS",
           "DCIInversion", "DDIMInversion", "EditFriendly", "EditMethod", "Inverted", "NullTextInversion", "SDEdit",
           "get_method", "load_inverted", "save_inverted", "NullText", "StepwiseNull", "learning_rate",
           "null_text_inversion", "sdedit", "FeatureInjection", "parse_layers", "resolve_layers", "PlugAndPlay"]
