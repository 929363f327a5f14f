"""PCPP: partially conditioned patch parallelism (Zhang, Luo, Lu, "Partially Conditioned Patch Parallelism for
Accelerated Diffusion Model Inference", 2024; official code xiuyuz/pcpp, distrifuser/modules/pp/attn.py).

After DistriFusion's synchronous warm-up, each rank exchanges fresh keys/values with its two neighbours only
(point-to-point, asynchronous, consumed one evaluation later), and attends to a window of the keys/values: its
own patch plus a fraction p of each neighbour, the token range (PCPP's partial attention)

    [ max(0, (i - p) L), min((i + 1 + p) L, n L) )        (i: the rank's patch, L: tokens per patch),

truncated to integers as the official code does. Keys/values of patches outside the neighbours keep their
warm-up values (they lie in the window only for p > 1).

One departure from the official code, which sends the neighbour its whole patch: condiff sends only the tokens
the neighbour's window reads (``neighbour_needs``), so the bytes per step are 2 p / (n - 1) of DistriFusion's
key/value all-gather per interior rank rather than min(2, n - 1) / (n - 1). For p >= 1 the whole patch is sent
and for n = 2 the result equals DistriFusion's attention exactly (the window covers everything).
"""

from __future__ import annotations


def window(i: int, tokens: int, n: int, p: float) -> tuple[int, int]:
    """The key/value token range [start, end) that rank ``i`` of ``n`` attends to, ``tokens`` per patch."""
    start = int(max(0.0, tokens * (i - p)))
    end = int(min(tokens * (i + 1 + p), tokens * n))
    return start, end


def neighbour_needs(i: int, tokens: int, n: int, p: float) -> tuple[int, int]:
    """(up, down): how many of the upper neighbour's last tokens and of the lower neighbour's first tokens rank
    ``i``'s window reads (0 at the image's top and bottom edge; at most one patch each)."""
    start, end = window(i, tokens, n, p)
    up = 0 if i == 0 else min(tokens, i * tokens - start)
    down = 0 if i == n - 1 else min(tokens, end - (i + 1) * tokens)
    return max(0, up), max(0, down)
