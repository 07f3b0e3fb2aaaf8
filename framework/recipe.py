"""The trainer/recipe boundary and the registry that maps a preset's `recipe:` name to a recipe.

A recipe supplies what differs between model families; the trainer owns everything else (loop,
accumulation, clipping, LR, EMA, logging, eval cadence, checkpoints, resume, signals).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from framework.config import ConfigError, RunConfig, apply_overrides, check_common, from_dict, read_preset
from framework.nn import sequence_parallel


@dataclass
class Built:
    """What `Recipe.build_model` returns: the trainable module that goes into the DeepSpeed engine.

    Frozen helpers (VAE, text encoder, teacher) are not part of it: they come from `Recipe.build_helpers`,
    built outside ZeRO-3's partitioning.
    """

    model: torch.nn.Module


class Recipe:
    """Base class of a recipe. Subclasses set `name` and `config_class` and implement the hooks.

    Every hook that takes the config takes it first, then the model and helpers where it needs them:
    `loss(cfg, model, helpers, ...)`, `evaluate(cfg, model, helpers, ...)`, `sample(cfg, model, helpers, ...)`.
    """

    name: str = ""
    config_class: type[RunConfig] = RunConfig
    unit: str = "samples"  # what `work()` counts; throughput is logged as `<unit>_per_s`
    export_sections: tuple[str, ...] = ("model",)  # config sections a safetensors export's config.json keeps

    def validate(self, cfg: RunConfig, world: int) -> None:
        """Raise ConfigError for combinations only this recipe knows are impossible."""

    def describe(self, cfg: RunConfig) -> str:
        """A one-line summary (parameters, FLOPs per unit) printed at start."""
        return ""

    def build_model(self, cfg: RunConfig) -> Built:
        """The trainable model (built under deepspeed.zero.Init for ZeRO-3, so partitioned at birth)."""
        raise NotImplementedError

    def build_helpers(self, cfg: RunConfig) -> dict[str, torch.nn.Module]:
        """Frozen modules (VAE, text encoder, teacher): built outside ZeRO-3's partitioning, whole on every rank."""
        return {}

    def build_data(self, cfg: RunConfig, split: str, rank: int, world: int, batch_multiple: int = 1) -> Iterable:
        """An iterable of batches (dicts of tensors) with state_dict()/load_state_dict(). Under
        train.sequence_parallel=N, rank and world are the data-parallel ones (rank // N, world / N): the ranks of
        a group get the same batches, and the loader's per-rank guarantees hold per group."""
        raise NotImplementedError

    def loss(self, cfg: RunConfig, model: Any, helpers: dict, batch: dict,
             gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """(scalar loss, scalar metrics); `gen` is seeded by (seed, step, rank, micro-step)."""
        raise NotImplementedError

    def work(self, cfg: RunConfig, batch: dict) -> tuple[float, float]:
        """(units, training FLOPs) of one micro-batch: units are tokens, frames or latent tokens."""
        return 0.0, 0.0

    def evaluate(self, cfg: RunConfig, model: Any, helpers: dict, rank: int, world: int, step: int) -> dict:
        """Runs on every rank; returns scalar metrics already reduced across ranks."""
        return {}

    def sample(self, cfg: RunConfig, model: Any, helpers: dict, rank: int, world: int, step: int,
               out_dir: str) -> list[str]:
        """Runs on every rank; rank 0 writes the samples and returns their paths (text, files)."""
        return []

    def export(self, state_dict: dict, cfg: RunConfig, fmt: str, out_dir: str, source: dict | None = None) -> list[str]:
        """Formats beyond plain safetensors (`hf`, `diffusers`); `source` is (recipe, step, ema) to record.
        Returns the paths written; an unknown format is a ConfigError listing the valid ones."""
        raise ConfigError(f"--format {fmt}: recipe '{self.name}' exports only 'safetensors'")

    def export_assets(self, cfg: RunConfig, out_dir: str) -> list[str]:
        """Copy what loading the weights needs besides them (tokenizer files); returns the paths."""
        return []

    def initial_weights(self, cfg: RunConfig, path: str) -> dict[str, torch.Tensor]:
        """Full weights for `train.init_from=PATH` (a fresh run only; resuming wins): by default a checkpoint or
        run dir of ours, or a safetensors export, of the same recipe and model config (ConfigError naming the
        differing keys otherwise). Recipes override it to read more formats (LLaDA: a Hugging Face folder)."""
        from framework.init_from import read_ours

        return read_ours(path, cfg)


# Recipes register lazily so that importing the framework never imports every model family.
RECIPES: dict[str, str] = {
    "llada": "recipes.llada.recipe:LladaRecipe",
    "video_vae": "recipes.video_vae.recipe:VideoVaeRecipe",
    "video_dit": "recipes.video_dit.recipe:VideoDiTRecipe",
    "video_distill": "recipes.video_distill.recipe:VideoDistillRecipe",
    "audio_vae": "recipes.audio_vae.recipe:AudioVaeRecipe",
    "video_audio": "recipes.video_audio.recipe:VideoAudioRecipe",
}


def get_recipe(name: str) -> Recipe:
    """Instantiate the recipe registered under `name`; unknown names list the known ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}' (known: {', '.join(sorted(RECIPES))})")
    module_name, cls_name = RECIPES[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)()


def load_run_config(preset: str | dict, overrides: list[str], world: int) -> tuple[RunConfig, Recipe]:
    """Preset file (or dict) + overrides -> validated, typed config and its recipe."""
    tree = read_preset(preset) if not isinstance(preset, dict) else dict(preset)
    tree = apply_overrides(tree, overrides)
    if "run_dir" not in tree and not isinstance(preset, dict):
        tree["run_dir"] = f"runs/{Path(preset).stem}"
    if not tree.get("recipe"):
        raise ConfigError(f"the preset must name its recipe, e.g. 'recipe: llada' (known: {', '.join(RECIPES)})")
    recipe = get_recipe(str(tree["recipe"]))
    cfg = from_dict(recipe.config_class, tree)
    sp = cfg.train.sequence_parallel
    # A single process (sampling, export, --describe, the planner) never splits sequences; a launch of several
    # ranks must hold whole sequence-parallel groups (the trainer checks the world it really got).
    sequence_parallel.check_world(world if world > 1 else sp, sp)
    # Batches count data-parallel replicas: the N ranks of a sequence-parallel group share each sample.
    try:
        check_common(cfg, sequence_parallel.dp_world(world, sp) if world > 1 else 1)
    except ConfigError as e:
        if sp == 1:
            raise
        raise ConfigError(f"{e} (data-parallel size = world {world} / train.sequence_parallel {sp})") from None
    check_sequence_parallel(cfg, sp)
    recipe.validate(cfg, world)
    return cfg, recipe


def check_sequence_parallel(cfg: RunConfig, sp: int) -> None:
    """What DeepSpeed's all-to-all needs, from the config alone: every attention's heads (and a GQA model's KV
    heads) divisible by N, and a text row of data.seq_len tokens too. Video token counts depend on the
    bucket and the VAE; the model refuses an indivisible grid with the same ConfigError at its first forward."""
    if sp <= 1:
        return
    model = getattr(cfg, "model", None)
    wan = getattr(model, "wan", None) if getattr(model, "arch", "") == "wan" else None
    if wan is not None:
        sequence_parallel.check_heads(wan.num_attention_heads, sp, "model.wan.num_attention_heads")
    else:
        for key in ("heads", "n_heads", "n_kv_heads"):
            value = getattr(model, key, None)
            if isinstance(value, int) and value > 0:
                sequence_parallel.check_heads(value, sp, f"model.{key}")
    seq_len = getattr(getattr(cfg, "data", None), "seq_len", None)
    if isinstance(seq_len, int) and seq_len > 0:
        sequence_parallel.check_divisible(seq_len, sp, "a row of data.seq_len")
