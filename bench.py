"""
Training-step throughput of the denoisers on 32x32x4 latents (forward, backward, AdamW), eager and compiled.

  python bench.py                                   # DiT-S/2, batch 32, eager and compiled
  python bench.py --models=DiT-S/2,DiT-XL/2 --batch_size=256 --dtype=bfloat16    # on a GPU

Prints one table; every number is the median over `steps` timed steps after `warmup` untimed ones.
"""
import sys
import time

import torch

from configurator import configure
from model import DiT_models, GaussianDiffusion

models = "DiT-S/2"
batch_size = 32
steps = 10
warmup = 3
compile = "both"        # off | on | both
dtype = "float32"       # autocast dtype on CUDA: float32 | bfloat16
seed = 0


def train_step_throughput(name, use_compile):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(seed)
    net = DiT_models[name](input_size=32, in_channels=4, num_classes=1000).to(device)
    step_net = torch.compile(net) if use_compile else net
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    diffusion = GaussianDiffusion()
    x0 = torch.randn(batch_size, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=cuda and dtype != "float32")
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        t = torch.randint(0, 1000, (batch_size,), device=device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        with autocast:
            out = step_net(x_t, t, y)
        loss = diffusion.training_loss(out, x0, x_t, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch_size / sorted(times)[len(times) // 2]


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"training step, batch {batch_size}, 32x32x4 latents, {dtype}, {device}, torch {torch.__version__}")
    print(f"| model | compile | images/s |\n|---|---|---|")
    for name in models.split(","):
        for use_compile in {"off": [False], "on": [True], "both": [False, True]}[compile]:
            print(f"| {name} | {'yes' if use_compile else 'no'} | {train_step_throughput(name, use_compile):.1f} |", flush=True)
