"""Discrete (masked, absorbing-state) diffusion: mask schedules, time-independent logit denoisers, the DCE
losses, cached samplers and discrete guidance. Tokens are ids 0..V-1; id V is the mask token [M].

The shapes match the continuous side: a schedule in place of the noise schedule, a ``LogitDenoiser`` (tokens
-> log-probabilities over the V real tokens, no time input) in place of the Denoiser, samplers as pure steps
over one loop with StepInfo callbacks and a network-row count, and guidance as denoiser -> denoiser
transforms.
"""

from condiff.discrete.block import (
    BlockPolicy,
    FixedBlocks,
    FutureMasked,
    LearnedBlockPolicy,
    PolicyBlocks,
    sample_blocks,
)
from condiff.discrete.block_cache import BlockDCE, CachedBlockDenoiser, block_dce_loss, sample_blocks_cached
from condiff.discrete.cdcd import cdcd_loss, contrastive_term, inter_negatives, intra_negatives, with_contrastive
from condiff.discrete.denoiser import ExactConditional, LogitDenoiser, NetworkDenoiser, mask_id, one_hot
from condiff.discrete.drakes import (
    SoftStep,
    SoftTrajectory,
    drakes_loss,
    gumbel_softmax,
    relaxed_trajectory,
    soft_trajectory,
    soft_trajectory_ordered,
    step_kl,
    straight_through,
    trajectory_kl,
)
from condiff.discrete.guidance import ClassifierGuided, ExactTilt, FirstOrder, TiltMode, classifier_log_prob
from condiff.discrete.losses import KDCE, TDCE, DCELoss, LambdaDCE
from condiff.discrete.sampling import (
    Direct,
    DiscreteStep,
    Euler,
    TopK,
    TopP,
    TweedieTauLeap,
    expected_nfe,
    sample,
    sample_ordered,
)
from condiff.discrete.schedules import Linear, LogLinear, MaskSchedule

__all__ = [
    "BlockDCE",
    "CachedBlockDenoiser",
    "block_dce_loss",
    "sample_blocks_cached",
    "SoftStep",
    "SoftTrajectory",
    "cdcd_loss",
    "contrastive_term",
    "drakes_loss",
    "gumbel_softmax",
    "inter_negatives",
    "intra_negatives",
    "relaxed_trajectory",
    "soft_trajectory",
    "soft_trajectory_ordered",
    "step_kl",
    "straight_through",
    "trajectory_kl",
    "with_contrastive",
    "BlockPolicy",
    "ClassifierGuided",
    "ExactTilt",
    "FirstOrder",
    "FixedBlocks",
    "FutureMasked",
    "LearnedBlockPolicy",
    "PolicyBlocks",
    "TiltMode",
    "classifier_log_prob",
    "sample_blocks",
    "DCELoss",
    "Direct",
    "DiscreteStep",
    "Euler",
    "ExactConditional",
    "KDCE",
    "LambdaDCE",
    "Linear",
    "LogLinear",
    "LogitDenoiser",
    "MaskSchedule",
    "NetworkDenoiser",
    "TDCE",
    "TopK",
    "TopP",
    "TweedieTauLeap",
    "expected_nfe",
    "mask_id",
    "one_hot",
    "sample",
    "sample_ordered",
]
