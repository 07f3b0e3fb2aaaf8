"""Text-to-video DiT in the latent space of the causal video VAE (rectified flow by default)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework import distributed as dist
from framework.config import ConfigError, RunConfig
from framework.data.buckets import parse_buckets
from framework.data.latents import LatentStream, cache_key, read_text_index, text_index_path
from framework.diffusion import flow, gaussian
from framework.diffusion.guidance import Guidance, drop_condition, replace_dropped
from framework.export import diffusers_pipeline, diffusers_wan
from framework.export.video_io import to_uint8, write_grid_png, write_mp4
from framework.nn import sequence_parallel
from framework.recipe import Built, Recipe
from framework.rng import derive_seed
from recipes.t2v_core import (
    TextConditioned,
    bucket_latent_shape,
    check_sampler,
    encode_text,
    held_out_loss,
    render_on_every_rank,
    token_count,
    unwrap,
)
from recipes.video_common import VideoDataConfig, check_vae_buckets, video_stream, video_tensor
from recipes.video_dit import model as dit_model
from recipes.video_dit import wan
from recipes.video_dit.model import VideoDiT, VideoDiTConfig
from recipes.video_dit.text_encoder import ByteTextEncoder, FrozenTextEncoder, encoder_digest
from recipes.video_dit.vae_ref import VaeRefConfig, assumed_vae, latent_stats, load_vae, vae_config
from recipes.video_dit.wan import WanDiT
from recipes.video_vae.model import VideoVAEConfig

SHAPES_PROMPTS = [f"a {c} {s} moves {d}" for c, s, d in [
    ("red", "circle", "left"), ("green", "square", "right"), ("blue", "triangle", "up"), ("yellow", "circle", "down"),
    ("red", "square", "up"), ("green", "triangle", "down"), ("blue", "circle", "right"), ("yellow", "square", "left"),
    ("red", "triangle", "right"), ("green", "circle", "up"), ("blue", "square", "down"), ("yellow", "triangle", "left"),
]]


@dataclass
class TextConfig:
    encoder: str = "bytes"  # "bytes": a small trainable encoder; else a local T5/UMT5 folder (frozen helper)
    layers: int = 2
    heads: int = 4
    max_len: int = 64


@dataclass
class DiffusionConfig:
    objective: Literal["flow", "gaussian"] = "flow"
    logit_mean: float = 0.0  # flow: t = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0
    shift: float = 0.0  # flow: time shift; 0 = the pipeline folder's (train.init_from), else grows with tokens
    # flow: 0 = continuous t; T = t on the source scheduler's grid of T shifted training sigmas, and sampling on
    # FlowMatchEulerDiscreteScheduler(T, shift)'s grid (0 = the pipeline folder's when train.init_from is one)
    num_train_timesteps: int = 0
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"  # flow: how t (or its index) is drawn
    prediction: Literal["eps", "v", "x0"] = "v"  # gaussian parameterisation
    schedule: Literal["linear", "cosine"] = "cosine"
    num_steps: int = 1000
    caption_dropout: float = 0.1  # condition dropout for classifier-free guidance


@dataclass
class VideoSampleConfig:
    prompts: list[str] = field(default_factory=lambda: list(SHAPES_PROMPTS))
    sampler: Literal["euler", "heun", "ddim", "ddpm"] = "euler"
    steps: int = 30
    cfg_scale: float = 4.0  # CFG, uncond + s (cond - uncond) as in every recipe: 1 = off, 0 = unconditional
    seed: int = 0
    bucket: int = 0  # index into data.buckets giving resolution and frame count


@dataclass
class VideoDiTRunConfig(RunConfig):
    recipe: str = "video_dit"
    model: VideoDiTConfig = field(default_factory=VideoDiTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VaeRefConfig = field(default_factory=VaeRefConfig)
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: VideoSampleConfig = field(default_factory=VideoSampleConfig)


class TextToVideo(TextConditioned):
    """The trainable module: the DiT, the trainable text encoder if any, and the learned null caption."""

    def __init__(self, cfg: VideoDiTRunConfig, dit: nn.Module | None = None):
        """dit: any module called as dit(x, t, text, text_mask) -> like x (default: cfg.model.arch's DiT).
        cfg.model.text_dim is model.wan.text_dim under arch=wan (VideoDiTConfig copies it)."""
        if dit is None:  # before the text encoder: seeded init draws in order
            dit = WanDiT(cfg.model.wan) if cfg.model.arch == "wan" else VideoDiT(cfg.model)
        text_encoder = (ByteTextEncoder(cfg.model.text_dim, cfg.text.layers, cfg.text.heads, cfg.text.max_len)
                        if cfg.text.encoder == "bytes" else None)
        # A frozen encoder's null caption is its states of "" (WanPipeline's negative prompt): no learned token.
        super().__init__(dit, text_encoder, cfg.model.text_dim, learned_null=text_encoder is not None)

    def null_condition(self, length: int) -> dict[str, Tensor]:
        """The unconditional caption as the samplers' condition: the learned null token, then padding (the byte
        encoder's; with a frozen encoder the recipe's null_condition gives the states of "")."""
        text, mask = self.null_caption(length)
        return {"text": text, "text_mask": mask}

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, keep: Tensor | None = None) -> Tensor:
        """x (B, C, T, H, W), t (B,) in [0, 1], text (B, S, D), text_mask (B, S), keep (B,) caption dropout."""
        text, text_mask = self.drop_caption(text, text_mask, keep)
        # fp32 latents into a bf16 model (train.precision=bf16: the engine's cast, or a LoRA run's frozen base)
        return self.dit(x.to(self.compute_dtype), t, text, text_mask)


class VideoDiTRecipe(Recipe):
    name = "video_dit"
    config_class = VideoDiTRunConfig
    unit = "latent_tokens"

    def validate(self, cfg: VideoDiTRunConfig, world: int) -> None:
        adopt_pipeline(cfg)
        if cfg.diffusion.num_train_timesteps < 0:
            raise ConfigError(f"diffusion.num_train_timesteps={cfg.diffusion.num_train_timesteps} must be >= 0 "
                              f"(0 = continuous t)")
        vae = self.vae_geometry(cfg)
        self.check_vae(cfg, vae)
        check_vae_buckets(cfg.data.buckets, cfg.train.micro_batch, vae.compression)
        if not 0 <= cfg.sample.bucket < len(cfg.data.buckets):
            raise ConfigError(f"sample.bucket={cfg.sample.bucket} is not an index into data.buckets "
                              f"({len(cfg.data.buckets)} buckets)")
        check_sampler(cfg.diffusion.objective, cfg.sample.sampler)
        if cfg.model.arch == "wan":
            self.check_wan(cfg)
        if world > 1:  # a single process (sampling, export, --describe) runs whole sequences
            for i, bucket in enumerate(cfg.data.buckets):  # now, not at the bucket's first forward hours in
                sequence_parallel.check_divisible(self.tokens(cfg, self.latent_shape(cfg, i)),
                                                  cfg.train.sequence_parallel, f"data.buckets {bucket!r}")

    def warn_extreme_shift(self, cfg: VideoDiTRunConfig) -> None:
        """diffusion.shift=0 extrapolates Flux's token-count rule, which at video sizes gives shifts in the
        thousands (t near 1 almost always): say so where the shift is used (training, sampling), since a Wan
        preset run without its pipeline folder would train that way."""
        if cfg.diffusion.objective != "flow" or cfg.diffusion.shift or os.environ.get("RANK", "0") != "0":
            return
        shift = max(self.flow_shift(cfg, self.latent_shape(cfg, i)) for i in range(len(cfg.data.buckets)))
        if shift > 10:
            print(f"warning: diffusion.shift=0 gives a time shift of {shift:,.0f} at the largest bucket (Wan uses 3 "
                  f"to 5); set diffusion.shift or pass train.init_from=PIPELINE_FOLDER for its scheduler's",
                  flush=True)

    def check_wan(self, cfg: VideoDiTRunConfig) -> None:
        """What WanDiT would refuse only at its first forward: output channels other than the latents', and
        buckets whose latent grid outruns diffusers' RoPE table."""
        w = cfg.model.wan
        if w.out_channels != w.in_channels:
            raise ConfigError(f"model.wan.out_channels={w.out_channels} but the recipe predicts latents of "
                              f"model.wan.in_channels={w.in_channels}")
        for i, bucket in enumerate(cfg.data.buckets):
            grid = [n // p for n, p in zip(self.latent_shape(cfg, i)[1:], w.patch_size)]
            if max(grid) > w.rope_max_seq_len:
                raise ConfigError(f"data.buckets: {bucket!r} gives a latent grid {grid}, beyond "
                                  f"model.wan.rope_max_seq_len={w.rope_max_seq_len} positions per axis")

    def describe(self, cfg: VideoDiTRunConfig) -> str:
        shape = self.latent_shape(cfg, cfg.sample.bucket)
        n = self.arch(cfg).count_parameters(self.arch_config(cfg))
        f = self.train_flops(cfg, shape[1:])
        return (f"{n / 1e6:.2f}M DiT parameters ({n:,}, model.arch={cfg.model.arch}), latent {tuple(shape)}, "
                f"{self.tokens(cfg, shape)} tokens, {f / 1e12:.4f} TFLOPs per training sample")

    @staticmethod
    def arch(cfg: VideoDiTRunConfig):
        """The module of cfg.model.arch: its count_parameters / train_flops_per_sample take arch_config(cfg)."""
        return wan if cfg.model.arch == "wan" else dit_model

    @staticmethod
    def arch_config(cfg: VideoDiTRunConfig):
        return cfg.model.wan if cfg.model.arch == "wan" else cfg.model

    def train_flops(self, cfg: VideoDiTRunConfig, latent_thw) -> float:
        """Training FLOPs of one sample of latents (T, h, w) with text.max_len caption tokens."""
        return self.arch(cfg).train_flops_per_sample(self.arch_config(cfg), tuple(latent_thw), cfg.text.max_len)

    # ---- shapes: the VAE's geometry, never a formula of our own -------------------------------------
    def vae_geometry(self, cfg: VideoDiTRunConfig) -> VideoVAEConfig:
        """The VAE config latent shapes come from: the loaded helper's, else its export's config.json, else
        (no export yet: --describe, unit tests) the default architecture at model.in_channels."""
        loaded = getattr(self, "_vae_cfg", None)
        if loaded is not None and loaded[0] == cfg.vae.path:
            return loaded[1]
        return vae_config(cfg.vae.path) or assumed_vae(cfg.model.in_channels)

    def check_vae(self, cfg: VideoDiTRunConfig, vae: VideoVAEConfig) -> None:
        if vae.latent_channels != cfg.model.in_channels:
            raise ConfigError(f"model.in_channels={cfg.model.in_channels} but the VAE at {cfg.vae.path} has "
                              f"{vae.latent_channels} latent channels")

    def latent_shape(self, cfg: VideoDiTRunConfig, bucket: int) -> tuple[int, int, int, int]:
        return bucket_latent_shape(self.vae_geometry(cfg), cfg.data.buckets[bucket])

    def tokens(self, cfg: VideoDiTRunConfig, shape) -> int:
        return token_count(shape, cfg.model.patch)

    # ---- building -----------------------------------------------------------------------------------
    def build_model(self, cfg: VideoDiTRunConfig) -> Built:
        return Built(model=TextToVideo(cfg))

    def build_helpers(self, cfg: VideoDiTRunConfig) -> dict[str, nn.Module]:
        require_helper_paths(cfg)
        self.warn_extreme_shift(cfg)  # here, not in validate: --plan / --describe of a Wan preset need no shift
        vae = load_vae(cfg.vae.path)
        self.check_vae(cfg, vae.cfg)
        self._vae_cfg = (cfg.vae.path, vae.cfg)
        helpers: dict[str, nn.Module] = {"vae": vae}
        if cfg.text.encoder != "bytes":
            if not Path(cfg.text.encoder).is_dir():
                raise ConfigError(f"text.encoder: {cfg.text.encoder!r} is neither 'bytes' nor a local T5/UMT5 folder")
            try:  # reads config.json and finds the tokenizer; the weights load at the first caption to encode
                encoder = FrozenTextEncoder(cfg.text.encoder, cfg.text.max_len)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(str(e)) from None
            if encoder.hidden_size != cfg.model.text_dim:
                raise ConfigError(f"model.text_dim={cfg.model.text_dim} but {cfg.text.encoder} outputs "
                                  f"{encoder.hidden_size}")
            helpers["text_encoder"] = encoder
        return helpers

    def initial_weights(self, cfg: VideoDiTRunConfig, path: str) -> dict[str, Tensor]:
        """train.init_from: with model.arch=wan also a diffusers WanTransformer3DModel folder (the released
        `transformer/`), whose config.json must describe model.wan, or a whole pipeline folder (its transformer/;
        validate took vae, text encoder and schedule from it); else our checkpoints and exports."""
        if diffusers_pipeline.is_pipeline_folder(path):
            path = diffusers_pipeline.component(path, "transformer")
        if not diffusers_wan.is_diffusers_folder(path):
            if diffusers_wan.is_diffusers_folder(Path(path) / "transformer"):  # a pipeline without model_index.json
                raise ConfigError(f"train.init_from: {path} is a diffusers pipeline; give its transformer folder "
                                  f"{Path(path) / 'transformer'} (or the pipeline with its model_index.json)")
            return super().initial_weights(cfg, path)
        if cfg.model.arch != "wan":
            raise ConfigError(f"train.init_from: {path} is a diffusers WanTransformer3DModel folder, which needs "
                              f"model.arch=wan (this run has model.arch={cfg.model.arch})")
        try:
            dit = wan.load_diffusers_folder(path, cfg.model.wan)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"train.init_from: {e}") from None
        return {**fresh_non_dit_weights(cfg), **{f"dit.{k}": v for k, v in dit.items()}}

    def export(self, state_dict: dict, cfg: VideoDiTRunConfig, fmt: str, out_dir: str,
               source: dict | None = None) -> list[str]:
        """--format diffusers (model.arch=wan): the DiT as a folder WanTransformer3DModel.from_pretrained loads.
        The learned null caption and a trainable text encoder have no place there and are left out."""
        if fmt != "diffusers":
            raise ConfigError(f"--format {fmt}: recipe '{self.name}' exports 'safetensors' and, with "
                              f"model.arch=wan, 'diffusers'")
        if cfg.model.arch != "wan":
            raise ConfigError(f"--format diffusers writes diffusers' WanTransformer3DModel, but this run has "
                              f"model.arch={cfg.model.arch}; use --format safetensors")
        return wan.export_diffusers(state_dict, cfg.model.wan, out_dir, prefix="dit.", source=source)

    def build_data(self, cfg: VideoDiTRunConfig, split: str, rank: int, world: int, batch_multiple: int = 1):
        if cfg.data.latents and split == "train":
            return self.latent_stream(cfg, rank, world, batch_multiple)
        return video_stream(cfg.data, split, rank, world, cfg.train.seed, batch_multiple)

    def latent_stream(self, cfg: VideoDiTRunConfig, rank: int, world: int, batch_multiple: int) -> LatentStream:
        """Training batches from a latent cache, refused unless it was made by this VAE at this size and fps."""
        path = Path(cfg.data.latents) / "train"
        if not (path / "index.json").is_file():
            raise ConfigError(f"data.latents: no latent cache at {path}; make one with "
                              f"`python launch/cache_latents.py PRESET --out {cfg.data.latents}`")
        index = json.loads((path / "index.json").read_text())
        expected = cache_key(cfg.vae.path, cfg.data.buckets[0], cfg.data.fps)
        if index.get("cache_key") != expected:
            raise ConfigError(f"data.latents: {path} was made with {index.get('cache_key')}, but this run needs "
                              f"{expected} (vae.path, data.buckets[0], data.fps); rebuild the cache")
        self._stats = (index["latent_mean"], 1.0 / index["latent_std"])
        batch = parse_buckets(cfg.data.buckets)[0].batch_size
        try:
            return LatentStream(path, batch, rank, world, cfg.train.seed, batch_multiple, text=self.cached_text(cfg))
        except ValueError as e:  # a clip without its caption embeddings: the sidecar is incomplete
            raise ConfigError(f"data.latents: {e}; rebuild them with {rebuild_text_command(cfg)}") from None

    def cached_text(self, cfg: VideoDiTRunConfig) -> bool:
        """Whether training reads caption embeddings from the cache: a frozen encoder and a text sidecar made by
        this encoder at this text.max_len and dtype (another key is refused). Without a sidecar (a cache made
        before, or with text.encoder=bytes) the encoder embeds each batch, as without a cache."""
        if cfg.text.encoder == "bytes":
            return False
        path = Path(cfg.data.latents) / "train"
        index = read_text_index(path)
        if index is None:
            if dist.is_main():
                print(f"note: {path} has no caption embeddings, so text.encoder runs every step; add them with "
                      f"{rebuild_text_command(cfg)}", flush=True)
            return False
        try:
            expected = text_cache_key(cfg)
        except (FileNotFoundError, ValueError) as e:  # no config.json, tokenizer or weights in text.encoder
            raise ConfigError(str(e)) from None
        if index["text_key"] != expected:
            raise ConfigError(f"data.latents: {text_index_path(path).parent} was made with {index['text_key']}, but "
                              f"this run needs {expected} (text.encoder, text.max_len, train.precision); rebuild "
                              f"them with {rebuild_text_command(cfg)}")
        return True

    # ---- training -----------------------------------------------------------------------------------
    def encode_text(self, model, helpers: dict, captions: list[str]) -> tuple[Tensor, Tensor]:
        return encode_text(model, helpers, captions)

    def caption_states(self, model, helpers: dict, batch: dict) -> tuple[Tensor, Tensor]:
        """A batch's caption states and mask: cached by launch/cache_latents.py, else encoded now."""
        if "text" in batch:
            return batch["text"], batch["text_mask"]
        return self.encode_text(model, helpers, batch["caption"])

    def null_condition(self, model, helpers: dict, length: int, batch: dict | None = None) -> dict[str, Tensor]:
        """The unconditional caption: with a frozen encoder its states of "" (WanPipeline's default negative
        prompt; from the cache when the batch carries them, so the encoder need not exist), else the model's
        learned null token."""
        if "text_encoder" not in helpers:
            return unwrap(model).null_condition(length)
        if batch is not None and "null_text" in batch:
            return {"text": batch["null_text"], "text_mask": batch["null_mask"]}
        text, mask = helpers["text_encoder"].null()
        return {"text": text, "text_mask": mask}

    def frozen_dropout(self, model, helpers: dict, batch: dict, text: Tensor, mask: Tensor, keep: Tensor):
        """Caption dropout: with a frozen encoder the dropped rows get the states of "" here, and the model is
        told to drop nothing (None); with the byte encoder the model swaps in its learned null itself (keep)."""
        if "text_encoder" not in helpers:
            return text, mask, keep
        null = self.null_condition(model, helpers, text.shape[1], batch)
        return replace_dropped(text, null["text"], keep), replace_dropped(mask, null["text_mask"], keep), None

    def latents(self, cfg: VideoDiTRunConfig, helpers: dict, batch: dict) -> Tensor:
        """Normalised VAE latents of a batch: from the cache, or encoded online (no grad)."""
        if "latents" in batch:
            shift, scale = self._stats
            return (batch["latents"].float() - shift) * scale
        vae = helpers["vae"]
        with torch.no_grad():
            video = video_tensor(batch).to(next(vae.parameters()).dtype)
            mean, _ = vae.encode(video, chunked=video.shape[2] > 33)  # chunks only where memory needs them
        shift, scale = self.latent_stats(cfg, helpers)
        return (mean.float() - shift) * scale

    def latent_stats(self, cfg: VideoDiTRunConfig, helpers: dict) -> tuple[float, float]:
        """Computed once per process from the same held-out clips on every rank, so all ranks agree."""
        if not hasattr(self, "_stats"):
            self._stats = latent_stats(cfg.vae, helpers["vae"], lambda: video_stream(
                cfg.data, "val", 0, 1, cfg.train.seed, num_workers=0))
        return self._stats

    def loss(self, cfg: VideoDiTRunConfig, model, helpers, batch, gen):
        x0 = self.latents(cfg, helpers, batch)
        b = x0.shape[0]
        text, mask = self.caption_states(model, helpers, batch)
        keep = drop_condition(b, cfg.diffusion.caption_dropout, gen).to(x0.device)
        text, mask, drop = self.frozen_dropout(model, helpers, batch, text, mask, keep)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device)
        d = cfg.diffusion
        if d.objective == "flow":
            t = flow_times(d, b, gen, self.flow_shift(cfg, x0.shape)).to(x0.device)
            pred = model(flow.interpolate(x0, noise, t), t, text, mask, drop)
            target = flow.velocity_target(x0, noise)
        else:
            schedule = self.schedule(cfg)
            steps = gaussian.sample_timesteps(b, gen, d.num_steps).to(x0.device)
            pred = model(gaussian.q_sample(x0, steps, noise, schedule), steps.float() / d.num_steps, text, mask,
                         drop)
            target = gaussian.prediction_target(x0, noise, steps, schedule, d.prediction)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"caption_kept": keep.float().mean()}

    def flow_shift(self, cfg: VideoDiTRunConfig, shape) -> float:
        """diffusion.shift, or (0) the shift for this many latent tokens (SD3 / Open-Sora)."""
        return cfg.diffusion.shift or flow.resolution_shift(self.tokens(cfg, shape))

    def schedule(self, cfg: VideoDiTRunConfig) -> gaussian.GaussianSchedule:
        d = cfg.diffusion
        return (gaussian.cosine_schedule(d.num_steps) if d.schedule == "cosine"
                else gaussian.linear_schedule(d.num_steps))

    def work(self, cfg: VideoDiTRunConfig, batch: dict) -> tuple[float, float]:
        if "latents" in batch:
            b, shape = batch["latents"].shape[0], tuple(batch["latents"].shape[2:])
        else:
            v = batch["video"]
            b, shape = v.shape[0], self.vae_geometry(cfg).latent_shape(*v.shape[2:])[1:]
        return float(b * self.tokens(cfg, shape)), b * self.train_flops(cfg, shape)

    # ---- evaluation and sampling --------------------------------------------------------------------
    def evaluate(self, cfg: VideoDiTRunConfig, model, helpers, rank: int, world: int, step: int) -> dict:
        """Held-out loss at fixed noise draws, and prompt adherence of freshly sampled videos."""
        from recipes.video_dit.adherence import adherence

        stream = video_stream(cfg.data, "val", rank, world, cfg.train.seed, num_workers=0)
        mean = held_out_loss(lambda batch, gen: self.loss(cfg, model, helpers, batch, gen)[0], stream,
                             cfg.eval.batches, cfg.train.seed, rank)
        values = {"loss": mean}
        prompts = cfg.sample.prompts[: cfg.eval.samples]
        if prompts:
            videos = self.render(cfg, model, helpers, prompts, rank, world, step)
            self._rendered = (step, prompts, videos)
            values.update({f"adherence_{k}": v for k, v in adherence(videos, prompts).items()})
        return values

    def render(self, cfg: VideoDiTRunConfig, model, helpers, prompts: list[str], rank: int, world: int,
               step: int) -> list:
        """Every rank samples its share of the prompts (equal work: ZeRO-3 forwards are collective);
        returns all videos as uint8 (T, H, W, 3) arrays, in prompt order, on every rank."""
        def generate(mine: list[str]) -> list:
            videos = self.generate(cfg, model, helpers, mine, derive_seed(cfg.sample.seed, rank, step))
            return [to_uint8(v) for v in videos]

        return render_on_every_rank(prompts, rank, world, generate)

    def generate(self, cfg: VideoDiTRunConfig, model, helpers, prompts: list[str], seed: int) -> Tensor:
        """Prompts -> videos (B, 3, T, H, W) in [-1, 1]: sample latents, then decode with the VAE."""
        z = self.sample_latents(cfg, model, helpers, prompts, seed)
        vae = helpers["vae"]
        shift, scale = self.latent_stats(cfg, helpers)
        with torch.no_grad():
            z = (z / scale + shift).to(next(vae.parameters()).dtype)
            return vae.decode(z, chunked=z.shape[2] > 9).float().clamp(-1, 1)

    def sample_latents(self, cfg: VideoDiTRunConfig, model, helpers, prompts: list[str], seed: int) -> Tensor:
        """Prompts -> normalised latents (B, C, T, h, w) by the sample.* sampler, guided by sample.cfg_scale."""
        s, d = cfg.sample, cfg.diffusion
        check_sampler(d.objective, s.sampler)  # validate() said so already; a config edited since is caught here
        shape = (len(prompts), *self.latent_shape(cfg, s.bucket))
        text, mask = self.encode_text(model, helpers, prompts)
        guidance = Guidance(s.cfg_scale, self.null_condition(model, helpers, text.shape[1]))
        cond = {"text": text, "text_mask": mask}
        gen = torch.Generator(device=dist.device()).manual_seed(seed)
        if d.objective == "flow":
            noise = torch.randn(shape, generator=gen, device=gen.device)
            sigmas = flow.flow_sigmas(s.steps, self.flow_shift(cfg, shape), d.num_train_timesteps or None)
            sampler = flow.euler_sample if s.sampler == "euler" else flow.heun_sample
            z = sampler(model, noise, sigmas, cond=cond, guidance=guidance)
        else:
            def model_fn(x, t, **c):
                return model(x, t / d.num_steps, **c)

            schedule = self.schedule(cfg)
            if s.sampler == "ddim":
                z = gaussian.ddim_sample(model_fn, shape, schedule, d.prediction, s.steps, 0.0, gen, cond=cond,
                                         guidance=guidance, device=gen.device)
            else:
                z = gaussian.ddpm_sample(model_fn, shape, schedule, d.prediction, gen, cond=cond, guidance=guidance,
                                         steps=s.steps, device=gen.device)
        return z

    def sample(self, cfg: VideoDiTRunConfig, model, helpers, rank: int, world: int, step: int, out_dir: str) -> list[str]:
        """Rank 0 writes the videos of this evaluation (rendered once, in evaluate) as mp4s and a PNG grid."""
        from recipes.video_dit.adherence import CHANCE, adherence

        prompts = cfg.sample.prompts[: cfg.eval.samples]
        rendered = getattr(self, "_rendered", None)
        if rendered is not None and rendered[0] == step and rendered[1] == prompts:
            videos = rendered[2]
        else:
            videos = self.render(cfg, model, helpers, prompts, rank, world, step)
        if rank != 0 or not prompts:
            return []
        lines = write_videos(videos, prompts, Path(out_dir), cfg.data.fps)
        a = adherence(videos, prompts)
        lines.append("prompt adherence: " + ", ".join(f"{k} {a[k]:.2f} (chance {CHANCE[k]:.2f})" for k in CHANCE))
        return lines


def compute_dtype(cfg: VideoDiTRunConfig) -> torch.dtype:
    """The dtype the trainer runs frozen helpers in (train.precision)."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def text_cache_key(cfg: VideoDiTRunConfig) -> dict:
    """What cached caption embeddings depend on: the frozen encoder (config, tokenizer and weights' digest), the
    padded length, and the dtype it computes in. WanPipeline's embedding recipe is named too, so a change to
    it would make older caches refuse themselves."""
    return {"encoder_sha256": encoder_digest(cfg.text.encoder), "max_len": cfg.text.max_len,
            "dtype": str(compute_dtype(cfg)).removeprefix("torch."), "recipe": "wan_t5_prompt_embeds"}


def rebuild_text_command(cfg: VideoDiTRunConfig) -> str:
    return (f"`python launch/cache_latents.py PRESET text.encoder={cfg.text.encoder} text.max_len={cfg.text.max_len} "
            f"train.precision={cfg.train.precision} --out {cfg.data.latents} --text-only`")


def flow_times(d: DiffusionConfig, b: int, gen: torch.Generator, shift: float) -> Tensor:
    """Training times (b,) on gen's device: u drawn by diffusion.timestep_sampling, then shifted continuously
    (num_train_timesteps 0) or, as diffusers' flow training scripts and DiffSynth's Wan training do, taken from
    the source scheduler's grid of shifted training sigmas at index floor(u * T)."""
    u = (flow.logit_normal_t(b, gen, d.logit_mean, d.logit_std) if d.timestep_sampling == "logit_normal"
         else flow.uniform_t(b, gen))
    if d.num_train_timesteps:
        return flow.discrete_t(u, flow.train_sigmas(d.num_train_timesteps, shift))
    return flow.shift_t(u, shift)


# Keys a pipeline folder fills while they hold "" or their default: (key, section, field, default, subfolder).
_FROM_PIPELINE = (("vae.path", "vae", "path", VaeRefConfig.path, "vae"),
                  ("text.encoder", "text", "encoder", TextConfig.encoder, "text_encoder"))


def require_helper_paths(cfg: VideoDiTRunConfig) -> None:
    """The Wan presets leave vae.path and text.encoder empty for a pipeline folder to fill (--plan and
    --describe need neither); a run that must load them says which key is missing."""
    for key, section, name, _, _ in _FROM_PIPELINE:
        if not getattr(getattr(cfg, section), name):
            raise ConfigError(f"{key} is empty: pass train.init_from=PIPELINE_FOLDER (a diffusers Wan pipeline "
                              f"with model_index.json) or set {key}")


def check_transformer_config(folder: str, cfg: VideoDiTRunConfig) -> None:
    """The pipeline's transformer/config.json must describe model.wan (the preset's shape): ConfigError naming every
    differing key, from the config alone (initial_weights checks the same again with the weights)."""
    try:
        found = diffusers_wan.read_config(folder)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"train.init_from: {e}") from None
    ours = cfg.model.wan.diffusers_config()
    diffs = [f"model.wan.{k}: {ours[k]} in the run config but {found[k]} in {folder}/config.json"
             for k in found if k in ours and wan._differs(ours[k], found[k])]
    if diffs:
        raise ConfigError("train.init_from: the pipeline's transformer differs from the model config: "
                          + "; ".join(diffs))


def adopt_pipeline(cfg: VideoDiTRunConfig) -> None:
    """train.init_from = a diffusers pipeline folder (model_index.json): vae.path <- vae/, text.encoder <-
    text_encoder/ (tokenizer/ beside it), diffusion.shift and num_train_timesteps <- scheduler/, each only where
    the config leaves it empty or at its default; the transformer is read by initial_weights. Each filled key is
    printed once. Idempotent (validate may run more than once on one config)."""
    root = cfg.train.init_from
    if not diffusers_pipeline.is_pipeline_folder(root):
        return
    if cfg.model.arch != "wan":
        raise ConfigError(f"train.init_from: {root} is a diffusers pipeline, which needs model.arch=wan (this run "
                          f"has model.arch={cfg.model.arch})")
    check_transformer_config(diffusers_pipeline.component(root, "transformer"), cfg)  # now, not after hours of setup
    filled = []
    for key, section, name, default, sub in _FROM_PIPELINE:
        if getattr(getattr(cfg, section), name) in ("", default):
            value = diffusers_pipeline.component(root, sub)
            if sub == "text_encoder":
                diffusers_pipeline.component(root, "tokenizer")  # where the encoder's loader finds its tokenizer
            setattr(getattr(cfg, section), name, value)
            filled.append(f"{key} <- {value}")
    d = cfg.diffusion
    if d.objective == "flow" and (not d.shift or not d.num_train_timesteps):
        schedule = diffusers_pipeline.flow_schedule(root)
        source = f"{root}/scheduler ({schedule.scheduler})"
        if not d.shift:
            d.shift = schedule.shift
            filled.append(f"diffusion.shift <- {d.shift:g} from {source}")
        if not d.num_train_timesteps:
            d.num_train_timesteps = schedule.num_train_timesteps
            filled.append(f"diffusion.num_train_timesteps <- {d.num_train_timesteps} from {source}")
    if filled and os.environ.get("RANK", "0") == "0":  # before dist.init: once per job, not per rank
        print("diffusers pipeline: " + "; ".join(filled), flush=True)


def fresh_non_dit_weights(cfg: VideoDiTRunConfig) -> dict[str, Tensor]:
    """The weights of TextToVideo outside its DiT (the learned null caption, a trainable byte encoder), freshly
    initialised: a diffusers transformer folder has none of them. Seeded by train.seed alone, so every rank
    (each reads the folder itself below ZeRO-3) starts from the same values."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        module = TextToVideo(cfg, dit=nn.Identity())
    return {k: v.detach() for k, v in module.state_dict().items()}


def write_videos(videos: list, prompts: list[str], out: Path, fps: float) -> list[str]:
    """mp4 per prompt plus one PNG grid; returns printable lines."""
    lines = []
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        path = write_mp4(video, out / f"{i:03d}_{prompt.replace(' ', '_')[:60]}.mp4", fps)
        lines.append(f"{path}: {prompt}")
    lines.append(str(write_grid_png(videos, out / "grid.png")))
    return lines
