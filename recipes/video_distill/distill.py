"""Pure functions of guidance-baked few-step distillation on the rectified-flow ODE (see recipe.py for the method).

t in [0, 1] as in framework/diffusion/flow.py: t = 1 is noise, t = 0 data. The student's grid has N + 1 times;
segment k runs from grid[k] down to grid[k + 1]. The teacher integrates its classifier-free-guided ODE over a
segment with Euler steps at its own sampling grid's times that fall inside it, so the N segments together are
exactly the teacher's `teacher_steps`-step sampler whenever the student's grid is a subset of the teacher's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from framework.diffusion import flow
from framework.diffusion.guidance import Guidance

# Teacher times this close to a segment end count as that end (the two grids are computed separately in float32).
_SAME_TIME = 1e-6


def segment_grid(student: Tensor, teacher: Tensor, k: int) -> Tensor:
    """Decreasing times of segment k: student[k], the teacher's times strictly inside it, student[k + 1]."""
    a, b = float(student[k]), float(student[k + 1])
    inner = teacher[(teacher < a - _SAME_TIME) & (teacher > b + _SAME_TIME)]
    return torch.cat([torch.tensor([a]), inner.float(), torch.tensor([b])])


@torch.no_grad()
def teacher_solution(teacher_fn, x: Tensor, grid: Tensor, cond: Mapping[str, Tensor],
                     guidance: Guidance) -> Tensor:
    """Where the teacher's guided ODE takes x (B, ...) from grid[0] to grid[-1]: Euler over `grid`, each step
    uncond + s (cond - uncond) with s = guidance.scale (so the target carries the guidance)."""
    return flow.euler_sample(teacher_fn, x, grid, cond=cond, guidance=guidance)


def segment_velocity(x: Tensor, x_end: Tensor, t_from: float, t_to: float) -> Tensor:
    """The velocity v whose single Euler step x + (t_to - t_from) v lands on x_end: the student's target."""
    return (x_end.float() - x.float()) / (t_to - t_from)


def student_sigmas(steps: int, shift: float, num_train_timesteps: int = 0) -> Tensor:
    """The student's sampling grid (steps + 1,): the same rule the video DiT samples with (flow.flow_sigmas), so
    launch/sample.py with sample.steps = steps walks exactly the segments the student was trained on."""
    return flow.flow_sigmas(steps, shift, num_train_timesteps or None)
