"""
Networks and the Gaussian diffusion.

DiT (Peebles & Xie, 2023) with adaLN-Zero blocks. Parameter names and shapes are those of the official DiT
checkpoints, so DiT-XL-2-256x256.pt loads with strict=True; `load_dit` also reads the diffusers layout.
The diffusion is the one of DDPM / improved DDPM as DiT trains it: linear betas, eps prediction, and with a
learned variance the hybrid loss (MSE on eps + variational bound on the variance).

Imports nothing from the project: copy this file into another project as it is.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# DiT


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class, used for classifier-free guidance.

    `perturb` is a hook for condition embedding perturbation (cep.py) or embedding dropout: a module that is
    applied to the embeddings of real classes in training mode only, never to the null class."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.perturb = None

    def forward(self, labels, force_drop_ids=None):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids, self.num_classes, labels)
        emb = self.embedding_table(labels)
        if self.perturb is not None and self.training:
            emb = torch.where((labels != self.num_classes)[:, None], self.perturb(emb), emb)
        return emb


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W/p^2, hidden]


def sincos_pos_embed(dim, grid_size):
    """Fixed 2D sin-cos position embedding of MAE/DiT: the first half encodes the column, the second the row."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    def embed_1d(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)


class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid_size = input_size // patch_size
        # A frozen parameter, not a buffer, because the official checkpoints store it under this name.
        self.pos_embed = nn.Parameter(torch.tensor(sincos_pos_embed(hidden_size, grid_size), dtype=torch.float32)[None],
                                      requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight  # like nn.Linear, not the default conv init
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the model's output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, force_drop_ids=None):
        """x: [N, C, H, W] noisy input, t: [N] timesteps, y: [N] class labels (num_classes = the null class)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance in one batched forward: eps = eps(null) + s * (eps(y) - eps(null)).

        Guides all channels (the official DiT guides only the first 3 of 4 latent channels, a bug not copied
        here); the learned variance is taken from the conditional half."""
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        eps_cond, rest = cond.split(self.in_channels, dim=1)
        eps = uncond[:, :self.in_channels] + cfg_scale * (eps_cond - uncond[:, :self.in_channels])
        return torch.cat([eps, rest], dim=1)


DiT_sizes = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
             "Ti": (6, 192, 3)}  # Ti is ours: a tiny size for CPU runs, not in the DiT paper


def _make(depth, hidden, heads, patch):
    return lambda **kw: DiT(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kw)


DiT_models = {f"DiT-{size}/{p}": _make(*DiT_sizes[size], p) for size in DiT_sizes for p in (2, 4, 8)}


def diffusers_to_dit(sd):
    """Map a diffusers DiTTransformer2DModel state dict to the official DiT names. Diffusers keeps a copy of the
    timestep and class embedders in every block; they are identical, block 0's is taken. Note that diffusers runs
    these weights with timestep frequencies exp(-log(1e4) k / (128 - 1)) where DiT (and this file) uses k / 128,
    so our outputs for converted official weights are the official DiT's, not diffusers'."""
    out = {}
    for key, value in sd.items():
        if key.startswith("transformer_blocks.") and ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
            continue
        new = key
        for old, rep in [("pos_embed.proj.", "x_embedder.proj."),
                         ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
                         ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
                         ("transformer_blocks.0.norm1.emb.class_embedder.", "y_embedder."),
                         ("transformer_blocks.", "blocks."), (".norm1.linear.", ".adaLN_modulation.1."),
                         (".attn1.to_out.0.", ".attn.proj."), (".ff.net.0.proj.", ".mlp.fc1."),
                         (".ff.net.2.", ".mlp.fc2."), ("proj_out_1.", "final_layer.adaLN_modulation.1."),
                         ("proj_out_2.", "final_layer.linear.")]:
            new = new.replace(old, rep)
        out[new] = value
    for key in [k for k in out if ".attn1.to_q." in k]:  # separate q, k, v -> one qkv projection
        prefix, kind = key.split(".attn1.to_q.")
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([out.pop(f"{prefix}.attn1.to_{n}.{kind}") for n in "qkv"])
    return out


def load_dit(state_dict, input_size=None, num_heads=None):
    """Build a DiT from a bare state dict (official checkpoint, diffusers layout, or ours) and load it strictly.
    The architecture is read off the tensor shapes; diffusers does not store the position embedding, so the input
    size (latent side, e.g. 32 for 256px images) must be given for it. The number of heads leaves no trace in the
    weights: it is taken from DiT_sizes unless given."""
    sd = diffusers_to_dit(state_dict) if "pos_embed.proj.weight" in state_dict else dict(state_dict)
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or next((h for d, w, h in DiT_sizes.values() if (d, w) == (depth, hidden)), None)
    if heads is None:
        raise ValueError(f"depth {depth} and width {hidden} are not a size of DiT_sizes: pass num_heads")
    if "pos_embed" in sd:
        input_size = int(sd["pos_embed"].shape[1] ** 0.5) * patch
    elif input_size is None:
        raise ValueError("this state dict has no pos_embed (diffusers layout): pass input_size, e.g. 32 for 256px")
    out_channels = sd["final_layer.linear.weight"].shape[0] // patch ** 2
    model = DiT(input_size=input_size, patch_size=patch, in_channels=in_channels,
                hidden_size=hidden, depth=depth, num_heads=heads,
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
                learn_sigma=out_channels == 2 * in_channels)
    sd.setdefault("pos_embed", model.pos_embed.data)
    model.load_state_dict(sd, strict=True)
    return model


# -----------------------------------------------------------------------------
# Gaussian diffusion


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
    """Forward process, posterior, model mean/variance and the training loss. `betas` defaults to DDPM's linear
    schedule; samplers with fewer steps build one from a subsequence of timesteps (`respaced`)."""

    def __init__(self, num_timesteps=1000, learn_sigma=True, betas=None, timestep_map=None):
        if betas is None:
            betas = np.linspace(1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps, num_timesteps)
        self.betas = betas = np.asarray(betas, dtype=np.float64)  # float64: the schedule needs the precision
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance at t=0 is 0; its log is clipped to the next value
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - self.alphas_cumprod)

    def respaced(self, num_steps):
        """A diffusion over `num_steps` evenly spaced timesteps of this one, with the same alphas_cumprod there.
        Call the model with `timestep_map[t]`."""
        use = np.round(np.linspace(0, self.num_timesteps - 1, num_steps)).astype(np.int64)
        acp = self.alphas_cumprod[use]
        betas = 1.0 - acp / np.append(1.0, acp[:-1])
        return GaussianDiffusion(betas=betas, learn_sigma=self.learn_sigma, timestep_map=self.timestep_map[use])

    @staticmethod
    def _at(arr, t, x):
        """arr[t] as a tensor broadcastable to x."""
        return torch.as_tensor(arr, device=x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        return self._at(np.sqrt(self.alphas_cumprod), t, x0) * x0 + self._at(np.sqrt(1 - self.alphas_cumprod), t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0(self, x_t, t, eps):
        return (self._at(np.sqrt(1 / self.alphas_cumprod), t, x_t) * x_t
                - self._at(np.sqrt(1 / self.alphas_cumprod - 1), t, x_t) * eps)

    def p_mean_variance(self, model_output, x_t, t, clip_denoised=False):
        """Mean and log-variance of p(x_{t-1} | x_t), and the predicted x0 and eps."""
        C = x_t.shape[1]
        if self.learn_sigma:
            eps, v = model_output[:, :C], model_output[:, C:]
            # The model outputs v in [-1, 1], interpolating the log-variance between beta_tilde_t and beta_t.
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(np.log(self.betas), t, x_t)
            frac = (v.float() + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:  # DDPM's "fixed large" variance, as DiT uses without learned sigma
            eps = model_output
            log_var = self._at(np.log(np.append(self.posterior_variance[1], self.betas[1:])), t, x_t)
        eps = eps.float()
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0, eps

    def training_loss(self, model_output, x0, x_t, t, noise):
        """Per-sample loss: MSE on eps, plus with a learned variance the variational bound (in bits per dim) of the
        variance alone: the mean is detached so the VB term trains only the variance (improved DDPM's hybrid)."""
        C = x0.shape[1]
        model_output = model_output.float()
        mse = ((noise - model_output[:, :C]) ** 2).mean(dim=(1, 2, 3))
        if not self.learn_sigma:
            return mse
        frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
        mean, log_var, _, _ = self.p_mean_variance(frozen, x_t, t)
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)
