"""Tiny diffusers pipelines with random weights, built from configs and saved with ``save_pretrained``.

They exist for tests, the parity checks against diffusers and the interop benchmark: every part is a real
diffusers / transformers class (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DiTTransformer2DModel), only small. Nothing is downloaded: the CLIP tokenizer's ``vocab.json`` and
``merges.txt`` are written here (lower-case letters, their end-of-word forms and a few whole words).

The scheduler config is Stable Diffusion v1's (scaled-linear betas 0.00085 -> 0.012, ``steps_offset=1``,
``set_alpha_to_one=False``, and the ``clip_sample=False`` that SD v1's PNDM config file carries for DDIM), so
the quirks that matter for parity (leading spacing, the final alpha) are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    prediction_type="epsilon",
)
WORDS = ("red", "blue", "green", "cat", "dog", "circle", "square", "large", "small", "photo", "of")
MAX_TOKENS = 16


def write_clip_vocab(directory: Path, max_length: int = MAX_TOKENS) -> Path:
    """A CLIP BPE vocabulary (vocab.json, merges.txt, tokenizer_config.json) in ``directory``: letters, letters
    ending a word, and merges that build each of WORDS from left to right."""
    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in letters + [c + "</w>" for c in letters]:
        vocab[piece] = len(vocab)
    merges = []
    for word in WORDS:
        left = word[0]
        for i, c in enumerate(word[1:], start=1):
            right = c + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{left} {right}")
            left = left + right
            vocab.setdefault(left, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"})
    )
    return directory


def tiny_unet(in_channels: int = 4, cross_attention_dim: int = 32, seed: int = 0, perturb: float = 0.0):
    """A tiny UNet2DConditionModel (block channels 8, 16; cross-attention in the second block and the middle),
    seeded; ``perturb`` > 0 adds that much N(0, 1) noise to every weight, so that the output layers diffusers
    initialises to zero do not hide any path."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    if perturb:
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(perturb * torch.randn_like(p))
    return unet


def tiny_sd_components(seed: int = 0) -> dict:
    """UNet2DConditionModel (block channels 8, 16; cross-attention in the second block and the middle),
    AutoencoderKL (scale factor 2) and CLIPTextModel (width 32, 2 layers), seeded."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = tiny_unet(in_channels=4, cross_attention_dim=32, seed=seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=200,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=32,
        )
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval()}


def build_tiny_sd(directory, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline (random weights, no safety checker) into ``directory``."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    directory = Path(directory)
    vocab = write_clip_vocab(directory / "_vocab")
    tokenizer = CLIPTokenizer.from_pretrained(vocab, local_files_only=True)
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(seed),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    cfg_path = directory / "scheduler" / "scheduler_config.json"  # SD v1's file also carries DDIM's clip_sample
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "clip_sample": False}, indent=2))
    for f in vocab.iterdir():
        f.unlink()
    vocab.rmdir()
    return directory


def build_tiny_dit(directory, seed: int = 0, num_classes: int = 4) -> Path:
    """Save a tiny DiTPipeline (DiTTransformer2DModel with learned sigma, AutoencoderKL, DDIM scheduler,
    ``num_classes`` named labels) into ``directory``. The class table has 1000 entries plus the null class
    1000, because DiTPipeline hard-codes 1000 as its null label."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    directory = Path(directory)
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    labels = {i: name for i, name in enumerate(["circle", "square", "triangle", "star"][:num_classes])}
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=sched, id2label=labels)
    pipe.save_pretrained(directory)
    index = directory / "model_index.json"  # save_pretrained drops id2label; the hub's DiT folders carry it here
    index.write_text(json.dumps({**json.loads(index.read_text()), "id2label": labels}, indent=2))
    return directory
