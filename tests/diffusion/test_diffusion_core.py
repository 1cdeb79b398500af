"""dcdit.diffusion checked against closed forms and torch.distributions."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dcdit.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
    unpack_model_output,
)

T = 1000
LN2 = math.log(2.0)
# Independent float64 reference schedule (DDPM linear, Ho et al. 2020).
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)


def bayes_posterior(x0, xt, t):
    """q(x_{t-1} | x_t, x_0) from the product of two Gaussians in x_{t-1}:
    N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) * N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
    abar_prev = ABAR[t - 1] if t > 0 else 1.0
    alpha, beta = 1.0 - BETAS[t], BETAS[t]
    if t == 0:
        return x0.clone(), 0.0
    prec = 1.0 / (1.0 - abar_prev) + alpha / beta
    var = 1.0 / prec
    mean = var * (math.sqrt(abar_prev) / (1.0 - abar_prev) * x0 + math.sqrt(alpha) / beta * xt)
    return mean, var


def point_mass_eps_model(x0, abar=ABAR, var_channels=True):
    """Exact eps-predictor for the data distribution delta(x0), indexed by ORIGINAL t."""

    def model(x, t, **kw):
        a = torch.as_tensor(abar, dtype=x.dtype)[t].view(-1, *([1] * (x.ndim - 1)))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if var_channels else eps

    return model


# ----------------------------------------------------------------------------- helpers


def test_unpack_model_output():
    x = torch.ones(2)
    assert unpack_model_output(x) == (x, None)
    p, aux = unpack_model_output((x, {"a": 1}))
    assert p is x and aux == {"a": 1}
    p, aux = unpack_model_output((x,))
    assert p is x and aux is None


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    # scalar arguments (standard-normal prior)
    ref0 = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), ref0)


def _brute_force_discretized_logp(x, mean, std):
    """log P(bin of x) with bins [x - 1/255, x + 1/255]; the bins of -1 / +1 are open-ended."""
    n = Normal(mean, std)
    upper = torch.where(x > 0.999, torch.ones_like(x), n.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), n.cdf(x - 1 / 255))
    return torch.log(upper - lower)


def test_discretized_gaussian_log_likelihood_brute_force():
    g = torch.Generator().manual_seed(1)
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # uint8 grid in [-1, 1]
    x = levels[torch.randint(0, 256, (6, 200), generator=g)]
    x[:, 0], x[:, 1] = -1.0, 1.0  # edges
    mean = (x + 0.03 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1.05, 1.05)
    std = 0.01 + 0.05 * torch.rand(x.shape, generator=g, dtype=torch.float64)
    ref = _brute_force_discretized_logp(x, mean, std)
    keep = ref > math.log(1e-6)  # the 1e-12 clamp only matters for vanishing bins

    exact = discretized_gaussian_log_likelihood(x, means=mean, log_scales=std.log(), exact_cdf=True)
    torch.testing.assert_close(exact[keep], ref[keep], rtol=1e-9, atol=1e-9)
    # default: DDPM/DiT tanh approximation of Phi -- close where the bin has real mass
    approx = discretized_gaussian_log_likelihood(x, means=mean, log_scales=std.log())
    big = ref > math.log(0.05)
    assert big.sum() > 100
    assert (approx[big] - ref[big]).abs().max() < 0.02
    # probabilities over all 256 levels sum to one
    mu, s = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    p = discretized_gaussian_log_likelihood(
        levels, means=mu.expand(256), log_scales=s.log().expand(256), exact_cdf=True
    ).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("t", [1, 7, 300, 999])
def test_posterior_matches_bayes_rule(t):
    d = create_diffusion("")
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.full((2,), t))
    ref_mean, ref_var = bayes_posterior(x0, xt, t)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-9, atol=1e-9)
    assert var.shape == x0.shape and torch.allclose(var, torch.full_like(var, ref_var), rtol=1e-9)
    torch.testing.assert_close(log_var, var.log())


def test_posterior_log_variance_clipped_at_t0():
    d = create_diffusion("")
    assert d.posterior_variance[0] == 0.0
    _, ref_var1 = bayes_posterior(torch.zeros(1), torch.zeros(1), 1)
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(ref_var1), rel=1e-10)


def test_q_sample_statistics():
    d = create_diffusion("")
    x0 = torch.tensor([0.7, -0.4, 0.0], dtype=torch.float64)
    n = 200_000
    for t in (0, 250, 999):
        xs = d.q_sample(x0.expand(n, 3).contiguous(), torch.full((n,), t))
        a = ABAR[t]
        torch.testing.assert_close(xs.mean(0), math.sqrt(a) * x0, rtol=0, atol=5 * math.sqrt((1 - a) / n))
        torch.testing.assert_close(xs.var(0), torch.full((3,), 1 - a, dtype=torch.float64), rtol=0.02, atol=1e-7)
    mean, var, log_var = d.q_mean_variance(x0[None], torch.tensor([250]))
    torch.testing.assert_close(mean, math.sqrt(ABAR[250]) * x0[None])
    assert var[0, 0].item() == pytest.approx(1 - ABAR[250]) and log_var[0, 0].item() == pytest.approx(math.log(1 - ABAR[250]))


# ----------------------------------------------------------------------------- VLB / losses


def _ho_mean_from_eps(xt, eps, t):
    """Ho et al. (2020) Eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)."""
    return (xt - BETAS[t] / math.sqrt(1 - ABAR[t]) * eps) / math.sqrt(1 - BETAS[t])


@pytest.mark.parametrize("t", [1, 40, 999])
def test_vb_term_is_kl_in_bits_per_dim(t):
    d = create_diffusion("")
    g = torch.Generator().manual_seed(t)
    shape = (2, 3, 4, 4)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1 + (xt - math.sqrt(ABAR[t]) * x0) / math.sqrt(1 - ABAR[t])
    v = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    model = lambda x, tt, **kw: torch.cat([eps, v], 1)  # noqa: E731
    out = d._vb_terms_bpd(model, x0, xt, torch.full((2,), t), clip_denoised=False)["output"]

    q_mean, q_var = bayes_posterior(x0, xt, t)
    frac = (v + 1) / 2
    p_logvar = frac * math.log(BETAS[t]) + (1 - frac) * math.log(q_var)
    p = Normal(_ho_mean_from_eps(xt, eps, t), (0.5 * p_logvar).exp())
    q = Normal(q_mean, math.sqrt(q_var))
    ref = kl_divergence(q, p).mean(dim=(1, 2, 3)) / LN2
    assert out.shape == (2,)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)


def test_vb_term_at_t0_is_decoder_nll():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 4, 4)
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    x0 = levels[torch.randint(0, 256, shape, generator=g)]
    xt = d.q_sample(x0, torch.zeros(2, dtype=torch.long), noise=torch.randn(shape, generator=g, dtype=torch.float64))
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    out = d._vb_terms_bpd(lambda x, tt: torch.cat([eps, torch.zeros_like(eps)], 1), x0, xt,
                          torch.zeros(2, dtype=torch.long), clip_denoised=False)["output"]
    # p(x_0 | x_1): mean from Eq. 11 at t=0, log variance halfway between log beta_0 and log beta~_1
    mean = _ho_mean_from_eps(xt, eps, 0)
    _, var1 = bayes_posterior(x0, xt, 1)
    std = math.exp(0.25 * (math.log(BETAS[0]) + math.log(var1)))
    ref = -_brute_force_discretized_logp(x0, mean, torch.full_like(mean, std)).clamp(min=math.log(1e-12))
    ref = ref.mean(dim=(1, 2, 3)) / LN2
    torch.testing.assert_close(out, ref, rtol=0.02, atol=0.05)  # tanh-approximated CDF


class PerfectModel(torch.nn.Module):
    """Returns the true noise and v = -1 (variance = true posterior variance beta~_t)."""

    def __init__(self, noise, aux=None):
        super().__init__()
        self.noise, self.aux, self.seen_t = noise, aux, []
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        self.seen_t.append(t.clone())
        out = torch.cat([self.noise + 0 * self.dummy, -torch.ones_like(self.noise)], 1)
        return out if self.aux is None else (out, self.aux)


def test_training_losses_perfect_model_and_aux():
    d = create_diffusion("")
    shape = (4, 3, 4, 4)
    x0, noise = torch.rand(shape) * 2 - 1, torch.randn(shape)
    t = torch.tensor([1, 10, 500, 999])
    terms = d.training_losses(PerfectModel(noise), x0, t, model_kwargs={"y": None}, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (4,)
    assert torch.all(terms["mse"] == 0)
    assert terms["vb"].abs().max() < 1e-4  # KL of (numerically) identical Gaussians
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    aux = {"boundaries": torch.ones(4, 7)}
    terms = d.training_losses(PerfectModel(noise, aux=aux), x0, t, noise=noise)
    assert terms["aux"] is aux


def test_training_losses_values_and_vb_detached_from_mean():
    d = create_diffusion("")
    shape = (3, 2, 4, 4)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.rand(shape, generator=g) * 2 - 1, torch.randn(shape, generator=g)
    eps_hat = torch.randn(shape, generator=g).requires_grad_(True)
    v = (torch.rand(shape, generator=g) * 2 - 1).requires_grad_(True)
    t = torch.tensor([3, 200, 900])
    terms = d.training_losses(lambda x, tt: torch.cat([eps_hat, v], 1), x0, t, noise=noise)
    torch.testing.assert_close(terms["mse"], ((noise - eps_hat) ** 2).mean(dim=(1, 2, 3)))
    terms["loss"].sum().backward()
    # eps channels get only the MSE gradient; the VLB term reaches the variance channels only
    torch.testing.assert_close(eps_hat.grad, -2 * (noise - eps_hat.detach()) / (2 * 4 * 4))
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_vb_rescaling_follows_dit():
    shape = (2, 2, 3, 3)
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.rand(shape, generator=g) * 2 - 1, torch.randn(shape, generator=g)
    out = torch.randn(2, 4, 3, 3, generator=g).clamp(-1, 1)
    model = lambda x, tt: out  # noqa: E731
    t = torch.tensor([5, 300])
    vb = {}
    for rescale in (False, True):
        d = create_diffusion("", diffusion_steps=500, rescale_learned_sigmas=rescale)
        vb[rescale] = d.training_losses(model, x0, t, noise=noise)["vb"]
    # DiT default (rescale_learned_sigmas=False -> LossType.MSE): VLB term NOT rescaled;
    # RESCALED_MSE multiplies it by T / 1000.
    torch.testing.assert_close(vb[True], vb[False] * 0.5)
    assert create_diffusion("").loss_type == LossType.MSE


def test_training_losses_fixed_variance_has_no_vb():
    d = create_diffusion("", learn_sigma=False)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    terms = d.training_losses(lambda x, t: (noise, "aux!"), x0, torch.tensor([0, 999]), noise=noise)
    assert "vb" not in terms and torch.all(terms["loss"] == 0) and terms["aux"] == "aux!"


def test_kl_loss_type_and_calc_bpd_loop_shapes():
    d = create_diffusion("10", use_kl=True)
    assert d.loss_type == LossType.RESCALED_KL
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    model = point_mass_eps_model(x0)
    terms = d.training_losses(model, x0, torch.tensor([0, 5]))
    assert terms["loss"].shape == (2,)
    res = d.calc_bpd_loop(model, x0, clip_denoised=False)
    assert res["vb"].shape == (2, 10) and res["total_bpd"].shape == (2,)
    torch.testing.assert_close(res["mse"], torch.zeros(2, 10), atol=1e-6, rtol=0)  # exact eps


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_rules():
    ddim = sorted(space_timesteps(1000, "ddim50"))
    assert ddim == list(range(0, 1000, 20))
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 999
    assert s250 == np.linspace(0, 999, 250).round().astype(int).tolist()
    sec = sorted(space_timesteps(300, "10,15,20"))
    assert len(sec) == 45
    assert [sum(lo <= s < lo + 100 for s in sec) for lo in (0, 100, 200)] == [10, 15, 20]
    assert sec[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99] and sec[-1] == 299
    assert sorted(space_timesteps(1000, [1000])) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


@pytest.mark.parametrize("respacing,n", [("", 1000), (None, 1000), ("250", 250), ("ddim50", 50)])
def test_create_diffusion_respacing(respacing, n):
    d = create_diffusion(respacing)
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == n and len(d.timestep_map) == n
    # the respaced process has the original marginals at the kept steps
    np.testing.assert_allclose(d.alphas_cumprod, ABAR[d.timestep_map], rtol=1e-12)


def test_model_receives_original_timesteps():
    d = create_diffusion("ddim50")
    x0 = torch.zeros(2, 3, 4, 4)
    seen = []

    def model(x, t, **kw):
        seen.append(t.clone())
        return point_mass_eps_model(x0)(x, t)

    for out in d.ddim_sample_loop_progressive(model, (2, 3, 4, 4)):
        assert out["model_t"].tolist() == [d.timestep_map[out["t"][0].item()]] * 2
    assert [s[0].item() for s in seen] == list(range(980, -1, -20))
    assert all(s.dtype == torch.long for s in seen)
    # training path too
    m = PerfectModel(torch.zeros(2, 3, 4, 4))
    d.training_losses(m, x0, torch.tensor([1, 49]))
    assert m.seen_t[0].tolist() == [20, 980]


# ----------------------------------------------------------------------------- sampling


def test_sampling_loops_shapes_and_yield_keys():
    d = create_diffusion("5")
    aux = {"route": 1}
    model = lambda x, t, y=None: (torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:]), aux)  # noqa: E731
    shape = (2, 4, 3, 3)
    for loop in (d.p_sample_loop_progressive, d.ddim_sample_loop_progressive):
        outs = list(loop(model, shape, model_kwargs={"y": torch.tensor([1, 2])}))
        assert len(outs) == 5
        assert [o["t"].tolist() for o in outs] == [[i, i] for i in range(4, -1, -1)]
        for o in outs:
            assert {"sample", "pred_xstart", "aux", "t", "model_t"} <= set(o)
            assert o["sample"].shape == shape and o["aux"] is aux
    assert d.p_sample_loop(model, shape, progress=True).shape == shape
    assert d.ddim_sample_loop(model, list(shape), eta=0.5).shape == shape
    # without aux the key is absent
    plain = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # noqa: E731
    assert "aux" not in next(d.p_sample_loop_progressive(plain, shape))
    assert "aux" not in d.p_mean_variance(plain, torch.zeros(shape), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("respacing", ["20", "ddim20"])
def test_samplers_converge_to_point_mass(respacing):
    d = create_diffusion(respacing)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9
    model = point_mass_eps_model(x0)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for sample in (
        d.p_sample_loop(model, x0.shape, noise=noise),
        d.ddim_sample_loop(model, x0.shape, noise=noise),
        d.ddim_sample_loop(model, x0.shape, noise=noise, eta=1.0),
    ):
        torch.testing.assert_close(sample, x0, rtol=0, atol=1e-9)
    # float32 (the usual working precision) up to rounding
    sample32 = d.p_sample_loop(point_mass_eps_model(x0.float()), x0.shape, noise=noise.float())
    torch.testing.assert_close(sample32, x0.float(), rtol=0, atol=1e-4)


def test_ddim_reverse_then_forward_roundtrip():
    d = create_diffusion("ddim10", learn_sigma=False)
    x0 = torch.rand(2, 3, 4, 4) * 1.8 - 0.9
    model = point_mass_eps_model(x0, var_channels=False)
    x = x0.clone()
    for k in range(d.num_timesteps - 1):  # invert x_0-ish -> x_{K-1}
        x = d.ddim_reverse_sample(model, x, torch.full((2,), k))["sample"]
    torch.testing.assert_close(x, math.sqrt(ABAR[d.timestep_map[-1]]) * x0 + math.sqrt(1 - ABAR[d.timestep_map[-1]])
                               * model(x, torch.full((2,), d.timestep_map[-1])), atol=1e-5, rtol=0)


def test_fixed_variances_and_guidance():
    shape = (2, 3, 4, 4)
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.tensor([0, 600])
    eps_model = lambda x, tt: torch.zeros_like(x)  # noqa: E731
    small = create_diffusion("", learn_sigma=False, sigma_small=True).p_mean_variance(eps_model, x, t)
    large = create_diffusion("", learn_sigma=False).p_mean_variance(eps_model, x, t)
    _, var1 = bayes_posterior(x, x, 1)
    _, var600 = bayes_posterior(x, x, 600)
    assert small["variance"][0].max().item() == 0.0 and small["variance"][1, 0, 0, 0].item() == pytest.approx(var600)
    assert large["variance"][0, 0, 0, 0].item() == pytest.approx(var1)  # beta~_1 at t = 0
    assert large["variance"][1, 0, 0, 0].item() == pytest.approx(BETAS[600])

    # classifier guidance: mean shifted by variance * grad; cond_fn sees original timesteps
    d = create_diffusion("250")
    seen = []

    def cond_fn(x, tt, **kw):
        seen.append(tt.clone())
        return torch.full_like(x, 0.5)

    k = torch.tensor([100, 100])
    model = lambda x, tt: torch.zeros(x.shape[0], 6, *x.shape[2:], dtype=x.dtype)  # noqa: E731
    noise = torch.zeros(shape, dtype=torch.float64)
    base = d.p_sample(model, x, k, noise=noise)["sample"]
    guided = d.p_sample(model, x, k, cond_fn=cond_fn, noise=noise)["sample"]
    var = d.p_mean_variance(model, x, k)["variance"]
    torch.testing.assert_close(guided, base + 0.5 * var.float())
    assert seen[0].tolist() == [d.timestep_map[100]] * 2


def test_generic_gaussian_diffusion_predict_xstart():
    d = GaussianDiffusion(betas=BETAS, model_mean_type=ModelMeanType.START_X,
                          model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    terms = d.training_losses(lambda x, t: x0, x0, torch.tensor([3, 700]))
    assert torch.all(terms["mse"] == 0)
    out = d.p_mean_variance(lambda x, t: x0 * 5, torch.randn(2, 3, 4, 4), torch.tensor([3, 700]))
    assert out["pred_xstart"].abs().max() <= 1.0  # clip_denoised
