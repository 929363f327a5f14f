"""Bottleneck ("h-space") features that carry an attribute: collect, a k-sparse autoencoder, attribution and
interventions during sampling.

h-space (Kwon, Jeong & Uh, "Diffusion Models Already Have a Semantic Latent Space", ICLR 2023, sec. 3.2) is
the output of the UNet's bottleneck (diffusers' ``mid_block``); a layer is named by its dotted module name in
the network (``'mid'`` is an alias of ``mid_block``; condiff's families keep the UNet at ``net['unet']``).

1. ``collect_hspace``: the chosen module's output at every network call of a sampling run (a forward hook
   registered for one call at a time and removed in ``finally``).
2. ``TopKSAE``: a k-sparse autoencoder over h-space vectors (Makhzani & Frey, "k-Sparse Autoencoders", 2013;
   Gao et al., "Scaling and Evaluating Sparse Autoencoders", 2024, eqs. 1-2), as in DiffLens (Shi et al.,
   "Dissecting and Mitigating Diffusion Bias via Mechanistic Interpretability", CVPR 2025):

       z = TopK(ReLU(W_e (h - b) / s + b_e)),      h_hat = s W_d z + b,      loss = |h - h_hat|^2

   with unit-norm decoder columns and ``s`` a fixed data scale (the RMS of the centred training vectors, so
   one learning rate fits any layer). One vector per spatial position of the (B, C, H, W) output (channels
   are the vector): positions share one dictionary, so a feature found where an object was seen applies
   wherever the next object is, and a run gives H * W times more training vectors than pooling would.
3. ``attribute``: gradient x activation (DiffLens sec. 3.2; Simonyan et al. 2014, Shrikumar et al. 2016):
   ``A_j = sum over calls, positions of z_j * d score / d z_j``, averaged over rows. ``through='step'`` scores
   each call's own estimate x0_hat (one backward per call); ``'trajectory'`` scores the final sample and
   backpropagates through the solver's remaining steps. ``score`` is any differentiable attribute score of an
   image (one value per row). The trajectory itself is plain sampling: the edit that carries the gradient adds
   s W_d (z - stopgrad(z)) = 0.
4. ``FeatureEdit``: a Denoiser -> Denoiser wrapper that, during its forward only, rewrites chosen latents,
   z_j <- lambda_j z_j + c_j (DiffLens sec. 3.3), and puts the change back into h as ``h + s W_d (z' - z)`` (the
   SAE's reconstruction error stays in h). ``steering(attribution, n, lambda, sign)`` picks the edit that pushes
   the score: the n most positive latents scaled by lambda, the n most negative set to 0.
   ``HShift``: the h-space baseline ``h <- h + alpha * dh(t)``, with ``mean_difference`` giving dh as the mean h
   of one attribute group minus another's at each recorded time (Kwon et al.'s Delta-h, sec. 3.3, as a fixed
   difference of means instead of their learned f_t; added in the plain, symmetric reverse process, not their
   asymmetric one).
   Both wrap any denoiser, so every solver and guidance composes, and they stack; lambda = 1 with c = 0 (alpha 0)
   calls the wrapped denoiser without any hook: bit-identical to plain sampling. An optional time window
   ``t_range`` (Asyrp edits the early steps only; ``early_window(grid, f)``: the first fraction f of the steps)
   limits where they act.
5. ``Features`` / ``load_features``: the SAE, the attribution, the chosen latents and Delta-h in one safetensors
   file (JSON metadata; never a pickle).

Files: ``features_hspace`` (hooks, collection, Delta-h), ``features_sae`` (the SAE, attribution, edits, the
file); this module names them all. Which layer carries an attribute is a property of the network, not of the
method: in the bundled shapes model the bottleneck (``mid_block``) does not carry the object's size at all (its
h taken from a run whose caption names the other size changes no sample) while the decoder's last
cross-attention block (``up_blocks.0.attentions.1``, the same 4x4 resolution) and the upsampler after it
(``up_blocks.0.upsamplers.0``, 8x8, after the last cross-attention) carry all of it (docs/tasks.md).
"""

from condiff.tasks.features_hspace import (
    ALIASES,
    LAYOUTS,
    HShift,
    HSpace,
    Recorder,
    check_layout,
    collect_hspace,
    early_window,
    find_layer,
    from_vectors,
    hook_root,
    mean_difference,
    output_hook,
    to_vectors,
)
from condiff.tasks.features_sae import (
    FORMAT,
    THROUGH,
    Attribution,
    FeatureEdit,
    Features,
    SAEFit,
    TopKSAE,
    attribute,
    load_features,
    sae_nmse,
    steering,
    topk,
    train_sae,
)

__all__ = [
    "ALIASES",
    "FORMAT",
    "LAYOUTS",
    "THROUGH",
    "Attribution",
    "FeatureEdit",
    "Features",
    "HShift",
    "HSpace",
    "Recorder",
    "SAEFit",
    "TopKSAE",
    "attribute",
    "check_layout",
    "collect_hspace",
    "early_window",
    "find_layer",
    "from_vectors",
    "hook_root",
    "load_features",
    "mean_difference",
    "output_hook",
    "sae_nmse",
    "steering",
    "to_vectors",
    "topk",
    "train_sae",
]
