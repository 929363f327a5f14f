"""Semi-autoregressive block diffusion sampling (Arriola et al., ICLR 2025, "Block Diffusion: Interpolating Between
Autoregressive and Diffusion Language Models", BD3-LM, Eq. 1-2; CtrlDiff, Huang & Tang 2025, adaptive block sizes).

The sequence is split into blocks, p(x) = prod_b p(x_b | x_<b), and each block is drawn by masked diffusion
conditioned on the clean previous blocks: ``sample`` (tau-leaping over its own grid t = 1 -> t_end, with RADD's cache)
runs on the prefix plus the current block, while the denoiser always sees the full length with every future position
set to [M], so the future is marginalised out and never unmasked. A block of size L is ``sample`` itself; blocks of
size 1 with exact conditionals draw exactly from the joint, as an autoregressive model does.

Block sizes come from a ``BlockPolicy``: ``FixedBlocks(size)`` (BD3-LM), or ``PolicyBlocks(policy, candidates)``
where ``policy(prefix, cond)`` picks an index into ``candidates`` from the clean prefix (CtrlDiff's adaptive block
size). One size is chosen per block for the whole batch; the last block is cut to the remaining length.
``LearnedBlockPolicy`` is a small softmax policy over context features with ``log_prob`` for a REINFORCE update.

KV cache: the clean previous blocks are fixed context, so a network with block-causal attention can cache their keys
and values and compute only the current block (BD3-LM, Sec. 3.2); that is the network's side. Here a network row is
one call for one sequence, as in ``sample``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from condiff.discrete.denoiser import LogitDenoiser, mask_id
from condiff.discrete.sampling import Direct, DiscreteStep, Strategy, TweedieTauLeap, sample
from condiff.discrete.schedules import LogLinear, MaskSchedule
from condiff.errors import ConfigError, check_int


class BlockPolicy:
    """The size of the next block, given the clean prefix (n, n_done), the condition and the length remaining."""

    def next_size(self, prefix: torch.Tensor, cond: torch.Tensor | None, remaining: int) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class FixedBlocks(BlockPolicy):
    """Blocks of ``size`` tokens (the last one shorter if ``size`` does not divide the length)."""

    size: int

    def __post_init__(self):
        check_int("block size", self.size, lo=1)

    def next_size(self, prefix, cond, remaining):
        return min(self.size, remaining)


@dataclass(frozen=True)
class PolicyBlocks(BlockPolicy):
    """``candidates[policy(prefix, cond)]`` tokens (cut to the remaining length): one choice per block for the batch.

    ``policy`` returns an int (or a one-element tensor) in 0..len(candidates)-1; to sample a ``LearnedBlockPolicy``
    with its own generator pass ``functools.partial(learned.choose, generator=g)``."""

    policy: Callable[[torch.Tensor, torch.Tensor | None], int]
    candidates: Sequence[int]

    def __post_init__(self):
        candidates = tuple(self.candidates)
        if not candidates:
            raise ConfigError(f"candidates must be a non-empty list of block sizes >= 1, got {self.candidates!r}")
        for c in candidates:
            check_int("a candidate block size", c, lo=1)
        object.__setattr__(self, "candidates", candidates)

    def next_size(self, prefix, cond, remaining):
        choice = self.policy(prefix, cond)
        if isinstance(choice, torch.Tensor):
            if choice.numel() != 1:
                raise ConfigError(
                    f"a block policy must return one index for the batch, got shape {tuple(choice.shape)}"
                )
            choice = int(choice.item())
        k = check_int("the block policy's choice", choice, lo=0, hi=len(self.candidates) - 1)
        return min(self.candidates[k], remaining)


class LearnedBlockPolicy(nn.Module):
    """A softmax policy over ``num_choices`` block sizes from batch-mean context features: the mean one-hot of the
    last ``context`` prefix tokens (V values, zeros for an empty prefix) and the fraction n_done / length.

    ``choose`` samples (or, ``greedy``, takes the argmax of) one choice for the batch; ``log_prob(prefix, choice)``
    is log pi(choice | prefix), differentiable in the parameters, for REINFORCE:
    loss = -(reward - baseline) * log_prob. The weights start at zero (the uniform policy); ``cond`` is unused."""

    def __init__(self, vocab_size: int, num_choices: int, length: int, context: int = 8):
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, lo=1)
        check_int("num_choices", num_choices, lo=1)
        self.length = check_int("length", length, lo=1)
        self.context = check_int("context", context, lo=1)
        self.linear = nn.Linear(vocab_size + 1, num_choices)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, prefix: torch.Tensor) -> torch.Tensor:
        """(V + 1,): the batch mean of the last tokens' one-hots, then n_done / length."""
        n, done = prefix.shape
        recent = prefix[:, max(0, done - self.context) :]
        dtype = self.linear.weight.dtype
        if recent.shape[1]:
            mean = nn.functional.one_hot(recent, self.vocab_size + 1)[..., : self.vocab_size].to(dtype).mean((0, 1))
        else:
            mean = torch.zeros(self.vocab_size, dtype=dtype)
        return torch.cat([mean, torch.tensor([done / self.length], dtype=dtype)])

    def forward(self, prefix: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (num_choices,)."""
        return self.linear(self.features(prefix))

    def log_prob(self, prefix: torch.Tensor, choice, cond: torch.Tensor | None = None) -> torch.Tensor:
        """log pi(choice | prefix); ``choice`` an int or a LongTensor of choices (same shape out)."""
        return torch.log_softmax(self(prefix, cond), -1)[torch.as_tensor(choice, dtype=torch.long)]

    def choose(self, prefix, cond=None, generator: torch.Generator | None = None, greedy: bool = False) -> int:
        with torch.no_grad():
            logits = self(prefix, cond)
            if greedy:
                return int(logits.argmax())
            return int(torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=generator))


class FutureMasked(LogitDenoiser):
    """The denoiser on a prefix of ``length`` positions: the rest is appended as [M] and its output dropped."""

    def __init__(self, denoiser, length: int):
        self.denoiser, self.length, self.vocab_size = denoiser, length, denoiser.vocab_size

    def __call__(self, x, cond=None):
        b, e = x.shape[:2]
        m = mask_id(self.vocab_size)
        if x.is_floating_point():
            pad = torch.zeros(b, self.length - e, x.shape[-1], dtype=x.dtype)
            pad[..., m] = 1
        else:
            pad = torch.full((b, self.length - e), m, dtype=x.dtype)
        return self.denoiser(torch.cat([x, pad], 1), cond)[:, :e]


def sample_blocks(
    denoiser,
    n: int,
    length: int,
    blocks: BlockPolicy,
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
) -> tuple[torch.Tensor, int]:
    """Tokens (n, length) and the network rows evaluated, one block after another (module docstring).

    ``start`` fixes some tokens (mask id elsewhere), e.g. a prompt; a fixed token in a later block stays hidden
    from the denoiser until its block is reached. The other keywords are ``sample``'s, used for every block."""
    check_int("steps_per_block", steps_per_block, lo=1)
    check_int("length", length, lo=1)
    if not isinstance(blocks, BlockPolicy):
        raise ConfigError(f"blocks must be FixedBlocks(size) or PolicyBlocks(policy, candidates), got {blocks!r}")
    x = torch.full((n, length), mask_id(denoiser.vocab_size), dtype=torch.long) if start is None else start.clone()
    if x.shape != (n, length):
        raise ConfigError(f"start must have shape ({n}, {length}), got {tuple(x.shape)}")
    done, rows = 0, 0
    visible = FutureMasked(denoiser, length)
    while done < length:
        size = check_int("the next block size", blocks.next_size(x[:, :done], cond, length - done), 1, length - done)
        end = done + size
        x[:, :end], r = sample(
            visible,
            n,
            end,
            steps_per_block,
            generator=generator,
            schedule=schedule,
            step=step,
            strategy=strategy,
            cond=cond,
            cache=cache,
            start=x[:, :end],
            t_end=t_end,
        )
        rows += r
        done = end
    return x, rows
