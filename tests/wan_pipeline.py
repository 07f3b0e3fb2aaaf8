"""A tiny random diffusers Wan pipeline folder for tests, assembled and saved by diffusers itself:
`WanPipeline(tokenizer, text_encoder, transformer, vae, scheduler).save_pretrained(root)` writes model_index.json,
transformer/ (WanTransformer3DModel), vae/ (AutoencoderKLWan with per-channel latent statistics), text_encoder/
(UMT5EncoderModel) with tokenizer/ (a sentencepiece T5Tokenizer), and scheduler/ (FlowMatchEulerDiscreteScheduler
with a shift other than 1), the layout of the released Wan2.1 `*-Diffusers` folders.

Sizes: 32-wide text, 4 latent channels, 8x spatial and 4x temporal compression (32x32x9 video -> 4x3x4x4 latents).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.text_encoders import write_umt5

TINY_WAN = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=40, num_layers=2, rope_max_seq_len=64)
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
SHIFT = 3.0  # Wan2.1's flow shift; != 1 so a sampler that ignored the folder's scheduler would differ
# The run config keys that describe TINY_WAN (the presets describe the 1.3B model; a folder does not resize it).
WAN_OVERRIDES = [f"model.wan.{k}={json.dumps(v)}" for k, v in TINY_WAN.items()]


def write_wan_pipeline(root: Path, seed: int = 0, shift: float = SHIFT) -> Path:
    """Save the tiny pipeline under root (created) and return root. Every transformer weight is random (no zero
    output head, no unit norm gains), so training and guidance visibly move the samples."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = Path(root)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_WAN).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    staging = root.parent / f".{root.name}_umt5"  # the shared UMT5 builder writes text_encoder/ + tokenizer/
    write_umt5(staging, seed=seed, pipeline=True)
    text_encoder = UMT5EncoderModel.from_pretrained(staging / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(staging / "tokenizer")
    shutil.rmtree(staging)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000)
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                scheduler=scheduler).save_pretrained(root)
    return root
