"""
Networks and the Gaussian diffusion.

DiT (Peebles & Xie, 2023) with adaLN-Zero blocks. Parameter names and shapes are those of the official DiT
checkpoints, so DiT-XL-2-256x256.pt loads with strict=True; `load_dit` also reads the diffusers layout.
The diffusion is the one of DDPM / improved DDPM as DiT trains it: linear betas, eps prediction, and with a
learned variance the hybrid loss (MSE on eps + variational bound on the variance).

Imports nothing from the project: copy this file into another project as it is.
"""
import json
import math
import os

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

    def null_like(self, labels):
        return torch.full_like(labels, self.num_classes)


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


def forward_with_cfg(model, x, t, y, cfg_scale):
    """Classifier-free guidance in one batched forward: eps = eps(null) + s * (eps(y) - eps(null)), for the DiT and
    the U-Net alike, class labels or caption tokens. Guides all channels (the official DiT guides only the first 3 of
    4 latent channels, a bug not copied here); the learned variance is taken from the conditional half."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, model.y_embedder.null_like(y)]))
    cond, uncond = out.chunk(2)
    c = model.in_channels
    return torch.cat([uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)


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

    forward_with_cfg = forward_with_cfg


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


# ---------------------------------------------------------------------------------------------------------------------
# First stages: the Stable Diffusion KL-f8 VAE (DiT) and LDM's VQ-f4 autoencoder (LDM-4). Both are written in diffusers'
# parameter layout (../shared/manifests/*_diffusers_keys.json), so diffusers' weight files load without renaming.


class VAEResnet(nn.Module):
    """diffusers' ResnetBlock2D without a timestep input."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, used once in each mid block."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # a list for the key name to_out.0 (diffusers' to_out.1 is a dropout)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        # a head axis of 1: the fused SDPA kernels on GPU take 4-D inputs only
        h = F.scaled_dot_product_attention(*(f(h)[:, None] for f in (self.to_q, self.to_k, self.to_v)))[:, 0]
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class VAEMidBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(c, groups)])
        self.resnets = nn.ModuleList([VAEResnet(c, c, groups), VAEResnet(c, c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEResample(nn.Module):
    """2x nearest upsampling then a conv, or a stride-2 conv on the input padded right and bottom only (as LDM trained)."""

    def __init__(self, c, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


class VAEBlock(nn.Module):
    """diffusers' DownEncoderBlock2D / UpDecoderBlock2D: resnets, then optionally a 2x down- or upsampler."""

    def __init__(self, cin, cout, n, groups, resample=None):  # resample: None, "down" or "up"
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnet(cin if i == 0 else cout, cout, groups) for i in range(n)])
        # both lists exist so the key names match diffusers; the unused one is empty and holds no parameters
        self.downsamplers = nn.ModuleList([VAEResample(cout, up=False)] if resample == "down" else [])
        self.upsamplers = nn.ModuleList([VAEResample(cout, up=True)] if resample == "up" else [])

    def forward(self, x):
        for m in [*self.resnets, *self.downsamplers, *self.upsamplers]:
            x = m(x)
        return x


class VAEEncoder(nn.Module):
    def __init__(self, chans, n, groups, cout):
        super().__init__()
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(3, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([VAEBlock(chans[max(i - 1, 0)], c, n, groups, "down" if i < last else None)
                                          for i, c in enumerate(chans)])
        self.mid_block = VAEMidBlock(chans[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], cout, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class VAEDecoder(nn.Module):
    def __init__(self, chans, n, groups, cin):
        super().__init__()
        rev, last = chans[::-1], len(chans) - 1
        self.conv_in = nn.Conv2d(cin, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList([VAEBlock(rev[max(i - 1, 0)], c, n + 1, groups, "up" if i < last else None)
                                        for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def load_diffusers_weights(model, path, name, url):
    """Loads diffusers' diffusion_pytorch_model.safetensors (if the safetensors package is importable) or .bin into
    `model` (strict). `path` is the file itself, or a folder holding it directly or in a vae/ or vqvae/ subfolder (the
    layouts of the Hugging Face repos). With path=None the folder is <torch hub dir>/checkpoints/<name>, and a missing
    file is downloaded there from `url` when the machine has internet."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    default = path is None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name) if default else os.fspath(path)
    exts = ("safetensors", "bin") if load_file else ("bin",)
    files = [path] if os.path.isfile(path) else \
        [os.path.join(path, sub, "diffusion_pytorch_model." + ext) for sub in ("", "vae", "vqvae") for ext in exts]
    found = [f for f in files if os.path.isfile(f)]
    dest = os.path.join(path, "diffusion_pytorch_model.bin")
    if not found and default:
        try:
            os.makedirs(path, exist_ok=True)
            torch.hub.download_url_to_file(url, dest)
            found = [dest]
        except Exception as e:  # no internet: fall through to the error that says where the file goes
            print(f"download of {url} failed: {e}")
    if not found:
        raise FileNotFoundError(
            f"{name} weights not found: no diffusion_pytorch_model.{' or .'.join(exts)} in {path} (nor in its vae/ or "
            f"vqvae/ subfolder). Download {url} and save it as {dest}, or pass the folder that holds it.")
    f = found[0]
    sd = load_file(f) if f.endswith(".safetensors") else torch.load(f, map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    return model


class AutoencoderKL(nn.Module):
    """The Stable Diffusion KL-f8 VAE (stabilityai/sd-vae-ft-ema or -mse): 256x256x3 images in [-1, 1] <-> 32x32x4
    latents, which are multiplied by 0.18215 so that they have roughly unit variance (as DiT and SD train on them)."""

    scale = 0.18215

    def __init__(self, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 norm_num_groups=32):
        super().__init__()
        c = self.latent_channels = latent_channels
        self.factor = 2 ** (len(block_out_channels) - 1)  # one 2x downsampling per block but the last
        self.encoder = VAEEncoder(block_out_channels, layers_per_block, norm_num_groups, 2 * c)  # mean and log-variance
        self.decoder = VAEDecoder(block_out_channels, layers_per_block, norm_num_groups, c)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    def encode(self, x, sample=False):
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8]: the posterior's mean, or a sample of it."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        if sample:
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)
        return mean * self.scale

    def decode(self, z):
        """Scaled latents -> images in about [-1, 1]; not clamped, so that this equals diffusers' decode."""
        return self.decoder(self.post_quant_conv(z / self.scale))

    def load_pretrained(self, path=None):
        return load_diffusers_weights(self, path, "sd-vae-ft-ema",
                                      "https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.bin")


class VectorQuantizer(nn.Module):
    """Nearest codebook entry by Euclidean distance. No straight-through gradient: the first stage stays frozen here."""

    def __init__(self, num_codes, dim):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)

    def forward(self, z):  # [B, C, H, W] -> the same shape, every pixel replaced by its nearest code
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        # chunked so the distance matrix stays below ~0.5 GB with 8192 codes (a batch of 64 at 64x64 would need 8.6 GB)
        idx = torch.cat([torch.cdist(c, self.embedding.weight).argmin(1) for c in zf.split(16384)])
        return self.embedding(idx).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)


class VQModel(nn.Module):
    """LDM's VQ-f4 first stage (LDM-4: 256x256x3 images <-> 64x64x3 latents, 8192 codes). As in LDM's VQModelInterface
    and diffusers' VQModel, encode() returns the continuous latents before quantization (the diffusion model is trained
    on these, with scale factor 1), and decode() first snaps them to the nearest codebook entries."""

    scale = 1.0

    def __init__(self, block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3, num_codes=8192,
                 norm_num_groups=32):
        super().__init__()
        c = self.latent_channels = latent_channels
        self.factor = 2 ** (len(block_out_channels) - 1)
        self.encoder = VAEEncoder(block_out_channels, layers_per_block, norm_num_groups, c)
        self.decoder = VAEDecoder(block_out_channels, layers_per_block, norm_num_groups, c)
        self.quant_conv = nn.Conv2d(c, c, 1)
        self.quantize = VectorQuantizer(num_codes, c)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(self.quantize(z)))

    def load_pretrained(self, path=None):
        # CompVis/ldm-celebahq-256/vqvae is LDM's vq-f4 converted to diffusers' layout
        return load_diffusers_weights(self, path, "ldm-vq-f4",
                                      "https://huggingface.co/CompVis/ldm-celebahq-256/resolve/main/vqvae/diffusion_pytorch_model.bin")


def load_first_stage(path):
    """The AutoencoderKL or VQModel whose diffusers weights are at `path` (a folder, as for load_diffusers_weights, or
    the file), built from the config.json that diffusers saves beside them (_class_name, block_out_channels,
    layers_per_block, latent_channels, norm_num_groups, num_vq_embeddings, scaling_factor). Without a config.json:
    the Stable Diffusion KL-f8 VAE."""
    path = os.fspath(path)
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    configs = [f for f in (os.path.join(folder, sub, "config.json") for sub in ("", "vae", "vqvae"))
               if os.path.isfile(f)]
    cfg = {}
    if configs:
        with open(configs[0]) as f:
            cfg = json.load(f)
    kw = {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]
          for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups") if k in cfg}
    if cfg.get("_class_name") == "VQModel":
        return VQModel(num_codes=cfg.get("num_vq_embeddings", 8192), **kw).load_pretrained(path)
    vae = AutoencoderKL(**kw).load_pretrained(path)
    vae.scale = cfg.get("scaling_factor", vae.scale)  # VQModel configs have one too, but LDM uses VQ latents unscaled
    return vae


# ---------------------------------------------------------------------------------------------------------------------
# Text encoders over CLIP's tokenizer: CLIP's text transformer, frozen with OpenAI's weights (the paper trained a BERT;
# this project uses CLIP's, or the same architecture small and trained from scratch on machines without the weights).
# The clip package (clip-anytorch) is imported only here, when a text encoder is used.


def tokenize(captions):
    """Captions -> CLIP tokens [n, 77]: start, BPE, end, zero padding; longer captions are cut to 77 tokens. The BPE
    vocabulary ships inside the clip package, so this works offline."""
    import clip
    return clip.tokenize(list(captions), truncate=True)


class TextEncoder(nn.Module):
    """CLIP's text transformer from clip-anytorch's modules, with OpenAI's parameter names, so the text half of a CLIP
    checkpoint loads as it is: token and position embeddings, causally masked pre-LN blocks with heads of 64 channels,
    a final layer norm. Returns the embedding of every token [B, 77, width], as Stable Diffusion conditions on CLIP,
    not CLIP's pooled projection. Randomly initialised as CLIP is; `load_clip_text_encoder` gives OpenAI's weights."""

    def __init__(self, width, layers, vocab_size=49408, context_length=77):
        super().__init__()
        from clip.model import LayerNorm, Transformer
        self.width, self.layers = width, layers
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.transformer = Transformer(width, layers, max(1, width // 64), attn_mask=mask)
        self.ln_final = LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialisation
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        return self.ln_final(self.transformer(x.transpose(0, 1)).transpose(0, 1))  # clip's blocks are sequence-first


def load_clip(name):
    """OpenAI's CLIP through clip-anytorch, in float32 and eval mode, and its image preprocessing (as clip.load).
    `name` is a checkpoint file (a TorchScript archive as OpenAI ships them, or a state dict), or one of clip's model
    names (ViT-B/32, ViT-L/14, ...), looked up in clip's cache ~/.cache/clip and downloaded there when the machine is
    online. A missing file is one error that names it and where to put it."""
    import clip
    path = name
    if not os.path.isfile(name):
        urls = clip.clip._MODELS
        if name not in urls:
            raise FileNotFoundError(f"CLIP weights {name!r}: no such file, and not one of clip's models "
                                    f"({', '.join(urls)})")
        root = os.path.expanduser("~/.cache/clip")
        path = os.path.join(root, os.path.basename(urls[name]))
        if not os.path.isfile(path):
            try:
                clip.clip._download(urls[name], root)
            except Exception as e:  # no internet: the error says where the file goes
                raise FileNotFoundError(f"CLIP {name} weights not found: {path} does not exist and the download "
                                        f"failed ({e}). Download {urls[name]} and save it as {path}, or pass the "
                                        f"path of the file.") from None
    model, preprocess = clip.load(path, device="cpu", jit=False)
    return model.float().eval(), preprocess


def load_clip_text_encoder(name):
    """The TextEncoder of a CLIP checkpoint (see load_clip), with its weights."""
    clip_model, _ = load_clip(name)
    encoder = TextEncoder(clip_model.transformer.width, clip_model.transformer.layers, clip_model.vocab_size,
                          clip_model.context_length)
    encoder.load_state_dict({k: v for k, v in clip_model.state_dict().items() if k in encoder.state_dict()})
    return encoder


class TextEmbedder(nn.Module):
    """Caption tokens [B, 77] -> the U-Net's context [B, 77, width], through a TextEncoder. The empty caption is the null
    condition of classifier-free guidance: in training, each caption is replaced by it with probability dropout_prob.
    `perturb` as in LabelEmbedder (CEP, a delta per token): training mode only, never on a null caption. A frozen
    encoder runs without gradients."""

    def __init__(self, encoder, dropout_prob):
        super().__init__()
        self.encoder, self.dropout_prob, self.perturb = encoder, dropout_prob, None
        self.register_buffer("null", tokenize([""])[0], persistent=False)

    def null_like(self, tokens):
        return self.null.expand_as(tokens)

    def forward(self, tokens, force_drop_ids=None):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(tokens.shape[0], device=tokens.device) < self.dropout_prob
            tokens = torch.where(drop[:, None], self.null, tokens)
        if force_drop_ids is not None:
            tokens = torch.where(force_drop_ids[:, None], self.null, tokens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder.token_embedding.weight.requires_grad):
            emb = self.encoder(tokens)
        if self.perturb is not None and self.training:
            emb = torch.where((tokens != self.null).any(1)[:, None, None], self.perturb(emb), emb)
        return emb


# ---------------------------------------------------------------------------------------------------------------------
# The LDM U-Net (LDM's openaimodel.UNetModel with use_spatial_transformer): ADM-style residual blocks with the timestep
# embedding, and transformer blocks (self-attention, cross-attention to a context [B, L, D], feed-forward) at chosen
# downsampling factors. The condition enters only through the context: a class is one token, text is many.


class UNetResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(32, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # zero residual branch: the block starts as (a projection of) the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNetAttention(nn.Module):
    """Multi-head attention from x [B, N, dim] to a context [B, L, context_dim] (x itself for self-attention)."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.proj(h.transpose(1, 2).reshape(B, N, C))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv to tokens, one pre-LayerNorm transformer block (self-attention, cross-attention, GEGLU
    feed-forward), 1x1 conv back (zero-init), residual."""

    def __init__(self, c, context_dim, heads):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.proj_in = nn.Conv2d(c, c, 1)
        self.norm1, self.attn1 = nn.LayerNorm(c), UNetAttention(c, c, heads)
        self.norm2, self.attn2 = nn.LayerNorm(c), UNetAttention(c, context_dim, heads)
        self.norm3, self.ff_in, self.ff_out = nn.LayerNorm(c), nn.Linear(c, 8 * c), nn.Linear(4 * c, c)
        self.proj_out = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, C]
        n = self.norm1(h)
        h = h + self.attn1(n, n)
        h = h + self.attn2(self.norm2(h), context)
        a, gate = self.ff_in(self.norm3(h)).chunk(2, dim=-1)
        h = h + self.ff_out(a * F.gelu(gate))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class UNetLayers(nn.ModuleList):
    """One step of the U-Net: hands the timestep embedding to residual blocks and the context to transformers."""

    def forward(self, x, emb, context):
        for m in self:
            x = m(x, emb) if isinstance(m, UNetResBlock) else m(x, context) if isinstance(m, SpatialTransformer) else m(x)
        return x


class UNet(nn.Module):
    """attention_resolutions are downsampling factors (LDM's convention): 2 means attention at 1/2 of the input size.
    forward(x, t, y) for class ids y [B] (num_classes + 1 embedding rows, the last one null), or with text_layers > 0
    for caption tokens y [B, 77] (a TextEncoder of width context_dim and text_layers layers; the empty caption is
    null), or forward(x, t, context=c) for any context c [B, L, context_dim] (then num_classes may be 0)."""

    def __init__(self, in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads,
                 context_dim, num_classes, learn_sigma=False, class_dropout_prob=0.1, text_layers=0):
        super().__init__()
        self.in_channels, self.model_channels, self.learn_sigma = in_channels, model_channels, learn_sigma
        self.num_classes = num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # the table keeps nn.Embedding's N(0, 1) init, as LDM's (the DiT sets std 0.02 in its own init)
        self.y_embedder = (TextEmbedder(TextEncoder(context_dim, text_layers), class_dropout_prob) if text_layers else
                           LabelEmbedder(num_classes, context_dim, class_dropout_prob) if num_classes else None)

        def level(cin, cout, ds):
            layers = [UNetResBlock(cin, cout, emb_dim)]
            if ds in attention_resolutions:
                layers.append(SpatialTransformer(cout, context_dim, num_heads))
            return layers

        self.input_blocks = nn.ModuleList([UNetLayers([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        skips, ch, ds = [model_channels], model_channels, 1  # skips: channels of every skip connection
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.input_blocks.append(UNetLayers(level(ch, mult * model_channels, ds)))
                ch = mult * model_channels
                skips.append(ch)
            if i < len(channel_mult) - 1:
                self.input_blocks.append(UNetLayers([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                ds *= 2
        self.middle_block = UNetLayers([UNetResBlock(ch, ch, emb_dim), SpatialTransformer(ch, context_dim, num_heads),
                                        UNetResBlock(ch, ch, emb_dim)])
        self.output_blocks = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for j in range(num_res_blocks + 1):
                layers = level(ch + skips.pop(), mult * model_channels, ds)
                ch = mult * model_channels
                if i > 0 and j == num_res_blocks:
                    layers.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                                nn.Conv2d(ch, ch, 3, padding=1)))
                    ds //= 2
                self.output_blocks.append(UNetLayers(layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # with the zero residual branches: output exactly 0 at init, as in ADM
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None, context=None, force_drop_ids=None):
        assert (y is None) != (context is None), "pass exactly one of y (class ids) and context"
        if y is not None:
            context = self.y_embedder(y, force_drop_ids)
            context = context[:, None] if context.dim() == 2 else context  # a class is one token, text is many
        emb = self.time_embed(TimestepEmbedder.timestep_embedding(t, self.model_channels))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

    forward_with_cfg = forward_with_cfg


UNet_models = {
    # LDM-4 on ImageNet (LDM's cin256-v2.yaml): attention at 1/2, 1/4, 1/8 of the 64x64x3 VQ-f4 latents
    "LDM-4": dict(model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2, attention_resolutions=(2, 4, 8),
                  num_heads=1, context_dim=512),
    # a small one for CPU runs and tests
    "LDM-S": dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                  num_heads=4, context_dim=256),
}


def build_model(name, input_size, **kwargs):
    """A DiT (DiT_models) or a U-Net (UNet_models) by name. kwargs: in_channels, num_classes, learn_sigma,
    class_dropout_prob, and for the U-Net text_layers and context_dim (which overrides the model's). The U-Net is
    convolutional: it takes any input_size divisible by 2^(levels - 1)."""
    if name in DiT_models:
        return DiT_models[name](input_size=input_size, **kwargs)
    if name in UNet_models:
        levels = len(UNet_models[name]["channel_mult"])
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"{name} downsamples {levels - 1} times: its input size must be divisible by "
                             f"{2 ** (levels - 1)}, got {input_size}")
        return UNet(**{**UNet_models[name], **kwargs})
    raise ValueError(f"model {name!r} is not one of {', '.join([*DiT_models, *UNet_models])}")


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
    schedule; samplers with fewer steps build one from a subsequence of timesteps (`respaced`).

    `prediction` is what the model's first C channels predict: "eps", the noise (DDPM, DiT, LDM), or "v" =
    sqrt(a) eps - sqrt(1 - a) x0 with a = alphas_cumprod (Salimans & Ho, 2022). At high noise x_t is almost all
    eps, so an eps-model must be very precise there for its x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) to mean anything;
    v tends to -x0 there instead, which a small model on a short budget learns far sooner.

    `min_snr_gamma` > 0 weights each sample's MSE so that its error on x0 counts min(SNR, gamma) times (Min-SNR-gamma,
    Hang et al., 2023; SNR = a / (1 - a)): the nearly clean timesteps, whose fine detail is cheap to learn, no longer
    dominate the gradient. 0: the plain MSE on eps or v."""

    def __init__(self, num_timesteps=1000, learn_sigma=True, prediction="eps", betas=None, timestep_map=None,
                 min_snr_gamma=0.0):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if betas is None:
            betas = np.linspace(1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps, num_timesteps)
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
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - self.alphas_cumprod)
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
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

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
        target = noise if self.prediction == "eps" else \
            self._at(self.sqrt_alphas_cumprod, t, x0) * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
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
