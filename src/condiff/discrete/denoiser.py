"""Time-independent logit denoisers c_theta(x_t) for absorbing diffusion.

RADD (Ou et al., ICLR 2025, Thm. 1) shows that for a masked position i the concrete score factors as
p_t(x^{i<-v}) / p_t(x_t) = [exp(-sigma_bar) / (1 - exp(-sigma_bar))] * p_0(x^i = v | unmasked x_t): the time enters
only through a scalar, so the network is c_theta(x_t) with no t input, a softmax over the V real tokens and the
mask logit at -inf. A ``LogitDenoiser`` maps tokens (B, L) in 0..V (V is [M]) or soft one-hots (B, L, V+1) and an
optional condition to log-probabilities (B, L, V) over the real tokens.

``ExactConditional`` is the enumeration oracle: for a known joint p over V^d it returns
p(x^i = v | the unmasked tokens of x_t) exactly.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from condiff.errors import ConfigError


def mask_id(vocab_size: int) -> int:
    """The mask token's id: one past the real tokens."""
    return vocab_size


def one_hot(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, L) token ids in 0..V -> (B, L, V+1) float one-hots (a float input is returned unchanged)."""
    if x.is_floating_point():
        return x
    if int(x.min()) < 0 or int(x.max()) > vocab_size:
        raise ConfigError(
            f"token ids must lie in 0..{vocab_size} (V real tokens and the mask), got {int(x.min())}..{int(x.max())}"
        )
    return nn.functional.one_hot(x, vocab_size + 1).float()


class LogitDenoiser:
    """x_t (and a condition) -> log p(x_0^i = v | x_t), shape (B, L, V); ``vocab_size`` is V."""

    vocab_size: int

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class NetworkDenoiser(LogitDenoiser):
    """A network of (B, L, V+1) one-hots (and ``cond``) -> logits (B, L, V+1) or (B, L, V), read as c_theta:
    the mask column, if present, is dropped (its logit is -inf) and the rest log-softmaxed."""

    def __init__(self, net: nn.Module, vocab_size: int):
        self.net, self.vocab_size = net, vocab_size

    def __call__(self, x, cond=None):
        h = one_hot(x, self.vocab_size)
        logits = self.net(h) if cond is None else self.net(h, cond)
        return torch.log_softmax(logits[..., : self.vocab_size].float(), -1)


class ExactConditional(LogitDenoiser):
    """The exact conditionals of a joint over V^d given as log-probabilities of shape (V,) * d (float64)."""

    def __init__(self, log_joint: torch.Tensor):
        self.vocab_size, self.length = log_joint.shape[0], log_joint.dim()
        if any(s != self.vocab_size for s in log_joint.shape):
            raise ConfigError(f"the joint must have shape (V,) * d, got {tuple(log_joint.shape)}")
        self.log_joint = log_joint.double()
        grid = itertools.product(range(self.vocab_size), repeat=self.length)
        self.sequences = torch.tensor(list(grid), dtype=torch.long)  # (V^d, d), row-major like log_joint
        self.log_p = self.log_joint.reshape(-1)

    def __call__(self, x, cond=None):
        if x.is_floating_point():
            x = x.argmax(-1)
        masked = x == self.vocab_size
        agree = (self.sequences[None] == x[:, None]) | masked[:, None]  # (B, V^d, d)
        logw = torch.where(agree.all(-1), self.log_p[None], torch.tensor(-torch.inf, dtype=torch.float64))
        w = torch.softmax(logw, -1)  # the posterior over full sequences given the unmasked tokens
        probs = torch.zeros(*x.shape, self.vocab_size, dtype=torch.float64)
        for i in range(self.length):
            probs[:, i] = w @ nn.functional.one_hot(self.sequences[:, i], self.vocab_size).double()
        return probs.clamp_min(1e-300).log()

    def entropy(self) -> float:
        """H(p) in nats."""
        p = self.log_p.exp()
        return float(-(p * torch.where(p > 0, self.log_p, torch.zeros_like(self.log_p))).sum())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.multinomial(self.log_p.exp(), n, replacement=True, generator=generator)
        return self.sequences[idx]
