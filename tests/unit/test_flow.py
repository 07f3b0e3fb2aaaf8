"""Rectified flow: interpolation, loss, time sampling and shifts, and Euler / Heun checked against diffusers."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from framework.diffusion.flow import (
    discrete_t,
    euler_sample,
    euler_step,
    flow_loss,
    flow_sigmas,
    heun_sample,
    interpolate,
    logit_normal_t,
    resolution_shift,
    shift_t,
    train_sigmas,
    uniform_t,
    velocity_target,
)

SHAPE = (2, 3, 4, 4)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed))


@pytest.mark.parametrize("shift", [1.0, 1.7, 3.0, 0.5])
@pytest.mark.parametrize("steps", [1, 7, 28])
def test_flow_sigmas_equal_diffusers_scheduler(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    assert torch.equal(flow_sigmas(steps, shift, num_train_steps=1000), ref.sigmas)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 0.7])
@pytest.mark.parametrize("steps", [1000, 500, 7])
def test_train_sigmas_equal_the_schedulers_training_grid(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=steps)
    ours = train_sigmas(steps, shift)
    assert torch.equal(ours, ref.sigmas) and torch.equal(ours * steps, ref.timesteps)


def test_discrete_t_picks_the_scheduler_sigma_as_diffusers_training_scripts_do():
    # train_dreambooth_sd3 / finetrainers: indices = (u * T).long(); sigmas = scheduler.sigmas[indices]
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)
    for u in (uniform_t(4096, gen(0)), logit_normal_t(4096, gen(1))):
        assert torch.equal(discrete_t(u, train_sigmas(1000, 3.0)), ref.sigmas[(u * 1000).long()])
    ends = discrete_t(torch.tensor([0.0, 0.9999999]), train_sigmas(1000, 3.0))  # u = 0 is pure noise
    assert ends[0].item() == 1.0 and ends[1].item() == ref.sigmas[-1].item()


def test_diffusers_grid_is_shifted_twice_at_its_low_end():
    # diffusers linspaces down to its (already shifted) smallest training sigma, then shifts the grid again.
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    assert ref.sigmas[-2].item() == pytest.approx(shift_t(shift_t(1e-3, 3.0), 3.0), rel=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_continuous_flow_sigmas(shift):
    sigmas = flow_sigmas(10, shift)
    assert sigmas.shape == (11,) and sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    expected = shift_t(torch.linspace(1, 0, 11, dtype=torch.float64), shift).float()
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-7)


def test_euler_step_equals_scheduler_step_along_a_trajectory():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(12)
    x = randn(0)
    for i, t in enumerate(ref.timesteps):
        v = randn(i + 1)
        ours = euler_step(v, x, ref.sigmas[i], ref.sigmas[i + 1])
        x = ref.step(v, t, x).prev_sample
        assert torch.equal(ours, x)


def test_euler_sample_equals_the_diffusers_loop_and_passes_t_in_unit_interval():
    def model_fn(x, t):
        return torch.sin(3 * x) * t.view(-1, 1, 1, 1) - x

    ref = FlowMatchEulerDiscreteScheduler(shift=2.0)
    ref.set_timesteps(9)
    x = randn(0)
    for t in ref.timesteps:
        x = ref.step(model_fn(x, (t / 1000).expand(x.shape[0])), t, x).prev_sample
    seen = []

    def recording(x, t):
        seen.append(t)
        return model_fn(x, t)

    ours = euler_sample(recording, randn(0), flow_sigmas(9, 2.0, num_train_steps=1000))
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)
    assert len(seen) == 9 and seen[0].shape == (2,) and seen[0].dtype == torch.float32
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), ref.timesteps / 1000)


def test_interpolate_matches_scheduler_scale_noise():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    x0, noise = randn(0), randn(1)
    idx = torch.tensor([2, 7])
    expected = ref.scale_noise(x0, ref.timesteps[idx], noise)
    torch.testing.assert_close(interpolate(x0, noise, ref.sigmas[idx]), expected)


def test_flow_loss_zero_for_perfect_model():
    x0, noise, t = randn(0), randn(1), torch.tensor([0.25, 0.9])
    seen = {}

    def perfect(x, tt, *, text):
        seen.update(t=tt, text=text)
        return velocity_target(x0, noise)

    assert flow_loss(perfect, x0, noise, t, cond={"text": torch.ones(2, 5)}).item() == 0.0
    assert torch.equal(seen["t"], t) and seen["text"].shape == (2, 5)
    # A zero model pays the mean squared target, so the loss is a plain MSE over all elements.
    zero = flow_loss(lambda x, tt: torch.zeros_like(x), x0, noise, t)
    assert zero.item() == pytest.approx((noise - x0).pow(2).mean().item(), rel=1e-6)


def test_logit_normal_t():
    t = logit_normal_t(20000, gen(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    assert abs(t.median().item() - 0.5) < 0.02
    assert torch.equal(t, logit_normal_t(20000, gen(0)))
    shifted = logit_normal_t(20000, gen(0), mean=1.0, std=0.5)
    assert abs(shifted.median().item() - 1 / (1 + math.exp(-1.0))) < 0.02


def test_shift_t_fixes_ends_and_is_monotone():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0):
        s = shift_t(t, shift)
        assert s[0].item() == 0.0 and s[-1].item() == pytest.approx(1.0)
        assert bool((s[1:] > s[:-1]).all())
    assert torch.equal(shift_t(t, 1.0), t)
    assert bool((shift_t(t, 3.0)[1:-1] > t[1:-1]).all())  # shift > 1 spends more time near noise
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_t(t, 0.0)


def test_resolution_shift_grows_with_tokens_like_flux():
    assert resolution_shift(256) == pytest.approx(1.0) and resolution_shift(4096) == pytest.approx(3.0)
    shifts = [resolution_shift(n) for n in (64, 256, 1024, 4096, 16384)]
    assert all(a < b for a, b in zip(shifts, shifts[1:]))
    # Flux's calculate_shift gives mu = log(shift) with mu 0.5 at 256 tokens and 1.15 at 4096.
    for n in (256, 1000, 4096, 8192):
        ours = resolution_shift(n, 256, math.exp(0.5), 4096, math.exp(1.15))
        assert ours == pytest.approx(math.exp(calculate_shift(n)), rel=1e-12)
    with pytest.raises(ValueError, match="max_tokens > base_tokens"):
        resolution_shift(100, base_tokens=4096, max_tokens=256)


def point_mass(c: float):
    """The exact velocity model for data = c: along x_t = (1 - t) c + t n, v = n - c = (x_t - c) / t."""
    return lambda x, t: (x - c) / t.view(-1, *([1] * (x.ndim - 1)))


def gaussian_oracle(mu: float, std: float):
    """E[noise - x0 | x_t] for data ~ N(mu, std^2)."""

    def model_fn(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        var = (1 - t) ** 2 * std**2 + t**2
        centred = x - (1 - t) * mu
        return t / var * centred - (mu + (1 - t) * std**2 / var * centred)

    return model_fn


@pytest.mark.parametrize("sampler", [euler_sample, heun_sample])
def test_samplers_recover_a_point_mass(sampler):
    x = sampler(point_mass(0.7), randn(0), flow_sigmas(8, shift=3.0))
    assert (x - 0.7).abs().max().item() < 1e-3


def test_heun_is_second_order_on_gaussian_data():
    # The exact ODE maps noise n to mu + std * n; Heun's error shrinks ~4x per halving of the step, Euler's ~2x.
    mu, std = 0.5, 0.3
    noise = randn(0, (4096,)).double()
    exact = mu + std * noise

    def error(sampler, steps):
        return (sampler(gaussian_oracle(mu, std), noise, flow_sigmas(steps).double()) - exact).abs().max().item()

    assert error(heun_sample, 32) < 1e-2
    assert error(heun_sample, 16) < error(euler_sample, 16) / 5
    assert error(euler_sample, 16) / error(euler_sample, 32) == pytest.approx(2.0, rel=0.25)
    assert error(heun_sample, 16) / error(heun_sample, 32) > 3.0


def test_samplers_keep_dtype_and_shape():
    x = euler_sample(point_mass(0.0), randn(0).bfloat16(), flow_sigmas(3))
    assert x.dtype == torch.bfloat16 and x.shape == SHAPE
    assert np.isfinite(x.float().numpy()).all()
