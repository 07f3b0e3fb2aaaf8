"""Learning-rate schedules as pure functions of the step (nothing to save or restore on resume)."""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, schedule: str,
          min_lr_ratio: float) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine decay or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"optim.schedule: unknown schedule {schedule!r} (valid: cosine, constant)")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = base_lr * min_lr_ratio
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
