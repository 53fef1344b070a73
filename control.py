"""
Downstream adaptation (the paper's Section 3.2): a frozen pre-trained denoiser steered by a control image through a
trainable adapter, and the Canny edges the paper uses as one of its controls.

- ControlNet (Zhang et al. 2023) for the U-Net: a trainable copy of the encoder and middle block, fed the control
  through a small convolutional hint encoder; its features join the frozen U-Net's skip connections and middle
  block through zero-initialised 1x1 convolutions. For the DiT, as PixArt's ControlNet: a trainable copy of the
  first N blocks, joined to the frozen blocks' outputs through zero-initialised linear layers.
- T2I-Adapter (Mou et al. 2023): a light convolutional network whose multi-scale features are added to the frozen
  U-Net's encoder features, one per resolution.
- `Adapted(base, adapter)`: the frozen model and its adapter as one denoiser, forward(x, t, y, hint).
- `cached_controls`: the controls of a dataset computed once and cached on disk, as data.py caches latents.

At initialisation every adapter's output is exactly zero, so the adapted model is the pre-trained one.
Imports only model.py.
"""
import hashlib
import os
import uuid
from copy import deepcopy
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model import UNet, forward_with_cfg

# -----------------------------------------------------------------------------
# Canny edges, as OpenCV's cv2.Canny computes them (the paper: thresholds 100 and 200)


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of float images [B, C, H, W], borders reflected (OpenCV's default), kernel size
    2*round(3 sigma)+1 (OpenCV's for 8-bit images with ksize=(0, 0))."""
    radius = max(1, round(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = (k / k.sum()).repeat(x.shape[1], 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=x.shape[1])


@torch.no_grad()
def canny(images, low=100, high=200, sigma=0.0):
    """Canny edges of uint8 images [B, C, H, W] (or [C, H, W]) -> uint8 [B, 1, H, W], 255 on edges. As cv2.Canny:
    3x3 Sobel gradients on the 8-bit values, borders replicated, the L1 magnitude |dx| + |dy|, of a colour image
    the channel where it is largest; non-maximum suppression along the gradient quantised to 0, 45, 90 or 135
    degrees; a pixel is strong above `high`, weak above `low`, and weak pixels 8-connected to strong ones are
    edges (hysteresis). cv2.Canny does not blur: sigma > 0 first blurs with a Gaussian (rounded back to 8 bits,
    as cv2.GaussianBlur would), the textbook first step; the paper's annotator (ControlNet's) did not."""
    x = images[None] if images.dim() == 3 else images
    x = x.float()
    if sigma > 0:
        x = gaussian_blur(x, sigma).round()
    B, C, H, W = x.shape
    p = F.pad(x.reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device)
    dx = F.conv2d(p, sobel[None, None]).reshape(B, C, H, W)
    dy = F.conv2d(p, sobel.t()[None, None]).reshape(B, C, H, W)
    mag = dx.abs() + dy.abs()
    best = mag.argmax(dim=1, keepdim=True)  # the first channel of the largest magnitude, as OpenCV
    dx, dy, mag = dx.gather(1, best), dy.gather(1, best), mag.gather(1, best)
    # neighbours along the gradient, the magnitude being 0 outside the image
    m = F.pad(mag, (1, 1, 1, 1))
    at = lambda i, j: m[:, :, 1 + i:1 + i + H, 1 + j:1 + j + W]
    ax, ay = dx.abs().long() << 15, dy.abs().long() << 15
    tan22 = ax // 32768 * 13573  # OpenCV's fixed point: tan(22.5 degrees) = 13573 / 2^15
    horizontal, vertical = ay < tan22, ay > tan22 + 2 * ax  # tan(67.5) = tan(22.5) + 2
    s = torch.where(dx * dy < 0, -1, 1)  # diagonal: the gradient goes down-right (s=1) or down-left (s=-1)
    diag = torch.where(s > 0, (mag > at(-1, -1)) & (mag > at(1, 1)), (mag > at(-1, 1)) & (mag > at(1, -1)))
    # the strict / non-strict comparisons are OpenCV's: of two equal neighbours, the first keeps the edge
    peak = torch.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                       torch.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), diag))
    weak = peak & (mag > low)
    edges = weak & (mag > high)
    while True:  # grow the strong edges into the weak pixels they touch, until nothing changes
        grown = weak & (F.max_pool2d(edges.float(), 3, 1, 1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    out = edges.to(torch.uint8) * 255
    return out[0] if images.dim() == 3 else out


def control_image(kind, images, controls=None):
    """The adapter's input [B, 3, H, W] in [0, 1]: for kind canny the edges of `images` ([-1, 1], as datasets give
    them), else the dataset's control images `controls` ([-1, 1])."""
    if kind == "canny":
        return canny(((images + 1) * 127.5).round().to(torch.uint8)).div(255).expand(-1, 3, -1, -1)
    return (controls + 1) / 2


def cached_controls(dataset, kind, folder, batch_size=64, num_workers=0, multiprocessing_context=None):
    """The control image of every item of `dataset` as adaptation feeds it (control_image of the unflipped item), uint8
    [n, C, H, W] (C = 1 for Canny), computed once into folder/controls-<key>.npy (written whole: a .tmp of its writer's
    own made on disk, then renamed) and read back memory-mapped, like data.py's latents. The key is the dataset's
    content (its images' and control images' paths, sizes and modification times; for the built-in shapes, the
    parameters they are drawn from and the first 16 drawings, so a change to the drawing code misses), its length and
    resolution, and the control's settings (kind; for Canny its thresholds). multiprocessing_context: the loader
    workers' start method (a script with top-level code needs fork: training.worker_start)."""
    files = [*getattr(dataset, "paths", []), *(getattr(dataset, "controls", None) or [])]
    content = "\n".join(f"{os.path.abspath(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files) or \
        repr(dataset.params) + hashlib.sha1(np.stack([dataset.render(i) for i in range(16)]).tobytes()).hexdigest()
    settings = f"{type(dataset).__name__}|{len(dataset)}|{dataset.resolution}|{kind}|{canny.__defaults__}|{content}"
    if getattr(dataset, "flip", False):
        raise ValueError("cached controls are of the unflipped images: set flip=False (diffusers' ControlNet and "
                         "T2I-Adapter scripts do not flip either), or leave control_cache empty")
    path = os.path.join(folder, f"controls-{hashlib.sha1(settings.encode()).hexdigest()[:20]}.npy")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=num_workers,
                                             multiprocessing_context=multiprocessing_context)
        out, start = None, 0
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:16]}.tmp"  # this writer's own: two runs may share a cache
        try:
            for images, _, *controls in tqdm(loader, desc=f"{kind} controls, once", leave=False):
                c = control_image(kind, images, *controls)[:, :1 if kind == "canny" else 3].mul(255).round()
                if out is None:
                    out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(dataset), *c.shape[1:]))
                out[start:start + len(c)], start = c.to(torch.uint8).numpy(), start + len(c)
            out.flush()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return np.load(path, mmap_mode="r")


# -----------------------------------------------------------------------------
# Adapters


def zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class HintEncoder(nn.Module):
    """ControlNet's input hint block: 3x3 convolutions and SiLUs from the control image (pixels, [0, 1]) down to the
    denoiser's resolution (`downsample`, a power of 2: one stride-2 stage per factor 2), then a zero-initialised
    3x3 convolution to `out_channels`. Widths 16, 32, 64, ... are ours (ControlNet's: 16, 32, 96, 256 for 8x)."""

    def __init__(self, out_channels, downsample, hint_channels=3, width=16):
        super().__init__()
        layers, c = [nn.Conv2d(hint_channels, width, 3, padding=1), nn.SiLU()], width
        for _ in range(downsample.bit_length() - 1):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU()]
            c *= 2
        self.net = nn.Sequential(*layers, zero(nn.Conv2d(c, out_channels, 3, padding=1)))

    def forward(self, hint):
        return self.net(hint)


def out_channels(block):
    """Channels of what a U-Net input block puts out: those of its last convolution (every block ends in one)."""
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class UNetControlNet(nn.Module):
    """A trainable copy of the U-Net's encoder and middle block; the hint joins after the first convolution, and
    each input block's output and the middle block's go through a zero 1x1 convolution to the frozen U-Net's skips
    and middle. The timestep embedding and the context are the frozen U-Net's (ControlNet copies the timestep MLP
    too; it does not depend on the control, so ours shares it)."""

    def __init__(self, unet, downsample):
        super().__init__()
        self.input_blocks, self.middle_block = deepcopy(unet.input_blocks), deepcopy(unet.middle_block)
        self.input_blocks.requires_grad_(True), self.middle_block.requires_grad_(True)
        self.hint = HintEncoder(unet.model_channels, downsample)
        channels = [out_channels(b) for b in unet.input_blocks] + [out_channels(unet.middle_block)]
        self.zero_convs = nn.ModuleList([zero(nn.Conv2d(c, c, 1)) for c in channels])

    def forward(self, hint, x, emb, context):
        h, outs = x, []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context) + (self.hint(hint) if i == 0 else 0)
            outs.append(h)
        outs.append(self.middle_block(h, emb, context))
        return {}, [conv(h) for conv, h in zip(self.zero_convs, outs)]


class DiTControlNet(nn.Module):
    """PixArt's ControlNet for the DiT: a trainable copy of the first `depth` blocks (PixArt: 13 of 28; ours: half)
    takes the tokens plus the hint's (the hint encoder patchifies the control image to the token grid), and the
    output of copy k, through a zero linear layer, is added to the output of frozen block k."""

    def __init__(self, dit, downsample, depth=None):
        super().__init__()
        depth = depth or len(dit.blocks) // 2
        hidden = dit.pos_embed.shape[-1]
        self.blocks = deepcopy(dit.blocks[:depth]).requires_grad_(True)
        self.hint = HintEncoder(hidden, downsample * dit.patch_size)
        self.zero_linears = nn.ModuleList([zero(nn.Linear(hidden, hidden)) for _ in range(depth)])

    def forward(self, hint, x, c):
        h, outs = x + self.hint(hint).flatten(2).transpose(1, 2), []
        for block, linear in zip(self.blocks, self.zero_linears):
            h = block(h, c)
            outs.append(linear(h))
        return outs


class AdapterResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class T2IAdapter(nn.Module):
    """T2I-Adapter (its "full" adapter): pixel-unshuffle the control image to the U-Net's input resolution, a 3x3
    convolution, then per U-Net level (a stride-2 convolution from the second on) two residual blocks; the feature
    of level k is added to the U-Net's encoder after the last residual block of level k, and goes on through the
    encoder. Unlike the original, each feature leaves through a zero 1x1 convolution (ours), so that the adapted
    model starts exactly as the pre-trained one."""

    def __init__(self, unet, downsample):
        super().__init__()
        self.downsample = downsample
        channels = [m * unet.model_channels for m in unet.channel_mult]
        self.blocks_at = [k * (unet.num_res_blocks + 1) + unet.num_res_blocks for k in range(len(channels))]
        self.conv_in = nn.Conv2d(3 * downsample ** 2, channels[0], 3, padding=1)
        self.levels = nn.ModuleList([nn.Sequential(
            nn.Conv2d(channels[max(k - 1, 0)], c, 3, stride=2 if k else 1, padding=1),
            AdapterResBlock(c), AdapterResBlock(c)) for k, c in enumerate(channels)])
        self.outs = nn.ModuleList([zero(nn.Conv2d(c, c, 1)) for c in channels])

    def forward(self, hint, x, emb, context):
        h, features = self.conv_in(F.pixel_unshuffle(hint, self.downsample)), {}
        for i, level, out in zip(self.blocks_at, self.levels, self.outs):
            h = level(h)
            features[i] = out(h)
        return features, None


class Adapted(nn.Module):
    """A frozen pre-trained denoiser and its trainable adapter, as one denoiser: forward(x, t, y, hint) with the
    control image `hint` [B, 3, H, W] in [0, 1] at the resolution of the images (not of the latents)."""

    def __init__(self, base, adapter):
        super().__init__()
        self.base, self.adapter = base.requires_grad_(False), adapter

    def forward(self, x, t, y, hint, force_drop_ids=None):
        return self.base(x, t, y, force_drop_ids=force_drop_ids, control=partial(self.adapter, hint))

    forward_with_cfg = forward_with_cfg
    # what the samplers and the training loop ask of a denoiser
    in_channels = property(lambda self: self.base.in_channels)
    learn_sigma = property(lambda self: self.base.learn_sigma)
    num_classes = property(lambda self: self.base.num_classes)
    y_embedder = property(lambda self: self.base.y_embedder)


def adapt(base, kind, downsample):
    """`base` frozen, with a new adapter: kind controlnet (U-Net or DiT) or t2i (U-Net); `downsample`: images per
    denoiser pixel (the first stage's factor, 1 in pixel space). A model with no place for the adapter: an error."""
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"the control image is {downsample}x the denoiser's input: the hint encoder needs a "
                         "power of 2")
    if kind == "t2i" and not isinstance(base, UNet):
        raise ValueError("adapter=t2i adds multi-scale features to a U-Net's encoder, and this checkpoint's model is a "
                         "DiT, which has none: use adapter=controlnet (PixArt's ControlNet for the DiT)")
    if kind not in ("controlnet", "t2i"):
        raise ValueError(f"adapter must be controlnet or t2i, got {kind!r}")
    if kind == "t2i":
        adapter = T2IAdapter(base, downsample)
    elif isinstance(base, UNet):
        adapter = UNetControlNet(base, downsample)
    else:
        adapter = DiTControlNet(base, downsample)
    return Adapted(base, adapter)
