"""Text-to-video-and-audio: the joint DiT (model.py) in the latent spaces of a frozen causal video VAE and a
frozen audio VAE, trained with rectified flow on per-modality times (timesteps.py); samples are mp4 files
with sound, scored by the sync metric (sync.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from framework import distributed as dist
from framework.config import ConfigError, RunConfig
from framework.data.buckets import parse_buckets
from framework.diffusion import flow
from framework.diffusion.guidance import drop_condition
from framework.export.video_io import to_uint8, write_grid_png, write_mp4
from framework.recipe import Built, Recipe
from framework.rng import derive_seed
from recipes.t2v_core import (
    TextConditioned,
    bucket_latent_shape,
    held_out_loss,
    render_on_every_rank,
    to_device,
    token_count,
    unwrap,
)
from recipes.video_audio.audio_ref import AudioVaeRefConfig, FrozenAudioVAE, load_audio_vae
from recipes.video_audio.model import JointAVConfig, JointAVDiT
from recipes.video_audio.sampling import JointGuidance, joint_euler
from recipes.video_audio.sync import sync_report
from recipes.video_audio.timesteps import joint_times
from recipes.video_common import VideoDataConfig, check_vae_buckets, video_stream, video_tensor
from recipes.video_dit.recipe import DiffusionConfig, TextConfig
from recipes.video_dit.text_encoder import ByteTextEncoder
from recipes.video_dit.vae_ref import VaeRefConfig, assumed_vae, latent_stats, load_vae, vae_config
from recipes.video_vae.model import VideoVAEConfig

FLASH_BEEP_PROMPTS = [f"a {c} {s} flashes {n}" for c, s, n in [
    ("red", "circle", "once"), ("green", "square", "twice"), ("blue", "triangle", "three times"),
    ("yellow", "circle", "twice"), ("red", "square", "three times"), ("green", "triangle", "once"),
    ("blue", "circle", "twice"), ("yellow", "square", "three times"),
]]


@dataclass
class JointNoiseConfig:
    """How the two modalities are noised per training row (timesteps.py), and modality dropout."""

    independent: float = 0.2  # audio time drawn independently of the video's
    clean_video: float = 0.1  # video given clean (t = 0, no video loss): trains video-to-audio
    clean_audio: float = 0.1  # audio given clean: trains audio-to-video
    modality_dropout: float = 0.1  # cross-modal attention cut for the row: each tower alone (cross guidance)


@dataclass
class JointSampleConfig:
    prompts: list[str] = field(default_factory=lambda: list(FLASH_BEEP_PROMPTS))
    mode: Literal["joint", "video_to_audio", "audio_to_video"] = "joint"  # the given modality: held-out clips
    steps: int = 30
    # Guidance scales as in every recipe (sampling.py): 1 = off, 0 = the unconditional branch alone.
    cfg_scale: float = 4.0  # caption guidance of the video
    audio_cfg_scale: float = 4.0  # caption guidance of the audio
    cross_cfg_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # (video, audio) on the other one
    seed: int = 0
    bucket: int = 0  # index into data.buckets giving resolution and frame count
    griffin_lim_iters: int = 32


def _joint_data() -> VideoDataConfig:
    return VideoDataConfig(dir="datasets/flash_beep", fps=25.0, buckets=["32x32x49:8"], audio_rate=16000)


@dataclass
class JointRunConfig(RunConfig):
    recipe: str = "video_audio"
    model: JointAVConfig = field(default_factory=JointAVConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VaeRefConfig = field(default_factory=lambda: VaeRefConfig(path="exports/av_video_vae_tiny"))
    audio_vae: AudioVaeRefConfig = field(default_factory=AudioVaeRefConfig)
    data: VideoDataConfig = field(default_factory=_joint_data)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    joint: JointNoiseConfig = field(default_factory=JointNoiseConfig)
    sample: JointSampleConfig = field(default_factory=JointSampleConfig)


class TextToVideoAudio(TextConditioned):
    """The trainable module: the joint DiT, the byte text encoder and the learned null caption."""

    def __init__(self, cfg: JointRunConfig):
        dit = JointAVDiT(cfg.model)  # built before the text encoder: the seeded init draws in this order
        text_encoder = ByteTextEncoder(cfg.model.text_dim, cfg.text.layers, cfg.text.heads, cfg.text.max_len)
        super().__init__(dit, text_encoder, cfg.model.text_dim)

    def null_condition(self, length: int) -> tuple[Tensor, Tensor]:
        """The unconditional caption (1, length, D) and its mask: the learned null token, then padding."""
        return self.null_caption(length)

    def forward(self, video: Tensor, audio: Tensor, t_video: Tensor, t_audio: Tensor, text: Tensor,
                text_mask: Tensor, bridge: Tensor | None = None, keep_text: Tensor | None = None) -> tuple[Tensor, Tensor]:
        text, text_mask = self.drop_caption(text, text_mask, keep_text)
        dtype = self.compute_dtype  # fp32 latents from the frozen VAEs into a bf16 (or LoRA bf16-base) DiT
        return self.dit(video.to(dtype), audio.to(dtype), t_video, t_audio, text.to(dtype), text_mask, bridge=bridge)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-row mean squared error (B,) over all dims but the batch; mask (B, T) selects the last dim's frames."""
    err = (pred.float() - target.float()).pow(2)
    if mask is None:
        return err.flatten(1).mean(1)
    w = mask[:, None, :].expand_as(err).to(err.dtype)
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)


def video_tokens(cfg: JointRunConfig, video_latent: Tensor) -> int:
    return token_count(video_latent.shape[2:], cfg.model.video_patch)


def flow_shift(cfg: JointRunConfig, n_video_tokens: int) -> float:
    """diffusion.shift, or the resolution-dependent one of the video's token count (both modalities share it)."""
    return cfg.diffusion.shift or flow.resolution_shift(n_video_tokens)


def joint_flow_loss(cfg: JointRunConfig, model, xv: Tensor, xa: Tensor, audio_mask: Tensor, text: Tensor,
                    text_mask: Tensor, gen: torch.Generator) -> tuple[Tensor, dict]:
    """Rectified-flow loss on normalised latents: video (B, Cv, T, h, w), audio (B, Ca, Ta) with its frame mask
    (B, Ta). Each modality's MSE is averaged over its noised rows (a clean one is input, not target); caption
    dropout and modality dropout (bridge cut) are drawn per row from gen."""
    b, d, j = xv.shape[0], cfg.diffusion, cfg.joint
    dev = xv.device
    keep_text = drop_condition(b, d.caption_dropout, gen).to(dev)
    bridge = drop_condition(b, j.modality_dropout, gen).to(dev)
    shift = flow_shift(cfg, video_tokens(cfg, xv))

    def draw_t(n: int, g: torch.Generator) -> Tensor:
        return flow.shift_t(flow.logit_normal_t(n, g, d.logit_mean, d.logit_std), shift)

    times = joint_times(b, gen, draw_t, j.independent, j.clean_video, j.clean_audio)
    tv, ta = times.t_video.to(dev), times.t_audio.to(dev)
    nv = torch.randn(xv.shape, generator=gen, device=gen.device).to(dev)
    na = torch.randn(xa.shape, generator=gen, device=gen.device).to(dev)
    pred_v, pred_a = model(flow.interpolate(xv, nv, tv), flow.interpolate(xa, na, ta), tv, ta, text, text_mask,
                           bridge, keep_text)
    loss_v = masked_mse(pred_v, flow.velocity_target(xv, nv))
    loss_a = masked_mse(pred_a, flow.velocity_target(xa, na), audio_mask)
    wv, wa = times.video_loss.to(dev), times.audio_loss.to(dev) * audio_mask.any(1).float()
    loss = (loss_v * wv).sum() / b + (loss_a * wa).sum() / b
    return loss, {"loss_video": (loss_v * wv).sum() / wv.sum().clamp_min(1.0),
                  "loss_audio": (loss_a * wa).sum() / wa.sum().clamp_min(1.0),
                  "bridge_kept": bridge.float().mean(), "caption_kept": keep_text.float().mean()}


class VideoAudioRecipe(Recipe):
    name = "video_audio"
    config_class = JointRunConfig
    unit = "latent_tokens"

    def validate(self, cfg: JointRunConfig, world: int) -> None:
        d, m = cfg.data, cfg.model
        vae = self.vae_geometry(cfg)
        self.check_vae(cfg, vae)
        check_vae_buckets(d.buckets, cfg.train.micro_batch, vae.compression)
        if cfg.diffusion.objective != "flow":
            raise ConfigError("diffusion.objective: the joint recipe trains rectified flow only ('flow')")
        if d.audio_rate <= 0:
            raise ConfigError("data.audio_rate must be > 0: the joint recipe trains on each clip's audio")
        if abs(m.fps - d.fps) > 1e-9:
            raise ConfigError(f"model.fps={m.fps} must equal data.fps={d.fps}: token times are computed from it")
        if not 0 <= cfg.sample.bucket < len(d.buckets):
            raise ConfigError(f"sample.bucket={cfg.sample.bucket} is not an index into data.buckets")
        if len(cfg.sample.cross_cfg_scale) != 2:
            raise ConfigError(f"sample.cross_cfg_scale needs two scales (video, audio), got "
                              f"{cfg.sample.cross_cfg_scale}")
        j = cfg.joint
        try:
            joint_times(1, torch.Generator(), lambda n, g: torch.rand(n, generator=g), j.independent, j.clean_video,
                        j.clean_audio)
            drop_condition(1, j.modality_dropout, torch.Generator())
        except ValueError as e:
            raise ConfigError(str(e)) from e
        for spec, b in zip(d.buckets, parse_buckets(d.buckets)):
            latents = b.seconds(d.fps) * m.audio_latent_rate
            if abs(latents - round(latents)) > 1e-6 or round(latents) % m.audio_patch:
                raise ConfigError(f"data.buckets: {spec!r} at data.fps={d.fps} lasts {b.seconds(d.fps):g} s = "
                                  f"{latents:g} audio latents at model.audio_latent_rate={m.audio_latent_rate}; "
                                  f"it must be a whole multiple of model.audio_patch={m.audio_patch}")

    def describe(self, cfg: JointRunConfig) -> str:
        n = sum(p.numel() for p in JointAVDiT(cfg.model).parameters())
        v, a = self.token_counts(cfg, cfg.sample.bucket)
        return (f"{n / 1e6:.2f}M joint DiT parameters, {v} video + {a} audio tokens per clip, "
                f"shared time RoPE {'on' if cfg.model.shared_time_rope else 'OFF (ablation)'}")

    # ---- shapes: the video VAE's geometry, never a formula of our own -------------------------------
    def vae_geometry(self, cfg: JointRunConfig) -> VideoVAEConfig:
        """The video VAE config latent shapes come from: the loaded helper's, else its export's config.json,
        else (no export yet: --describe, unit tests) the default architecture at model.temporal_compression."""
        loaded = getattr(self, "_vae_cfg", None)
        if loaded is not None and loaded[0] == cfg.vae.path:
            return loaded[1]
        return vae_config(cfg.vae.path) or assumed_vae(cfg.model.video_channels, cfg.model.temporal_compression)

    def check_vae(self, cfg: JointRunConfig, vae: VideoVAEConfig) -> None:
        """The model's token times and widths must be those of the video VAE it trains in."""
        if vae.latent_channels != cfg.model.video_channels:
            raise ConfigError(f"model.video_channels={cfg.model.video_channels} but the video VAE at {cfg.vae.path} "
                              f"has {vae.latent_channels} latent channels")
        if vae.compression[0] != cfg.model.temporal_compression:
            raise ConfigError(f"model.temporal_compression={cfg.model.temporal_compression} but the video VAE at "
                              f"{cfg.vae.path} compresses time {vae.compression[0]}x: token times would be wrong")

    def latent_shapes(self, cfg: JointRunConfig, bucket: int) -> tuple[tuple[int, ...], tuple[int, int]]:
        """((Cv, T, h, w), (Ca, Ta)) of one clip of the bucket."""
        spec, m = cfg.data.buckets[bucket], cfg.model
        seconds = parse_buckets([spec])[0].seconds(cfg.data.fps)
        return bucket_latent_shape(self.vae_geometry(cfg), spec), (m.audio_channels, round(seconds * m.audio_latent_rate))

    def token_counts(self, cfg: JointRunConfig, bucket: int) -> tuple[int, int]:
        video, (_, ta) = self.latent_shapes(cfg, bucket)
        return token_count(video[1:], cfg.model.video_patch), ta // cfg.model.audio_patch

    # ---- building -----------------------------------------------------------------------------------
    def build_model(self, cfg: JointRunConfig) -> Built:
        return Built(model=TextToVideoAudio(cfg))

    def build_helpers(self, cfg: JointRunConfig) -> dict[str, nn.Module]:
        audio_vae = load_audio_vae(cfg.audio_vae.path)
        if audio_vae.mel.rate != cfg.data.audio_rate:
            raise ConfigError(f"data.audio_rate={cfg.data.audio_rate} but the audio VAE at {cfg.audio_vae.path} "
                              f"was trained on {audio_vae.mel.rate} Hz features")
        if abs(audio_vae.latent_rate - cfg.model.audio_latent_rate) > 1e-6:
            raise ConfigError(f"model.audio_latent_rate={cfg.model.audio_latent_rate} but the audio VAE at "
                              f"{cfg.audio_vae.path} gives {audio_vae.latent_rate:g} latents per second")
        if audio_vae.vae.cfg.latent_channels != cfg.model.audio_channels:
            raise ConfigError(f"model.audio_channels={cfg.model.audio_channels} but the audio VAE has "
                              f"{audio_vae.vae.cfg.latent_channels} latent channels")
        vae = load_vae(cfg.vae.path)
        self.check_vae(cfg, vae.cfg)
        self._vae_cfg = (cfg.vae.path, vae.cfg)
        return {"vae": vae, "audio_vae": audio_vae}

    def build_data(self, cfg: JointRunConfig, split: str, rank: int, world: int, batch_multiple: int = 1):
        return video_stream(cfg.data, split, rank, world, cfg.train.seed, batch_multiple)

    # ---- latents ------------------------------------------------------------------------------------
    def latent_stats(self, cfg: JointRunConfig, helpers: dict) -> dict[str, tuple[float, float]]:
        """{"video": (shift, scale), "audio": (shift, scale)}: normalised latents have zero mean and unit
        variance; computed once per process from the same held-out clips on every rank, so all ranks agree."""
        if not hasattr(self, "_stats"):
            def val_stream():
                return video_stream(cfg.data, "val", 0, 1, cfg.train.seed, num_workers=0)

            stats = {"video": latent_stats(cfg.vae, helpers["vae"], val_stream)}
            if cfg.audio_vae.scale > 0:
                stats["audio"] = (cfg.audio_vae.shift, cfg.audio_vae.scale)
            else:
                values = []
                for _, batch in zip(range(cfg.vae.stats_batches), val_stream()):
                    z, mask = self.audio_latents(helpers, batch, normalise=None)
                    values.append(z.transpose(1, 2)[mask].flatten())
                z = torch.cat(values)
                stats["audio"] = (float(z.mean()), float(1.0 / z.std().clamp_min(1e-6)))
            self._stats = stats
        return self._stats

    def audio_latents(self, helpers: dict, batch: dict, normalise: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
        audio_vae: FrozenAudioVAE = helpers["audio_vae"]
        device = next(audio_vae.parameters()).device
        z, mask = audio_vae.encode(batch["audio"].to(device).float(), batch["audio_mask"].to(device))
        if normalise is not None:
            z = (z - normalise[0]) * normalise[1]
        return z, mask

    def latents(self, cfg: JointRunConfig, helpers: dict, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised (video (B, Cv, T, h, w), audio (B, Ca, Ta), audio frame mask (B, Ta)), no grad."""
        stats = self.latent_stats(cfg, helpers)
        vae = helpers["vae"]
        with torch.no_grad():
            w = next(vae.parameters())
            video = video_tensor(batch).to(device=w.device, dtype=w.dtype)  # as audio_latents does for audio
            mean, _ = vae.encode(video, chunked=video.shape[2] > 33)
        shift, scale = stats["video"]
        za, mask = self.audio_latents(helpers, batch, stats["audio"])
        ta = self.audio_latent_count(cfg, video.shape[2], za)
        return (mean.float() - shift) * scale, za[..., :ta], mask[:, :ta]

    def audio_latent_count(self, cfg: JointRunConfig, frames: int, audio: Tensor) -> int:
        """Audio latents that cover exactly a clip of `frames` frames: the loader's window can round to one
        latent more."""
        expected = round(frames / cfg.data.fps * cfg.model.audio_latent_rate)
        if audio.shape[-1] < expected:
            raise ValueError(f"{audio.shape[-1]} audio latents for a clip of {frames} frames; expected {expected}")
        return expected

    # ---- training -----------------------------------------------------------------------------------
    def loss(self, cfg: JointRunConfig, model, helpers, batch, gen):
        xv, xa, audio_mask = self.latents(cfg, helpers, batch)
        text, text_mask = unwrap(model).text_encoder(batch["caption"])
        return joint_flow_loss(cfg, model, xv, xa, audio_mask, text, text_mask, gen)

    def work(self, cfg: JointRunConfig, batch: dict) -> tuple[float, float]:
        b, frames = batch["video"].shape[0], batch["video"].shape[2]
        bucket = next(i for i, s in enumerate(parse_buckets(cfg.data.buckets)) if s.frames == frames)
        v, a = self.token_counts(cfg, bucket)
        params = getattr(self, "_params", None) or sum(p.numel() for p in JointAVDiT(cfg.model).parameters())
        self._params = params
        return float(b * (v + a)), 6.0 * params * b * (v + a)

    # ---- evaluation and sampling --------------------------------------------------------------------
    def evaluate(self, cfg: JointRunConfig, model, helpers, rank: int, world: int, step: int) -> dict:
        """Held-out loss at fixed noise draws, and the sync of freshly sampled clips (joint mode)."""
        stream = video_stream(cfg.data, "val", rank, world, cfg.train.seed, num_workers=0)
        mean = held_out_loss(lambda batch, gen: self.loss(cfg, model, helpers, batch, gen)[0], stream,
                             cfg.eval.batches, cfg.train.seed, rank)
        values = {"loss": mean}
        prompts = cfg.sample.prompts[: cfg.eval.samples]
        if prompts:
            clips = self.render(cfg, model, helpers, prompts, rank, world, step)
            self._rendered = (step, prompts, clips)
            report = sync_report(clips, cfg.data.fps, cfg.data.audio_rate)
            values.update({f"sync_{k}": float(v) for k, v in report.items() if k != "clips"})
        return values

    def render(self, cfg: JointRunConfig, model, helpers, prompts: list[str], rank: int, world: int,
               step: int, given: dict | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every rank samples its share of the prompts (equal work: ZeRO-3 forwards are collective); returns
        (video uint8 (T, H, W, 3), audio float32 (N,)) per prompt, in prompt order, on every rank."""
        def generate(mine: list[int]) -> list:
            mine_given = None if given is None else {k: v[mine] for k, v in given.items()}
            videos, audios = self.generate(cfg, model, helpers, [prompts[i] for i in mine],
                                           derive_seed(cfg.sample.seed, rank, step), mine_given)
            return [(to_uint8(v), a.numpy().astype(np.float32)) for v, a in zip(videos, audios)]

        return render_on_every_rank(list(range(len(prompts))), rank, world, generate)

    def generate(self, cfg: JointRunConfig, model, helpers, prompts: list[str], seed: int,
                 given: dict | None = None) -> tuple[Tensor, Tensor]:
        """Prompts -> (videos (B, 3, T, H, W) in [-1, 1], waveforms (B, N)). given {"video"|"audio": normalised
        latents} switches to video-to-audio or audio-to-video: that modality stays as given."""
        zv, za = self.sample_latents(cfg, model, prompts, seed, given)
        s = cfg.sample
        stats = self.latent_stats(cfg, helpers)
        vae = helpers["vae"]
        with torch.no_grad():
            zv = (zv / stats["video"][1] + stats["video"][0]).to(next(vae.parameters()).dtype)
            frames = vae.decode(zv, chunked=zv.shape[2] > 9).float().clamp(-1, 1)
            za = za / stats["audio"][1] + stats["audio"][0]
            wave_gen = torch.Generator().manual_seed(seed)
            waves = helpers["audio_vae"].decode(za, s.griffin_lim_iters, gen=wave_gen)
        return frames, waves.float()

    def sample_latents(self, cfg: JointRunConfig, model, prompts: list[str], seed: int,
                       given: dict | None = None) -> tuple[Tensor, Tensor]:
        """Prompts -> normalised (video (B, Cv, T, h, w), audio (B, Ca, Ta)) latents by joint Euler sampling,
        guided by sample.cfg_scale / audio_cfg_scale / cross_cfg_scale; a `given` modality stays as given."""
        s = cfg.sample
        vshape, ashape = self.latent_shapes(cfg, s.bucket)
        b, dev = len(prompts), dist.device()
        net = unwrap(model)
        text, text_mask = net.text_encoder(prompts)
        null_text, null_mask = net.null_condition(text.shape[1])
        gen = torch.Generator(device=dev).manual_seed(seed)
        video = torch.randn((b, *vshape), generator=gen, device=dev)
        audio = torch.randn((b, *ashape), generator=gen, device=dev)
        clean = ""
        if given:
            (clean, value), = given.items()
            if clean == "video":
                video = value.to(dev)
            else:
                audio = value.to(dev)
        sigmas = flow.flow_sigmas(s.steps, flow_shift(cfg, self.token_counts(cfg, s.bucket)[0]))
        guidance = JointGuidance(text=(s.cfg_scale, s.audio_cfg_scale), cross=tuple(s.cross_cfg_scale))
        return joint_euler(model, video, audio, sigmas, text, text_mask, null_text, null_mask, guidance, clean)

    def given_latents(self, cfg: JointRunConfig, helpers: dict, n: int) -> tuple[list[str], dict]:
        """The first n held-out clips' captions and their normalised latents of the modality that
        sample.mode gives (video for video_to_audio, audio for audio_to_video)."""
        stream = video_stream(cfg.data, "val", 0, 1, cfg.train.seed, num_workers=0)
        captions, latents = [], []
        for batch in stream:
            xv, xa, _ = self.latents(cfg, helpers, to_device(batch, dist.device()))
            latents.append(xv if cfg.sample.mode == "video_to_audio" else xa)
            captions += batch["caption"]
            if len(captions) >= n:
                break
        key = "video" if cfg.sample.mode == "video_to_audio" else "audio"
        return captions[:n], {key: torch.cat(latents)[:n].cpu()}

    def sample(self, cfg: JointRunConfig, model, helpers, rank: int, world: int, step: int, out_dir: str) -> list[str]:
        """Rank 0 writes mp4s with sound, a PNG grid and the sync report; sample.mode picks joint generation or
        generation of one modality from held-out clips' other one (their captions are the prompts then)."""
        prompts = cfg.sample.prompts[: cfg.eval.samples]
        rendered = getattr(self, "_rendered", None)
        if cfg.sample.mode != "joint":
            prompts, given = self.given_latents(cfg, helpers, len(prompts))
            clips = self.render(cfg, model, helpers, prompts, rank, world, step, given)
        elif rendered is not None and rendered[0] == step and rendered[1] == prompts:
            clips = rendered[2]
        else:
            clips = self.render(cfg, model, helpers, prompts, rank, world, step)
        if rank != 0 or not prompts:
            return []
        out, lines = Path(out_dir), []
        for i, (prompt, (video, audio)) in enumerate(zip(prompts, clips)):
            name = f"{i:03d}_{prompt.replace(' ', '_')[:60]}.mp4"
            path = write_mp4(video, out / name, cfg.data.fps, audio=audio, audio_rate=cfg.data.audio_rate)
            lines.append(f"{path}: {prompt}")
        lines.append(str(write_grid_png([v for v, _ in clips], out / "grid.png")))
        r = sync_report(clips, cfg.data.fps, cfg.data.audio_rate)
        lines.append(f"sync ({cfg.sample.mode}): median |offset| {r['median_abs_offset_ms']:.1f} ms, "
                     f"{r['within_40ms']:.2f} of events within 40 ms ({r['events']} matched, "
                     f"{r['unmatched']} unmatched, {r['clips']} clips)")
        return lines
