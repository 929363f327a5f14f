"""The shapes family: caption tokens -> SlotTextEncoder -> cross-attention UNet2DConditionModel.

The encoder's sequence output is the cross-attention context; its pooled mean is added to the time
embedding (``class_embed_type='projection'``). The UNet runs on a 2x pixel-unshuffled image (32x32x3 ->
16x16x12) for CPU throughput; attention is only at 4x4. The null condition is the empty caption.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condiff.data import labeller, shapes, text
from condiff.models.family import ModelFamily, load_pretrained
from condiff.nets import SlotTextEncoder, build_unet


class ShapesFamily(ModelFamily):
    name = "shapes"
    attributes = ("shape", "color", "size", "position")
    image_shape = (3, 32, 32)

    def build(self, model_cfg):
        te_cfg = {"vocab_size": text.VOCAB_SIZE, "seq_len": text.SEQ_LEN, **model_cfg.get("text_encoder", {})}
        return nn.ModuleDict(
            {"unet": build_unet("UNet2DConditionModel", model_cfg["unet"]), "text_encoder": SlotTextEncoder(**te_cfg)}
        )

    def forward(self, module, model_cfg, x, t_in, cond):
        f = model_cfg.get("pixel_unshuffle", 1)
        h = F.pixel_unshuffle(x, f) if f > 1 else x
        out = module["unet"](
            h, t_in, encoder_hidden_states=cond["encoder_hidden_states"], class_labels=cond["pooled"]
        ).sample
        return F.pixel_shuffle(out, f) if f > 1 else out

    def encode(self, module, raw):
        hidden, pooled = module["text_encoder"](raw)
        return {"encoder_hidden_states": hidden, "pooled": pooled}

    def null_raw(self, n):
        return text.null_tokens(n)

    def parse_prompt(self, prompt):
        return torch.tensor([text.tokenize(prompt)], dtype=torch.long)

    def captions(self, raw):
        attrs = text.tokens_to_attrs(raw)
        return [shapes.caption(a.clamp(min=0), (a >= 0).tolist()) for a in attrs]

    def random_conditions(self, n, generator):
        attrs = shapes.random_attrs(n, generator)
        return text.attrs_to_tokens(attrs), attrs

    def attribute_targets(self, raw):
        """(B, 4) attributes named by the captions (shape, color, size, position), -1 where omitted."""
        return text.tokens_to_attrs(raw)

    def score(self, images, targets):
        return labeller.accuracy(labeller.label(images), targets)

    def training_batch(self, step, n, generator, seed, objective):
        b = shapes.sample_batch(n, generator)
        keep = torch.rand(n, 4, generator=generator) >= objective.attr_dropout
        return b.images, text.attrs_to_tokens(b.attrs, keep)

    def save_parts(self, module, directory: Path):
        module["unet"].save_pretrained(directory / "unet")
        module["text_encoder"].save_pretrained(directory / "text_encoder")

    def load_parts(self, directory: Path, model_cfg):
        from diffusers import UNet2DConditionModel

        return nn.ModuleDict(
            {
                "unet": load_pretrained(UNet2DConditionModel, directory / "unet"),
                "text_encoder": load_pretrained(SlotTextEncoder, directory / "text_encoder"),
            }
        )
