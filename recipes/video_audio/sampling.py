"""Joint rectified-flow sampling of video and audio latents, with guidance per modality.

Each output modality m gets its own guidance on two conditions, the caption and the other modality:

    out_m = c_m + (text_m - 1) (c_m - no_text_m) + (cross_m - 1) (c_m - no_bridge_m)

c is the conditional prediction, no_text the one with the null caption, no_bridge the one with the
cross-modal attention cut (what modality dropout trains). With one term this is every recipe's CFG,
u + s (c - u): a scale of 1 is off (its term dropped exactly), and a single scale of 0 gives exactly the
unconditional branch. A branch that no modality needs is never computed; the branches run as one forward
over the stacked batch.
A modality given clean (video-to-audio, audio-to-video) stays fixed at t = 0 and only the other one moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from framework.diffusion.flow import euler_step
from framework.diffusion.guidance import cfg_combine

# model_fn(video, audio, t_video, t_audio, text, text_mask, bridge) -> (video velocity, audio velocity)
JointModelFn = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class JointGuidance:
    text: tuple[float, float] = (1.0, 1.0)  # (video, audio) scale on the caption
    cross: tuple[float, float] = (1.0, 1.0)  # (video, audio) scale on the other modality


def guided_velocity(model_fn: JointModelFn, v: Tensor, a: Tensor, tv: Tensor, ta: Tensor, text: Tensor,
                    text_mask: Tensor, null_text: Tensor, null_mask: Tensor,
                    guidance: JointGuidance) -> tuple[Tensor, Tensor]:
    """Both velocities with `guidance` applied; null_text/null_mask (1, S, D)/(1, S) is the unconditional caption."""
    b = v.shape[0]
    branches = [(text, text_mask, True)]
    if any(s != 1.0 for s in guidance.text):
        branches.append((null_text.expand_as(text), null_mask.expand_as(text_mask), True))
    if any(s != 1.0 for s in guidance.cross):
        branches.append((text, text_mask, False))
    n = len(branches)
    bridge = torch.cat([torch.full((b,), keep, dtype=torch.bool, device=v.device) for _, _, keep in branches])
    out_v, out_a = model_fn(v.repeat(n, *[1] * (v.ndim - 1)), a.repeat(n, 1, 1), tv.repeat(n), ta.repeat(n),
                            torch.cat([t for t, _, _ in branches]), torch.cat([m for _, m, _ in branches]), bridge)
    results = []
    for m, out in enumerate((out_v, out_a)):
        c, *others = out.split(b)  # in the order of `branches`: conditional, [no caption], [no bridge]
        scales = [s[m] for s in (guidance.text, guidance.cross) if any(x != 1.0 for x in s)]
        results.append(combine_terms(c, list(zip(scales, others))))
    return results[0], results[1]


def combine_terms(c: Tensor, terms: list[tuple[float, Tensor]]) -> Tensor:
    """c + sum of (s - 1)(c - u) over terms (scale, unconditional output). A scale of 1 drops its term; a
    single term is `cfg_combine`, so exactly c at s = 1 and exactly u at s = 0 (the sum would round both)."""
    terms = [(s, u) for s, u in terms if s != 1.0]
    if len(terms) == 1:
        return cfg_combine(c, terms[0][1], terms[0][0])
    out = c
    for s, u in terms:
        out = out + (s - 1.0) * (c - u)
    return out


@torch.no_grad()
def joint_euler(model_fn: JointModelFn, video: Tensor, audio: Tensor, sigmas: Tensor, text: Tensor,
                text_mask: Tensor, null_text: Tensor, null_mask: Tensor, guidance: JointGuidance = JointGuidance(),
                clean: str = "", progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """Euler integration down sigmas (N + 1,) from noise (or a clean given modality) -> (video, audio) at t = 0.

    video (B, C, T, H, W) and audio (B, C, T) start as noise; clean="video" (or "audio") means that tensor is
    the given clean latent: it keeps t = 0 and is never updated, so the model generates only the other one.
    """
    if clean not in ("", "video", "audio"):
        raise ValueError(f"clean must be '', 'video' or 'audio', got {clean!r}")
    b = video.shape[0]
    zero = torch.zeros(b, device=video.device)
    for i in range(len(sigmas) - 1):
        t = sigmas[i].to(video.device).expand(b)
        tv, ta = (zero if clean == "video" else t), (zero if clean == "audio" else t)
        vel_v, vel_a = guided_velocity(model_fn, video, audio, tv, ta, text, text_mask, null_text, null_mask,
                                       guidance)
        if clean != "video":
            video = euler_step(vel_v, video, sigmas[i], sigmas[i + 1])
        if clean != "audio":
            audio = euler_step(vel_a, audio, sigmas[i], sigmas[i + 1])
        if progress is not None:
            progress(i)
    return video, audio
