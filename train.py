"""
Pre-train a class- or text-conditional DiT or LDM U-Net, optionally on corrupted conditions (corrupt.py) and with CEP
(cep.py) or one of its baselines (input perturbation, embedding dropout, label smoothing): the paper's lesson. Text
conditioning changes only the condition encoder: captions -> tokens -> a text transformer -> token embeddings, the
U-Net's cross-attention context.

  python train.py                                        # the embedded default: built-in shapes, CPU, minutes
  torchrun --nproc_per_node=8 train.py --corrupt 0.05 --cep
  python train.py config/ldm4_in256.py --corrupt 0.025   # a config file (the paper's presets in config/), then flags
  python train.py --latents=latents/in256 --model=DiT-XL/2   # on latents cached by data.py (the fast path)
  python train.py --data_path=imagenet/train --image_size=256 --vae=sd-vae-ft-ema --model=LDM-S  # encoded on the fly
  python train.py --model=LDM-S --text_encoder=small     # text-to-image on the built-in shapes' captions

Adaptation (ControlNet, T2I-Adapter) is adapt.py's, consistency distillation distill.py's; both start from the
checkpoint this writes. Defaults are the variables below (nanoGPT style, see configurator.py; --help lists them).
The RNG is re-seeded at every step from (seed, step, rank), so timesteps, noise, label dropout, CEP and random-mode
corruption are a function of the step: that is what makes --resume continue exactly, with no RNG state to save.
"""
import multiprocessing
import os
import sys

import numpy as np
import torch

from cep import input_perturbation
from configurator import configure
from corrupt import check_corruption, corrupt_batch
from data import CaptionPairs
from diffusion import GaussianDiffusion
from model import DiT_models, UNet_models
from pipeline import build, class_rows, sample_grid, text_args
from text import load_clip_text_encoder, read_bert_folder
from training import (
    Log, Steps, Stop, check_out_dir, check_training, corrupted_dataset, cpu_layout, describe_cep, describe_size,
    first_stage_for, init_distributed, open_dataset, optimizer_and_ema, perturbation, seed_step, start
)

# -----------------------------------------------------------------------------
# data and model
out_dir = "out"
data_path = ""            # "": the built-in synthetic shapes; else an ImageNet-style folder root/<class>/<image>, or
                          # with a text encoder an image-caption set (data.ImageCaptions: .txt beside, or a manifest)
flip = True               # class folders: random horizontal flips (ADM, DiT); False where a flip changes the class
skip_bad_images = False   # an unreadable image of a class folder stops the run naming it; True: the next image
                          # stands in, and the log counts them
latents = ""              # a cache written by data.py: train on its latents instead of images (the fast path)
vae = ""                  # a folder of diffusers VAE (or VQ-f4) weights: encode images on the fly; with latents, the
                          # VAE that decodes the grids, by default the one the cache was written with
image_size = 16           # the CPU default: at 16 px with patch 2 the model learns the shapes in minutes (README)
synthetic_size = 20000
synthetic_seed = 0        # the built-in dataset's draw, apart from `seed`: evaluate.py's reference draws seed 1
synthetic_scale = 1.0     # the built-in shapes' size, times: 0.6 is the downstream task of docs/downstream.md
model = "DiT-Ti/2"        # model.DiT_models (DiT-XL/2, ...) or model.UNet_models (LDM-4, LDM-S)
learn_sigma = True
prediction = "v"          # v | eps: what the model predicts. DiT and LDM predict eps; v learns far sooner on a
                          # short budget (diffusion.GaussianDiffusion), so the CPU default uses it
schedule = "linear"       # the betas: linear (DDPM, DiT) | scaled_linear (LDM-4) | sd (diffusion.GaussianDiffusion)
min_snr_gamma = 5.0       # Min-SNR-gamma loss weights, which learn the shapes sooner; 0: the plain MSE (DiT, LDM)
class_dropout = 0.1       # label dropout to the null class (the empty caption), for classifier-free guidance
text_encoder = ""         # "": class-conditional | bert: bert-base-uncased, trained with the U-Net (the paper's CC3M
                          # encoder) | clip: CLIP's text transformer, frozen | small: 4 layers, trained
bert_path = "bert-base-uncased"  # text_encoder=bert: a Hugging Face bert-base-uncased folder (config.json, vocab.txt,
                          # model.safetensors)
clip_model = "ViT-L/14"   # text_encoder=clip: a CLIP checkpoint file, or a clip model name (in ~/.cache/clip)
# optimisation
global_batch_size = 16    # the CPU default: at the same images/s, twice the updates of batch 32 learn more
max_steps = 3000
lr = 1e-3                 # DiT: 1e-4 at batch 256; a tiny model on a CPU budget takes more
weight_decay = 0.0
grad_clip = 1.0           # the gradient's global norm; 0: no clipping (DiT and LDM clip none)
ema_decay = 0.995         # DiT: 0.9999 over 400K steps; a short run needs a short average
seed = 0
num_workers = 2
compile = False
compile_mode = "default"  # torch.compile's mode: default | reduce-overhead (CUDA graphs, for small models whose eager
                          # steps wait on kernel launches; docs/speed.md) | max-autotune
dtype = "bfloat16"        # autocast dtype on CUDA; "float32" turns autocast off
# logging, checkpoints, samples
log_every = 100
ckpt_every = 500
sample_every = 0          # 0: a sample grid at the end only
grid_cfg_scale = 4.0
grid_steps = 50           # DPM-Solver++ steps
resume = False
wandb_project = ""        # "": no Weights & Biases; a project name logs the loss there too (pip install wandb)
wandb_run_name = ""
# corrupted conditions and CEP (the paper)
corrupt = 0.0             # eta: the fraction of training samples whose condition is wrong
corrupt_type = "sym"      # class labels: sym | asym; captions: swap | rewrite
corrupt_mode = "fixed"    # fixed: decided once from the seed | random: each label flipped with prob eta every step
corrupt_subset = ""       # asym: class indices "1,5,9", or a file of class indices or folder names
corrupt_rewrites = ""     # rewrite: a JSON file {"index": "rewritten caption", ...}
cep = False
cep_type = "uniform"      # uniform (CEP-U) | gaussian (CEP-G)
cep_scale = 1.0           # gamma
cep_fixed = 0.0           # > 0: Fixed CEP (paper App. E.4): this fraction of the samples keeps one delta all run
ip = 0.0                  # input perturbation baseline, lambda (0.1 in Ning et al.)
emb_dropout = 0.0         # dropout on the class embedding, a baseline (the paper: 0.1)
label_smoothing = 0.0     # label smoothing on the class embedding, a baseline (the paper: 0.1; model.LabelEmbedder)
# -----------------------------------------------------------------------------
MOVED = dict(init="adapt.py", adapter="adapt.py", control="adapt.py", control_cache="adapt.py", teacher="distill.py",
             w_min="distill.py", w_max="distill.py", skip_interval="distill.py")


def check_config():
    """Every bad setting fails here, before any work, with the setting's name. The model name and the corruption
    settings are checked again where they are used, but only after the data is read, which can take minutes."""
    if model not in DiT_models and model not in UNet_models:
        raise ValueError(f"model {model!r} is not one of {', '.join([*DiT_models, *UNet_models])}")
    check_corruption(corrupt, corrupt_type, corrupt_mode)
    if latents and data_path:
        raise ValueError(f"latents={latents!r} and data_path={data_path!r} are both set: the cache holds its dataset")
    if text_encoder not in ("", "bert", "clip", "small"):
        raise ValueError(f"text_encoder must be '' (class-conditional), bert, clip or small, got {text_encoder!r}")
    if skip_bad_images and text_encoder:  # a stand-in image would be paired with the caption of the one it replaces
        raise ValueError("skip_bad_images=True works on class folders; drop it for an image-caption set")
    if text_encoder and model not in UNet_models:
        raise ValueError(f"text_encoder={text_encoder}: text enters through cross-attention, which the DiT has not; "
                         f"use a U-Net ({', '.join(UNet_models)})")
    caption_corruption = corrupt_type in ("swap", "rewrite")
    if corrupt > 0 and caption_corruption and not text_encoder:
        raise ValueError(f"corrupt_type={corrupt_type} does not apply to this class-conditional run: use sym or asym "
                         "(swap and rewrite need a text_encoder)")
    if corrupt > 0 and not caption_corruption and text_encoder:
        raise ValueError(f"corrupt_type={corrupt_type} does not apply to this text-conditional run: use swap or "
                         "rewrite")
    if corrupt_type == "rewrite" and corrupt > 0 and not os.path.isfile(corrupt_rewrites):
        raise FileNotFoundError(f"corrupt_type=rewrite needs corrupt_rewrites, a JSON file of rewritten captions "
                                f"{{\"index\": \"caption\"}}; got {corrupt_rewrites!r}")
    if corrupt_type == "asym" and corrupt > 0 and not corrupt_subset:
        raise ValueError("corrupt_type=asym needs corrupt_subset: class indices '1,5,9' or a file of them")
    if cep and emb_dropout > 0:  # both would be the embedding's one perturbation; the paper compares them
        raise ValueError("cep and emb_dropout are alternatives (the paper compares them): set one of them")
    if cep_fixed and not cep:
        raise ValueError(f"cep_fixed={cep_fixed} is a variant of CEP: add --cep")
    if label_smoothing and text_encoder:
        raise ValueError("label_smoothing mixes class embeddings; a text-conditional run has none: drop it")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    for key in ("ip", "emb_dropout", "lr", "weight_decay", "grad_clip", "class_dropout", "min_snr_gamma"):
        if globals()[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {globals()[key]}")
    positive = ("max_steps", "log_every", "ckpt_every", "global_batch_size", "image_size", "synthetic_size",
                "synthetic_scale")
    check_training(config, world_size, ckpt_path, positive)
    if grid_steps < 2:
        raise ValueError(f"grid_steps must be >= 2, got {grid_steps}")
    if compile_mode not in ("default", "reduce-overhead", "max-autotune"):
        raise ValueError(f"compile_mode must be default, reduce-overhead or max-autotune, got {compile_mode!r}")
    if dtype not in ("bfloat16", "float32"):  # float16 would need a gradient scaler; bf16 does not
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    if data_path and not os.path.exists(data_path):
        raise FileNotFoundError(f"data_path {data_path!r} does not exist (expected a folder root/<class>/<image>, or "
                                "with a text encoder images with .txt captions or a .tsv/.csv manifest)")
    check_out_dir(out_dir, rank)


def write_grid(path):
    """The EMA's samples: at the end, and every sample_every steps."""
    sample_grid(ema, path, grid_rows, seed=seed, cfg_scale=grid_cfg_scale, num_steps=grid_steps, size=input_size,
                vae=first_stage, prediction=prediction, schedule=schedule, progress=True)
    log(f"sample grid (EMA, cfg {grid_cfg_scale}, {grid_steps} DPM-Solver++ steps): {path}")


def refuse_moved(argv):
    """The flags of adaptation and distillation, which train.py had, name the script that has them now."""
    for arg in argv:
        key = arg[2:].split("=")[0]
        if arg.startswith("--") and key in MOVED:
            sys.exit(f"error: --{key} is {MOVED[key]}'s now: python {MOVED[key]} --{key} ... (train.py pre-trains)")


refuse_moved(sys.argv[1:])
config = configure(globals(), sys.argv[1:])
ckpt_path = os.path.join(out_dir, "ckpt.pt")
rank, world_size, device = init_distributed()
check_config()
log = Log(out_dir, rank == 0, wandb_project, wandb_run_name, config)
# built before the data is read: their constructors check cep_type, cep_scale, prediction and schedule
perturb = perturbation(cep, cep_type, cep_scale, cep_fixed, seed, emb_dropout)
diffusion = GaussianDiffusion(learn_sigma=learn_sigma, prediction=prediction, schedule=schedule,
                              min_snr_gamma=min_snr_gamma)
stop = Stop()

# data, and the corruption of its labels or captions (decided once, from the seed: identical on every rank)
skipped_images = multiprocessing.Value("q", 0)  # images skipped (skip_bad_images), counted across the loader workers
dataset = open_dataset(latents, data_path, bool(text_encoder), image_size, flip,
                       skipped_images if skip_bad_images else None, synthetic_size=synthetic_size,
                       synthetic_seed=synthetic_seed, synthetic_scale=synthetic_scale)
first_stage, first_stage_args, in_channels, input_size = first_stage_for(vae, dataset, latents, image_size, device)
if text_encoder:
    num_classes = 0
    grid_rows = [dataset.captions[i] for i in np.linspace(0, len(dataset) - 1, 8).round().astype(np.int64)]  # clean
else:
    num_classes = len(dataset.classes)
    grid_rows = class_rows(num_classes)
dataset, corruption, prior = corrupted_dataset(dataset, bool(text_encoder), corrupt, corrupt_type, corrupt_mode, seed,
                                               corrupt_subset, corrupt_rewrites, out_dir, rank == 0, world_size)

# model, EMA, optimiser
# what sample.py needs to rebuild the model and decode its samples, in the checkpoint (plain types: weights_only loads)
model_args = dict(name=model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                  learn_sigma=learn_sigma, class_dropout_prob=class_dropout)
if text_encoder == "clip":
    clip_text = load_clip_text_encoder(clip_model)
    model_args.update(text_args(clip_text))
elif text_encoder == "small":
    model_args.update(text_layers=4)  # of the U-Net's context width (our choice: small enough for a CPU)
elif text_encoder == "bert":  # build() loads the folder's pre-trained weights: trained with the U-Net, as the paper's
    model_args.update(bert=os.path.abspath(bert_path), context_dim=read_bert_folder(bert_path)[0]["hidden_size"])
# what each checkpoint holds beside the weights: what sample.py, adapt.py and distill.py read back
record = dict(config=config, corruption=corruption, model_args=model_args, prediction=prediction, schedule=schedule,
              first_stage=first_stage_args, consistency=None)
torch.manual_seed(seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
net = build(model_args).to(device)
if text_encoder == "clip":
    net.y_embedder.encoder.load_state_dict(clip_text.state_dict())
    net.y_embedder.encoder.requires_grad_(False)
    del clip_text
if text_encoder:  # the images and their (corrupted) captions' tokens
    dataset = CaptionPairs(dataset, net.y_embedder.tokenizer)
net = cpu_layout(net, model, device)
net.y_embedder.perturb = perturb
if label_smoothing:
    net.y_embedder.smoothing = label_smoothing
opt, ema = optimizer_and_ema(net, lr, weight_decay)  # ema: what sample.py samples
step, elapsed, train_net, autocast, loader, batches = start(config, net, opt, ema, dataset, model_args,
                                                             corruption, rank, world_size, device, log, stop)
if prior is not None:
    prior = prior.to(device)

space = "pixel space"
if latents:
    space = f"latents {in_channels}x{input_size}x{input_size} from {latents}"
elif first_stage is not None:
    space = f"latents {in_channels}x{input_size}x{input_size} encoded on the fly"
conditions = f"{num_classes} classes"
if text_encoder == "clip":
    conditions = f"captions, text encoder: CLIP {clip_model}, frozen"
elif text_encoder:
    conditions = f"captions, text encoder: {text_encoder}, trained"
log.config(config)
log(f"{model} ({describe_size(net)}), {len(dataset)} images, {space}, {conditions}, "
    f"{world_size} process(es) on {device}; corruption: {corruption}; "
    f"CEP: {describe_cep(cep, cep_type, cep_scale, cep_fixed)}; IP: {ip}; embedding dropout: {emb_dropout}; "
    f"label smoothing: {label_smoothing}")

# -----------------------------------------------------------------------------
# the training loop
net.train()
steps = Steps(step, elapsed, config, device, log, stop, record, write_grid, skipped_images)
for (x, y), index in zip(loader, batches):  # a second pass of the sampler: the dataset indices, for Fixed CEP
    if cep_fixed:
        perturb.index = torch.tensor(index)
    seed_step(seed, steps.step, rank)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if first_stage is not None and not latents:
        with torch.no_grad():  # in float32 outside autocast: the posterior mean, as data.py caches it
            x = first_stage.encode(x)
    if corrupt > 0 and corrupt_mode == "random":
        y = corrupt_batch(y, corrupt, prior)
    t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=device)
    noise = torch.randn_like(x)
    x_t = diffusion.q_sample(x, t, input_perturbation(noise, ip) if ip > 0 else noise)
    with autocast:
        out = train_net(x_t, t, y)
    loss = diffusion.training_loss(out, x, x_t, t, noise).mean()
    loss.backward()
    if steps.update(loss, net, opt, ema):
        break
steps.finish()
