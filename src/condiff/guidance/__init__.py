"""Guidance: Denoiser -> Denoiser objects that nest (e.g. ``CFG(D, 3.0)``)."""

from .cfg import CFG, contrast, batch_cond, split_batch
from .thresholding import DynamicThresholding, dynamic_threshold
from .schedules import LinearScale, CosineScale, IntervalScale
from .interval import GuidanceInterval
from .rescale import GuidanceRescale, rescale_guidance
from .negative import NegativeGuidance, Negation
from .adaptive import AdaptiveGuidance, AGState, CountRows
from .linear_ag import LinearAG, LinearAGCoefficients, Regressors, fit_linear_ag, load_linear_ag, save_linear_ag
from .pag import PAG, PAGTerm, Tap
from .classifier import ClassifierGuidance
from .elucd import EluCD
from .steered import Inpaint, SuperResolution, Colorize, Projection, inpaint
from .universal import UniversalGuidance, Forward, Backward, SelfRecurrence

__all__ = ["CFG", "contrast", "batch_cond", "split_batch", "DynamicThresholding", "dynamic_threshold"]
__all__ += ["PAG", "PAGTerm", "Tap", "ClassifierGuidance", "EluCD"]
__all__ += ["LinearScale", "CosineScale", "IntervalScale", "GuidanceInterval", "GuidanceRescale", "rescale_guidance",
            "NegativeGuidance", "Negation", "AdaptiveGuidance", "AGState", "CountRows", "LinearAG",
            "LinearAGCoefficients", "Regressors", "fit_linear_ag", "load_linear_ag", "save_linear_ag"]
__all__ += ["Inpaint", "SuperResolution", "Colorize", "Projection", "inpaint", "UniversalGuidance", "Forward",
            "Backward", "SelfRecurrence"]
from .ppap import MultiExpert, distill_experts, load_ppap, lora_expert, ppap_guidance, save_ppap  # noqa: E402

__all__ += ["MultiExpert", "distill_experts", "load_ppap", "lora_expert", "ppap_guidance", "save_ppap"]
from .minority import (MinorityClassifier, MinorityGuidance, fit_minority_classifier, load_minority,  # noqa: E402
                       minority_score, quantile_levels, save_minority)

__all__ += ["MinorityClassifier", "MinorityGuidance", "fit_minority_classifier", "load_minority", "minority_score",
            "quantile_levels", "save_minority"]
