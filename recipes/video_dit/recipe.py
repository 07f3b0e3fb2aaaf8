"""Text-to-video DiT in the latent space of the causal video VAE (rectified flow by default)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from framework import distributed as dist
from framework.config import ConfigError, RunConfig
from framework.data.buckets import parse_buckets
from framework.data.latents import LatentStream, cache_key
from framework.diffusion import flow, gaussian
from framework.diffusion.guidance import Guidance, drop_condition
from framework.export import diffusers_wan
from framework.export.video_io import to_uint8, write_grid_png, write_mp4
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
from recipes.video_dit.text_encoder import ByteTextEncoder, HFTextEncoder
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
    shift: float = 0.0  # flow: time shift; 0 = grows with the number of latent tokens (SD3 / Open-Sora)
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
        super().__init__(dit, text_encoder, cfg.model.text_dim)

    def null_condition(self, length: int) -> dict[str, Tensor]:
        """The unconditional caption as the samplers' condition: the learned null token, then padding."""
        text, mask = self.null_caption(length)
        return {"text": text, "text_mask": mask}

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, keep: Tensor | None = None) -> Tensor:
        """x (B, C, T, H, W), t (B,) in [0, 1], text (B, S, D), text_mask (B, S), keep (B,) caption dropout."""
        text, text_mask = self.drop_caption(text, text_mask, keep)
        return self.dit(x, t, text, text_mask)


class VideoDiTRecipe(Recipe):
    name = "video_dit"
    config_class = VideoDiTRunConfig
    unit = "latent_tokens"

    def validate(self, cfg: VideoDiTRunConfig, world: int) -> None:
        vae = self.vae_geometry(cfg)
        self.check_vae(cfg, vae)
        check_vae_buckets(cfg.data.buckets, cfg.train.micro_batch, vae.compression)
        if not 0 <= cfg.sample.bucket < len(cfg.data.buckets):
            raise ConfigError(f"sample.bucket={cfg.sample.bucket} is not an index into data.buckets "
                              f"({len(cfg.data.buckets)} buckets)")
        check_sampler(cfg.diffusion.objective, cfg.sample.sampler)
        if cfg.model.arch == "wan":
            self.check_wan(cfg)

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
        vae = load_vae(cfg.vae.path)
        self.check_vae(cfg, vae.cfg)
        self._vae_cfg = (cfg.vae.path, vae.cfg)
        helpers: dict[str, nn.Module] = {"vae": vae}
        if cfg.text.encoder != "bytes":
            if not Path(cfg.text.encoder).is_dir():
                raise ConfigError(f"text.encoder: {cfg.text.encoder!r} is neither 'bytes' nor a local T5/UMT5 folder")
            encoder = HFTextEncoder(cfg.text.encoder, cfg.text.max_len)
            if encoder.hidden_size != cfg.model.text_dim:
                raise ConfigError(f"model.text_dim={cfg.model.text_dim} but {cfg.text.encoder} outputs "
                                  f"{encoder.hidden_size}")
            helpers["text_encoder"] = encoder
        return helpers

    def initial_weights(self, cfg: VideoDiTRunConfig, path: str) -> dict[str, Tensor]:
        """train.init_from: with model.arch=wan also a diffusers WanTransformer3DModel folder (the released
        `transformer/`), whose config.json must describe model.wan; else our checkpoints and exports."""
        if not diffusers_wan.is_diffusers_folder(path):
            if diffusers_wan.is_diffusers_folder(Path(path) / "transformer"):
                raise ConfigError(f"train.init_from: {path} is a diffusers pipeline; give its transformer folder "
                                  f"{Path(path) / 'transformer'}")
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
        return LatentStream(path, batch, rank, world, cfg.train.seed, batch_multiple)

    # ---- training -----------------------------------------------------------------------------------
    def encode_text(self, model, helpers: dict, captions: list[str]) -> tuple[Tensor, Tensor]:
        return encode_text(model, helpers, captions)

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
        text, mask = self.encode_text(model, helpers, batch["caption"])
        keep = drop_condition(b, cfg.diffusion.caption_dropout, gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device)
        d = cfg.diffusion
        if d.objective == "flow":
            t = flow.logit_normal_t(b, gen, d.logit_mean, d.logit_std).to(x0.device)
            t = flow.shift_t(t, d.shift or flow.resolution_shift(self.tokens(cfg, x0.shape)))
            pred = model(flow.interpolate(x0, noise, t), t, text, mask, keep)
            target = flow.velocity_target(x0, noise)
        else:
            schedule = self.schedule(cfg)
            steps = gaussian.sample_timesteps(b, gen, d.num_steps).to(x0.device)
            pred = model(gaussian.q_sample(x0, steps, noise, schedule), steps.float() / d.num_steps, text, mask, keep)
            target = gaussian.prediction_target(x0, noise, steps, schedule, d.prediction)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"caption_kept": keep.float().mean()}

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
        guidance = Guidance(s.cfg_scale, unwrap(model).null_condition(text.shape[1]))
        cond = {"text": text, "text_mask": mask}
        gen = torch.Generator(device=dist.device()).manual_seed(seed)
        if d.objective == "flow":
            noise = torch.randn(shape, generator=gen, device=gen.device)
            sigmas = flow.flow_sigmas(s.steps, d.shift or flow.resolution_shift(self.tokens(cfg, shape)))
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
