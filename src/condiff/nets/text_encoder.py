"""A small trained caption encoder: token + position embeddings, a few pre-norm transformer layers
(torch's ``nn.TransformerEncoderLayer``) and a final LayerNorm. Its outputs are the cross-attention
context of a UNet2DConditionModel (as CLIP's last hidden state is for Stable Diffusion) and a pooled mean
vector that is added to the time embedding (as SDXL adds its pooled text embedding).

It is a diffusers ``ModelMixin``, so ``save_pretrained``/``from_pretrained`` write and read safetensors."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class SlotTextEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, vocab_size: int = 21, seq_len: int = 4, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(seq_len, dim))
        nn.init.normal_(self.positions, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.tokens(tokens) + self.positions
        h = self.norm(self.blocks(h))
        return h, h.mean(1)
