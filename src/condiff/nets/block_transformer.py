"""A block-causal transformer with a KV cache for block diffusion (Arriola et al., ICLR 2025, "Block Diffusion:
Interpolating Between Autoregressive and Diffusion Language Models", BD3-LM, Sec. 3; CtrlDiff builds on it).

BD3-LM factorises log p(x) = sum_b log p(x^b | x^<b) (Sec. 3.1) and models each block by masked diffusion conditioned
on the clean previous blocks, x_theta^b(x_t^b, K^{1:b-1}, V^{1:b-1}). Its network uses the block-causal attention
mask of Sec. 3.2: position i attends to
every position j with block(j) <= block(i) (bidirectional inside a block), so the states of blocks < b never depend
on block b or later. The clean prefix's keys and values can therefore be computed once and cached, and sampling
block b computes only block b's positions (``prefix_cache``, ``extend_cache``, ``forward_block``).

The input is a (B, L, V+1) one-hot (or soft one-hot), embedded by one linear map plus learned positions, followed by
pre-norm layers with explicit q/k/v projections and ``scaled_dot_product_attention`` and a final LayerNorm and
read-out to V logits; there is no time input (RADD's c_theta(x_t), Ou et al., ICLR 2025). A condition (B, C) of ids
in 0..cond_vocab-1 enters as C leading tokens that every position attends to and that attend only to each other.
``forward(x)[:, s:e]`` equals ``forward_block(x[:, s:e], prefix_cache(x[:, :s]), s)`` up to rounding.

It is a diffusers ``ModelMixin``, so ``save_pretrained``/``from_pretrained`` write and read safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from condiff.errors import ConfigError, check_int


@dataclass(frozen=True)
class BlockKVCache:
    """Per-layer keys and values (B, heads, C + length, dim / heads) of the condition slots and a clean prefix of
    ``length`` tokens (whole blocks). ``cache[rows]`` is the cache of some sequences."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    length: int

    def __getitem__(self, rows) -> BlockKVCache:
        return BlockKVCache(tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values), self.length)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]


class BlockAttentionLayer(nn.Module):
    """Pre-norm self-attention and MLP; ``forward`` also returns this layer's keys and values of the new positions."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, h, past_k, past_v, allowed):
        """h (B, n, D) new positions; past_k/past_v (B, H, P, D/H) or None; allowed (n, P + n) bool (True: attend)."""
        a = self.norm1(h)
        q, k, v = self._split(self.q(a)), self._split(self.k(a)), self._split(self.v(a))
        keys = k if past_k is None else torch.cat([past_k, k], 2)
        values = v if past_v is None else torch.cat([past_v, v], 2)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        h = h + self.proj(o.transpose(1, 2).reshape(h.shape))
        return h + self.mlp(self.norm2(h)), k, v


class BlockTransformer(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4,
        length: int = 16,
        block_size: int = 4,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        cond_slots: int = 0,
        cond_vocab: int = 1,
    ):
        super().__init__()
        check_int("vocab_size", vocab_size, lo=1)
        check_int("length", length, lo=1)
        check_int("block_size", block_size, lo=1, hi=length)
        if length % block_size:
            raise ConfigError(f"block_size must divide length {length}, got {block_size}")
        check_int("heads", heads, lo=1)
        check_int("layers", layers, lo=1)
        check_int("dim", dim, lo=1)
        if dim % heads:
            raise ConfigError(f"dim must be a multiple of heads {heads}, got {dim}")
        check_int("cond_slots", cond_slots, lo=0)
        check_int("cond_vocab", cond_vocab, lo=1)
        self.embed = nn.Linear(vocab_size + 1, dim, bias=False)
        self.positions = nn.Parameter(torch.zeros(cond_slots + length, dim))
        nn.init.normal_(self.positions, std=0.02)
        self.cond_embed = nn.Embedding(cond_vocab * cond_slots, dim) if cond_slots else None
        self.blocks = nn.ModuleList(BlockAttentionLayer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size)

    # the block-causal mask ----------------------------------------------------------------------------------------
    def _block_ids(self, lo: int, hi: int, with_cond: bool) -> torch.Tensor:
        """Block index of token positions lo..hi-1, preceded by -1 for each condition slot if ``with_cond``."""
        ids = torch.arange(lo, hi, device=self.positions.device) // self.config.block_size
        if with_cond:
            ids = torch.cat([torch.full((self.config.cond_slots,), -1, device=ids.device), ids])
        return ids

    def _run(self, onehot: torch.Tensor, cache: BlockKVCache | None, cond: torch.Tensor | None):
        """The new positions' final states and per-layer K/V: tokens cache.length.. (or 0.. and the condition slots
        when ``cache`` is None), attending to the cache and block-causally among themselves."""
        cfg = self.config
        c = cfg.cond_slots
        start = 0 if cache is None else cache.length
        end = start + onehot.shape[1]
        if onehot.dim() != 3 or onehot.shape[-1] != cfg.vocab_size + 1:
            raise ConfigError(f"the input must be one-hots (B, n, {cfg.vocab_size + 1}), got {tuple(onehot.shape)}")
        if end > cfg.length:
            raise ConfigError(f"positions {start}..{end - 1} run past the length {cfg.length}")
        h = self.embed(onehot)
        fresh_cond = cache is None and c > 0
        if fresh_cond:
            if cond is None or tuple(cond.shape) != (onehot.shape[0], c):
                got = None if cond is None else tuple(cond.shape)
                raise ConfigError(f"cond must have shape ({onehot.shape[0]}, {c}), got {got}")
            offsets = torch.arange(c, device=h.device) * cfg.cond_vocab
            h = torch.cat([self.cond_embed(cond.long() + offsets), h], 1)
            h = h + self.positions[: c + end]
        else:
            h = h + self.positions[c + start : c + end]
        queries = self._block_ids(start, end, fresh_cond)
        keys = self._block_ids(0, end, c > 0)
        allowed = keys[None, :] <= queries[:, None]
        ks, vs = [], []
        for i, layer in enumerate(self.blocks):
            past_k = None if cache is None else cache.keys[i]
            past_v = None if cache is None else cache.values[i]
            h, k, v = layer(h, past_k, past_v, allowed)
            ks.append(k if past_k is None else torch.cat([past_k, k], 2))
            vs.append(v if past_v is None else torch.cat([past_v, v], 2))
        out = h[:, c:] if fresh_cond else h
        return out, BlockKVCache(tuple(ks), tuple(vs), end)

    def _check_blocks(self, what: str, start: int, end: int):
        bs = self.config.block_size
        if start % bs or end % bs:
            raise ConfigError(f"{what} must cover whole blocks of {bs} tokens, got positions {start}..{end - 1}")

    # the public calls ---------------------------------------------------------------------------------------------
    def forward(self, onehot: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n, V) of a sequence (B, n, V+1), n <= length, under the block-causal mask."""
        h, _ = self._run(onehot, None, cond)
        return self.out(self.norm(h))

    def prefix_cache(self, onehot_prefix: torch.Tensor, cond: torch.Tensor | None = None) -> BlockKVCache:
        """The keys and values of the condition and a clean prefix of whole blocks (B, s, V+1), s >= 0."""
        self._check_blocks("the prefix", 0, onehot_prefix.shape[1])
        return self._run(onehot_prefix, None, cond)[1]

    def extend_cache(self, cache: BlockKVCache, onehot_block: torch.Tensor) -> BlockKVCache:
        """``cache`` extended by the finished (clean) blocks ``onehot_block``, computing only their positions."""
        self._check_blocks("the cached blocks", cache.length, cache.length + onehot_block.shape[1])
        return self._run(onehot_block, cache, None)[1]

    def forward_block(
        self,
        onehot_block: torch.Tensor,
        cache: BlockKVCache | None,
        start: int,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, e - start, V) of the blocks at positions start..e-1 attending to ``cache`` (the prefix
        0..start-1; the condition, if any, is in it and ``cond`` is used only when ``cache`` is None, start 0)."""
        if cache is None:
            cache = self.prefix_cache(onehot_block[:, :0], cond)
        if start != cache.length:
            raise ConfigError(f"start must be the cached length {cache.length}, got {start}")
        self._check_blocks("the block", start, start + onehot_block.shape[1])
        h, _ = self._run(onehot_block, cache, None)
        return self.out(self.norm(h))
