"""Gaussian diffusion (DDPM, Ho et al. 2020; DDIM, Song et al. 2021) as pure functions over a model_fn.

Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with integer t in [0, T).
Model convention: ``model_fn(x_t, t, **cond) -> out`` with x_t (B, ...), t a float32 tensor (B,) holding
the integer timestep index, and ``out`` shaped like x_t in the parameterisation ``kind``:
"eps" (noise), "v" (sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022) or "x0" (clean data).
Samplers match diffusers' DDPMScheduler / DDIMScheduler step for step (clip_sample=False); every random
draw takes an explicit torch.Generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from framework.diffusion.guidance import Guidance, guided

ModelFn = Callable[..., Tensor]  # model_fn(x (B, ...), t (B,) float32, **cond) -> (B, ...)
Kind = Literal["eps", "v", "x0"]
KINDS = ("eps", "v", "x0")


@dataclass(frozen=True, eq=False)
class GaussianSchedule:
    """Noise schedule: betas (T,) and alphas_cumprod (T,), float64 on the CPU."""

    betas: Tensor
    alphas_cumprod: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def schedule_from_betas(betas: Tensor) -> GaussianSchedule:
    """Schedule from betas (T,): alphas_cumprod is the running product of 1 - beta, in float64."""
    betas = betas.to(torch.float64).cpu()
    if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"betas must be a 1-D tensor in (0, 1), got shape {tuple(betas.shape)}")
    return GaussianSchedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> GaussianSchedule:
    """DDPM's linear betas (diffusers beta_schedule="linear")."""
    return schedule_from_betas(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))


def scaled_linear_schedule(
    num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> GaussianSchedule:
    """Latent diffusion's betas, linear in sqrt(beta) (diffusers beta_schedule="scaled_linear")."""
    root = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64)
    return schedule_from_betas(root**2)


def cosine_schedule(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> GaussianSchedule:
    """Improved DDPM's cosine schedule, abar(t) = cos((t/T + s) / (1 + s) * pi/2)^2 (diffusers squaredcos_cap_v2)."""

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    # Betas capped at max_beta: the last abar is ~0 and 1 - abar_T / abar_{T-1} would reach 1.
    betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
    return schedule_from_betas(torch.tensor(betas, dtype=torch.float64))


def _abar(schedule: GaussianSchedule, t: Tensor | int, x: Tensor) -> Tensor:
    """abar_t in float64 on x's device, shaped to broadcast against x (B, ...).

    t (B,) -> (B, 1, ..., 1); t int -> (), where t < 0 means abar = 1 (the clean end of the chain).
    """
    if isinstance(t, int):
        value = schedule.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)
        return value.to(x.device)
    # Index on t's device: moving t to the CPU instead would stall a GPU stream every call.
    values = schedule.alphas_cumprod.to(t.device)[t.long()]
    return values.to(x.device).view(-1, *([1] * (x.ndim - 1)))


def _coefs(schedule: GaussianSchedule, t: Tensor | int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) in x's dtype, computed in float64 before the cast (bf16 keeps more)."""
    a = _abar(schedule, t, x)
    return a.sqrt().to(x.dtype), (1.0 - a).sqrt().to(x.dtype)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"prediction kind must be one of {KINDS}, got {kind!r}")


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, schedule: GaussianSchedule) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: x0, noise (B, ...), t (B,) long -> (B, ...)."""
    a, b = _coefs(schedule, t, x0)
    return a * x0 + b * noise


def prediction_target(x0: Tensor, noise: Tensor, t: Tensor, schedule: GaussianSchedule, kind: Kind) -> Tensor:
    """What the model is trained to output for kind "eps", "v" or "x0": (B, ...)."""
    _check_kind(kind)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    a, b = _coefs(schedule, t, x0)
    return a * noise - b * x0


def predict_x0_eps(
    model_out: Tensor, x_t: Tensor, t: Tensor | int, schedule: GaussianSchedule, kind: Kind
) -> tuple[Tensor, Tensor]:
    """Convert any parameterisation to (x0_hat, eps_hat): model_out, x_t (B, ...), t (B,) or int."""
    _check_kind(kind)
    a, b = _coefs(schedule, t, x_t)
    if kind == "eps":
        return (x_t - b * model_out) / a, model_out
    if kind == "x0":
        return model_out, (x_t - a * model_out) / b
    return a * x_t - b * model_out, a * model_out + b * x_t


def sample_timesteps(batch: int, gen: torch.Generator, num_steps: int) -> Tensor:
    """Training timesteps uniform on {0, ..., T-1}: (B,) long on gen's device."""
    return torch.randint(0, num_steps, (batch,), generator=gen, device=gen.device)


def gaussian_loss(
    model_fn: ModelFn,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    schedule: GaussianSchedule,
    kind: Kind,
    cond: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """MSE between model_fn(x_t, t, **cond) and the kind's target: x0, noise (B, ...), t (B,) long -> ()."""
    x_t = q_sample(x0, t, noise, schedule)
    out = model_fn(x_t, t.to(device=x0.device, dtype=torch.float32), **(cond or {}))
    # The loss is reduced in float32 whatever the compute dtype, so bf16 runs average the same way.
    return F.mse_loss(out.float(), prediction_target(x0, noise, t, schedule, kind).float())


def _noise_like(x: Tensor, noise: Tensor | None, gen: torch.Generator | None) -> Tensor:
    """The given noise, or a fresh draw from gen in the same order and shape as diffusers' randn_tensor."""
    if noise is not None:
        return noise
    if gen is None:
        # The global RNG would break exact resume, so a draw must name its generator.
        raise ValueError("this step adds noise: pass noise= or gen= (a torch.Generator)")
    return torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)


def ddpm_step(
    model_out: Tensor,
    x_t: Tensor,
    t: int,
    schedule: GaussianSchedule,
    kind: Kind,
    gen: torch.Generator | None = None,
    variance: Literal["beta", "posterior"] = "beta",
    t_prev: int | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Ancestral step x_t -> x_{t_prev} (t_prev defaults to t - 1): (B, ...) -> (B, ...).

    variance "beta" is sigma^2 = beta_t (diffusers "fixed_large"), "posterior" is the posterior variance
    (1 - abar_prev) / (1 - abar_t) beta_t ("fixed_small"); with a strided t_prev, beta_t = 1 - abar_t / abar_prev.
    No noise is added on the step to t_prev < 0 (the last one), as in diffusers.
    """
    if variance not in ("beta", "posterior"):
        raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
    t_prev = t - 1 if t_prev is None else t_prev
    x0, _ = predict_x0_eps(model_out, x_t, t, schedule, kind)
    a_t = _abar(schedule, t, x_t)
    a_prev = _abar(schedule, t_prev, x_t)
    beta = 1.0 - a_t / a_prev
    # Posterior mean of q(x_prev | x_t, x0), Ho et al. eq. (7).
    c_x0 = (a_prev.sqrt() * beta / (1.0 - a_t)).to(x_t.dtype)
    c_xt = ((1.0 - beta).sqrt() * (1.0 - a_prev) / (1.0 - a_t)).to(x_t.dtype)
    mean = c_x0 * x0 + c_xt * x_t
    if t_prev < 0:
        return mean
    var = beta if variance == "beta" else (1.0 - a_prev) / (1.0 - a_t) * beta
    return mean + var.sqrt().to(x_t.dtype) * _noise_like(x_t, noise, gen)


def ddim_step(
    model_out: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    schedule: GaussianSchedule,
    kind: Kind,
    eta: float = 0.0,
    noise: Tensor | None = None,
    gen: torch.Generator | None = None,
) -> Tensor:
    """DDIM step x_t -> x_{t_prev} (t_prev < 0 means abar = 1, diffusers' set_alpha_to_one): (B, ...).

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)); eta = 0 is the ODE, eta = 1
    the ancestral DDPM step. Noise is drawn whenever eta > 0, even on the last step, as diffusers does.
    """
    x0, eps = predict_x0_eps(model_out, x_t, t, schedule, kind)
    a_t = _abar(schedule, t, x_t)
    a_prev = _abar(schedule, t_prev, x_t)
    sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()
    direction = (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt().to(x_t.dtype)
    x_prev = a_prev.sqrt().to(x_t.dtype) * x0 + direction * eps
    if eta > 0:
        x_prev = x_prev + sigma.to(x_t.dtype) * _noise_like(x_t, noise, gen)
    return x_prev


def leading_timesteps(num_steps: int, steps: int) -> list[int]:
    """diffusers' "leading" spacing (steps_offset 0): [k * (T // steps) for k = steps-1 .. 0], descending."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be in [1, {num_steps}], got {steps}")
    ratio = num_steps // steps
    return [k * ratio for k in reversed(range(steps))]


def _start(shape: tuple[int, ...], gen: torch.Generator, device: torch.device | str | None) -> Tensor:
    """Initial noise x_T (shape) drawn on gen's device, then moved to device."""
    return torch.randn(shape, generator=gen, device=gen.device).to(device or gen.device)


def _call(model_fn: ModelFn, x: Tensor, t: int, cond: Mapping[str, Tensor] | None) -> Tensor:
    """model_fn at the integer timestep t, passed as a float32 (B,) tensor."""
    return model_fn(x, torch.full((x.shape[0],), float(t), device=x.device), **(cond or {}))


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    schedule: GaussianSchedule,
    kind: Kind,
    gen: torch.Generator,
    cond: Mapping[str, Tensor] | None = None,
    variance: Literal["beta", "posterior"] = "beta",
    guidance: Guidance | None = None,
    steps: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Ancestral sampling from x_T ~ N(0, I) over all T steps (or `steps` with leading spacing): (shape)."""
    fn = guided(model_fn, guidance.scale, guidance.null_cond) if guidance is not None else model_fn
    ts = list(range(schedule.num_steps - 1, -1, -1)) if steps is None else leading_timesteps(schedule.num_steps, steps)
    x = _start(shape, gen, device)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = ddpm_step(_call(fn, x, t, cond), x, t, schedule, kind, gen, variance, t_prev)
    return x


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    schedule: GaussianSchedule,
    kind: Kind,
    steps: int,
    eta: float,
    gen: torch.Generator,
    cond: Mapping[str, Tensor] | None = None,
    guidance: Guidance | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """DDIM sampling over `steps` timesteps with diffusers' "leading" spacing (last step to abar = 1): (shape)."""
    fn = guided(model_fn, guidance.scale, guidance.null_cond) if guidance is not None else model_fn
    ts = leading_timesteps(schedule.num_steps, steps)
    x = _start(shape, gen, device)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = ddim_step(_call(fn, x, t, cond), x, t, t_prev, schedule, kind, eta, gen=gen)
    return x
