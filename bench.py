"""
Throughput, in one table: training steps of the DiTs (on 32x32x4 latents) and U-Nets, each DiT beside diffusers'
DiTTransformer2DModel on the same weights; sampling with guidance; FID features beside pytorch-fid. Or
(--suite=speedups) eager against compiled and CUDA graphs, and the attention kernels, in one run (docs/speed.md).

  python bench.py                               # CPU: DiT-S/2 and LDM-S, small batches, eager (a few minutes)
  python bench.py                               # GPU: DiT-S/2, B/2, XL/2, LDM-S, LDM-4 at batch 32, eager/compiled
  python bench.py --suite=speedups --sample_batch_size=128 --csv=out/speedups.csv   # GPU, about 8 minutes

A training step is train.py's (autocast, hybrid loss, backward, clipping, fused AdamW, EMA); sampling is sample()'s
with guidance. Training and features: medians of `steps` repeats after `warmup` (which also compile), the compared
implementations in turn, so that both see the same load; sampling: one run after a warm-up. MFU: the model's matmul
FLOPs (forward_flops; a training step is 3 forwards) over the GPU's dense bf16 or TF32 peak. Rows needing diffusers
or pytorch-fid are skipped without them.
"""
import csv as csv_module  # as csv_module: `csv` is the name of an option
import gc
import os
import statistics
import sys
import time
from copy import deepcopy
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fid
from configurator import atomic_write, configure
from diffusion import GaussianDiffusion
from model import DiT, DiT_models, DiT_sizes, SpatialTransformer, UNet, UNetResBlock, build_model
from pipeline import load_dit, sample
from vae import AutoencoderKL, VQModel

device = "cuda" if torch.cuda.is_available() else "cpu"  # the defaults below follow the machine
models = "DiT-S/2,DiT-B/2,DiT-XL/2,LDM-S,LDM-4" if device == "cuda" else "DiT-S/2,LDM-S"
batch_size = 32 if device == "cuda" else 4         # 32: DiT's per-GPU batch (256 on 8 GPUs)
sample_batch_size = 32 if device == "cuda" else 2   # images; the guided forward sees twice as many
compile = "both" if device == "cuda" else "off"     # off | on | both
dtypes = "float32,bfloat16"
steps = 10 if device == "cuda" else 3
warmup = 3 if device == "cuda" else 1
sampler = "dpm++"                       # sample.py's default, DPM-Solver++(2M): one forward a step
sample_steps = 50
cfg_scale = 4.0
fid_images = 512 if device == "cuda" else 16       # 256x256 uint8 images through the FID Inception; 0: none
compare = True                          # the diffusers and pytorch-fid rows, when those packages are installed
csv = ""                                # also write the table to this CSV file, and beside it a .md with the notes
seed = 0
# suite=speedups: eager against compiled on one GPU, the rows docs/speed.md owes (see jobs())
suite = "table"                         # table: the models x compile x dtypes grid above | speedups
sample_models = "DiT-XL/2,LDM-4" if device == "cuda" else "DiT-S/2"  # sampling: eager, then compiled (CUDA graphs)
graph_models = "DiT-S/2,LDM-S"          # training steps at batch_size: eager against reduce-overhead (CUDA graphs)
mfu_model = "DiT-XL/2" if device == "cuda" else "DiT-S/2"  # training, eager and compiled, at mfu_batch_size
mfu_batch_size = 256 if device == "cuda" else 4  # halved until the eager step fits the GPU

# dense tensor-core peaks in TFLOP/s (bfloat16, TF32), from NVIDIA's data sheets; the first name found in the
# device's name is taken
PEAK_TFLOPS = {"H100 PCIe": (756, 378), "H100": (989, 494), "H200": (989, 494), "A100": (312, 156)}


def forward_flops(model, input_size, context_len=1):
    """FLOPs (2 per multiply-add) of the matmuls, convolutions and attention of one forward pass on one sample,
    counted from the layer shapes. Norms, activations and other elementwise work are left out, as in MFU."""
    lin = lambda m, n=1: 2 * m.weight.numel() * n  # a linear layer applied to n tokens
    if isinstance(model, DiT):
        n, d = (input_size // model.patch_size) ** 2, model.pos_embed.shape[-1]
        # the adaLN and timestep MLPs see one vector per sample, every other layer each of the n tokens
        flops = sum(lin(m, 1 if "adaLN" in name or "t_embedder" in name else n)
                    for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        return flops + len(model.blocks) * 4 * n * n * d  # q k^T and attn v
    assert isinstance(model, UNet), type(model)
    conv = lambda m, side: lin(m, (side // m.stride[0]) ** 2)

    def layers(modules, side):
        flops = 0
        for m in modules:
            if isinstance(m, nn.Conv2d):
                flops += conv(m, side)
                side //= m.stride[0]
            elif isinstance(m, nn.Sequential):  # nearest upsampling, then a conv
                side *= 2
                flops += conv(m[1], side)
            elif isinstance(m, UNetResBlock):
                flops += conv(m.conv1, side) + conv(m.conv2, side) + lin(m.emb)
                flops += conv(m.skip, side) if isinstance(m.skip, nn.Conv2d) else 0
            else:
                assert isinstance(m, SpatialTransformer), type(m)
                n, c = side ** 2, m.proj_in.out_channels
                per_token = [m.proj_in, m.proj_out, m.attn1.q, m.attn1.kv, m.attn1.proj, m.attn2.q, m.attn2.proj,
                             m.ff_in, m.ff_out]
                flops += sum(lin(layer, n) for layer in per_token) + lin(m.attn2.kv, context_len)
                flops += 4 * n * n * c + 4 * n * context_len * c
        return flops, side

    flops, side = lin(model.time_embed[0]) + lin(model.time_embed[2]), input_size
    for block in [*model.input_blocks, model.middle_block, *model.output_blocks]:
        f, side = layers(block, side)
        flops += f
    return flops + conv(model.out[-1], side)


def seconds(fn):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fns):
    """Median seconds per call of each function; the functions are called in turn, so that they share the load."""
    times = [[seconds(fn) for fn in fns] for _ in range(warmup + steps)][warmup:]
    return [statistics.median(ts) for ts in zip(*times)]


def host_syncs(fn):
    """Whether fn makes the host wait for the GPU, which starves the GPU of queued kernels."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "makes no host-device sync"
    except RuntimeError as e:
        return f"syncs: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def on_cudnn(forward, *args):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return forward(*args)


def attention_kernels(fn):
    """The names of the attention kernels one call of fn runs on the GPU (the profiler's), to tell which SDPA chose."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ("flash", "fmha", "sdpa", "attn"))}
    return ", ".join(sorted(name[:60] for name in names)) or "none found"


def train_step(net, forward, channels, side, dtype, learn_sigma, batch):
    """train.py's training step on a batch of random latents, for forward(x_t, t, y) -> model output."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ema = [p.detach().clone() for p in params]
    diffusion = GaussianDiffusion(learn_sigma=learn_sigma)
    x0 = torch.randn(batch, channels, side, side, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            out = forward(x_t, t, y)
        loss = diffusion.training_loss(out, x0, x_t, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema, params, 1e-4)
    return step


def diffusers_twin(name):
    """diffusers' DiTTransformer2DModel configured as DiT_models[name], and our DiT with its weights. The embedders
    that diffusers keeps in every block are made copies of block 0's, as in converted checkpoints, and its timestep
    frequencies k/127 set to the official k/128 (neither changes its speed), so that both compute the same function;
    the weights are random.
    None, None where diffusers is not installed."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        return None, None
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden, heads = DiT_sizes[size]
    ref = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                out_channels=8, num_layers=depth, sample_size=32, patch_size=int(patch),
                                num_embeds_ada_norm=1000, norm_eps=1e-6)
    for p in ref.parameters():  # not DiT's zeroed initialisation, under which both output zeros and agree trivially
        nn.init.normal_(p, std=0.02)
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    return load_dit(ref.state_dict(), input_size=32, num_heads=heads), ref


def latent_shape(name):
    return (3, 64) if name == "LDM-4" else (4, 32)  # LDM-4 on its 64x64x3 VQ-f4 latents, the others on SD's 32x32x4


def bench_model(name, use_compile, dtype):
    """Rows for the training step (diffusers' beside ours for a DiT) and for sampling of one model, and notes."""
    torch.manual_seed(seed)
    channels, side = latent_shape(name)
    dit, notes = name in DiT_models, []
    net, ref = diffusers_twin(name) if dit and compare else (None, None)
    if dit and compare and ref is None:
        notes.append(f"diffusers is not installed: the diffusers row of {name} is skipped (pip install diffusers)")
    if ref is not None:
        x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), torch.tensor([1, 1000])
        with torch.no_grad():
            a, b = net.eval()(x, t, y), ref.eval()(x, t, y).sample
        notes.append(f"{name}: on the same weights, ours and diffusers' outputs differ by "
                     f"{((a - b).abs().max() / b.abs().max()).item():.1e} of their largest value")
    net = net or build_model(name, side, in_channels=channels, num_classes=1000, learn_sigma=dit)
    if isinstance(net, UNet) and not device.startswith("cuda"):  # as train.py
        net = net.to(memory_format=torch.channels_last)
    impls = [(net, net)] + ([(ref, lambda x, t, y: ref(x, t, y).sample)] if ref is not None else [])
    for module, _ in impls:
        module.to(device).train()
        if use_compile:
            module.compile()  # in place, so that forward_with_cfg, which sample() calls, runs compiled too
    step_fns = [train_step(module, forward, channels, side, dtype, dit, batch_size) for module, forward in impls]
    times = timed(step_fns)
    config = f"{name}, {'compiled' if use_compile else 'eager'}, {dtype_name(dtype)}"
    if device.startswith("cuda"):
        notes.append(f"{config}: our training step {host_syncs(step_fns[0])}")
    rows = [dict(task="train", model=model, input=f"{side}x{side}x{channels}", batch=batch_size, seconds=s,
                 images=batch_size, flops=3 * forward_flops(net, side) * batch_size)
            for model, s in zip([name, f"{name} (diffusers)"], times)]
    if len(times) == 2:
        notes.append(f"{config}: our training step is {times[1] / times[0]:.2f}x as fast as diffusers'")
    impls = step_fns = ref = None  # frees the diffusers twin before sampling
    net.eval()
    labels = torch.arange(sample_batch_size, device=device) % 1000
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def sampling(num_steps):
        def run():
            with autocast:
                sample(net, labels, cfg_scale, sampler, num_steps, size=side,
                       generator=torch.Generator(device).manual_seed(seed))
        return run
    sampling(2)()  # the warm-up (and the compilation); then one run, itself an average over sample_steps forwards
    s = seconds(sampling(sample_steps))
    forwards = sample_steps * sample_batch_size * (1 if cfg_scale == 1 else 2)
    rows.append(dict(task=f"sample, {sampler} {sample_steps} steps, cfg {cfg_scale}", model=name,
                     input=f"{side}x{side}x{channels}", batch=sample_batch_size, seconds=s, images=sample_batch_size,
                     flops=forwards * forward_flops(net, side)))
    return [dict(r, compile="yes" if use_compile else "no", dtype=dtype_name(dtype)) for r in rows], notes


def random_inception():
    """The FID Inception with random weights that keep activations O(1), like trained ones (tiny weights would
    push activations into denormals, slow on CPU and unrealistic). The state dict is returned for pytorch-fid."""
    g = torch.Generator().manual_seed(seed)
    model, sd = fid.InceptionV3().eval(), {}
    for k, v in model.state_dict().items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            sd[k] = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
        elif v.is_floating_point():
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = v
    model.load_state_dict(sd)
    return model.to(device), sd


def bench_inception():
    """fid.py's features of uint8 images, and pytorch-fid's inner loop (uint8 -> float -> model, no file decoding:
    that favours it) on the same weights and images."""
    ours, sd = random_inception()
    images = np.random.default_rng(seed).integers(0, 256, (fid_images, 256, 256, 3), dtype=np.uint8)
    fns = [lambda: fid.compute_features(images, ours, batch_size, device, progress=False, keys=("pool",))]
    names, notes = ["fid.py"], []
    pfi = None
    if compare:
        try:
            import pytorch_fid.inception as pfi
        except ImportError:
            notes.append("pytorch-fid is not installed: its row is skipped (pip install pytorch-fid)")
    if pfi is not None:
        pfi.load_state_dict_from_url = lambda *a, **k: sd  # no download: the same random weights
        ref = pfi.InceptionV3([3]).eval().to(device)

        @torch.inference_mode()
        def run_ref():  # in full float32 as fid.py: cuDNN's default TF32 would be faster, less exact
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                for i in range(0, fid_images, batch_size):
                    x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float().div(255)
                    ref(x)[0].squeeze(3).squeeze(2).cpu()
        fns.append(run_ref)
        names.append("pytorch-fid")
    times = timed(fns)
    rows = [dict(task="FID Inception features", model=f"Inception-v3 ({n})", input="256x256x3 uint8",
                 batch=batch_size, seconds=s, images=fid_images, flops=0, compile="no", dtype="float32")
            for n, s in zip(names, times)]
    if len(times) == 2:
        notes.append(f"FID features: fid.py is {times[1] / times[0]:.2f}x as fast as pytorch-fid")
    return rows, notes


def random_model(name):
    """The model `name` on its latents, with every zero-initialised weight drawn from N(0, 0.02^2): at DiT's adaLN-Zero
    init (and the U-Net's zero convolutions) the output is 0, on which eager and compiled samples agree trivially."""
    torch.manual_seed(seed)
    channels, side = latent_shape(name)
    net = build_model(name, side, in_channels=channels, num_classes=1000, learn_sigma=name in DiT_models)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    return net.to(device), channels, side


def relative_difference(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sampling_rows(name):
    """sample.py's sampling with guidance (DPM-Solver++ 50 steps) and the first stage's decode (random weights: as
    fast as trained), one batch a row: eager in bfloat16 at batch 32 (the table's), then at sample_batch_size eager in
    float32 and bfloat16 and compiled in bfloat16 (a CUDA graph on GPU), from one seed. FLOPs: the denoiser's."""
    net, channels, side = random_model(name)
    net.eval()
    vae = (AutoencoderKL() if channels == 4 else VQModel()).to(device).eval()
    rows, out, cuda, first = [], {}, device.startswith("cuda"), min(32, sample_batch_size)
    runs = [(first, False, torch.bfloat16)] + [(sample_batch_size, False, torch.float32),
                                               (sample_batch_size, False, torch.bfloat16),
                                               (sample_batch_size, True, torch.bfloat16)]
    for batch, use_compile, dtype in runs:
        def run(num_steps):
            out[use_compile, dtype] = sample(net, torch.arange(batch, device=device) % 1000, cfg_scale, sampler,
                                             num_steps, size=side, vae=vae, dtype=dtype, compile=use_compile,
                                             generator=torch.Generator(device).manual_seed(seed))
        run(3)  # the warm-up: compiles, records the CUDA graph at the second step, replays it at the third
        compile_mode = "no"
        if use_compile:
            compile_mode = "default"
            if cuda:
                compile_mode = "reduce-overhead"
        rows.append(dict(task=f"sample, {sampler} {sample_steps} steps, cfg {cfg_scale}, {type(vae).__name__} decode",
                         model=name, batch=batch, input=f"{side}x{side}x{channels}", images=batch,
                         seconds=seconds(lambda: run(sample_steps)), dtype=dtype_name(dtype),
                         flops=sample_steps * batch * (1 if cfg_scale == 1 else 2) * forward_flops(net, side),
                         compile=compile_mode))
    eager, compiled = out[False, torch.bfloat16], out[True, torch.bfloat16]
    minutes = [50000 * r["seconds"] / r["images"] / 60 for r in (rows[0], rows[-1])]
    notes = [f"{name}, sampling at batch {sample_batch_size}, bfloat16: compiled "
             f"{rows[-2]['seconds'] / rows[-1]['seconds']:.2f}x as fast as eager; from the same seeds, images that "
             f"differ by {relative_difference(compiled, eager):.1e} (relative RMS; max "
             f"{(compiled - eager).abs().max():.2g}, at std {eager.std():.2g}), where bfloat16 and float32 eager "
             f"differ by {relative_difference(eager, out[False, torch.float32]):.1e}",
             f"{name}: 50K images take {minutes[0]:.0f} minutes eager at batch {first} and {minutes[1]:.0f} compiled "
             f"at batch {sample_batch_size}, per GPU (bfloat16, decoded)"]
    return rows, notes


def graph_rows(name):
    """train.py's training step at batch_size in bfloat16, eager against compile_mode=reduce-overhead (CUDA graphs; on
    CPU the compiled code without graphs), on two copies of one model, timed in turn."""
    eager, channels, side = random_model(name)
    graphed = deepcopy(eager)
    graphed.compile(mode="reduce-overhead")
    step_fns = [train_step(m, m, channels, side, torch.bfloat16, name in DiT_models, batch_size)
                for m in (eager, graphed)]
    times = timed(step_fns)
    rows = [dict(task="train", model=name, input=f"{side}x{side}x{channels}", batch=batch_size, seconds=s,
                 images=batch_size, flops=3 * forward_flops(eager, side) * batch_size, compile=c, dtype="bfloat16")
            for s, c in zip(times, ["no", "reduce-overhead" if device.startswith("cuda") else "default"])]
    notes = [f"{name}, training at batch {batch_size}: reduce-overhead {times[0] / times[1]:.2f}x as fast as eager"]
    if device.startswith("cuda"):
        notes.append(f"{name}, reduce-overhead: the training step {host_syncs(step_fns[1])}")
    return rows, notes


def mfu_rows():
    """The training step of mfu_model in bfloat16 at mfu_batch_size, halved until the eager step fits: eager, then
    compiled (the default mode: at this size the GPU, not the launches, is the bound)."""
    net, channels, side = random_model(mfu_model)
    dit, batch = mfu_model in DiT_models, mfu_batch_size
    while True:
        try:
            eager = timed([train_step(net, net, channels, side, torch.bfloat16, dit, batch)])[0]
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        batch //= 2  # out of the except clause: its traceback no longer holds the activations
        net.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    net.compile()
    step = train_step(net, net, channels, side, torch.bfloat16, dit, batch)
    times, modes, notes = [eager, timed([step])[0]], ["no", "default"], []
    if device.startswith("cuda"):
        notes.append(f"{mfu_model}, compiled at batch {batch}: the training step {host_syncs(step)}, attention "
                     f"kernels {attention_kernels(step)}")
        # compiled anew with cuDNN's attention asked for inside each block's forward, where the graph records it (a
        # context around the compiled call did not reach it: docs/speed.md)
        torch._dynamo.reset()
        for block in net.blocks:
            block.attn.forward = partial(on_cudnn, block.attn.forward)
        try:
            times.append(timed([step])[0])
            modes.append("default, cuDNN attention")
            notes.append(f"{mfu_model}, compiled on cuDNN attention: attention kernels {attention_kernels(step)}")
        except RuntimeError as e:
            notes.append(f"{mfu_model}: the compiled step cannot run on cuDNN attention: {str(e).splitlines()[0]}")
    rows = [dict(task="train", model=mfu_model, input=f"{side}x{side}x{channels}", batch=batch, seconds=s,
                 images=batch, flops=3 * forward_flops(net, side) * batch, compile=c, dtype="bfloat16")
            for s, c in zip(times, modes)]
    too_big = f" ({mfu_batch_size} did not fit)" if batch < mfu_batch_size else ""
    notes.insert(0, f"{mfu_model}, training at batch {batch}{too_big}: compiled {times[0] / times[1]:.2f}x as fast "
                    f"as eager")
    return rows, notes


def attention_rows():
    """mfu_model's attention (a DiT's) at mfu_batch_size, forward and backward in bfloat16, on each kernel of SDPA,
    also with the head dim padded to a power of two (zeros in q, k and v, the true scale: the same output): which
    attention the compiled training step should ask for, and whether padding DiT-XL/2's 72 pays."""
    _, hidden, heads = DiT_sizes[mfu_model.split("-")[1].split("/")[0]]
    tokens, head_dim = (latent_shape(mfu_model)[1] // int(mfu_model.split("/")[1])) ** 2, hidden // heads
    q, k, v, grad = torch.randn(4, mfu_batch_size, heads, tokens, head_dim, device=device, dtype=torch.bfloat16)
    kernels = ([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
               if device.startswith("cuda") else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    rows, notes, outputs = [], [], {}
    for width in sorted({head_dim, 1 << (head_dim - 1).bit_length()}):
        padded = [nn.functional.pad(t, (0, width - head_dim)).requires_grad_() for t in (q, k, v)]
        for kernel in kernels:
            def run():
                with sdpa_kernel(kernel):
                    out = nn.functional.scaled_dot_product_attention(*padded, scale=head_dim ** -0.5)[..., :head_dim]
                out.backward(grad)
                return out
            name = kernel.name.lower() + ("" if width == head_dim else f", head dim padded to {width}")
            try:
                outputs[name] = run()
            except RuntimeError as e:  # no kernel of that name takes these shapes on this machine
                notes.append(f"attention ({name}) cannot run here: {str(e).splitlines()[0]}")
                continue
            rows.append(dict(task=f"attention ({name}), forward and backward, {heads} heads of {head_dim}",
                             model=mfu_model, input=f"{tokens} tokens", batch=mfu_batch_size, images=mfu_batch_size,
                             seconds=timed([run])[0], flops=12 * mfu_batch_size * heads * tokens ** 2 * head_dim,
                             compile="no", dtype="bfloat16"))
    (first, reference), *others = outputs.items()
    return rows, notes + [f"attention ({name}) differs from {first} by {relative_difference(out, reference):.1e} "
                          f"(relative)" for name, out in others]


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


HEADER = ["task", "model", "input", "batch", "compile", "dtype", "images/s", "TFLOP/s", "MFU"]


def table_of(rows, peak):
    table = []
    for r in rows:
        tflops = r["flops"] / r["seconds"] / 1e12
        mfu = f"{tflops / peak[r['dtype'] == 'float32']:.1%}" if peak and r["flops"] else "-"
        table.append([r["task"], r["model"], r["input"], r["batch"], r["compile"], r["dtype"],
                      f"{r['images'] / r['seconds']:.3g}", f"{tflops:.3g}" if r["flops"] else "-", mfu])
    return table


def markdown(title, table, notes):
    lines = [title, "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(map(str, line)) + " |" for line in table]
    return "\n".join(lines + [f"- {note}" for note in dict.fromkeys(notes)]) + "\n"  # each note once, in order


def save(title, table, notes):
    """The CSV at `csv`, and beside it (.md) the markdown table with its notes; atomically: a run killed mid-write
    leaves the last complete table."""
    os.makedirs(os.path.dirname(csv) or ".", exist_ok=True)
    with atomic_write(csv, "w") as f:
        csv_module.writer(f).writerows([HEADER] + table)
    with atomic_write(os.path.splitext(csv)[0] + ".md", "w") as f:
        f.write(markdown(title, table, notes))


def jobs(kinds):
    """(name, function) pairs, each function returning rows and notes. speedups: eager against compiled on one GPU,
    before and after in one process, in about 6 minutes on an H100, mostly compiling (docs/speed.md)."""
    if suite == "speedups":
        return ([(f"sampling {n}", partial(sampling_rows, n)) for n in sample_models.split(",") if n]
                + [(f"CUDA graphs {n}", partial(graph_rows, n)) for n in graph_models.split(",") if n]
                + ([(f"MFU {mfu_model}", mfu_rows)] if mfu_model else [])
                + ([(f"attention {mfu_model}", attention_rows)] if mfu_model in DiT_models else []))
    grid = [(f"{name}, {'compiled' if c else 'eager'}, {dtype_name(d)}", partial(bench_model, name, c, d))
            for name in models.split(",") for c in {"off": [False], "on": [True], "both": [False, True]}[compile]
            for d in kinds]
    return grid + ([("FID features", bench_inception)] if fid_images else [])


def main(argv):
    """Prints the table and its notes, and returns the table (a list of rows, as in the CSV). With `csv`, the CSV is
    rewritten after each model, so that a run stopped early keeps what it measured."""
    configure(globals(), argv)
    if compile not in ("off", "on", "both"):
        raise ValueError(f"compile must be off, on or both, got {compile!r}")
    if suite not in ("table", "speedups"):
        raise ValueError(f"suite must be table or speedups, got {suite!r}")
    names = models if suite == "table" else ",".join([sample_models, graph_models, mfu_model])
    unknown = [n for n in names.split(",") if n and n not in DiT_models and n not in ("LDM-4", "LDM-S")]
    if unknown:
        raise ValueError(f"unknown models {unknown}: choose from {', '.join(DiT_models)}, LDM-4, LDM-S")
    kinds = [getattr(torch, d, None) for d in dtypes.split(",")]
    if any(k not in (torch.float32, torch.bfloat16) for k in kinds):
        raise ValueError(f"dtypes must be float32 and/or bfloat16, got {dtypes!r}")
    cuda, notes = device.startswith("cuda"), []
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
        if torch.bfloat16 in kinds and not torch.cuda.is_bf16_supported():
            kinds.remove(torch.bfloat16)
            notes.append(f"{torch.cuda.get_device_name()} does not support bfloat16: those rows are skipped")
    machine = torch.cuda.get_device_name() if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    peak = next((p for k, p in PEAK_TFLOPS.items() if k in machine), None) if cuda else None
    title = (f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}; training and features: medians "
             f"of {steps} repeats, sampling: one run")
    rows, start = [], time.perf_counter()
    for name, job in jobs(kinds):
        torch._dynamo.reset()  # no graphs of the previous model (nor its recompilations, which are limited)
        try:
            new, new_notes = job()
        except torch.cuda.OutOfMemoryError:
            new, new_notes = [], [f"{name}: out of memory (lower the batch size)"]
        rows += new
        notes += new_notes
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - start:.0f} s] {name}", file=sys.stderr, flush=True)
        if csv:
            save(title, table_of(rows, peak), notes)
    table = table_of(rows, peak)
    print(markdown(title, table, notes), end="")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
