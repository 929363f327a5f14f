"""DiffuSIA: an encoder-decoder transformer for continuous-embedding text diffusion with spiral interaction.

The decoder denoises the target's word embeddings z_t (B, L, D) given the source tokens, as in SeqDiffuSeq
(Yuan et al. 2022), the encoder-decoder form of DiffuSeq (Gong et al., ICLR 2023); DiffuSIA (Tan et al. 2023,
"DiffuSIA: A Spiral Interaction Architecture for Encoder-Decoder Text Diffusion") lets information flow both
ways between the two stacks, layer by layer:

    e_{-1} = source embeddings,  d_{-1} = decoder input (projected z_t + positions + time)
    e_k = Enc_k(e_{k-1}, context d_{k-1})        (spiral: the encoder reads the decoder of the layer before)
    d_k = Dec_k(d_{k-1}, context e_k)             (the decoder reads the encoder of its own layer)

so the encoder is recomputed at every denoising step, interleaved with the decoder. Every layer is pre-norm:
self-attention, cross-attention, MLP, each a residual branch. ``spiral=False`` drops the encoder's
cross-attention: the plain encoder-decoder baseline (the same layer-aligned decoder cross-attention, so the two
differ by the interaction alone), whose encoder never sees z_t or t and can be computed once per sample
(``encode``). The encoder's interaction branch starts with a zero output projection, so a freshly built
``spiral=True`` net computes exactly what the ``spiral=False`` net with its other weights computes.

Word embeddings E (V, D) are shared: they embed the source (then projected to the width), define the
diffusion's clean target z_0 = E(y), and, tied, read out the logits x0_hat E^T used for rounding (Li et al.
2022, Diffusion-LM). The forward returns the predicted clean embeddings x0_hat (B, L, D), their logits (B, L, V)
and the encoder's per-layer states.

A diffusers ``ModelMixin``, so ``save_pretrained``/``from_pretrained`` write and read safetensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from condiff.errors import ConfigError


class DiffuSIAOutput(NamedTuple):
    x0: torch.Tensor  # (B, L, D) predicted clean target embeddings
    logits: torch.Tensor  # (B, L, V) x0 E^T, the rounding distribution's logits
    encoder: tuple[torch.Tensor, ...]  # each encoder layer's output (B, Ls, dim)


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when it is ``x``), no mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class CrossBranch(nn.Module):
    """A pre-norm cross-attention branch: attention of LN(x) over LN(context)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)

    def forward(self, x, context):
        return self.attn(self.norm(x), self.norm_context(context))


class Layer(nn.Module):
    """Pre-norm self-attention, an optional cross-attention (``cross``), MLP; each a residual branch."""

    def __init__(self, dim: int, heads: int, cross: bool, zero_cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross = CrossBranch(dim, heads) if cross else None
        if cross and zero_cross:
            nn.init.zeros_(self.cross.attn.out.weight)
            nn.init.zeros_(self.cross.attn.out.bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, context=None):
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        if self.cross is not None:
            x = x + self.cross(x, context)
        return x + self.mlp(self.norm2(x))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000 t (t in [0, 1], one per sample) (B, dim), as in DDPM's U-Net."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


class DiffuSIANet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        vocab_size: int = 8,
        length: int = 12,
        dim: int = 128,
        layers: int = 3,
        heads: int = 4,
        spiral: bool = True,
        embed_dim: int = 32,
        src_length: int | None = None,
    ):
        super().__init__()
        src_length = src_length or length
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # N(0, 1) entries, as DiffuSeq's word embedding
        self.src_in = nn.Linear(embed_dim, dim)
        self.src_positions = nn.Parameter(torch.randn(src_length, dim) * 0.02)
        self.tgt_in = nn.Linear(embed_dim, dim)
        self.tgt_positions = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.encoder = nn.ModuleList(Layer(dim, heads, cross=spiral, zero_cross=True) for _ in range(layers))
        self.decoder = nn.ModuleList(Layer(dim, heads, cross=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, embed_dim)

    # the shared word embedding ---------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """E(tokens): (B, L) ids -> (B, L, embed_dim), the diffusion's clean target z_0."""
        return self.embedding(tokens)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x E^T: the tied read-out (B, L, V) of embeddings ``x`` (B, L, embed_dim)."""
        return x @ self.embedding.weight.t()

    # the two stacks -------------------------------------------------------------------------------------------
    def source_states(self, src: torch.Tensor) -> torch.Tensor:
        """The encoder's input (B, Ls, dim): projected shared embeddings of the source plus positions."""
        return self.src_in(self.embedding(src)) + self.src_positions[: src.shape[1]]

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The plain encoder's per-layer states (spiral=False only: they do not depend on z_t or t, so a sampler
        computes them once); a spiral net's encoder needs the decoder and runs inside ``forward``."""
        if self.config.spiral:
            raise ConfigError("a spiral DiffuSIANet's encoder reads the decoder; it runs only inside forward")
        e, states = self.source_states(src), []
        for layer in self.encoder:
            e = layer(e)
            states.append(e)
        return tuple(states)

    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        src: torch.Tensor,
        encoder_states: tuple[torch.Tensor, ...] | None = None,
    ) -> DiffuSIAOutput:
        """x0_hat, its logits and the encoder states for noisy target embeddings ``z_t`` (B, L, embed_dim) at
        times ``t`` (B,) in [0, 1] given source ids ``src`` (B, Ls). ``encoder_states``: the plain net's
        ``encode(src)`` reused (spiral=False only)."""
        spiral = self.config.spiral
        if encoder_states is not None and spiral:
            raise ConfigError("encoder_states can be reused only by a spiral=False DiffuSIANet")
        t = torch.as_tensor(t, device=z_t.device)
        if t.dim() == 0:
            t = t.expand(z_t.shape[0])
        d = self.tgt_in(z_t) + self.tgt_positions[: z_t.shape[1]]
        d = d + self.time_mlp(timestep_embedding(t, d.shape[-1]).to(d.dtype))[:, None]
        e = None if encoder_states is not None else self.source_states(src)
        states = []
        for k, (enc, dec) in enumerate(zip(self.encoder, self.decoder)):
            if encoder_states is not None:
                e = encoder_states[k]
            else:
                e = enc(e, d) if spiral else enc(e)  # spiral: encoder layer k reads decoder layer k-1
            states.append(e)
            d = dec(d, e)  # decoder layer k reads encoder layer k
        x0 = self.out(self.norm(d))
        return DiffuSIAOutput(x0, self.logits(x0), tuple(states))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
