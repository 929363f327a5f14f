"""A small transformer over token one-hots for discrete diffusion and its autoregressive baseline.

The input is a (B, L, V+1) one-hot (or soft one-hot: reward fine-tuning differentiates through it), embedded by
one linear map, plus learned positions, pre-norm ``nn.TransformerEncoderLayer`` blocks and a final LayerNorm and
read-out to V logits. There is no time input: RADD's c_theta(x_t) (Ou et al., ICLR 2025, Sec. 3) needs none.
``causal=True`` makes it the autoregressive baseline of the same size (input shifted right behind a start token).
A condition (B, C) of ids in 0..cond_vocab-1 enters as C extra leading tokens that every position attends to.
``adapter_kernel = k`` (odd, not causal) adds a zero-initialised 1-D convolution of the input one-hots (k letters
centred on each position) to the logits: a local-context adapter that parameter-efficient fine-tuning trains
alone (DRAKES' ``drakes.adapter``); at initialisation the network's output is unchanged.

It is a diffusers ``ModelMixin``, so ``save_pretrained``/``from_pretrained`` write and read safetensors.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class TokenTransformer(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4,
        length: int = 16,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        causal: bool = False,
        cond_slots: int = 0,
        cond_vocab: int = 1,
        adapter_kernel: int = 0,
    ):
        super().__init__()
        if adapter_kernel and (causal or adapter_kernel < 0 or adapter_kernel % 2 == 0):
            raise ValueError(f"adapter_kernel must be 0 or an odd size > 0 of a non-causal net, got {adapter_kernel}")
        self.embed = nn.Linear(vocab_size + 1, dim, bias=False)
        self.positions = nn.Parameter(torch.zeros(length + cond_slots, dim))
        nn.init.normal_(self.positions, std=0.02)
        self.cond_embed = nn.Embedding(max(cond_vocab, 1) * max(cond_slots, 1), dim) if cond_slots else None
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size)
        self.adapter = None
        if adapter_kernel:
            self.adapter = nn.Conv1d(vocab_size + 1, vocab_size, adapter_kernel, padding=adapter_kernel // 2)
            nn.init.zeros_(self.adapter.weight)
            nn.init.zeros_(self.adapter.bias)
        if causal:
            mask = torch.triu(torch.full((length, length), float("-inf")), 1)
            if cond_slots:  # every position sees the condition tokens; they see only each other
                full = torch.zeros(length + cond_slots, length + cond_slots)
                full[:cond_slots, cond_slots:] = float("-inf")
                full[cond_slots:, cond_slots:] = mask
                mask = full
            self.register_buffer("attn_mask", mask, persistent=False)
        else:
            self.attn_mask = None

    def forward(self, onehot: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if cfg.causal:  # shift right: position i sees tokens < i; the start token is the mask one-hot
            start = torch.zeros_like(onehot[:, :1])
            start[..., cfg.vocab_size] = 1
            onehot = torch.cat([start, onehot[:, :-1]], 1)
        h = self.embed(onehot)
        if cfg.cond_slots:
            offsets = torch.arange(cfg.cond_slots, device=h.device) * cfg.cond_vocab
            h = torch.cat([self.cond_embed(cond.long() + offsets), h], 1)
        h = self.norm(self.blocks(h + self.positions, mask=self.attn_mask, is_causal=False))
        logits = self.out(h[:, cfg.cond_slots :])
        if self.adapter is not None:
            logits = logits + self.adapter(onehot.transpose(1, 2)).transpose(1, 2)
        return logits
