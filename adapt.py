"""
Downstream adaptation, the paper's Section 3.2: a ControlNet (Zhang et al. 2023) or a T2I-Adapter (Mou et al. 2023)
trained on a frozen pre-trained model of train.py, to generate from control images (Canny edges, segmentation maps)
and the model's condition (class or caption). control.py holds the adapters and the Canny edges.

  python adapt.py --init out/ckpt.pt --out_dir out_canny                  # ControlNet on Canny edges of the shapes
  python adapt.py --init out/ckpt.pt --adapter t2i --control mask --out_dir out_mask   # T2I-Adapter (a U-Net's)
  torchrun --nproc_per_node=8 adapt.py config/controlnet_canny.py --init out/ldm4/ckpt.pt \\
      --data_path /data/imagenet100/train --out_dir out/ldm4_canny       # the paper's setting (Table 2)

The model, its image size, first stage, text encoder, prediction and schedule are the pre-trained checkpoint's: they
are not settings here. Sample the adapted model with sample.py (held-out controls). The loop is train.py's, with
the base frozen and the adapter's control images as a second input.
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from configurator import configure
from control import cached_controls, control_image
from data import CaptionPairs
from diffusion import GaussianDiffusion
from model import UNet_models
from pipeline import build, control_grid
from training import (
    Log, Steps, Stop, check_training, cpu_layout, describe_cep, describe_size, first_stage_for, init_distributed,
    load_pretrained, open_dataset, optimizer_and_ema, perturbation, seed_step, start, worker_start
)

# -----------------------------------------------------------------------------
# the pre-trained model and the adapter
out_dir = "out_adapt"
init = "out/ckpt.pt"      # the pre-trained checkpoint (train.py's ckpt.pt; its EMA weights are adapted, frozen)
adapter = "controlnet"    # controlnet (U-Net or DiT) | t2i (T2I-Adapter, U-Net)
control = "canny"         # canny: the images' Canny edges (100/200) | mask: the built-in shapes' masks | a folder
                          # of control images laid out as data_path (data/a.jpg -> control/a.png), each its image's size
control_cache = ""        # a folder: the controls are computed once and cached there, keyed by the dataset's content
                          # and the control's settings (control.cached_controls; needs flip=False); "": per batch
# data
data_path = ""            # "": the built-in synthetic shapes; else a class folder, or for a text model an image-caption
                          # set (data.ImageCaptions)
flip = True               # random horizontal flips of the images and their controls
synthetic_size = 20000
synthetic_seed = 0
synthetic_scale = 1.0     # the built-in shapes' size, times: 0.6 is the downstream task of docs/downstream.md
class_dropout = 0.1       # label dropout to the null class (the empty caption), for classifier-free guidance
cep = False               # CEP in adaptation too (the paper does not say whether it used it there)
cep_type = "uniform"
cep_scale = 1.0
# optimisation
global_batch_size = 16
max_steps = 3000
lr = 1e-3
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.995
seed = 0
num_workers = 2
compile = False
compile_mode = "default"
dtype = "bfloat16"        # autocast dtype on CUDA; "float32" turns autocast off
# logging, checkpoints, samples
log_every = 100
ckpt_every = 500
sample_every = 0          # 0: a sample grid at the end only
grid_cfg_scale = 4.0
grid_steps = 50
resume = False
wandb_project = ""
wandb_run_name = ""
# -----------------------------------------------------------------------------
CLEAN = dict(eta=0.0, type="sym", mode="fixed", count=0)  # the data's conditions, as corrupt.py sums up clean ones
PRETRAINED = ("model", "image_size", "vae", "text_encoder", "clip_model", "bert_path", "prediction",
              "schedule", "learn_sigma", "min_snr_gamma")


def check_config():
    if adapter not in ("controlnet", "t2i"):
        raise ValueError(f"adapter must be controlnet or t2i, got {adapter!r}")
    if control == "mask" and data_path:
        raise ValueError("control=mask is the built-in shapes' masks: for data_path give a folder of control images")
    if control not in ("canny", "mask") and not (os.path.isdir(control) and data_path):
        raise FileNotFoundError(f"control {control!r} is not canny, mask, or a folder of control images beside "
                                "data_path's images")
    if data_path and not os.path.exists(data_path):
        raise FileNotFoundError(f"data_path {data_path!r} does not exist")
    positive = ("max_steps", "log_every", "ckpt_every", "global_batch_size", "synthetic_size", "synthetic_scale")
    check_training(config, world_size, ckpt_path, positive)


def hints(index, images, controls):
    """The control images of the dataset items `index` (their images [-1, 1], their control items if any): from the
    cache, or computed from the images and controls."""
    if cache is not None:
        return torch.from_numpy(cache[index]).to(device).div(255).expand(-1, 3, -1, -1)
    return control_image(control, images, *[c.to(device) for c in controls])


def write_grid(path):
    """The EMA's samples: at the end, and every sample_every steps."""
    images, _, *controls = torch.utils.data.default_collate([dataset[i] for i in grid_index])
    control_grid(ema, path, grid_conditions, hints(grid_index, images.to(device), controls), seed=seed,
                 cfg_scale=grid_cfg_scale, num_steps=grid_steps, size=input_size, vae=first_stage,
                 prediction=prediction, schedule=schedule, progress=True)
    log(f"sample grid (EMA, cfg {grid_cfg_scale}, {grid_steps} DPM-Solver++ steps): {path}")


config = configure(globals(), sys.argv[1:], taken=(PRETRAINED, "the pre-trained checkpoint (--init)"))
ckpt_path = os.path.join(out_dir, "ckpt.pt")
rank, world_size, device = init_distributed()
check_config()
pretrained = load_pretrained("init", init, out_dir, rank)
base = pretrained["config"]  # the pre-training's settings
if adapter == "t2i" and pretrained["model_args"]["name"] not in UNet_models:
    raise ValueError(f"adapter=t2i adds multi-scale features to a U-Net's encoder, and the model of {init!r} is "
                     f"{pretrained['model_args']['name']}, which has none: use adapter=controlnet")
config.update({k: base[k] for k in PRETRAINED if k in base})  # the run's whole config, in its checkpoint
text = bool(base["text_encoder"])
prediction, schedule = pretrained["prediction"], pretrained["schedule"]
log = Log(out_dir, rank == 0, wandb_project, wandb_run_name, config)
diffusion = GaussianDiffusion(learn_sigma=pretrained["model_args"]["learn_sigma"], prediction=prediction,
                              schedule=schedule, min_snr_gamma=base.get("min_snr_gamma", 0.0))
stop = Stop()

# data: the images with their controls (a control folder's files, the shapes' masks, or Canny edges made per batch)
folder = ""
if control not in ("canny", "mask"):
    folder = control
dataset = open_dataset("", data_path, text, base["image_size"], flip, controls=folder, masks=control == "mask",
                       synthetic_size=synthetic_size, synthetic_seed=synthetic_seed, synthetic_scale=synthetic_scale)
first_stage, _, in_channels, input_size = first_stage_for(base["vae"], dataset, "", base["image_size"], device)
cache = None
if control_cache:  # rank 0 computes the cache while the others wait, then they read it
    if rank > 0:
        dist.barrier()
    cache = cached_controls(dataset, control, control_cache, num_workers=num_workers,
                            multiprocessing_context=worker_start(num_workers))
    if rank == 0 and world_size > 1:
        dist.barrier()
    dataset.masks, dataset.controls = False, None  # the items' own controls are no longer read
grid_index = np.linspace(0, len(dataset) - 1, 8).round().astype(np.int64)  # the controls of 8 training images
grid_conditions = [int(dataset.labels[i]) for i in grid_index]
if text:
    grid_conditions = [dataset.captions[i] for i in grid_index]

# the model: the pre-trained one frozen inside, the adapter new (zero-initialised: it starts as the base model)
downsample = first_stage.factor if first_stage is not None else 1
model_args = dict(pretrained["model_args"], class_dropout_prob=class_dropout,
                  adapter=dict(kind=adapter, downsample=downsample))
torch.manual_seed(seed)
net = build(model_args).to(device)
net.base.load_state_dict(pretrained["ema"])
first_stage_args = pretrained["first_stage"]
del pretrained
# what each checkpoint holds beside the weights: what sample.py, adapt.py and distill.py read back
record = dict(config=config, corruption=CLEAN, model_args=model_args, prediction=prediction, schedule=schedule,
              first_stage=first_stage_args, consistency=None)
if text:
    dataset = CaptionPairs(dataset, net.y_embedder.tokenizer)
net = cpu_layout(net, model_args["name"], device)
net.y_embedder.perturb = perturbation(cep, cep_type, cep_scale, 0.0, seed)
opt, ema = optimizer_and_ema(net, lr, weight_decay)  # ema: what sample.py samples
step, elapsed, train_net, autocast, loader, batches = start(config, net, opt, ema, dataset, model_args,
                                                             CLEAN, rank, world_size, device, log, stop)
log.config(config)
log(f"adapting {init} (frozen, {model_args['name']}) with {adapter}, control: {control}; {describe_size(net)}; "
    f"{len(dataset)} images; CEP: {describe_cep(cep, cep_type, cep_scale)}; {world_size} process(es) on {device}")

# -----------------------------------------------------------------------------
# the training loop
net.train()
steps = Steps(step, elapsed, config, device, log, stop, record, write_grid)
for (x, y, *controls), index in zip(loader, batches):
    seed_step(seed, steps.step, rank)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    hint = hints(index, x, controls)  # from the images: before they are encoded
    if first_stage is not None:
        with torch.no_grad():
            x = first_stage.encode(x)
    t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=device)
    noise = torch.randn_like(x)
    x_t = diffusion.q_sample(x, t, noise)
    with autocast:
        out = train_net(x_t, t, y, hint)
    loss = diffusion.training_loss(out, x, x_t, t, noise).mean()
    loss.backward()
    if steps.update(loss, net, opt, ema):
        break
steps.finish()
