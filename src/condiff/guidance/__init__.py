"""Guidance: Denoiser -> Denoiser objects that nest (e.g. ``CFG(D, 3.0)``)."""

from condiff.guidance.adaptive import AdaptiveGuidance, AGState, CountRows
from condiff.guidance.cfg import CFG, batch_cond, contrast, split_batch
from condiff.guidance.classifier import ClassifierGuidance
from condiff.guidance.elucd import EluCD
from condiff.guidance.interval import GuidanceInterval
from condiff.guidance.linear_ag import (
    LinearAG,
    LinearAGCoefficients,
    Regressors,
    fit_linear_ag,
    load_linear_ag,
    save_linear_ag,
)
from condiff.guidance.negative import Negation, NegativeGuidance
from condiff.guidance.pag import PAG, PAGTerm, Tap
from condiff.guidance.rescale import GuidanceRescale, rescale_guidance
from condiff.guidance.schedules import CosineScale, IntervalScale, LinearScale
from condiff.guidance.steered import Colorize, Inpaint, Projection, SuperResolution, inpaint
from condiff.guidance.thresholding import DynamicThresholding, dynamic_threshold
from condiff.guidance.universal import Backward, Forward, SelfRecurrence, UniversalGuidance

__all__ = ["CFG", "contrast", "batch_cond", "split_batch", "DynamicThresholding", "dynamic_threshold"]
__all__ += ["PAG", "PAGTerm", "Tap", "ClassifierGuidance", "EluCD"]
__all__ += [
    "LinearScale",
    "CosineScale",
    "IntervalScale",
    "GuidanceInterval",
    "GuidanceRescale",
    "rescale_guidance",
    "NegativeGuidance",
    "Negation",
    "AdaptiveGuidance",
    "AGState",
    "CountRows",
    "LinearAG",
    "LinearAGCoefficients",
    "Regressors",
    "fit_linear_ag",
    "load_linear_ag",
    "save_linear_ag",
]
__all__ += [
    "Inpaint",
    "SuperResolution",
    "Colorize",
    "Projection",
    "inpaint",
    "UniversalGuidance",
    "Forward",
    "Backward",
    "SelfRecurrence",
]
from condiff.guidance.ppap import MultiExpert, load_ppap, lora_expert, ppap_guidance, save_ppap  # noqa: E402

__all__ += ["MultiExpert", "load_ppap", "lora_expert", "ppap_guidance", "save_ppap"]
from condiff.guidance.minority import MinorityClassifier, MinorityGuidance, minority_score, quantile_levels  # noqa: E402

__all__ += ["MinorityClassifier", "MinorityGuidance", "minority_score", "quantile_levels"]
