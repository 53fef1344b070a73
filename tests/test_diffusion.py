"""diffusion.py: schedules, q_sample, hybrid / v / Min-SNR losses, DDIM, DDPM, DPM-Solver++, LCM's consistency rules."""
import math

import numpy as np
import pytest
import torch
from conftest import randomize, rel_close, tiny_dit

import data
from diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood
from pipeline import sample


def test_linear_schedule():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000 and d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert d.alphas_cumprod[-1] == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))


def test_scaled_linear_schedule_is_ldms_and_diffusers():
    from diffusers import DDPMScheduler
    d = GaussianDiffusion(schedule="scaled_linear")
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)  # CompVis cin256-v2
    np.testing.assert_allclose(d.betas, ref.betas.double().numpy(), rtol=1e-6)
    snr0 = lambda d: math.sqrt(d.alphas_cumprod[0] / (1 - d.alphas_cumprod[0]))
    assert snr0(d) == pytest.approx(25.8, abs=0.05) and snr0(GaussianDiffusion()) == pytest.approx(100, abs=0.01)
    with pytest.raises(ValueError, match="schedule must be"):
        GaussianDiffusion(schedule="cosine")
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion v1's
    np.testing.assert_allclose(GaussianDiffusion(schedule="sd").betas, sd.betas.double().numpy(), rtol=1e-6)


def test_q_sample_statistics():
    d = GaussianDiffusion()
    torch.manual_seed(0)
    for step in (0, 100, 500, 999):
        x0 = torch.full((200_000, 1, 1, 1), 0.7)
        x_t = d.q_sample(x0, torch.full((200_000,), step), torch.randn_like(x0))
        a = d.alphas_cumprod[step]
        assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.01)
        assert x_t.var().item() == pytest.approx(1 - a, rel=0.02, abs=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_hybrid_loss_against_a_direct_computation(prediction):
    d = GaussianDiffusion(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1
    noise, out = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g).clamp(-1, 1)
    t = torch.tensor([0, 1, 400, 999])
    x_t = d.q_sample(x0, t, noise)
    loss = d.training_loss(out, x0, x_t, t, noise).numpy()

    # improved DDPM, written out in float64 numpy
    b = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - b)
    ab_prev = np.append(1, ab[:-1])
    x0n, xtn, nn_, on = (v.double().numpy() for v in (x0, x_t, noise, out))
    for i, s in enumerate(t.tolist()):
        pred, v = on[i, :2], on[i, 2:]
        post_var = b * (1 - ab_prev) / (1 - ab)
        min_log = np.log(post_var[1]) if s == 0 else np.log(post_var[s])
        log_var = (v + 1) / 2 * np.log(b[s]) + (1 - v + 1 - 1) / 2 * min_log
        if prediction == "eps":
            target, pred_x0 = nn_[i], (xtn[i] - np.sqrt(1 - ab[s]) * pred) / np.sqrt(ab[s])
        else:
            target, pred_x0 = np.sqrt(ab[s]) * nn_[i] - np.sqrt(1 - ab[s]) * x0n[i], np.sqrt(ab[s]) * xtn[i] - np.sqrt(1 - ab[s]) * pred
        c1, c2 = b[s] * np.sqrt(ab_prev[s]) / (1 - ab[s]), (1 - ab_prev[s]) * np.sqrt(1 - b[s]) / (1 - ab[s])
        mean, true_mean = c1 * pred_x0 + c2 * xtn[i], c1 * x0n[i] + c2 * xtn[i]
        mse = np.mean((target - pred) ** 2)
        if s == 0:
            vb = -discretized_gaussian_log_likelihood(torch.tensor(x0n[i]), torch.tensor(mean),
                                                      torch.tensor(0.5 * log_var)).numpy().mean() / np.log(2)
        else:
            kl = 0.5 * (-1 + log_var - min_log + np.exp(min_log - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
            vb = kl.mean() / np.log(2)
        assert loss[i] == pytest.approx(mse + vb, rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_true_target_gives_back_x0(prediction):
    d = GaussianDiffusion(learn_sigma=False, prediction=prediction)
    x0, noise, t = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4), torch.tensor([0, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    a = torch.from_numpy(d.alphas_cumprod[t]).float().view(-1, 1, 1, 1)
    target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert d.training_loss(target, x0, x_t, t, noise).abs().max() < 1e-10
    tol = 1e-4 if prediction == "v" else 0.05  # eps amplifies float32 rounding by 1 / sqrt(a) = 150 at t = 999
    torch.testing.assert_close(d.p_mean_variance(target, x_t, t)[2], x0, atol=tol, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighted_loss_counts_the_x0_error_min_snr_gamma_times(prediction):
    d = GaussianDiffusion(learn_sigma=False, prediction=prediction, min_snr_gamma=5.0)
    x0, noise, out = torch.rand(4, 2, 4, 4) * 2 - 1, torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    t = torch.tensor([0, 200, 500, 999])  # SNR from ~1e4 to ~4e-5: both sides of gamma
    x_t = d.q_sample(x0, t, noise)
    snr = torch.from_numpy(d.alphas_cumprod / (1 - d.alphas_cumprod))[t].float()
    x0_error = ((d.predict_x0(x_t, t, out) - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(d.training_loss(out, x0, x_t, t, noise), snr.clamp(max=5) * x0_error, rtol=1e-3, atol=0)


def test_discretized_likelihood_sums_to_one_over_the_bins():
    values = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(values, torch.tensor(0.3), torch.tensor(math.log(0.2)))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-3)


def test_hybrid_loss_trains_only_the_variance_through_the_vb_term():
    d = GaussianDiffusion()
    x0, noise = torch.rand(2, 1, 2, 2) * 2 - 1, torch.randn(2, 1, 2, 2)
    t = torch.tensor([10, 700])
    x_t = d.q_sample(x0, t, noise)
    out = torch.cat([noise, torch.zeros(2, 1, 2, 2)], 1).requires_grad_()  # exact eps: the MSE gradient is zero
    d.training_loss(out, x0, x_t, t, noise).sum().backward()
    assert torch.count_nonzero(out.grad[:, :1]) == 0 and torch.count_nonzero(out.grad[:, 1:]) > 0


@pytest.mark.slow
def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model, d = tiny_dit(class_dropout_prob=0.0), GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.from_numpy(data.SyntheticShapes(8, 8, seed=0).images_uint8()).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.arange(8) % 5
    t, noise = torch.randint(0, 1000, (8,)), torch.randn_like(x0)  # one fixed batch, fixed noise
    x_t = d.q_sample(x0, t, noise)
    losses = []
    for _ in range(150):
        loss = d.training_loss(model(x_t, t, y), x0, x_t, t, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    model = randomize(tiny_dit()).eval()
    y = torch.tensor([0, 1])
    g = lambda: torch.Generator().manual_seed(0)
    ddim = [sample(model, y, sampler="ddim", num_steps=5, generator=g()) for _ in range(2)]
    assert torch.equal(*ddim) and ddim[0].abs().max() <= 1 + 1e-6
    torch.manual_seed(0)
    x_T = torch.randn(2, 3, 8, 8, generator=g())
    # DDIM(eta=0) uses the generator for x_T only; DDPM also for the noise of every step
    ddpm = sample(model, y, sampler="ddpm", num_steps=5, generator=g())
    assert not torch.equal(ddpm, ddim[0]) and x_T.shape == ddpm.shape


class GaussianDataDenoiser(torch.nn.Module):
    """The exact eps-model of data N(mu, s^2) per pixel, whose probability-flow ODE has a closed form."""
    in_channels, learn_sigma, mu, s = 1, False, 0.3, 0.2

    def forward(self, x, t, y):
        a = torch.from_numpy(GaussianDiffusion().alphas_cumprod).float()[t].view(-1, 1, 1, 1)
        x0 = self.mu + a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a) * (x - a.sqrt() * self.mu)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def test_dpm_solver_is_second_order_on_gaussian_data():
    model, y = GaussianDataDenoiser(), torch.zeros(500, dtype=torch.long)
    run_ = lambda sampler, n: sample(model, y, 1.0, sampler, n, generator=torch.Generator().manual_seed(0), size=4)
    # exact: the flow keeps each pixel's standard score from x_T down to t = 0, where the last step takes x0
    a = GaussianDiffusion().alphas_cumprod
    x_T = torch.randn(500, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    z = (x_T - a[-1] ** 0.5 * model.mu) / (a[-1] * model.s ** 2 + 1 - a[-1]) ** 0.5
    x_0 = a[0] ** 0.5 * model.mu + (a[0] * model.s ** 2 + 1 - a[0]) ** 0.5 * z
    exact = model.mu + a[0] ** 0.5 * model.s ** 2 / (a[0] * model.s ** 2 + 1 - a[0]) * (x_0 - a[0] ** 0.5 * model.mu)
    error = {(k, n): (run_(k, n) - exact).abs().mean().item() for k in ("ddim", "dpm++") for n in (100, 200)}
    assert 1.7 < error["ddim", 100] / error["ddim", 200] < 2.3  # DDIM: first order, 2x the steps halve the error
    assert error["dpm++", 100] / error["dpm++", 200] > 3.5  # second order: at least a quarter
    assert error["dpm++", 100] < error["ddim", 100] / 5


def test_consistency_function_has_lcms_boundary_scalings_and_is_its_input_at_t0():
    from diffusers import LCMScheduler
    d, lcm = GaussianDiffusion(learn_sigma=False), LCMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    x, out = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = (torch.tensor([float(c) for c in cs]).view(-1, 1, 1, 1)
                     for cs in zip(*[lcm.get_scalings_for_boundary_condition_discrete(int(s)) for s in t]))
    rel_close(d.consistency_function(out, x, t), c_skip * x + c_out * d.predict_x0(x, t, out), rel=1e-6)
    assert torch.equal(d.consistency_function(out, x, torch.zeros(5, dtype=torch.long)), x)  # the boundary: f(x, 0) = x
    assert (d.consistency_function(out, x, t)[2:] - d.predict_x0(x, t, out)[2:]).abs().max() < 1e-4  # else ~ x0


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_consistency_sampler_is_diffusers_lcm_scheduler(num_steps):
    from diffusers import LCMScheduler
    d, lcm = GaussianDiffusion(learn_sigma=False), LCMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    denoise = GaussianDataDenoiser()
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = d.consistency_sample(lambda x, t: denoise(x, t, None), x, num_steps, generator=torch.Generator().manual_seed(0))
    lcm.set_timesteps(num_steps)  # LCM's grid of 50 (k = 20), from its top
    g, ref = torch.Generator().manual_seed(0), x
    for t in lcm.timesteps:
        ref, x0 = lcm.step(denoise(ref, t.view(1), None), t, ref, generator=g, return_dict=False)
    rel_close(ours, x0, rel=1e-3)  # x0 at t = 999 divides by sqrt(a) = 0.006: diffusers' float32 schedule shows
    with pytest.raises(ValueError, match="1 to 50 steps"):
        d.consistency_sample(lambda x, t: x, x, 51)


def test_consistency_loss_against_lcms_formulas():
    """One LCM step written as diffusers' train_lcm_distill_sd_wds.py writes it (its DDIMSolver, eps-prediction)."""
    d, k = GaussianDiffusion(learn_sigma=False), 20
    a = torch.from_numpy(d.alphas_cumprod).float()
    x_t, t, w = torch.randn(3, 3, 4, 4), torch.tensor([19, 519, 999]), torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1, 1)
    cond, uncond, student, target = (torch.randn(3, 3, 4, 4) for _ in range(4))
    loss = d.consistency_loss(student, x_t, t, lambda x, s: uncond + (1 + w) * (cond - uncond), lambda x, s: target, k)
    at, prev = a[t].view(-1, 1, 1, 1), torch.where(t - k < 0, 0, t - k)
    a_prev = a[prev].view(-1, 1, 1, 1)  # the solver's alphas_cumprod_prev: a[0] before the first grid point
    x0 = lambda x, at, eps: (x - (1 - at).sqrt() * eps) / at.sqrt()
    pred_x0 = x0(x_t, at, cond) + w * (x0(x_t, at, cond) - x0(x_t, at, uncond))
    pred_noise = cond + w * (cond - uncond)
    x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise

    def f(out, x, s):
        scaled = 10.0 * s.float().view(-1, 1, 1, 1)
        return 0.25 / (scaled ** 2 + 0.25) * x + scaled / (scaled ** 2 + 0.25) ** 0.5 * x0(x, a[s].view(-1, 1, 1, 1), out)
    rel_close(loss, ((f(student, x_t, t) - f(target, x_prev, prev)) ** 2).mean(dim=(1, 2, 3)), rel=1e-4)
