"""A bag-of-tokens logistic classifier on (soft) one-hots: logit(y | x) = sum_i onehot(x_i) . w + b, the same
weights at every position. It reads noisy (partly masked) sequences, the mask being one more token, so it is a
time-independent noisy classifier p(y | x_t) for discrete classifier guidance."""

from __future__ import annotations

import torch
from torch import nn


class BagOfTokens(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size + 1))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        """(B, L, V+1) -> the logit of y = 1, shape (B,)."""
        return (onehot.to(self.weight.dtype) @ self.weight).sum(-1) + self.bias

    def log_prob(self, onehot: torch.Tensor) -> torch.Tensor:
        """log p(y = 1 | x), shape (B,)."""
        return nn.functional.logsigmoid(self(onehot))
