"""
The denoisers: DiT (Peebles & Xie, 2023) with adaLN-Zero blocks and LDM's U-Net with cross-attention, their class
embedding table (its last row the null class of classifier-free guidance) and classifier-free guidance itself.
`build_model(name, input_size)` makes any of them by name. A text-to-image U-Net takes its condition encoder as
`y_embedder` (text.py's TextEmbedder); the U-Net only asks of it y_embedder(y, force_drop_ids) and null_like(y).

DiT's parameter names and shapes are those of the official checkpoints, so DiT-XL-2-256x256.pt loads with
strict=True (pipeline.load_dit reads them, and diffusers' layout).

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

    def forward(self, t, extra=None):
        """extra: added to the timestep's sinusoids (a consistency student's guidance embedding)."""
        freqs = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freqs if extra is None else freqs + extra)


class GuidanceEmbedder(nn.Module):
    """A consistency student's guidance scale w, as LCM (Luo et al. 2023) embeds it: the sinusoids of 1000 w (256 of
    them, frequencies 10000^(-k / 127), sin then cos: diffusers' get_guidance_scale_embedding), through a linear map
    without bias into the timestep's sinusoids, to which it is added (diffusers' TimestepEmbedding.cond_proj). So the
    U-Net of LCM-SD (time_cond_proj_dim=256) loads as it is. Zero at first (ours; LCM's starts random), so that the
    student starts as exactly its teacher."""

    def __init__(self, dim, embedding_dim=256):
        super().__init__()
        self.cond_proj = nn.Linear(embedding_dim, dim, bias=False)
        nn.init.zeros_(self.cond_proj.weight)

    def forward(self, w):
        half = self.cond_proj.in_features // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000) / (half - 1)))
        args = w.float()[:, None] * 1000 * freqs[None]
        return self.cond_proj(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class, used for classifier-free guidance.

    `perturb` is a hook for condition embedding perturbation (cep.py) or embedding dropout: a module that is
    applied to the embeddings of real classes in training mode only, never to the null class. `smoothing` eps > 0
    is label smoothing carried into the embedding (a baseline of the paper, which does not say how it enters an
    embedding layer; our reading): the smoothed target (1 - eps) onehot(y) + eps / K through the table, i.e.
    (1 - eps) e_y + eps mean_k(e_k), in training only."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.perturb, self.smoothing = None, 0.0

    def forward(self, labels, force_drop_ids=None):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids, self.num_classes, labels)
        emb = self.embedding_table(labels)
        real = (labels != self.num_classes)[:, None]
        if self.smoothing > 0 and self.training:
            mean = self.embedding_table.weight[:self.num_classes].mean(0)
            emb = torch.where(real, (1 - self.smoothing) * emb + self.smoothing * mean, emb)
        if self.perturb is not None and self.training:
            emb = torch.where(real, self.perturb(emb), emb)
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


def forward_with_cfg(model, x, t, y, cfg_scale, **inputs):
    """Classifier-free guidance in one batched forward: eps = eps(null) + s * (eps(y) - eps(null)), for the DiT and
    the U-Net alike, class labels or caption tokens. Guides all channels (the official DiT guides only the first 3 of
    4 latent channels, a bug not copied here); the learned variance is taken from the conditional half. `inputs`:
    more per-sample inputs (an adapter's control image, control.py), given to both halves."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, model.y_embedder.null_like(y)]),
                **{k: torch.cat([v, v]) for k, v in inputs.items()})
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
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, guidance_embed=False):
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
        # a consistency student's (distill.py): after the init, which would overwrite its zeros
        self.w_embedder = GuidanceEmbedder(self.t_embedder.frequency_embedding_size) if guidance_embed else None

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

    def forward(self, x, t, y, force_drop_ids=None, control=None, w=None):
        """x: [N, C, H, W] noisy input, t: [N] timesteps, y: [N] class labels (num_classes = the null class).
        control (a ControlNet, control.py): (tokens, c) -> residuals added to the outputs of the first blocks.
        w: [N] guidance scales, the input of a consistency student (guidance_embed)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t, None if w is None else self.w_embedder(w)) + self.y_embedder(y, force_drop_ids)
        residuals = control(x, c) if control is not None else []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i < len(residuals):
                x = x + residuals[i]
        return self.unpatchify(self.final_layer(x, c))

    forward_with_cfg = forward_with_cfg


DiT_sizes = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
             "Ti": (6, 192, 3)}  # Ti is ours: a tiny size for CPU runs, not in the DiT paper


def _make(depth, hidden, heads, patch):
    return lambda **kw: DiT(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kw)


DiT_models = {f"DiT-{size}/{p}": _make(*DiT_sizes[size], p) for size in DiT_sizes for p in (2, 4, 8)}


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
            if isinstance(m, UNetResBlock):
                x = m(x, emb)
            elif isinstance(m, SpatialTransformer):
                x = m(x, context)
            else:
                x = m(x)
        return x


class UNet(nn.Module):
    """attention_resolutions are downsampling factors (LDM's convention): 2 means attention at 1/2 of the input size.
    forward(x, t, y) for class ids y [B] (num_classes + 1 embedding rows, the last one null), or for what a given
    `y_embedder` takes (text.TextEmbedder: caption tokens [B, 77] -> [B, 77, context_dim]), or forward(x, t, context=c)
    for any context c [B, L, context_dim] (then num_classes may be 0)."""

    def __init__(self, in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads,
                 context_dim, num_classes, learn_sigma=False, class_dropout_prob=0.1, y_embedder=None,
                 guidance_embed=False):
        super().__init__()
        self.in_channels, self.model_channels, self.learn_sigma = in_channels, model_channels, learn_sigma
        self.channel_mult, self.num_res_blocks = channel_mult, num_res_blocks  # the layout, for control.py
        self.num_classes = num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.w_embedder = GuidanceEmbedder(model_channels) if guidance_embed else None  # a consistency student's
        # the class table keeps nn.Embedding's N(0, 1) init, as LDM's (the DiT sets std 0.02 in its own init)
        if y_embedder is None and num_classes:
            y_embedder = LabelEmbedder(num_classes, context_dim, class_dropout_prob)
        self.y_embedder = y_embedder

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

    def forward(self, x, t, y=None, context=None, force_drop_ids=None, control=None, w=None):
        """control (a ControlNet or T2I-Adapter, control.py): (x, emb, context) -> (features, residuals): features
        {i: f} are added to the output of input block i, which goes on through the encoder (T2I-Adapter);
        residuals, one per input block and one for the middle block, only to the skips and the middle block's
        output (ControlNet). w: [B] guidance scales, the input of a consistency student (guidance_embed)."""
        assert (y is None) != (context is None), "pass exactly one of y (class ids) and context"
        if y is not None:
            context = self.y_embedder(y, force_drop_ids)
            context = context[:, None] if context.dim() == 2 else context  # a class is one token, text is many
        freqs = TimestepEmbedder.timestep_embedding(t, self.model_channels)
        emb = self.time_embed(freqs if w is None else freqs + self.w_embedder(w))
        features, residuals = control(x, emb, context) if control is not None else ({}, None)
        hs, h = [], x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i in features:
                h = h + features[i]
            hs.append(h)
        h = self.middle_block(h, emb, context)
        if residuals is not None:
            hs = [s + r for s, r in zip(hs, residuals)]
            h = h + residuals[-1]
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

    forward_with_cfg = forward_with_cfg


UNet_models = {
    # LDM-4 on ImageNet (LDM's cin256-v2.yaml): attention at 1/2, 1/4, 1/8 of the 64x64x3 VQ-f4 latents
    "LDM-4": dict(model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2, attention_resolutions=(2, 4, 8),
                  num_heads=1, context_dim=512),
    # Stable Diffusion v1's (diffusers' UNet2DConditionModel, attention_head_dim 8) on 64x64x4 KL-f8 latents
    "SD-1.5": dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(1, 2, 4),
                   num_heads=8, context_dim=768),
    # a small one for CPU runs and tests
    "LDM-S": dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                  num_heads=4, context_dim=256),
}


def build_model(name, input_size, **kwargs):
    """A DiT (DiT_models) or a U-Net (UNet_models) by name. kwargs: in_channels, num_classes, learn_sigma,
    class_dropout_prob, and for the U-Net y_embedder and context_dim (which overrides the model's). The U-Net is
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
