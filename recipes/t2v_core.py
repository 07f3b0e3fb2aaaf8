"""The text-to-video core the video recipes share: a DiT-like module conditioned on a caption, latent geometry
from the VAE, sampler checks, held-out evaluation and rendering on every rank.

Nothing here knows a DiT class: `TextConditioned` wraps any module that takes `text` / `text_mask`, the
geometry comes from the VAE's own config (`VideoVAEConfig.latent_shape`), and evaluation and rendering take
the recipe's loss and generate functions. `video_dit` (any `model.arch`) and `video_audio` build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from framework import distributed as dist
from framework.config import ConfigError
from framework.data.buckets import parse_buckets
from framework.diffusion.guidance import replace_dropped
from framework.rng import derive_seed
from recipes.video_vae.model import VideoVAEConfig

# Which samplers integrate which objective: flow's ODE (Euler, Heun) or the Gaussian chain (DDIM, DDPM).
SAMPLERS = {"flow": ("euler", "heun"), "gaussian": ("ddim", "ddpm")}


class TextConditioned(nn.Module):
    """The trainable module of a text-to-video recipe: a DiT-like `dit`, the trainable text encoder if any
    (None when a frozen one is a helper), and the learned null caption classifier-free guidance uses.

    Subclasses give `forward` their model's signature and call `drop_caption` on the caption first.
    """

    def __init__(self, dit: nn.Module, text_encoder: nn.Module | None, text_dim: int, learned_null: bool = True):
        """learned_null False: no null token (a frozen encoder's null caption is its states of "", which the recipe
        supplies), so the module holds only weights that train."""
        super().__init__()
        self.dit = dit
        self.text_encoder = text_encoder
        if learned_null:
            self.null_text = nn.Parameter(torch.zeros(1, 1, text_dim))
        else:
            self.register_parameter("null_text", None)
        # Keys older versions held that this module drops on load, with why (framework/checkpoint.drop_obsolete):
        # frozen-encoder runs made before the null caption became the encoder's states of "" have a `null_text`.
        self.obsolete_keys = {} if learned_null else {
            "null_text": 'the null caption is now the text encoder\'s states of ""'}
        self._register_load_state_dict_pre_hook(self._drop_obsolete)

    def _drop_obsolete(self, state_dict: dict, prefix: str, *args) -> None:
        """load_state_dict (resume, launch/sample.py) of an older checkpoint: only `obsolete_keys` are dropped, so
        any other unexpected or missing key still fails a strict load."""
        from framework.checkpoint import drop_obsolete

        drop_obsolete(state_dict, {prefix + k: why for k, why in self.obsolete_keys.items()}, "checkpoint")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the DiT computes in: its weights' (bf16 after the engine's cast, or a LoRA run's frozen base)."""
        return next(self.dit.parameters()).dtype

    def null_caption(self, length: int) -> tuple[Tensor, Tensor]:
        """The unconditional caption (1, length, D) and its mask (1, length): the learned null token, then
        padding that the mask hides (so what the padding holds never matters)."""
        if self.null_text is None:
            raise ValueError("this model has no learned null caption (a frozen text encoder's is its states of \"\"): "
                             "drop captions and guide with the recipe's null_condition")
        mask = torch.zeros(1, length, dtype=torch.bool, device=self.null_text.device)
        mask[:, 0] = True
        return self.null_text.expand(1, length, -1), mask

    def drop_caption(self, text: Tensor, text_mask: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """Rows with keep False (caption dropout) get the null caption; keep None keeps every row."""
        if keep is None:
            return text, text_mask
        null, null_mask = self.null_caption(text.shape[1])
        return replace_dropped(text, null, keep), replace_dropped(text_mask, null_mask, keep)


def unwrap(model: Any) -> TextConditioned:
    """The module inside a DeepSpeed engine (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def encode_text(model: Any, helpers: dict, captions: list[str]) -> tuple[Tensor, Tensor]:
    """(B, S, D) caption states and (B, S) mask: the frozen helper encoder if there is one, else the model's."""
    if "text_encoder" in helpers:
        return helpers["text_encoder"](captions)
    return unwrap(model).text_encoder(captions)


# ---- geometry: from the VAE's config alone ------------------------------------------------------------------
def bucket_latent_shape(vae: VideoVAEConfig, bucket: str) -> tuple[int, int, int, int]:
    """(C, T, h, w) latents of one clip of a data.buckets entry ("HxWxF:B"), by the VAE's own geometry."""
    b = parse_buckets([bucket])[0]
    return vae.latent_shape(b.frames, b.height, b.width)


def token_count(latent_thw: Sequence[int], patch: Sequence[int]) -> int:
    """Tokens of a (T, h, w) latent cut into (pt, ph, pw) patches."""
    t, h, w = latent_thw[-3:]
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])


def check_sampler(objective: str, sampler: str) -> None:
    """A sampler that cannot integrate the objective is a config error, found before any work starts."""
    fits = SAMPLERS.get(objective, ())
    if sampler not in fits:
        raise ConfigError(f"sample.sampler={sampler} does not fit diffusion.objective={objective}; "
                          f"{objective} samples with {' or '.join(fits)}")


# ---- evaluation and rendering ------------------------------------------------------------------------------
def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch with every tensor on `device` (captions and other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def held_out_loss(loss_fn: Callable[[dict, torch.Generator], Tensor], stream, batches: int, seed: int, rank: int,
                  device: torch.device | None = None) -> float:
    """Mean loss over the first `batches` batches of a held-out stream, averaged over ranks. Every batch is
    moved to the device first (the loader yields CPU tensors); noise comes from a generator seeded per (seed,
    rank, batch), so the number is comparable from one evaluation to the next."""
    device = device or dist.device()
    total, batches = 0.0, min(batches, len(stream))
    for i, batch in zip(range(batches), stream):
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, rank, i, 7))
        total += float(loss_fn(to_device(batch, device), gen))
    (mean,) = dist.all_reduce([total / max(1, batches)], op="mean")
    return mean


def render_on_every_rank(items: list, rank: int, world: int, generate: Callable[[list], list]) -> list:
    """Every rank generates its share of `items` (equal work: ZeRO-3 forwards are collective); returns all
    results, in item order, on every rank."""
    mine = dist.split_work(items, rank, world)
    return dist.gather_work(generate(mine), len(items), world)
