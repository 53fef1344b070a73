"""
Latent consistency distillation (LCM, Luo et al. 2023), the paper's Section 8: a student that samples in 1 to 8 steps
learns, from a frozen guided teacher, to map any point of the teacher's ODE to its end. The teacher is a pre-trained
checkpoint of train.py, or a diffusers pipeline folder (Stable Diffusion v1.5, the paper's teacher); the student
starts as the teacher, with a guidance input w. The data's conditions may be corrupted and CEP added, as the paper
distils on CC3M with swapped captions or with CEP.

  python distill.py --teacher out/ckpt.pt --ema_decay 0.95 --lr 2e-4 --skip_interval 200 --max_steps 2000 \\
      --out_dir out_lcm                                 # the CPU default's student (docs/lcm.md), 20 minutes
  python sample.py --ckpt out_lcm/ckpt.pt --sampler lcm --num_steps 4
  torchrun --nproc_per_node=8 distill.py --teacher stable-diffusion-v1-5/ --data_path cc3m/ --corrupt 0.05 \\
      --corrupt_type swap --lr 1e-5 --max_steps 35000   # the paper's setting (docs/lcm.md)

The model, its image size, first stage, text encoder, prediction and schedule are the teacher's: they are not
settings here. Each step: x_t at t = t_{n+k} on LCM's skipping grid, one guided DDIM step of the teacher to t_n, and
the student's consistency function at t_{n+k} pulled towards the EMA target's at t_n (diffusion.consistency_loss).
"""
import os
import sys

import torch

from cep import input_perturbation
from configurator import configure
from corrupt import check_corruption, corrupt_batch
from data import CaptionPairs
from diffusion import GaussianDiffusion
from pipeline import build, class_rows, sample_grid
from training import (
    Log, Steps, Stop, check_training, corrupted_dataset, cpu_layout, describe_cep, first_stage_for, init_distributed,
    load_pretrained, open_dataset, optimizer_and_ema, perturbation, seed_step, start
)

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
ip = 0.0                  # input perturbation of x_t (Ning et al. 2023, lambda), the baseline of the paper's Table 1
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
    if ip < 0:
        raise ValueError(f"ip must be >= 0, got {ip}")
    if latents and data_path:
        raise ValueError(f"latents={latents!r} and data_path={data_path!r} are both set: the cache holds its dataset")
    if data_path and not os.path.exists(data_path):
        raise FileNotFoundError(f"data_path {data_path!r} does not exist")
    positive = ("max_steps", "log_every", "ckpt_every", "global_batch_size", "synthetic_size", "synthetic_scale")
    check_training(config, world_size, ckpt_path, positive)


def write_grid(path):
    """The EMA's samples: at the end, and every sample_every steps."""
    sample_grid(ema, path, grid_rows, seed=seed, cfg_scale=grid_cfg_scale, sampler="lcm", num_steps=4,
                skip_interval=skip_interval, size=input_size, vae=first_stage, prediction=prediction,
                schedule=schedule, progress=True)
    log(f"sample grid (EMA, w {grid_cfg_scale - 1}, 4 LCM steps): {path}")


config = configure(globals(), sys.argv[1:], taken=(PRETRAINED, "the teacher (--teacher)"))
ckpt_path = os.path.join(out_dir, "ckpt.pt")
rank, world_size, device = init_distributed()
check_config()
pretrained = load_pretrained("teacher", teacher, out_dir, rank)
base = pretrained["config"]  # the teacher's settings (a pipeline folder's: pipeline.read_pipeline)
text = bool(base["text_encoder"])
caption_corruption = corrupt_type in ("swap", "rewrite")
if corrupt > 0 and caption_corruption != text:
    raise ValueError(f"corrupt_type={corrupt_type} does not fit the teacher's conditions: captions take swap or "
                     "rewrite, classes sym or asym")
config.update({k: base[k] for k in PRETRAINED if k in base})  # the run's whole config, in its checkpoint
prediction, schedule = pretrained["prediction"], pretrained["schedule"]
log = Log(out_dir, rank == 0, wandb_project, wandb_run_name, config)
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
if text:
    grid_rows = dataset.captions[:8]
else:
    grid_rows = class_rows(pretrained["model_args"]["num_classes"])
dataset, corruption, prior = corrupted_dataset(dataset, text, corrupt, corrupt_type, corrupt_mode, seed,
                                               corrupt_subset, corrupt_rewrites, out_dir, rank == 0, world_size)

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
# what each checkpoint holds beside the weights: what sample.py, adapt.py and distill.py read back
record = dict(config=config, corruption=corruption, model_args=model_args, prediction=prediction, schedule=schedule,
              first_stage=first_stage_args, consistency=consistency)
if text:
    dataset = CaptionPairs(dataset, net.y_embedder.tokenizer)
net = cpu_layout(net, model_args["name"], device)
net.y_embedder.perturb = perturb
opt, ema = optimizer_and_ema(net, lr, weight_decay)  # ema: the target network
step, elapsed, train_net, autocast, loader, batches = start(config, net, opt, ema, dataset, model_args,
                                                             corruption, rank, world_size, device, log, stop)
if prior is not None:
    prior = prior.to(device)
log.config(config)
log(f"distilling {teacher} (frozen, {model_args['name']}), w in [{w_min}, {w_max}], k={skip_interval}; "
    f"{len(dataset)} images; corruption: {corruption}; CEP: {describe_cep(cep, cep_type, cep_scale)}; IP: {ip}; "
    f"{world_size} process(es) on {device}")

# -----------------------------------------------------------------------------
# the training loop
net.train()
steps = Steps(step, elapsed, config, device, log, stop, record, write_grid)
for x, y in loader:
    seed_step(seed, steps.step, rank)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if first_stage is not None and not latents:
        with torch.no_grad():
            x = first_stage.encode(x)
    if corrupt > 0 and corrupt_mode == "random":
        y = corrupt_batch(y, corrupt, prior)
    # t = t_{n+k} on LCM's skipping grid k - 1, 2k - 1, ..., 999
    t = torch.randint(0, diffusion.num_timesteps // skip_interval, (len(x),), device=device) * skip_interval
    t = t + skip_interval - 1
    noise = torch.randn_like(x)
    if ip > 0:
        noise = input_perturbation(noise, ip)
    x_t = diffusion.q_sample(x, t, noise)
    w = w_min + (w_max - w_min) * torch.rand(len(x), device=device)  # the student's guidance, an input

    def guided_teacher(x, s):  # LCM's cond + w (cond - uncond): classifier-free guidance at scale 1 + w
        return teacher_net.forward_with_cfg(x, s, y, 1 + w.view(-1, 1, 1, 1))

    def target(x, s):
        return ema(x, s, y, w=w)
    with autocast:
        out = train_net(x_t, t, y, w=w)
        loss = diffusion.consistency_loss(out, x_t, t, guided_teacher, target, skip_interval).mean()
    loss.backward()
    if steps.update(loss, net, opt, ema):
        break
steps.finish()
