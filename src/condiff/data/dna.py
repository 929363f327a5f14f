"""``dna``: synthetic DNA from a known first-order Markov chain, with known rewards for guidance.

Tokens: A, C, G, T are ids 0..3 (``V`` = 4); id 4 is the diffusion code's MASK and is never sampled.
Background: x_0 ~ ``STATIONARY``, x_t ~ ``TRANSITIONS[x_{t-1}]``; ``log_prob`` is exact.

Promoters (``sample_promoters``), the rare high-reward kind: k ~ Uniform{1, ..., max(1, L // 10)} copies of
``MOTIF`` at uniformly random non-overlapping starts, the other L - 4k letters independent with GC fraction
f_k = min(1, (L / 2) / (L - 4k)) (C and G f_k / 2 each, A and T (1 - f_k) / 2), so the expected GC fraction of the
whole sequence is 1/2 (a TATA box in a GC-balanced neighbourhood). ``dataset(..., promoter_share=s)`` is the
pretraining corpus: each sequence a promoter with probability s, otherwise background. The high-reward sequences
are then in the pretraining distribution but rare, as high-activity enhancers are in real regulatory DNA.

Rewards, for a sequence x of length L (hard ids (B, L) or soft one-hot probabilities (B, L, 4); a 5th, MASK
column (B, L, 5) is dropped, so a masked position counts as no letter):

* ``reward``: r(x) = sum_i m_i - GC_WEIGHT * L * (gc(x) - 1/2)^2, where m_i = 1 when x[i:i+4] is ``MOTIF``
  ("TATA", overlapping matches counted: "TATATA" has 2) and gc(x) is the fraction of C and G.
* ``heldout_reward`` (for evaluation; correlated, not equal): r'(x) = sum_i w_i (m_i + 1/2 n_i)
  - HELDOUT_GC_WEIGHT * L * (gc(x) - 1/2)^2, where n_i = 1 when x[i:i+4] differs from the motif in exactly
  one letter and w_i = 1/2 + (i + 1/2) / (L - 3) ramps over the window starts (mean 1).

On soft inputs m_i, n_i and gc are the same polynomials of the probabilities (products over the window, the
expected GC count), so both rewards are differentiable and equal the hard values on exact one-hots.
"""

from __future__ import annotations

import torch

from condiff.errors import ConfigError

ALPHABET = "ACGT"
V = 4
MASK = 4
TRANSITIONS = torch.tensor(  # rows: previous letter, columns: next letter (A, C, G, T); C->G depleted
    [
        [0.30, 0.20, 0.20, 0.30],
        [0.30, 0.30, 0.10, 0.30],
        [0.25, 0.25, 0.30, 0.20],
        [0.20, 0.20, 0.25, 0.35],
    ],
    dtype=torch.float64,
)


def _describe(x) -> str:
    """A one-line description of a value: a tensor's shape and dtype, otherwise its type."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def stationary(p: torch.Tensor) -> torch.Tensor:
    """pi with pi P = pi and sum(pi) = 1, by solving (P^T - I) pi = 0 with one row replaced by sum = 1."""
    a = p.T - torch.eye(len(p), dtype=p.dtype)
    a[-1] = 1.0
    b = torch.zeros(len(p), dtype=p.dtype)
    b[-1] = 1.0
    return torch.linalg.solve(a, b)


STATIONARY = stationary(TRANSITIONS)
MOTIF = "TATA"
GC_WEIGHT = 4.0
HELDOUT_GC_WEIGHT = 2.0


def _check_size(what: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{what} must be an integer >= {lo}, got {value!r}")
    return value


def sample_background(n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n background sequences (n, length) of ids 0..3 from the stationary Markov chain."""
    n, length = _check_size("n", n, 0), _check_size("length", length, 1)
    x = torch.empty(n, length, dtype=torch.long)
    if n == 0:
        return x
    x[:, 0] = torch.multinomial(STATIONARY.expand(n, V), 1, generator=generator)[:, 0]
    for t in range(1, length):
        x[:, t] = torch.multinomial(TRANSITIONS[x[:, t - 1]], 1, generator=generator)[:, 0]
    return x


def max_promoter_motifs(length: int) -> int:
    """K: a promoter of ``length`` letters holds k ~ Uniform{1, ..., K} motifs, K = max(1, length // 10)."""
    return max(1, length // 10)


def sample_promoters(n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n promoters (n, length): k ~ Uniform{1..K} non-overlapping MOTIFs, the rest GC-balanced (module docstring).
    The starts are k distinct sorted draws s_1 < ... < s_k from {0, ..., L - 3k - 1}, placed at s_j + 3 (j - 1):
    every non-overlapping placement equally likely."""
    n, length = _check_size("n", n, 0), _check_size("length", length, len(MOTIF))
    big = max_promoter_motifs(length)
    k = torch.randint(1, big + 1, (n,), generator=generator)  # K <= L // 4: the k motifs always fit
    gc = ((length / 2) / (length - len(MOTIF) * k).clamp(min=1)).clamp(max=1.0).double()  # L = 4: no flanks
    probs = torch.stack([(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2], 1)  # A, C, G, T
    x = torch.multinomial(probs.repeat_interleave(length, 0), 1, replacement=True, generator=generator)
    x = x.view(n, length)
    motif = encode(MOTIF)
    keys = torch.rand(n, length, generator=generator)
    for i in range(n):
        ki = int(k[i])
        slots = length - (len(MOTIF) - 1) * ki
        starts = keys[i, :slots].argsort()[:ki].sort().values + (len(MOTIF) - 1) * torch.arange(ki)
        for s in starts.tolist():
            x[i, s : s + len(MOTIF)] = motif
    return x


def dataset(n: int, length: int, generator: torch.Generator | None = None, promoter_share: float = 0.0) -> torch.Tensor:
    """The pretraining data: background sequences, each replaced by a promoter with probability
    ``promoter_share`` (0: ``sample_background(n, length, generator)`` exactly)."""
    x = sample_background(n, length, generator)
    if not promoter_share:
        return x
    if not 0 <= promoter_share <= 1:
        raise ConfigError(f"promoter_share must be in [0, 1], got {promoter_share!r}")
    which = torch.rand(n, generator=generator) < promoter_share
    x[which] = sample_promoters(int(which.sum()), length, generator)
    return x


def _check_hard(seqs, hi: int, what: str) -> torch.Tensor:
    if not isinstance(seqs, torch.Tensor) or seqs.dim() != 2 or seqs.is_floating_point() or seqs.dtype == torch.bool:
        raise ConfigError(f"{what} needs an integer tensor (B, L) of ids 0..{hi}, got {_describe(seqs)}")
    if seqs.numel() and (seqs.min() < 0 or seqs.max() > hi):
        raise ConfigError(f"{what}: ids must be in [0, {hi}], got {seqs.min()}..{seqs.max()}")
    return seqs.long()


def log_prob(seqs: torch.Tensor) -> torch.Tensor:
    """(B,) float64 exact log-probability of each sequence (B, L) of ids 0..3 under the background chain."""
    x = _check_hard(seqs, V - 1, "log_prob")
    lp = STATIONARY.log()[x[:, 0]]
    return lp + TRANSITIONS.log()[x[:, :-1], x[:, 1:]].sum(1)


def _probs(seqs) -> torch.Tensor:
    """(B, L, 4) letter probabilities: one-hot for hard ids (MASK: all zero), the first 4 columns of soft."""
    if isinstance(seqs, torch.Tensor) and seqs.is_floating_point():
        if seqs.dim() != 3 or seqs.shape[-1] not in (V, V + 1):
            raise ConfigError(f"soft sequences must have shape (B, L, 4) or (B, L, 5), got {tuple(seqs.shape)}")
        return seqs[..., :V]
    x = _check_hard(seqs, MASK, "reward")
    return torch.nn.functional.one_hot(x, V + 1)[..., :V].float()


def _motif_terms(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact match, exactly one mismatch) per window start, shape (B, L - 3) each."""
    k = len(MOTIF)
    idx = [ALPHABET.index(c) for c in MOTIF]
    length = p.shape[1] - k + 1
    if length <= 0:
        return p.new_zeros(p.shape[0], 0), p.new_zeros(p.shape[0], 0)
    q = torch.stack([p[:, j : j + length, idx[j]] for j in range(k)], -1)  # (B, W, k): P(letter j matches)
    exact = q.prod(-1)
    one = sum((1 - q[..., j]) * torch.cat([q[..., :j], q[..., j + 1 :]], -1).prod(-1) for j in range(k))
    return exact, one


def _gc_penalty(p: torch.Tensor, weight: float) -> torch.Tensor:
    length = p.shape[1]
    if length == 0:
        return p.new_zeros(p.shape[0])
    gc = (p[..., 1] + p[..., 2]).mean(1)
    return weight * length * (gc - 0.5) ** 2


def motif_count(seqs: torch.Tensor) -> torch.Tensor:
    """(B,) the number of MOTIF windows (overlapping) of each sequence; of soft inputs, its expectation."""
    return _motif_terms(_probs(seqs))[0].sum(1)


def reward(seqs: torch.Tensor) -> torch.Tensor:
    """(B,) r(x) = #MOTIF (overlapping) - GC_WEIGHT * L * (gc - 1/2)^2; see the module docstring."""
    return motif_count(seqs) - _gc_penalty(_probs(seqs), GC_WEIGHT)


def heldout_reward(seqs: torch.Tensor) -> torch.Tensor:
    """(B,) r'(x): position-weighted motif matches with one mismatch at half weight, minus a lighter GC
    penalty; see the module docstring."""
    p = _probs(seqs)
    exact, one = _motif_terms(p)
    w = exact.shape[1]
    weights = 0.5 + (torch.arange(w, dtype=p.dtype) + 0.5) / max(w, 1)
    return ((exact + 0.5 * one) * weights).sum(1) - _gc_penalty(p, HELDOUT_GC_WEIGHT)


def encode(s: str) -> torch.Tensor:
    """1-D ids of a string over ACGT."""
    bad = [c for c in s if c not in ALPHABET]
    if bad:
        raise ConfigError(f"unknown DNA letter {bad[0]!r}; accepted: {', '.join(ALPHABET)}")
    return torch.tensor([ALPHABET.index(c) for c in s], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    """The string of 1-D ids 0..3 (MASK reads as '-')."""
    x = _check_hard(ids.reshape(1, -1) if isinstance(ids, torch.Tensor) else ids, MASK, "decode")
    return "".join((ALPHABET + "-")[i] for i in x[0].tolist())
