"""Diffusion models used to see: classification by denoising error, single-step dense prediction, joint
image + map models, dense matching, and bottleneck features that carry an attribute.

Each method takes objects (a Denoiser, an ``nn.Module``, tensors), never a model family's name: the families and
their recipes live in ``condiff.models``, the commands in ``condiff.cli``.
"""
