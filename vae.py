"""
First stages of latent diffusion: the Stable Diffusion KL-f8 VAE (what DiT trains on: 256x256x3 images <-> 32x32x4
latents) and LDM's VQ-f4 autoencoder (LDM-4: 256x256x3 <-> 64x64x3), and the loading of their diffusers weight files.

Both are written in diffusers' parameter layout (AutoencoderKL, VQModel), so diffusers' weight files load without
renaming: `load_first_stage(folder)` builds the one that config.json names and loads its weights, from a local folder,
the torch hub cache, or (on a machine with internet) the Hugging Face URL.

Imports nothing from the project: copy this file into another project as it is.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # for the key name to_out.0 (diffusers' to_out.1: a dropout)

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
    """2x nearest upsampling then a conv, or a stride-2 conv on the input padded right and bottom only (as LDM
    trained)."""

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


def load_diffusers_weights(model, path, name, url=None):
    """Loads diffusers' weights into `model` (strict); see read_diffusers_weights."""
    model.load_state_dict(read_diffusers_weights(path, name, url))
    return model


def read_diffusers_weights(path, name, url=None):
    """The state dict of diffusers' diffusion_pytorch_model.safetensors (if the safetensors package is importable) or
    .bin. `path` is the file itself, or a folder holding it directly or in a vae/ or vqvae/ subfolder (the layouts
    of the Hugging Face repos). With path=None the folder is <torch hub dir>/checkpoints/<name>, and a missing file
    is downloaded there from `url` when the machine has internet."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    default = path is None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name) if default else os.fspath(path)
    exts = ("safetensors", "bin") if load_file else ("bin",)
    files = [path]
    if not os.path.isfile(path):
        files = [os.path.join(path, sub, f"diffusion_pytorch_model.{ext}") for sub in ("", "vae", "vqvae")
                 for ext in exts]
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
            f"vqvae/ subfolder). " + (f"Download {url} and save it as {dest}, or pass" if url else "Pass") +
            " the folder that holds it.")
    f = found[0]
    return load_file(f) if f.endswith(".safetensors") else torch.load(f, map_location="cpu", weights_only=True)


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
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8]: the posterior's mean, or a sample."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        if sample:
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)
        return mean * self.scale

    def decode(self, z):
        """Scaled latents -> images in about [-1, 1]; not clamped, so that this equals diffusers' decode."""
        return self.decoder(self.post_quant_conv(z / self.scale))

    def load_pretrained(self, path=None):
        return load_diffusers_weights(self, path, "sd-vae-ft-ema", "https://huggingface.co/stabilityai/sd-vae-ft-ema"
                                      "/resolve/main/diffusion_pytorch_model.bin")


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
        return load_diffusers_weights(self, path, "ldm-vq-f4", "https://huggingface.co/CompVis/ldm-celebahq-256"
                                      "/resolve/main/vqvae/diffusion_pytorch_model.bin")


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


