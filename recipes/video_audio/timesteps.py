"""Per-modality diffusion times for joint training: shared by default, sometimes independent, sometimes one
modality kept clean, so one model learns joint generation, video-to-audio and audio-to-video.

Per row (in this order of precedence):
- with probability clean_video the video is kept clean (t_video = 0, no video loss): video-to-audio;
- else with probability clean_audio the audio is kept clean: audio-to-video;
- otherwise both are noised, at the same t, or with probability independent at independently drawn times
  (so at sampling time either modality may be ahead of the other, e.g. under different step schedules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class JointTimes(NamedTuple):
    t_video: Tensor  # (B,) in [0, 1]; 0 = clean
    t_audio: Tensor  # (B,)
    video_loss: Tensor  # (B,) float: 1 where the video is noised (and so trained), 0 where it is given clean
    audio_loss: Tensor  # (B,) float


def joint_times(batch: int, gen: torch.Generator, draw_t: Callable[[int, torch.Generator], Tensor],
                independent: float = 0.0, clean_video: float = 0.0, clean_audio: float = 0.0) -> JointTimes:
    """Times for a batch; draw_t(n, gen) -> (n,) times in (0, 1) is the flow's time distribution.

    The generator advances the same way whatever the probabilities, so changing one does not reshuffle the
    rest of the run's randomness.
    """
    for name, p in (("independent", independent), ("clean_video", clean_video), ("clean_audio", clean_audio)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"joint.{name} must be a probability in [0, 1], got {p}")
    if clean_video + clean_audio > 1.0:
        raise ValueError(f"joint.clean_video + joint.clean_audio must be <= 1, got {clean_video + clean_audio}")
    shared, other = draw_t(batch, gen), draw_t(batch, gen)
    u_clean = torch.rand(batch, generator=gen, device=gen.device)
    u_indep = torch.rand(batch, generator=gen, device=gen.device)
    video_clean = u_clean < clean_video
    audio_clean = ~video_clean & (u_clean < clean_video + clean_audio)
    t_video = torch.where(video_clean, torch.zeros_like(shared), shared)
    t_audio = torch.where(u_indep < independent, other, shared)
    t_audio = torch.where(audio_clean, torch.zeros_like(t_audio), t_audio)
    return JointTimes(t_video, t_audio, (~video_clean).float(), (~audio_clean).float())
