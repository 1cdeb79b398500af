"""dcdit.diffusion checked against diffusers' DDPMScheduler / DDIMScheduler (an independent
implementation).

diffusers keeps its schedule in float32, where ``1 - abar_t / abar_{t-1}`` loses ~4 digits
for small t. The schedules themselves are compared at float32 precision; for the update
formulas the scheduler's linear schedule is rebuilt in float64 from its own config
(:func:`in_float64`) so that diffusers' formulas can be compared tightly with ours."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from dcdit.diffusion import create_diffusion  # noqa: E402

T = 1000
SHAPE = (3, 4, 5, 5)  # (B, C, H, W)


def in_float64(sched):
    """Recompute a linear-schedule diffusers scheduler's tensors in float64 (same formulas)."""
    cfg = sched.config
    sched.betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    return sched


def ddpm_scheduler(float64=True, **kw):
    sched = DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **kw
    )
    return in_float64(sched) if float64 else sched


def const_model(output):
    """A 'network' that ignores its input and returns a fixed tensor."""
    return lambda x, t, **kw: output


def seeded_noise(seed, shape=SHAPE):
    # diffusers draws step noise with torch.randn(shape, generator=g) on CPU (randn_tensor)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_ddpm_scheduler():
    d = create_diffusion("")
    ref = ddpm_scheduler(float64=False)
    assert d.betas.dtype == np.float64 and d.num_timesteps == T
    np.testing.assert_allclose(d.betas, ref.betas.double().numpy(), rtol=0, atol=5e-9)
    np.testing.assert_allclose(d.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-6, atol=0)


def test_cosine_schedule_matches_ddpm_scheduler():
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(d.betas, ref.betas.double().numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(d.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-4, atol=0)


def test_linear_schedule_scale_rule_for_other_T():
    d = create_diffusion("", diffusion_steps=500)
    assert d.betas[0] == pytest.approx(2e-4) and d.betas[-1] == pytest.approx(0.04)


# ----------------------------------------------------------------------------- variances


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_fixed_small_variance_matches(t):
    d = create_diffusion("")
    ref = ddpm_scheduler(variance_type="fixed_small")
    ref.set_timesteps(T)
    assert d.posterior_variance[t] == pytest.approx(float(ref._get_variance(t)), rel=1e-10)


@pytest.mark.parametrize("t", [1, 3, 250, 999])
def test_learned_range_interpolation_matches(t):
    d = create_diffusion("")  # learn_sigma=True -> learned range
    ref = ddpm_scheduler(variance_type="learned_range")
    ref.set_timesteps(T)
    v = torch.linspace(-1, 1, int(np.prod(SHAPE))).reshape(SHAPE)
    x = torch.randn(SHAPE)
    out = d.p_mean_variance(const_model(torch.cat([torch.zeros(SHAPE), v], 1)), x, torch.full((3,), t))
    expected = ref._get_variance(t, predicted_variance=v)  # log-variance for learned_range
    torch.testing.assert_close(out["log_variance"], expected.float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(out["variance"], expected.exp().float(), rtol=2e-5, atol=0)


# ----------------------------------------------------------------------------- DDPM step


def _ddpm_step_case(d, ref, k, var_channels, seed=0):
    """One p_sample step at respaced index k vs DDPMScheduler.step at original timestep."""
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(SHAPE, generator=g)
    eps = torch.randn(SHAPE, generator=g)
    out_tensor = eps if not var_channels else torch.cat([eps, torch.rand(SHAPE, generator=g) * 2 - 1], 1)
    t_orig = d.timestep_map[k]

    ours = d.p_sample(const_model(out_tensor), x, torch.full((SHAPE[0],), k), noise=seeded_noise(seed))
    theirs = ref.step(out_tensor, t_orig, x, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours["pred_xstart"], theirs.pred_original_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["sample"], theirs.prev_sample, rtol=1e-5, atol=2e-5)


VARIANCE_CASES = [
    # (create_diffusion kwargs, diffusers variance_type, model outputs 2C channels)
    (dict(learn_sigma=True), "learned_range", True),
    (dict(learn_sigma=False, sigma_small=True), "fixed_small", False),
    (dict(learn_sigma=False, sigma_small=False), "fixed_large", False),
]


@pytest.mark.parametrize("kwargs,variance_type,var_channels", VARIANCE_CASES)
@pytest.mark.parametrize("k", [999, 700, 1, 0])
def test_ddpm_step_full_schedule(kwargs, variance_type, var_channels, k):
    d = create_diffusion("", **kwargs)
    ref = ddpm_scheduler(variance_type=variance_type, clip_sample=True)
    ref.set_timesteps(T)
    _ddpm_step_case(d, ref, k, var_channels)


@pytest.mark.parametrize("kwargs,variance_type,var_channels", VARIANCE_CASES)
@pytest.mark.parametrize("k", [249, 130, 1, 0])
def test_ddpm_step_respaced_250(kwargs, variance_type, var_channels, k):
    d = create_diffusion("250", **kwargs)
    ref = ddpm_scheduler(variance_type=variance_type, clip_sample=True, timestep_spacing="linspace")
    ref.set_timesteps(250)
    # improved-DDPM's even spacing of 250 steps equals diffusers' "linspace" spacing
    assert ref.timesteps.tolist() == d.timestep_map[::-1]
    _ddpm_step_case(d, ref, k, var_channels)


def test_ddpm_step_unclipped_matches():
    d = create_diffusion("250")
    ref = ddpm_scheduler(variance_type="learned_range", clip_sample=False, timestep_spacing="linspace")
    ref.set_timesteps(250)
    x = torch.randn(SHAPE)
    out = torch.cat([3 * torch.randn(SHAPE), torch.zeros(SHAPE)], 1)  # large eps: clipping would matter
    k = 200
    ours = d.p_sample(const_model(out), x, torch.full((3,), k), clip_denoised=False, noise=seeded_noise(1))
    theirs = ref.step(out, d.timestep_map[k], x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours["sample"], theirs.prev_sample, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- DDIM step


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("k", [49, 25, 1, 0])
def test_ddim_step_matches_ddim_scheduler(clip, eta, k):
    d = create_diffusion("ddim50", learn_sigma=False)
    ref = in_float64(DDIMScheduler(
        num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
    ))
    ref.set_timesteps(50)
    assert ref.timesteps.tolist() == d.timestep_map[::-1]
    g = torch.Generator().manual_seed(k)
    x = torch.randn(SHAPE, generator=g)
    eps = 2 * torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    ours = d.ddim_sample(const_model(eps), x, torch.full((3,), k), clip_denoised=clip, eta=eta, noise=noise)
    # DiT re-derives eps from the clipped x0 -> diffusers' use_clipped_model_output=True
    theirs = ref.step(eps, d.timestep_map[k], x, eta=eta, use_clipped_model_output=True,
                      variance_noise=noise if eta > 0 else None)
    torch.testing.assert_close(ours["pred_xstart"], theirs.pred_original_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["sample"], theirs.prev_sample, rtol=1e-5, atol=2e-5)
