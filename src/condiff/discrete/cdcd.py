"""Discrete Contrastive Diffusion (CDCD; Zhu et al., "Discrete Contrastive Diffusion for Cross-Modal Music and
Image Generation", ICLR 2023, arXiv:2206.07771): an InfoNCE term added to the diffusion loss so that the condition c
makes its own data likelier than negatives.

L_CDCD = -E log[ s(x_0, c) / (s(x_0, c) + sum_{j=1..N} s(x_0^j, c)) ], with the score s the model's denoising
likelihood p_theta(x_0 | x_t, c) in its per-step form: log s = sum over masked i of log c_theta(x_t, c)[x_0^i],
positive and negatives scored on the same x_t and c. Negatives are other samples of the batch (inter-negatives) or
the same sample with tokens corrupted (intra-negatives). The training loss is L_base + lambda L_CDCD.
"""

from __future__ import annotations

import math

import torch

from condiff.discrete.denoiser import mask_id
from condiff.errors import ConfigError


def cdcd_loss(log_s_pos: torch.Tensor, log_s_neg: torch.Tensor) -> torch.Tensor:
    """(B,) -log[s_pos / (s_pos + sum_j s_neg_j)] = logsumexp([0, log s_neg - log s_pos]), computed in log space
    so that scores of any size stay finite."""
    if log_s_neg.dim() != 2 or log_s_pos.shape != log_s_neg.shape[:1]:
        raise ConfigError(
            f"log_s_pos must be (B,) and log_s_neg (B, N), got {tuple(log_s_pos.shape)} and {tuple(log_s_neg.shape)}"
        )
    rel = log_s_neg - log_s_pos.unsqueeze(1)  # log(s_neg / s_pos)
    return torch.cat([torch.zeros_like(rel[:, :1]), rel], 1).logsumexp(1)


def inter_negatives(x0: torch.Tensor, n_neg: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N, L): negative j of sample b is sample (b + k_j) mod B of the batch, with k_1..k_N distinct shifts
    drawn from 1..B-1, so no negative is its own positive and no two negatives of a sample are the same row."""
    b = x0.shape[0]
    if not 1 <= n_neg <= b - 1:
        raise ConfigError(f"inter negatives need 1 <= n_neg <= batch - 1 = {b - 1}, got {n_neg}")
    shifts = 1 + torch.randperm(b - 1, generator=generator)[:n_neg]
    rows = (torch.arange(b)[:, None] + shifts[None]) % b
    return x0[rows]


def intra_negatives(
    x0: torch.Tensor,
    n_neg: int,
    vocab: int,
    generator: torch.Generator | None = None,
    corrupt: float = 0.25,
) -> torch.Tensor:
    """(B, N, L): N copies of each sample with max(1, round(corrupt * L)) positions, chosen at random, each
    replaced by a uniformly drawn different token, so every negative differs from its positive."""
    if n_neg < 1:
        raise ConfigError(f"n_neg must be >= 1, got {n_neg}")
    if not 0 < corrupt <= 1:
        raise ConfigError(f"corrupt must lie in (0, 1], got {corrupt}")
    if vocab < 2:
        raise ConfigError(f"intra negatives need a vocabulary of >= 2 tokens, got {vocab}")
    b, length = x0.shape
    k = max(1, round(corrupt * length))
    rank = torch.rand(b, n_neg, length, generator=generator).argsort(-1).argsort(-1)
    hit = rank < k
    offset = torch.randint(1, vocab, (b, n_neg, length), generator=generator)
    x = x0[:, None].expand(b, n_neg, length)
    return torch.where(hit, (x + offset) % vocab, x)


def contrastive_term(
    denoiser,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    cond: torch.Tensor | None,
    negatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log s for the positive (B,) and the negatives (B, N): sum over the positions masked in x_t of
    log c_theta(x_t, cond)[token], one network call shared by all of them."""
    if negatives.dim() != 3 or negatives.shape[0] != x0.shape[0] or negatives.shape[2] != x0.shape[1]:
        raise ConfigError(
            f"negatives must be (B, N, L) = ({x0.shape[0]}, N, {x0.shape[1]}), got {tuple(negatives.shape)}"
        )
    logp = denoiser(x_t, cond)  # (B, L, V)
    ids = x_t.argmax(-1) if x_t.is_floating_point() else x_t
    masked = ids == mask_id(denoiser.vocab_size)
    tokens = torch.cat([x0.unsqueeze(1), negatives], 1)  # (B, 1 + N, L)
    picked = logp.unsqueeze(1).expand(-1, tokens.shape[1], -1, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    log_s = torch.where(masked.unsqueeze(1), picked, torch.zeros_like(picked)).sum(-1)
    return log_s[:, 0], log_s[:, 1:]


def with_contrastive(base: torch.Tensor, contrastive: torch.Tensor, lam: float) -> torch.Tensor:
    """base + lam * contrastive, per sample; lam = 0 returns ``base`` itself (bit for bit)."""
    if not (lam >= 0 and math.isfinite(lam)):
        raise ConfigError(f"the contrastive weight lambda must be a finite number >= 0, got {lam}")
    if base.shape != contrastive.shape:
        raise ConfigError(
            f"base and contrastive losses must have the same shape, got {tuple(base.shape)} and "
            f"{tuple(contrastive.shape)}"
        )
    return base if lam == 0 else base + lam * contrastive
