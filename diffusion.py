"""
The Gaussian diffusion of DDPM / improved DDPM, as DiT and LDM train it, and its samplers: the noise schedule, the
forward process q(x_t | x_0), the posterior, the model's mean and variance, the training loss (MSE on eps or v,
Min-SNR weights, and with a learned variance the hybrid loss), and the DDPM, DDIM and DPM-Solver++(2M) update rules;
latent consistency distillation's consistency function, loss and multi-step sampler (LCM, Luo et al. 2023).

The model enters only as a function denoise(x_t, t) -> output: any denoiser, guided or not, fits.

Imports nothing from the project: copy this file into another project as it is.
"""
import math

import numpy as np
import torch
from tqdm import tqdm

def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of 8-bit data (scaled to [-1, 1]) under a Gaussian discretised to bins of width 2/255."""
    def cdf(v):  # the fast tanh approximation used by improved DDPM and DiT
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_minus = cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))))
    return log_probs


class GaussianDiffusion:
    """Forward process, posterior, model mean/variance and the training loss. `schedule` names the betas: "linear",
    linspace(1e-4, 0.02) over 1000 steps (DDPM's and DiT's), or "scaled_linear", linspace(sqrt(0.0015),
    sqrt(0.0195))^2, the betas of CompVis's LDM configs (which call it "linear"), with which the paper's LDM-4
    trains: its sqrt(SNR) at t=0 is 25.8, DiT's 100; or "sd", linspace(sqrt(0.00085), sqrt(0.012))^2, Stable
    Diffusion's (diffusers' scaled_linear with SD's beta_start and beta_end). Samplers with fewer steps build a
    diffusion from a subsequence of the timesteps (`respaced`).

    `prediction` is what the model's first C channels predict: "eps", the noise (DDPM, DiT, LDM), or "v" =
    sqrt(a) eps - sqrt(1 - a) x0 with a = alphas_cumprod (Salimans & Ho, 2022). At high noise x_t is almost all
    eps, so an eps-model must be very precise there for its x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) to mean anything;
    v tends to -x0 there instead, which a small model on a short budget learns far sooner.

    `min_snr_gamma` > 0 weights each sample's MSE so that its error on x0 counts min(SNR, gamma) times (Min-SNR-gamma,
    Hang et al., 2023; SNR = a / (1 - a)): the nearly clean timesteps, whose fine detail is cheap to learn, no longer
    dominate the gradient. 0: the plain MSE on eps or v."""

    def __init__(self, num_timesteps=1000, learn_sigma=True, prediction="eps", schedule="linear", betas=None,
                 timestep_map=None, min_snr_gamma=0.0):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if betas is None and schedule == "linear":
            betas = np.linspace(1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps, num_timesteps)
        elif betas is None and schedule == "scaled_linear":
            betas = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, num_timesteps) ** 2
        elif betas is None and schedule == "sd":
            betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_timesteps) ** 2
        elif betas is None:
            raise ValueError(f"schedule must be 'linear' (DiT's), 'scaled_linear' (LDM's) or 'sd' (Stable "
                             f"Diffusion's), got {schedule!r}")
        self.betas = betas = np.asarray(betas, dtype=np.float64)  # float64: the schedule needs the precision
        self.num_timesteps = len(betas)
        self.learn_sigma, self.prediction = learn_sigma, prediction
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        # the eps-MSE is SNR times the x0-MSE, the v-MSE SNR + 1 times: this weight makes it min(SNR, gamma) times
        self.mse_weight = np.minimum(snr, min_snr_gamma) / (snr if prediction == "eps" else snr + 1) \
            if min_snr_gamma > 0 else None
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance at t=0 is 0; its log is clipped to the next value
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - betas) / \
            (1.0 - self.alphas_cumprod)
        # the per-step coefficients, computed once here rather than at every training or sampling step
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.log_betas = np.log(betas)
        self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self._device_tables = {}

    def respaced(self, num_steps):
        """A diffusion over `num_steps` evenly spaced timesteps of this one, with the same alphas_cumprod there.
        Call the model with `timestep_map[t]`."""
        if not 2 <= num_steps <= self.num_timesteps:
            raise ValueError(f"the number of sampling steps must be in [2, {self.num_timesteps}], got {num_steps}")
        use = np.round(np.linspace(0, self.num_timesteps - 1, num_steps)).astype(np.int64)
        acp = self.alphas_cumprod[use]
        betas = 1.0 - acp / np.append(1.0, acp[:-1])
        return GaussianDiffusion(learn_sigma=self.learn_sigma, prediction=self.prediction, betas=betas,
                                 timestep_map=self.timestep_map[use])

    def _at(self, arr, t, x):
        """arr[t] as a float32 tensor broadcastable to x. Each table goes to x's device once: a copy from host memory at
        every call would make the host wait for the GPU (a sync) several times a training or sampling step."""
        key = (id(arr), x.device)
        if key not in self._device_tables:  # the entry holds arr too, so that its id is never another array's
            self._device_tables[key] = arr, torch.as_tensor(arr, dtype=torch.float32, device=x.device)
        return self._device_tables[key][1][t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        return (self._at(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0, x_t, t):
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0(self, x_t, t, out):
        """x0 from the model's prediction of eps or v."""
        if self.prediction == "v":
            return (self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t
                    - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * out)
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * out)

    def p_mean_variance(self, model_output, x_t, t, clip_denoised=False):
        """Mean and log-variance of p(x_{t-1} | x_t), and the predicted x0."""
        C = x_t.shape[1]
        if self.learn_sigma:
            out, v = model_output[:, :C], model_output[:, C:]
            # The model outputs v in [-1, 1], interpolating the log-variance between beta_tilde_t and beta_t.
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(self.log_betas, t, x_t)
            frac = (v.float() + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:  # DDPM's "fixed large" variance, as DiT uses without learned sigma
            out = model_output
            log_var = self._at(self.fixed_large_log_variance, t, x_t)
        x0 = self.predict_x0(x_t, t, out.float())
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0

    def training_loss(self, model_output, x0, x_t, t, noise):
        """Per-sample loss: MSE on eps (or v), plus with a learned variance the variational bound (in bits per dim) of
        the variance alone: the mean is detached so the VB term trains only the variance (improved DDPM's hybrid)."""
        C = x0.shape[1]
        model_output = model_output.float()
        target = noise
        if self.prediction == "v":
            target = (self._at(self.sqrt_alphas_cumprod, t, x0) * noise
                      - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)
        mse = ((target - model_output[:, :C]) ** 2).mean(dim=(1, 2, 3))
        if self.mse_weight is not None:
            mse = mse * self._at(self.mse_weight, t, mse)
        if not self.learn_sigma:
            return mse
        frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
        mean, log_var, _ = self.p_mean_variance(frozen, x_t, t)
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)

    # Latent consistency distillation (LCM, Luo et al. 2023). The student f(x_t, t, w) = c_skip(t) x_t + c_out(t) x0(t)
    # with LCM's boundary scalings (sigma_data 0.5, timesteps scaled by 10, as its code and diffusers' LCMScheduler):
    # c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x exactly; from t = 19 on, c_skip < 1e-5 and f is nearly x0.

    def consistency_function(self, model_output, x_t, t, clip_denoised=False):
        scaled = 10.0 * t.float().view(-1, *([1] * (x_t.dim() - 1)))
        c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25) ** 0.5
        x0 = self.predict_x0(x_t, t, model_output[:, :x_t.shape[1]].float())
        return c_skip * x_t + c_out * (x0.clamp(-1, 1) if clip_denoised else x0)

    def ddim_step(self, model_output, x_t, t, t_prev):
        """The deterministic DDIM step from x_t to x_{t_prev} (per sample) with the model's x0 and eps."""
        x0 = self.predict_x0(x_t, t, model_output[:, :x_t.shape[1]].float())
        eps = (x_t - self._at(self.sqrt_alphas_cumprod, t, x_t) * x0) / self._at(self.sqrt_one_minus_alphas_cumprod,
                                                                                   t, x_t)
        return self._at(self.sqrt_alphas_cumprod, t_prev, x_t) * x0 + \
            self._at(self.sqrt_one_minus_alphas_cumprod, t_prev, x_t) * eps

    def consistency_loss(self, model_output, x_t, t, teacher, target, skip_interval):
        """Per-sample LCM loss of the student's output at x_t, t = t_{n+k}: the squared error (LCM's default "l2",
        averaged over the elements) of its consistency function against the target network's at x_{t_n}, which one
        DDIM step of the guided teacher reaches from x_t, t_n = t - k (0 at the first grid point, as LCM). `teacher`
        and `target` are callables (x, t) -> model output; no gradient reaches either."""
        t_prev = (t - skip_interval).clamp(min=0)
        with torch.no_grad():
            x_prev = self.ddim_step(teacher(x_t, t), x_t, t, t_prev)
            goal = self.consistency_function(target(x_prev, t_prev), x_prev, t_prev)
        return ((self.consistency_function(model_output, x_t, t) - goal) ** 2).mean(dim=tuple(range(1, x_t.dim())))

    @torch.no_grad()
    def consistency_sample(self, denoise, x, num_steps, skip_interval=20, clip_denoised=False, generator=None,
                           progress=False):
        """LCM's multi-step sampler: `num_steps` timesteps evenly spaced down the skipping grid from its top (with
        k = 20: 999, 759, 499, 259 for 4 steps, as diffusers' LCMScheduler); at each the student's consistency
        function gives x0, noised afresh to the next timestep; the last x0 is the sample. `denoise(x_t, t)`."""
        grid = np.arange(1, self.num_timesteps // skip_interval + 1) * skip_interval - 1
        if not 1 <= num_steps <= len(grid):
            raise ValueError(f"a consistency sampler takes 1 to {len(grid)} steps (its grid, every {skip_interval} "
                             f"of {self.num_timesteps}), got {num_steps}")
        steps = grid[::-1][np.floor(np.linspace(0, len(grid), num_steps, endpoint=False)).astype(np.int64)]
        for i, step in enumerate(tqdm(steps, disable=not progress, desc="sampling")):
            t = torch.full((len(x),), int(step), device=x.device)
            x0 = self.consistency_function(denoise(x, t), x, t, clip_denoised)
            if i + 1 < len(steps):
                noise = torch.randn(x.shape, device=x.device, generator=generator)
                x = self.q_sample(x0, torch.full_like(t, int(steps[i + 1])), noise)
        return x0

    @torch.no_grad()
    def sample(self, denoise, x, sampler="dpm++", ddim_eta=0.0, clip_denoised=False, generator=None, progress=False):
        """Run the reverse process from the noise x over every step of this (respaced) diffusion and return its x0.
        `denoise(x_t, t)` is the model, called with the original timesteps (timestep_map). sampler: "dpm++"
        (DPM-Solver++(2M), Lu et al. 2022: the paper's), "ddim" (with ddim_eta) or "ddpm" (ancestral, with the
        learned or fixed variance). clip_denoised: clip the predicted x0 to [-1, 1] (pixels; latents are unbounded)."""
        if sampler not in ("ddpm", "ddim", "dpm++"):
            raise ValueError(f"sampler must be 'ddpm', 'ddim' or 'dpm++', got {sampler!r}")
        n, x0_prev = len(x), None
        for i in tqdm(reversed(range(self.num_timesteps)), total=self.num_timesteps, disable=not progress,
                      desc="sampling"):
            t = torch.full((n,), i, device=x.device)
            out = denoise(x, torch.full_like(t, int(self.timestep_map[i])))
            mean, log_var, x0 = self.p_mean_variance(out, x, t, clip_denoised=clip_denoised)
            a, a_prev = self.alphas_cumprod[i], self.alphas_cumprod_prev[i]
            if i == 0:  # the last step lands on the data: every sampler returns its x0
                x = x0
            elif sampler == "ddpm":
                x = mean + torch.exp(0.5 * log_var) * torch.randn(x.shape, device=x.device, generator=generator)
            elif sampler == "ddim":
                eps = (x / a ** 0.5 - x0) / (1 / a - 1) ** 0.5  # recomputed from the (clipped) x0, as DDIM does
                sigma = ddim_eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
                x = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
                if sigma > 0:
                    x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
            else:  # DPM-Solver++(2M): the probability-flow ODE in x0, exact in log-SNR lambda, with x0 extrapolated
                # linearly from the previous step (second order; its first order is DDIM). The step into t=0 spans a
                # far longer lambda than the one before it, where extrapolating overshoots: first order there
                h = 0.5 * math.log(a_prev / (1 - a_prev)) - 0.5 * math.log(a / (1 - a))
                d = x0 if x0_prev is None or i == 1 else x0 + (x0 - x0_prev) * h / (2 * h_prev)
                x = ((1 - a_prev) / (1 - a)) ** 0.5 * x - a_prev ** 0.5 * math.expm1(-h) * d
                x0_prev, h_prev = x0, h
        return x
