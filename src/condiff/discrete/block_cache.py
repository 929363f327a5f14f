"""Block diffusion with a KV cache: sampling and the block loss (Arriola et al., ICLR 2025, "Block Diffusion:
Interpolating Between Autoregressive and Diffusion Language Models", BD3-LM, Sec. 3; CtrlDiff, Huang & Tang 2025).

BD3-LM factorises log p(x) = sum_b log p(x^b | x^<b) (Sec. 3.1) and draws each block by masked diffusion given the
clean previous blocks. With a block-causal network (``condiff.nets.block_transformer``) the prefix's keys and
values never depend on later blocks, so they are computed once per finished block and cached (Sec. 3.2):

- ``CachedBlockDenoiser(net, V)``: a ``NetworkDenoiser`` (the full block-causal forward, usable by
  ``sample_blocks``) that also exposes the network's cache: ``prefix_cache``, ``extend_cache``, ``block_logp``.
  Any network with ``prefix_cache(onehot, cond)``, ``extend_cache(cache, onehot)`` and
  ``forward_block(onehot, cache, start)`` fits, where ``cache[rows]`` selects sequences and ``cache.length`` is
  the cached prefix length.
- ``sample_blocks_cached``: ``sample_blocks`` with ``FixedBlocks(block_size)``, where each block's inner loop is
  ``sample`` (tau-leaping, RADD's row cache) over the block alone and the network computes only the block's
  positions, plus each finished block once to extend the cache. With ``same_draws=True`` the inner loop runs over
  the prefix and the block as ``sample_blocks`` does (the clean prefix is never redrawn, its logits are zeros and
  unused), so it consumes the generator identically and gives the same tokens; by default it draws random numbers
  for the block only (the same law, other draws).
- ``block_dce_loss`` / ``BlockDCE``: the block NELBO L_BD(x) = -sum_b E_t E_q (1/t) log p(x^b | x_t^b, x^<b)
  (Sec. 3.3), estimated with RADD's lambda-DCE inside a block (Ou et al., ICLR 2025, Eq. 14): each sample draws a
  block b uniformly, keeps blocks < b clean, masks block b at a rate lambda (stratified over the batch, as
  ``LambdaDCE``) and every later block fully, and scores block b's masked tokens with weight n_blocks / lambda.
  Given x its expectation is sum_b (the lambda-DCE of block b given x^<b), an upper bound on -log p_theta(x) of
  the block-factorised model; with exact conditionals its mean over x ~ p is H(p). With one block it is
  ``LambdaDCE`` (same draws, same value); with blocks of one token its expectation is the autoregressive NLL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condiff.discrete.denoiser import LogitDenoiser, NetworkDenoiser, mask_id, one_hot
from condiff.discrete.losses import DCELoss, apply_mask, masked_nll
from condiff.discrete.sampling import Direct, DiscreteStep, Strategy, TweedieTauLeap, sample
from condiff.discrete.schedules import LogLinear, MaskSchedule
from condiff.errors import ConfigError, check_int


def check_blocks(length: int, block_size: int) -> int:
    """The number of blocks; a one-line ConfigError unless block_size >= 1 divides length."""
    check_int("length", length, lo=1)
    check_int("block_size", block_size, lo=1)
    if length % block_size:
        raise ConfigError(f"block_size must divide the length {length}, got {block_size}")
    return length // block_size


def _one_hot(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``one_hot`` that also takes an empty prefix."""
    if x.numel() == 0 and not x.is_floating_point():
        return torch.zeros(*x.shape, vocab_size + 1)
    return one_hot(x, vocab_size)


class CachedBlockDenoiser(NetworkDenoiser):
    """c_theta of a block-causal network: ``__call__`` is the full forward (future positions given as [M]), and
    ``block_logp`` the log-probabilities of one block from the cached clean prefix (module docstring)."""

    def prefix_cache(self, prefix: torch.Tensor, cond: torch.Tensor | None = None):
        """The cache of a clean prefix (n, s) of whole blocks (s may be 0) and the condition."""
        return self.net.prefix_cache(_one_hot(prefix, self.vocab_size), cond)

    def extend_cache(self, cache, block: torch.Tensor):
        """``cache`` extended by the finished block (n, size): only the block's positions are computed."""
        return self.net.extend_cache(cache, _one_hot(block, self.vocab_size))

    def block_logp(self, block: torch.Tensor, cache, start: int) -> torch.Tensor:
        """log c_theta (n, size, V) of the block at positions start..start+size-1 given the cached prefix."""
        logits = self.net.forward_block(one_hot(block, self.vocab_size), cache, start)
        return torch.log_softmax(logits[..., : self.vocab_size].float(), -1)


class _CachedBlock(LogitDenoiser):
    """The LogitDenoiser ``sample`` runs for one block: its ``cond`` carries the row indices, which select the
    cache (the condition is already in it). Inputs are the block, or the prefix and the block (``same_draws``);
    prefix positions get zero logits, which ``sample`` never uses because they are clean."""

    def __init__(self, denoiser: CachedBlockDenoiser, cache, start: int, size: int):
        self.denoiser, self.cache, self.start, self.size = denoiser, cache, start, size
        self.vocab_size = denoiser.vocab_size
        self.positions = 0  # token positions computed

    def __call__(self, x, rows=None):
        k, width = x.shape[0], x.shape[1]
        lp = self.denoiser.block_logp(x[:, width - self.size :], self.cache[rows], self.start)
        self.positions += k * self.size
        if width > self.size:
            lp = torch.cat([lp.new_zeros(k, width - self.size, lp.shape[-1]), lp], 1)
        return lp


def sample_blocks_cached(
    denoiser: CachedBlockDenoiser,
    n: int,
    length: int,
    block_size: int,
    steps_per_block: int,
    *,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    cache: bool = True,
    schedule: MaskSchedule = LogLinear(),
    step: DiscreteStep = TweedieTauLeap(),
    strategy: Strategy = Direct(),
    start: torch.Tensor | None = None,
    t_end: float = 1e-5,
    same_draws: bool = False,
) -> tuple[torch.Tensor, int, int]:
    """Tokens (n, length), the network rows of the inner loops (sequences times calls, as ``sample``) and the token
    positions the network computed: block_size per row plus each finished block but the last once per sequence
    for the cache (condition slots not counted). ``sample_blocks`` with ``FixedBlocks(block_size)`` computes
    ``length`` positions per row instead. The keywords are ``sample_blocks``'s; ``same_draws`` is in the module
    docstring."""
    check_int("steps_per_block", steps_per_block, lo=1)
    check_int("n", n, lo=1)
    check_blocks(length, block_size)
    m = mask_id(denoiser.vocab_size)
    x = torch.full((n, length), m, dtype=torch.long) if start is None else start.clone()
    if x.shape != (n, length):
        raise ConfigError(f"start must have shape ({n}, {length}), got {tuple(x.shape)}")
    rows_index = torch.arange(n)
    rows = positions = 0
    with torch.no_grad():
        kv = denoiser.prefix_cache(x[:, :0], cond)
        for s in range(0, length, block_size):
            e = s + block_size
            lo = 0 if same_draws else s
            block = _CachedBlock(denoiser, kv, s, block_size)
            x[:, lo:e], r = sample(
                block,
                n,
                e - lo,
                steps_per_block,
                generator=generator,
                schedule=schedule,
                step=step,
                strategy=strategy,
                cond=rows_index,
                cache=cache,
                start=x[:, lo:e],
                t_end=t_end,
            )
            rows += r
            positions += block.positions
            if e < length:
                kv = denoiser.extend_cache(kv, x[:, s:e])
                positions += n * block_size
    return x, rows, positions


def block_dce_loss(
    denoiser, x0: torch.Tensor, generator: torch.Generator | None = None, cond=None, *, block_size: int
) -> torch.Tensor:
    """The per-sample block NELBO estimate (B,) in nats (module docstring). ``denoiser`` is any LogitDenoiser of
    the full length; with a block-causal network the [M] future is invisible anyway."""
    b, length = x0.shape
    blocks = check_blocks(length, block_size)
    lam = (torch.rand(b, generator=generator, dtype=torch.float64) + torch.arange(b)) / b
    masked = torch.rand(x0.shape, generator=generator, dtype=torch.float64) < lam[:, None]
    if blocks > 1:  # one block: exactly LambdaDCE's draws
        which = torch.randint(blocks, (b,), generator=generator)
        block_of = torch.arange(length) // block_size
        masked = (masked & (block_of[None] == which[:, None])) | (block_of[None] > which[:, None])
        scored = masked & (block_of[None] == which[:, None])
    else:
        scored = masked
    logp = denoiser(apply_mask(x0, masked, denoiser.vocab_size), cond)
    return masked_nll(logp, x0, scored) / lam.to(logp.dtype) * blocks


@dataclass(frozen=True)
class BlockDCE(DCELoss):
    """``block_dce_loss`` as a ``DCELoss`` (the loss interface of ``condiff.discrete.losses``)."""

    block_size: int

    def __post_init__(self):
        check_int("block_size", self.block_size, lo=1)

    def __call__(self, denoiser, x0, generator=None, cond=None):
        return block_dce_loss(denoiser, x0, generator, cond, block_size=self.block_size)
