"""Gaussian diffusion: schedules, forward process, targets and DDPM / DDIM steps checked against diffusers."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from framework.diffusion.gaussian import (
    GaussianSchedule,
    cosine_schedule,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    gaussian_loss,
    leading_timesteps,
    linear_schedule,
    predict_x0_eps,
    prediction_target,
    q_sample,
    sample_timesteps,
    scaled_linear_schedule,
)

SHAPE = (3, 2, 4, 4)
DIFFUSERS_KIND = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULES = {"linear": linear_schedule, "squaredcos_cap_v2": cosine_schedule}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


@pytest.mark.parametrize(
    "name, build, kwargs",
    [
        ("linear", linear_schedule, {}),
        ("squaredcos_cap_v2", cosine_schedule, {}),
        ("scaled_linear", scaled_linear_schedule, {"beta_start": 0.00085, "beta_end": 0.012}),
    ],
)
def test_schedules_match_diffusers(name, build, kwargs):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kwargs)
    ours = build()
    assert ours.num_steps == 1000 and ours.betas.dtype == torch.float64
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-6, atol=1e-8)
    # diffusers takes the running product in float32; ours is float64, so the tail differs by rounding only.
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=3e-5, atol=1e-7)


def test_cosine_schedule_caps_beta_and_other_lengths():
    sched = cosine_schedule(50, max_beta=0.9)
    assert sched.num_steps == 50 and sched.betas.max().item() == pytest.approx(0.9)
    ref = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(cosine_schedule(50).betas.float(), ref.betas, rtol=1e-6, atol=1e-8)


def test_q_sample_and_v_target_match_diffusers():
    ref = DDPMScheduler(beta_schedule="linear")
    x0, noise = randn(0), randn(1)
    t = torch.tensor([0, 417, 999])
    torch.testing.assert_close(q_sample(x0, t, noise, linear_schedule()), ref.add_noise(x0, noise, t))
    v = prediction_target(x0, noise, t, linear_schedule(), "v")
    torch.testing.assert_close(v, ref.get_velocity(x0, noise, t))
    assert prediction_target(x0, noise, t, linear_schedule(), "eps") is noise
    assert prediction_target(x0, noise, t, linear_schedule(), "x0") is x0


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_predict_x0_eps_inverts_every_target(kind):
    sched = cosine_schedule()
    x0, noise = randn(0).double(), randn(1).double()
    t = torch.tensor([1, 500, 990])
    x_t = q_sample(x0, t, noise, sched)
    x0_hat, eps_hat = predict_x0_eps(prediction_target(x0, noise, t, sched, kind), x_t, t, sched, kind)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-9, atol=1e-9)


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match="eps.*v.*x0.*'score'"):
        prediction_target(randn(0), randn(1), torch.tensor([1, 2, 3]), linear_schedule(), "score")


def test_sample_timesteps_uniform_and_deterministic():
    t = sample_timesteps(20000, gen(3), 1000)
    assert t.dtype == torch.int64 and t.shape == (20000,)
    assert t.min().item() == 0 and t.max().item() == 999
    assert abs(t.float().mean().item() - 499.5) < 10
    assert torch.equal(t, sample_timesteps(20000, gen(3), 1000))


def test_gaussian_loss_zero_for_perfect_model_and_passes_float_t():
    sched, x0, noise = linear_schedule(), randn(0), randn(1)
    t = torch.tensor([3, 300, 900])
    seen = {}

    def perfect(x, tt, *, label):
        seen.update(t=tt, label=label)
        return prediction_target(x0, noise, tt.long(), sched, "v")

    loss = gaussian_loss(perfect, x0, t, noise, sched, "v", cond={"label": torch.ones(3)})
    assert loss.item() == 0.0
    assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], t.float())
    zero = gaussian_loss(lambda x, tt: torch.zeros_like(x), x0, t, noise, sched, "eps")
    assert zero.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def in_float64(ref, sched: GaussianSchedule):
    """A diffusers scheduler computing in float64 on our schedule, so formulas compare to ~1e-12."""
    # Stock diffusers keeps alphas_cumprod in float32, where 1 - abar_t / abar_prev (the step's beta) loses
    # about 3 digits at small t; see test_ddpm_step_float32_close_to_stock_diffusers.
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    return ref


def ddpm_ref(sched_name: str, kind: str, variance: str) -> DDPMScheduler:
    variance_type = {"beta": "fixed_large", "posterior": "fixed_small"}[variance]
    return DDPMScheduler(beta_schedule=sched_name, prediction_type=DIFFUSERS_KIND[kind], variance_type=variance_type,
                         clip_sample=False)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_step_matches_diffusers(kind, variance):
    sched = linear_schedule()
    ref = in_float64(ddpm_ref("linear", kind, variance), sched)
    for t in (999, 640, 1, 0):
        x, out = randn(t).double(), randn(t + 1).double()
        expected = ref.step(out, t, x, generator=gen(7)).prev_sample
        # Explicit noise drawn like diffusers' randn_tensor (shape, generator, dtype): the same numbers.
        explicit = ddpm_step(out, x, t, sched, kind, variance=variance, noise=randn(7, x.shape, x.dtype))
        drawn = ddpm_step(out, x, t, sched, kind, gen(7), variance)
        torch.testing.assert_close(explicit, expected, rtol=1e-10, atol=1e-10)
        assert torch.equal(drawn, explicit)


@pytest.mark.parametrize("kind", ["eps", "x0"])
def test_ddpm_step_float32_close_to_stock_diffusers(kind):
    sched, ref = linear_schedule(), ddpm_ref("linear", kind, "posterior")
    for t, tol in ((999, 1e-6), (640, 1e-6), (1, 5e-4), (0, 1e-5)):
        x, out = randn(t), randn(t + 1)
        ours = ddpm_step(out, x, t, sched, kind, gen(7), "posterior")
        torch.testing.assert_close(ours, ref.step(out, t, x, generator=gen(7)).prev_sample, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["eps", "x0"])
def test_ddpm_strided_steps_match_diffusers(kind):
    sched = cosine_schedule()
    ref = in_float64(ddpm_ref("squaredcos_cap_v2", kind, "beta"), sched)
    ref.set_timesteps(20)
    ts = [int(t) for t in ref.timesteps]
    assert ts == leading_timesteps(1000, 20)
    for i, t in enumerate(ts):
        x, out = randn(t).double(), randn(t + 1).double()
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ours = ddpm_step(out, x, t, sched, kind, variance="beta", t_prev=t_prev, noise=randn(5, x.shape, x.dtype))
        expected = ref.step(out, t, x, generator=gen(5)).prev_sample
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", [7, 10, 50])
def test_ddim_step_matches_diffusers(name, kind, eta, steps):
    sched = SCHEDULES[name]()
    ref = in_float64(DDIMScheduler(beta_schedule=name, prediction_type=DIFFUSERS_KIND[kind], clip_sample=False), sched)
    ref.set_timesteps(steps)
    ts = [int(t) for t in ref.timesteps]
    assert ts == leading_timesteps(1000, steps)
    for i, t in enumerate(ts):
        x, out, noise = randn(t).double(), randn(t + 1).double(), randn(t + 2).double()
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
        ours = ddim_step(out, x, t, t_prev, sched, kind, eta=eta, noise=noise)
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_ddim_step_draws_noise_like_diffusers():
    ref = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    ref.set_timesteps(10)
    x, out = randn(0), randn(1)
    expected = ref.step(out, 500, x, eta=1.0, generator=gen(9)).prev_sample
    ours = ddim_step(out, x, 500, 400, linear_schedule(), "eps", eta=1.0, gen=gen(9))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def oracle(sched: GaussianSchedule, kind: str, mu: float, std: float):
    """The exact posterior-mean model for data ~ N(mu, std^2) (std 0: the point mass mu)."""

    def model_fn(x, t):
        assert bool((t == t[0]).all()), "samplers give every sample the same timestep"
        a = float(sched.alphas_cumprod[int(t[0])])  # Python floats keep the 1000-step loops cheap
        var = a * std**2 + 1 - a
        eps = (1 - a) ** 0.5 / var * (x - a**0.5 * mu)
        x0 = mu + a**0.5 * std**2 / var * (x - a**0.5 * mu)
        return {"eps": eps, "x0": x0, "v": a**0.5 * eps - (1 - a) ** 0.5 * x0}[kind]

    return model_fn


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_samplers_recover_a_point_mass(kind):
    sched, c = cosine_schedule(), 0.7
    x = ddim_sample(oracle(sched, kind, c, 0.0), (2, 3, 4), sched, kind, steps=10, eta=0.0, gen=gen(0))
    assert (x - c).abs().max().item() < 1e-3
    x = ddpm_sample(oracle(sched, kind, c, 0.0), (2, 3, 4), sched, kind, gen(1), steps=25)
    assert (x - c).abs().max().item() < 1e-3


@pytest.mark.parametrize("sampler", ["ddim0", "ddim1", "ddpm_beta", "ddpm_posterior"])
def test_samplers_reach_a_gaussian_data_distribution(sampler):
    # Only the early steps see the data's spread, so this checks the whole chain, not just the last step.
    # 1000 steps: at 100 DDIM's discretisation error alone is ~4% of the std.
    sched, mu, std = linear_schedule(), 0.5, 0.3
    model_fn = oracle(sched, "eps", mu, std)
    if sampler.startswith("ddim"):
        x = ddim_sample(model_fn, (8192,), sched, "eps", steps=1000, eta=float(sampler[-1]), gen=gen(2))
    else:
        x = ddpm_sample(model_fn, (8192,), sched, "eps", gen(2), variance=sampler[5:])
    assert abs(x.mean().item() - mu) < 0.01
    assert abs(x.std().item() - std) < 0.01


def test_ddim_eta_one_is_ddpm_with_posterior_variance():
    sched = cosine_schedule()
    model_fn = oracle(sched, "v", 0.2, 0.5)
    ddim = ddim_sample(model_fn, (64,), sched, "v", steps=25, eta=1.0, gen=gen(4))
    ddpm = ddpm_sample(model_fn, (64,), sched, "v", gen(4), variance="posterior", steps=25)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-5)


def test_leading_timesteps_rejects_bad_counts():
    assert leading_timesteps(1000, 4) == [750, 500, 250, 0]
    with pytest.raises(ValueError, match="steps must be in"):
        leading_timesteps(1000, 0)


def test_noisy_steps_need_an_explicit_generator_or_noise():
    with pytest.raises(ValueError, match="pass noise= or gen="):
        ddpm_step(randn(0), randn(1), 500, linear_schedule(), "eps")
    with pytest.raises(ValueError, match="pass noise= or gen="):
        ddim_step(randn(0), randn(1), 500, 400, linear_schedule(), "eps", eta=0.3)
    # Deterministic steps draw nothing, so they need neither.
    ddpm_step(randn(0), randn(1), 0, linear_schedule(), "eps")
    ddim_step(randn(0), randn(1), 500, 400, linear_schedule(), "eps")


def test_bf16_inputs_keep_their_dtype():
    sched, t = cosine_schedule(), torch.tensor([10, 500, 990])
    x0, noise = randn(0).bfloat16(), randn(1).bfloat16()
    x_t = q_sample(x0, t, noise, sched)
    assert x_t.dtype == torch.bfloat16
    torch.testing.assert_close(x_t.float(), q_sample(x0.float(), t, noise.float(), sched), rtol=1e-2, atol=1e-2)
    x0_hat, _ = predict_x0_eps(prediction_target(x0, noise, t, sched, "v"), x_t, t, sched, "v")
    assert x0_hat.dtype == torch.bfloat16
