"""The denoising cross-entropy (DCE) losses of RADD (Ou et al., ICLR 2025, Sec. 4 and Thm. 2).

All three have the same expectation, an upper bound on -log p(x_0) that is tight with the exact conditionals:
with c = c* it equals H(p) exactly for lambda-DCE and k-DCE (the any-order autoregressive identity), and up to
an O(eps) term for t-DCE.

- ``TDCE``: t ~ the low-discrepancy rule t_i = (u + i/B) mod 1 mapped to [t_min, 1]; each token masked with
  probability m(t); loss w(t) * sum_masked [-log c(x_t)[x_0] + log(exp(sigma_bar) - 1)] with
  w(t) = sigma_bar'(t) / (exp(sigma_bar) - 1) (Eq. 12).
- ``LambdaDCE``: lambda_i = (u_i + i)/B (stratified); mask with probability lambda; (1/lambda) sum_masked -log c
  (Eq. 14).
- ``KDCE``: k ~ U{1..d}; mask exactly k positions; (d/k) sum_masked -log c (Eq. 15, the AO-ARM loss).

Each returns the per-sample loss (B,) in nats; ``denoiser`` is any LogitDenoiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condiff.discrete.denoiser import mask_id
from condiff.discrete.schedules import LogLinear, MaskSchedule


def masked_nll(logp: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """sum over masked positions of -log c[x_0], per sample."""
    nll = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return torch.where(masked, nll, torch.zeros_like(nll)).sum(-1)


def apply_mask(x0: torch.Tensor, masked: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.where(masked, torch.full_like(x0, mask_id(vocab_size)), x0)


class DCELoss:
    def __call__(self, denoiser, x0: torch.Tensor, generator: torch.Generator | None = None, cond=None) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class LambdaDCE(DCELoss):
    def __call__(self, denoiser, x0, generator=None, cond=None):
        b = x0.shape[0]
        lam = (torch.rand(b, generator=generator, dtype=torch.float64) + torch.arange(b)) / b
        masked = torch.rand(x0.shape, generator=generator, dtype=torch.float64) < lam[:, None]
        logp = denoiser(apply_mask(x0, masked, denoiser.vocab_size), cond)
        return masked_nll(logp, x0, masked) / lam.to(logp.dtype)


@dataclass(frozen=True)
class KDCE(DCELoss):
    def __call__(self, denoiser, x0, generator=None, cond=None):
        b, d = x0.shape
        k = torch.randint(1, d + 1, (b,), generator=generator)
        rank = torch.rand(x0.shape, generator=generator).argsort(-1).argsort(-1)
        masked = rank < k[:, None]
        logp = denoiser(apply_mask(x0, masked, denoiser.vocab_size), cond)
        return masked_nll(logp, x0, masked) * (d / k.to(logp.dtype))


@dataclass(frozen=True)
class TDCE(DCELoss):
    schedule: MaskSchedule = LogLinear()
    t_min: float = 1e-3

    def __call__(self, denoiser, x0, generator=None, cond=None):
        b = x0.shape[0]
        u = torch.rand((), generator=generator, dtype=torch.float64)
        t = self.t_min + (1 - self.t_min) * ((u + torch.arange(b, dtype=torch.float64) / b) % 1)
        masked = torch.rand(x0.shape, generator=generator, dtype=torch.float64) < self.schedule.mask_prob(t)[:, None]
        logp = denoiser(apply_mask(x0, masked, denoiser.vocab_size), cond)
        sb = self.schedule.sigma_bar(t)
        log_em1 = torch.log(torch.expm1(sb))
        weight = self.schedule.dsigma_bar(t) / torch.expm1(sb)
        prior = masked.sum(-1).to(torch.float64) * log_em1
        return (weight * (masked_nll(logp, x0, masked).double() + prior)).to(logp.dtype)
