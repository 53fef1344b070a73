"""
Latent consistency distillation (LCM, Luo et al. 2023), the paper's Section 8: a student that samples in 1 to 8 steps
learns, from a frozen guided teacher, to map any point of the teacher's ODE to its end. The teacher is a pre-trained
checkpoint of train.py, or a diffusers pipeline folder (Stable Diffusion v1.5, the paper's teacher); the student
starts as the teacher, with a guidance input w. The data's conditions may be corrupted and CEP added, as the paper
distils on CC3M with swapped captions or with CEP.

  python distill.py --teacher out/ckpt.pt --ema_decay 0.95 --lr 2e-4 --skip_interval 200 --max_steps 2000 \
      --out_dir out_lcm                                 # the CPU default's student (docs/lcm.md), 20 minutes
  python sample.py --ckpt out_lcm/ckpt.pt --sampler lcm --num_steps 4
  torchrun --nproc_per_node=8 distill.py --teacher stable-diffusion-v1-5/ --data_path cc3m/ --corrupt 0.05 \
      --corrupt_type swap --lr 1e-5 --max_steps 35000   # the paper's setting (docs/lcm.md)

The model, its image size, first stage, text encoder, prediction and schedule are the teacher's: they are not
settings here. Each step: x_t at t = t_{n+k} on LCM's skipping grid, one guided DDIM step of the teacher to t_n, and
the student's consistency function at t_{n+k} pulled towards the EMA target's at t_n (diffusion.consistency_loss).
"""
import os
import sys
from contextlib import nullcontext
from copy import deepcopy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from corrupt import check_corruption, corrupt_batch
from data import CaptionPairs, StepBatches
from diffusion import GaussianDiffusion
from model import UNet_models
from pipeline import build, class_rows, sample_grid
from training import (Log, Steps, Stop, check_out_dir, corrupted_dataset, first_stage_for, init_distributed,
                      load_pretrained, open_dataset, perturbation, refuse_settings, resume_from, update_ema)

# -----------------------------------------------------------------------------
# the teacher and the consistency student
out_dir = "out_lcm"
teacher = "out/ckpt.pt"   # the teacher: train.py's ckpt.pt (its EMA weights) or a diffusers pipeline folder
w_min = 2.0               # w ~ U[w_min, w_max], in LCM's convention cond + w (cond - uncond): w = cfg_scale - 1. LCM:
w_max = 4.0               # 5..15 for Stable Diffusion; ours: around the CPU default's grid scale 4 (w = 3)
skip_interval = 20        # k: the teacher's DDIM step skips k of the 1000 timesteps (LCM's 20, a grid of 50; the CPU
                          # default's student learns far better with 200: docs/lcm.md)
# data and its conditions
data_path = ""            # "": the built-in synthetic shapes; else a class folder or an image-caption set
latents = ""              # a cache written by data.py with the teacher's VAE
flip = True
synthetic_size = 20000
synthetic_seed = 0
synthetic_scale = 1.0
corrupt = 0.0             # as train.py: eta, the fraction of the conditions that are wrong
corrupt_type = "sym"      # class labels: sym | asym; captions: swap | rewrite
corrupt_mode = "fixed"
corrupt_subset = ""
corrupt_rewrites = ""
cep = False               # CEP on the student's condition embedding (the teacher and the target see the clean one)
cep_type = "uniform"
cep_scale = 1.0
# optimisation
global_batch_size = 16
max_steps = 3000
lr = 1e-3
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.95          # the target network's (LCM: 0.95)
seed = 0
num_workers = 2
compile = False
compile_mode = "default"
dtype = "bfloat16"        # autocast dtype on CUDA; "float32" turns autocast off
# logging, checkpoints, samples
log_every = 100
ckpt_every = 500
sample_every = 0          # 0: a sample grid at the end only (4 LCM steps)
grid_cfg_scale = 4.0      # the grid's guidance: w = grid_cfg_scale - 1
resume = False
wandb_project = ""
wandb_run_name = ""
# -----------------------------------------------------------------------------
PRETRAINED = ("model", "image_size", "vae", "text_encoder", "clip_model", "bert_path", "prediction", "schedule",
              "learn_sigma")


def check_config():
    if not 0 <= w_min <= w_max:
        raise ValueError(f"w_min={w_min}, w_max={w_max}: the guidance range needs 0 <= w_min <= w_max")
    if skip_interval <= 0 or 1000 % skip_interval:
        raise ValueError(f"skip_interval={skip_interval} does not divide the 1000 timesteps: take 10, 20 (LCM's)...")
    check_corruption(corrupt, corrupt_type, corrupt_mode)
    if latents and data_path:
        raise ValueError(f"latents={latents!r} and data_path={data_path!r} are both set: the cache holds its dataset")
    if data_path and not os.path.exists(data_path):
        raise FileNotFoundError(f"data_path {data_path!r} does not exist")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {world_size} processes")
    for key in ("max_steps", "log_every", "ckpt_every", "global_batch_size", "synthetic_size", "synthetic_scale"):
        if globals()[key] <= 0:
            raise ValueError(f"{key} must be > 0, got {globals()[key]}")
    if resume and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint {ckpt_path!r}")


refuse_settings(sys.argv[1:], PRETRAINED, "distill.py", "the teacher (--teacher)")
config = configure(globals(), sys.argv[1:])
ckpt_path = os.path.join(out_dir, "ckpt.pt")
rank, world_size, device = init_distributed()
master = rank == 0
cuda = device.startswith("cuda")
check_config()
pretrained = load_pretrained("teacher", teacher, ckpt_path)
check_out_dir(out_dir, rank)  # after the checkpoint's checks: a bad one leaves no folder
base = pretrained["config"]  # the teacher's settings (a pipeline folder's: pipeline.read_pipeline)
text = bool(base["text_encoder"])
caption_corruption = corrupt_type in ("swap", "rewrite")
if corrupt > 0 and caption_corruption != text:
    raise ValueError(f"corrupt_type={corrupt_type} does not fit the teacher's conditions: captions take swap or "
                     "rewrite, classes sym or asym")
config.update({k: base[k] for k in PRETRAINED if k in base})  # the run's whole config, in its checkpoint
prediction, schedule = pretrained["prediction"], pretrained.get("schedule", "linear")
log = Log(out_dir, master, wandb_project, wandb_run_name, config)
diffusion = GaussianDiffusion(learn_sigma=pretrained["model_args"]["learn_sigma"], prediction=prediction,
                              schedule=schedule)
perturb = perturbation(cep, cep_type, cep_scale, 0.0, seed)
stop = Stop()

# data, and the corruption of its conditions (decided once, from the seed: identical on every rank)
dataset = open_dataset(latents, data_path, text, base["image_size"], flip, synthetic_size=synthetic_size,
                       synthetic_seed=synthetic_seed, synthetic_scale=synthetic_scale)
first_stage, _, in_channels, input_size = first_stage_for(base["vae"], dataset, latents, base["image_size"], device)
if (in_channels, input_size) != (pretrained["model_args"]["in_channels"], pretrained["model_args"]["input_size"]):
    raise ValueError(f"this data gives the model inputs of {in_channels}x{input_size}x{input_size}, the teacher takes "
                     f"{pretrained['model_args']['in_channels']}x{pretrained['model_args']['input_size']}: a latent "
                     "cache must be of the teacher's VAE and image size")
grid_rows = class_rows(pretrained["model_args"]["num_classes"])
if text:
    grid_rows = dataset.captions[:8]
dataset, corruption, prior = corrupted_dataset(dataset, text, corrupt, corrupt_type, corrupt_mode, seed,
                                               corrupt_subset, corrupt_rewrites, out_dir, master, world_size)

# the teacher, frozen; the student starts as the teacher: all its weights, and a guidance embedding of zeros
teacher_net = build(pretrained["model_args"]).to(device).eval().requires_grad_(False)
teacher_net.load_state_dict(pretrained["ema"])
model_args = dict(pretrained["model_args"], class_dropout_prob=0.0, guidance_embed=True)
torch.manual_seed(seed)
net = build(model_args).to(device)
net.load_state_dict({**net.state_dict(), **pretrained["ema"]})
first_stage_args = pretrained["first_stage"]
del pretrained
consistency = dict(teacher=teacher, w_min=w_min, w_max=w_max, skip_interval=skip_interval)
if text:
    dataset = CaptionPairs(dataset, net.y_embedder.tokenizer)
if model_args["name"] in UNet_models and not cuda:  # as train.py
    net = net.to(memory_format=torch.channels_last)
net.y_embedder.perturb = perturb
ema = deepcopy(net).requires_grad_(False).eval()  # the target network
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                        fused=True)
step, elapsed = 0, 0.0
if resume:
    step, elapsed = resume_from(ckpt_path, device, model_args, corruption, net, ema, opt, lr, weight_decay)
    log(f"resumed from {ckpt_path} at step {step}")
    if step >= max_steps:
        log(f"{ckpt_path} is at step {step}, max_steps={max_steps}: nothing to train")
        if world_size > 1:
            dist.destroy_process_group()
        sys.exit()
train_net = net
if compile:
    train_net = torch.compile(net, mode=compile_mode)
if world_size > 1:
    train_net = DDP(train_net, device_ids=[device] if cuda else None)
autocast = nullcontext()
if cuda and dtype != "float32":
    autocast = torch.autocast("cuda", dtype=getattr(torch, dtype))
batches = StepBatches(len(dataset), global_batch_size, rank, world_size, seed, step)
loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=cuda,
                                     persistent_workers=num_workers > 0, worker_init_fn=stop.worker_init)
if prior is not None:
    prior = prior.to(device)
perturbed = "off"
if cep:
    perturbed = f"{cep_type} gamma={cep_scale}"
log("config: " + " ".join(f"{k}={v!r}" for k, v in config.items()))
log(f"distilling {teacher} (frozen, {model_args['name']}), w in [{w_min}, {w_max}], k={skip_interval}; "
    f"{len(dataset)} images; corruption: {corruption}; CEP: {perturbed}; {world_size} process(es) on {device}")

# -----------------------------------------------------------------------------
# the training loop
net.train()
steps = Steps(step, max_steps, log_every, ckpt_every, global_batch_size, elapsed, device, log, stop, ckpt_path)
for x, y in loader:
    if steps.step >= max_steps:
        break
    torch.manual_seed((seed * 1_000_003 + steps.step) * 4096 + rank)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if first_stage is not None and not latents:
        with torch.no_grad():
            x = first_stage.encode(x)
    if corrupt > 0 and corrupt_mode == "random":
        y = corrupt_batch(y, corrupt, prior)
    # t = t_{n+k} on LCM's skipping grid k - 1, 2k - 1, ..., 999
    t = torch.randint(0, diffusion.num_timesteps // skip_interval, (len(x),), device=device) * skip_interval
    t = t + skip_interval - 1
    x_t = diffusion.q_sample(x, t, torch.randn_like(x))
    w = w_min + (w_max - w_min) * torch.rand(len(x), device=device)  # the student's guidance, an input

    def guided_teacher(x, s):  # LCM's cond + w (cond - uncond): classifier-free guidance at scale 1 + w
        return teacher_net.forward_with_cfg(x, s, y, 1 + w.view(-1, 1, 1, 1))

    def target(x, s):
        return ema(x, s, y, w=w)
    with autocast:
        out = train_net(x_t, t, y, w=w)
        loss = diffusion.consistency_loss(out, x_t, t, guided_teacher, target, skip_interval).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), grad_clip or float("inf"))
    opt.step()
    update_ema(ema, net, ema_decay)
    if steps.update(loss, grad_norm, net):
        steps.save(master, model=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), config=config,
                   corruption=corruption, model_args=model_args, prediction=prediction, schedule=schedule,
                   first_stage=first_stage_args, consistency=consistency)
    if steps.stopping:
        break
    if master and (steps.step == max_steps or (sample_every and steps.step % sample_every == 0)):
        grid = os.path.join(out_dir, f"samples_{steps.step:07d}.png")
        sample_grid(ema, grid, grid_rows, seed=seed, cfg_scale=grid_cfg_scale, sampler="lcm", num_steps=4,
                    skip_interval=skip_interval, size=input_size, vae=first_stage, prediction=prediction,
                    schedule=schedule, progress=True)
        log(f"sample grid (EMA, w {grid_cfg_scale - 1}, 4 LCM steps): {grid}")
steps.close()
if world_size > 1:
    dist.barrier()
    dist.destroy_process_group()
