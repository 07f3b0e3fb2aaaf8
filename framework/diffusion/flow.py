"""Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022) with SD3 and Open-Sora conventions.

t in [0, 1]: t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t noise, and the model predicts the velocity
dx_t/dt = noise - x0. Model convention: ``model_fn(x_t, t, **cond) -> v`` with x_t (B, ...) and t a float32
tensor (B,) in [0, 1] (diffusers pipelines pass 1000 t to their transformers; scale inside the model if
needed). Samplers integrate the ODE from t = 1 to t = 0 over a decreasing grid of sigmas (= t values).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from framework.diffusion.guidance import Guidance, guided

ModelFn = Callable[..., Tensor]  # model_fn(x (B, ...), t (B,) float32 in [0, 1], **cond) -> v (B, ...)


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """t (B,) -> (B, 1, ..., 1) in x's dtype and device."""
    return t.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise: x0, noise (B, ...), t (B,) -> (B, ...)."""
    tt = _per_sample(t, x0)
    return (1.0 - tt) * x0 + tt * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching target dx_t/dt = noise - x0: (B, ...)."""
    return noise - x0


def logit_normal_t(batch: int, gen: torch.Generator, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """SD3's training times t = sigmoid(mean + std * n), n ~ N(0, 1): (B,) float32 in (0, 1) on gen's device."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=gen, device=gen.device))


def shift_t(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3 time shift shift * t / (1 + (shift - 1) t): fixes 0 and 1, moves mass towards noise for shift > 1."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(
    num_tokens: int,
    base_tokens: int = 256,
    base_shift: float = 1.0,
    max_tokens: int = 4096,
    max_shift: float = 3.0,
) -> float:
    """Shift for a sequence of num_tokens: log(shift) is linear in num_tokens (Flux's calculate_shift, mu = log shift).

    Equals base_shift at base_tokens and max_shift at max_tokens, and extrapolates linearly in log space beyond
    them as Flux does; bigger inputs keep more signal at a given t, so they need more time near noise.
    """
    if max_tokens <= base_tokens or base_shift <= 0 or max_shift <= 0:
        raise ValueError(
            f"need max_tokens > base_tokens and positive shifts, got tokens {base_tokens}..{max_tokens}, "
            f"shifts {base_shift}..{max_shift}"
        )
    slope = (math.log(max_shift) - math.log(base_shift)) / (max_tokens - base_tokens)
    return math.exp(math.log(base_shift) + slope * (num_tokens - base_tokens))


def uniform_t(batch: int, gen: torch.Generator) -> Tensor:
    """t ~ U[0, 1): (B,) float32 on gen's device (DiffSynth's Wan training draws its timestep index uniformly)."""
    return torch.rand(batch, generator=gen, device=gen.device)


def train_sigmas(num_train_steps: int, shift: float) -> Tensor:
    """The training grid (T,) float32 of diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift):
    shift_t(i / T) for i = T .. 1, descending from 1; bit for bit its `.sigmas` before set_timesteps."""
    if num_train_steps < 1:
        raise ValueError(f"num_train_steps must be >= 1, got {num_train_steps}")
    # diffusers' float32 arithmetic, in its order: the grid is float32 before it is divided and shifted.
    steps = torch.from_numpy(np.linspace(1, num_train_steps, num_train_steps, dtype=np.float32)[::-1].copy())
    return shift_t(steps / num_train_steps, shift)


def discrete_t(u: Tensor, sigmas: Tensor) -> Tensor:
    """Training times on a scheduler's grid, as diffusers' flow training scripts pick them: index floor(u * T)
    into the descending sigmas (T,), u (B,) in [0, 1) -> t (B,) float32 on u's device (u = 0 is pure noise)."""
    idx = (u * len(sigmas)).long().clamp_(0, len(sigmas) - 1)
    return sigmas.to(u.device)[idx]


def flow_loss(
    model_fn: ModelFn, x0: Tensor, noise: Tensor, t: Tensor, cond: Mapping[str, Tensor] | None = None
) -> Tensor:
    """MSE between model_fn(x_t, t, **cond) and noise - x0: x0, noise (B, ...), t (B,) -> ()."""
    x_t = interpolate(x0, noise, t)
    v = model_fn(x_t, t.to(device=x0.device, dtype=torch.float32), **(cond or {}))
    # Reduced in float32 whatever the compute dtype, so bf16 runs average the same way.
    return F.mse_loss(v.float(), velocity_target(x0, noise).float())


def flow_sigmas(steps: int, shift: float = 1.0, num_train_steps: int | None = None) -> Tensor:
    """Decreasing sampling times (steps + 1,) float32 from 1 to 0, time-shifted by shift.

    num_train_steps None: shift_t(linspace(1, 0, steps + 1)), the continuous-time grid.
    num_train_steps T: diffusers FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift).set_timesteps(steps)
    exactly: linspace(1, m, steps) with m = shift_t(1 / T) (its training grid's smallest sigma, already shifted),
    shifted again, then a final 0 appended. So its last nonzero sigma is shift_t(shift_t(1 / T)), not 1 / steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if num_train_steps is None:
        return torch.from_numpy(shift_t(np.linspace(1.0, 0.0, steps + 1), shift)).float()
    # Mirror diffusers' arithmetic: its training sigmas are float32 (so the shifted max can miss 1 by an ulp)
    # and it reads both ends back as Python floats before a float64 linspace.
    ends = np.array([num_train_steps, 1], dtype=np.float32) / np.float32(num_train_steps)
    sigma_max, sigma_min = (float(e) for e in shift_t(ends, shift))
    grid = np.linspace(sigma_max * num_train_steps, sigma_min * num_train_steps, steps) / num_train_steps
    return torch.cat([torch.from_numpy(shift_t(grid, shift)).float(), torch.zeros(1)])


def euler_step(v: Tensor, x: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """x + (sigma_next - sigma) v, at least in float32 like FlowMatchEulerDiscreteScheduler.step: (B, ...)."""
    # bf16 states drift over many small steps, so the update is accumulated in float32 (float64 stays).
    dtype = torch.promote_types(x.dtype, torch.float32)
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return (x.to(dtype) + dt.to(device=x.device, dtype=dtype) * v.to(dtype)).to(x.dtype)


def _velocity(model_fn: ModelFn, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor] | None) -> Tensor:
    """model_fn at time sigma, passed as a float32 (B,) tensor."""
    return model_fn(x, sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0]), **(cond or {}))


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    noise: Tensor,
    sigmas: Tensor,
    cond: Mapping[str, Tensor] | None = None,
    guidance: Guidance | None = None,
) -> Tensor:
    """Euler ODE integration from noise (B, ...) at sigmas[0] down the grid sigmas (N + 1,): x at sigmas[-1]."""
    fn = guided(model_fn, guidance.scale, guidance.null_cond) if guidance is not None else model_fn
    x = noise
    for i in range(len(sigmas) - 1):
        x = euler_step(_velocity(fn, x, sigmas[i], cond), x, sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def heun_sample(
    model_fn: ModelFn,
    noise: Tensor,
    sigmas: Tensor,
    cond: Mapping[str, Tensor] | None = None,
    guidance: Guidance | None = None,
) -> Tensor:
    """Heun (2nd order) ODE integration over sigmas (N + 1,); the step to sigma 0 is Euler (k-diffusion's rule)."""
    fn = guided(model_fn, guidance.scale, guidance.null_cond) if guidance is not None else model_fn
    x = noise
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = _velocity(fn, x, s, cond)
        x_euler = euler_step(v, x, s, s_next)
        if float(s_next) == 0.0:
            # EDM's rule (Karras et al. 2022, Alg. 1): no correction on the step into t = 0, one evaluation saved.
            x = x_euler
            continue
        v_next = _velocity(fn, x_euler, s_next, cond)
        x = euler_step((v + v_next) / 2, x, s, s_next)
    return x
