"""Few-step text-to-video by distillation: a student video DiT that samples in 1-4 Euler steps with the
teacher's classifier-free guidance baked in.

Method (guidance-baked segment distillation on the rectified-flow ODE). The student is the teacher's DiT,
started from its weights. Its sampling grid has N = distill.student_steps segments (the grid the video DiT's own
sampler uses for N steps). Each training sample picks a segment k, puts the clip's latents on the forward path at
its start time a (x_a = (1 - a) x0 + a noise, as consistency distillation does), and the frozen teacher integrates
its guided ODE, uncond + s (cond - uncond) with s = distill.cfg_scale, from a to the segment's end b with Euler
steps at the times of its distill.teacher_steps-step grid that fall inside [b, a]. The student, given (x_a, a,
caption) and no null pass, regresses the velocity whose single Euler step lands where the teacher did:
v* = (x_b - x_a) / (b - a). Sampling is the video DiT's Euler sampler over the same N segments at
sample.cfg_scale = 1: one forward per step instead of the teacher's two per step over 30 steps.

Why this and not DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation", what FastVideo uses): DMD2
trains two networks (the student and a fake-score model of the student's outputs) plus a GAN head, with
alternating updates; that doubles the trainable state our trainer's single ZeRO engine holds and the CPU budget
of every step. The regression above needs one trainable model (an ordinary run of our trainer: ZeRO, exact resume,
export) and only forward passes of the teacher, and it fits a rectified-flow teacher directly: its ODE is the
thing being shortened. It is the flow-matching form of progressive / guided distillation (Salimans & Ho 2022,
"Progressive Distillation for Fast Sampling of Diffusion Models"; Meng et al. 2023, "On Distillation of Guided
Diffusion Models", which bakes the guidance scale into the student) and of piecewise straightening (PeRFlow, Yan
et al. 2024; InstaFlow, Liu et al. 2023, distils a rectified flow into one step), with consistency distillation's
choice of training points on the forward path (Song et al. 2023, "Consistency Models"; LCM, Luo et al. 2023,
also bakes guidance in). Each student step size gets its own student: N is fixed per run, since a student
without a step-size input cannot learn two different average velocities from the same (x_a, a).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from framework import checkpoint
from framework.config import ConfigError, from_dict
from framework.diffusion import flow
from framework.diffusion.guidance import Guidance
from framework.export.safetensors_io import consolidated_state_dict
from recipes.t2v_core import encode_text
from recipes.video_distill.distill import segment_grid, segment_velocity, student_sigmas, teacher_solution
from recipes.video_dit.model import VideoDiTConfig
from recipes.video_dit.recipe import (
    DiffusionConfig,
    TextConfig,
    TextToVideo,
    VideoDiTRecipe,
    VideoDiTRunConfig,
    compute_dtype,
)
from recipes.video_dit.vae_ref import VaeRefConfig

# Sections the student takes from its teacher: its architecture and what gives latents and times their meaning.
ADOPTED = {"model": VideoDiTConfig, "text": TextConfig, "vae": VaeRefConfig, "diffusion": DiffusionConfig}


@dataclass
class DistillConfig:
    teacher: str = ""  # a video_dit run dir or checkpoint dir; its EMA weights when it kept an EMA
    student_steps: int = 4  # 1-4 Euler steps at sampling
    teacher_steps: int = 30  # the teacher's Euler steps over the whole trajectory (30 = its usual sampler)
    cfg_scale: float = 4.0  # the teacher's guidance, baked into the student


@dataclass
class VideoDistillRunConfig(VideoDiTRunConfig):
    recipe: str = "video_distill"
    distill: DistillConfig = field(default_factory=DistillConfig)


def teacher_checkpoint(path: str) -> Path:
    """The teacher's newest complete checkpoint; ConfigError naming distill.teacher if there is none."""
    if not Path(path).exists():
        raise ConfigError(f"distill.teacher: {path} does not exist (give the run dir of a trained video_dit model)")
    try:
        ckpt = checkpoint.resolve(path, "")
    except FileNotFoundError as e:
        raise ConfigError(f"distill.teacher: {path} is not a video_dit run or checkpoint ({e})") from None
    if ckpt is None or not (ckpt / "meta.json").is_file():
        raise ConfigError(f"distill.teacher: {path} is not a video_dit run or checkpoint (no meta.json)")
    return ckpt


def teacher_config(path: str) -> dict:
    """The teacher run's resolved config, refused unless it is a video_dit run without LoRA adapters."""
    meta = checkpoint.read_meta(teacher_checkpoint(path))
    config = meta["config"]
    if meta.get("recipe") != "video_dit":
        raise ConfigError(f"distill.teacher: {path} is a {meta.get('recipe')} run, not a video_dit run")
    if (config.get("lora") or {}).get("rank", 0) > 0:
        raise ConfigError(f"distill.teacher: {path} trained LoRA adapters; train.init_from it into a full video_dit "
                          f"run first (that run starts from the merged weights)")
    return config


def teacher_weights(path: str) -> dict[str, Tensor]:
    """The teacher's full fp32 weights: its EMA when the run kept one (what it samples with), else the live ones."""
    ckpt = teacher_checkpoint(path)
    with checkpoint.safe_loading(ckpt):
        has_ema = checkpoint.trainer_states(ckpt)[0].get("ema") is not None
    return consolidated_state_dict(ckpt, use_ema=has_ema)


class VideoDistillRecipe(VideoDiTRecipe):
    name = "video_distill"
    config_class = VideoDistillRunConfig

    def validate(self, cfg: VideoDistillRunConfig, world: int) -> None:
        d = cfg.distill
        if not d.teacher:
            raise ConfigError("distill.teacher is empty: give the run dir of a trained video_dit model")
        if not 1 <= d.student_steps <= 4:
            raise ConfigError(f"distill.student_steps={d.student_steps} must be 1 to 4")
        if d.teacher_steps < d.student_steps:
            raise ConfigError(f"distill.teacher_steps={d.teacher_steps} must be >= distill.student_steps="
                              f"{d.student_steps} (at least one teacher step per student step)")
        # A saved student config already holds the teacher's sections: sampling needs no teacher on disk.
        if Path(d.teacher).exists():
            adopt_teacher(cfg, teacher_config(d.teacher))
        if not cfg.train.init_from:
            cfg.train.init_from = d.teacher  # the student starts as the teacher
        if cfg.sample.steps == 0:
            cfg.sample.steps = d.student_steps
        super().validate(cfg, world)
        if cfg.diffusion.objective != "flow" or cfg.sample.sampler != "euler":
            raise ConfigError(f"video_distill distils a flow teacher into Euler steps: needs diffusion.objective="
                              f"flow and sample.sampler=euler (got {cfg.diffusion.objective}, {cfg.sample.sampler})")

    def build_data(self, cfg: VideoDistillRunConfig, split: str, rank: int, world: int, batch_multiple: int = 1):
        if split == "train":  # the trainer asks for data first: a missing teacher fails before any model is built
            teacher_checkpoint(cfg.distill.teacher)
        return super().build_data(cfg, split, rank, world, batch_multiple)

    def initial_weights(self, cfg: VideoDistillRunConfig, path: str) -> dict[str, Tensor]:
        """train.init_from = the teacher (the default) or another video_dit run: its EMA weights; a video_distill
        run or export: as any recipe's."""
        p = Path(path)
        if (p / "meta.json").is_file() or (p / "checkpoints").is_dir():
            if checkpoint.read_meta(checkpoint.resolve(path, "")).get("recipe") == "video_dit":
                teacher_config(path)
                return teacher_weights(path)
        return super().initial_weights(cfg, path)

    def teacher(self, cfg: VideoDistillRunConfig, helpers: dict) -> TextToVideo:
        """The frozen teacher, loaded at first use and then held in the trainer's helpers (sampling and export
        of a student never load it). Frozen like every helper: eval, no grads, the run's compute dtype."""
        if "teacher" not in helpers:
            model = TextToVideo(cfg)
            model.load_state_dict(teacher_weights(cfg.distill.teacher))
            device = next(helpers["vae"].parameters()).device
            helpers["teacher"] = model.requires_grad_(False).eval().to(device=device, dtype=compute_dtype(cfg))
        return helpers["teacher"]

    def loss(self, cfg: VideoDistillRunConfig, model, helpers, batch, gen):
        teacher = self.teacher(cfg, helpers)
        x0 = self.latents(cfg, helpers, batch)
        b, d = x0.shape[0], cfg.distill
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device)
        segment = torch.randint(0, d.student_steps, (b,), generator=gen, device=gen.device).cpu()
        shift, steps = self.flow_shift(cfg, x0.shape), cfg.diffusion.num_train_timesteps
        student_grid, teacher_grid = student_sigmas(d.student_steps, shift, steps), student_sigmas(d.teacher_steps,
                                                                                                      shift, steps)
        t_from = student_grid[segment].to(x0.device)
        x = flow.interpolate(x0, noise, t_from)
        target = self.teacher_targets(cfg, teacher, helpers, batch, x, segment, student_grid, teacher_grid)
        text, mask = self.caption_states(model, helpers, batch)  # the student's own encoder (it trains)
        pred = model(x, t_from, text, mask, None)
        return F.mse_loss(pred.float(), target), {"segment": segment.float().mean()}

    @torch.no_grad()
    def teacher_targets(self, cfg, teacher, helpers, batch, x, segment, student_grid, teacher_grid) -> Tensor:
        """The student's velocity targets (B, ...): per segment, the teacher's guided Euler solution over it."""
        text, mask = (batch["text"], batch["text_mask"]) if "text" in batch else encode_text(teacher, helpers,
                                                                                             batch["caption"])
        guidance = Guidance(cfg.distill.cfg_scale, self.null_condition(teacher, helpers, text.shape[1], batch))
        target = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for k in segment.unique().tolist():
            rows = (segment == k).nonzero().flatten().to(x.device)
            grid = segment_grid(student_grid, teacher_grid, k)
            end = teacher_solution(teacher, x[rows], grid, {"text": text[rows], "text_mask": mask[rows]}, guidance)
            target[rows] = segment_velocity(x[rows], end, float(grid[0]), float(grid[-1]))
        return target


def adopt_teacher(cfg: VideoDistillRunConfig, teacher: dict) -> None:
    """Take model, text, vae and diffusion from the teacher's config (the student is its architecture, and its
    latents and times mean what the teacher's do); rank 0 names every key that this replaces."""
    replaced = []
    for section, cls in ADOPTED.items():
        ours, theirs = getattr(cfg, section), from_dict(cls, teacher.get(section) or {}, prefix=f"{section}.")
        replaced += [f"{section}.{k}" for k, v in vars(ours).items() if vars(theirs).get(k) != v]
        setattr(cfg, section, theirs)
    if replaced and os.environ.get("RANK", "0") == "0":
        print(f"video_distill: from the teacher {cfg.distill.teacher}: {', '.join(replaced)}", flush=True)
