"""
Train a class- or text-conditional DiT or LDM U-Net, optionally on corrupted conditions (corrupt.py) and with CEP
(cep.py). Text conditioning changes only the condition encoder: captions -> CLIP tokens -> a text transformer ->
token embeddings, the U-Net's cross-attention context.

  python train.py                                        # the embedded default: built-in shapes, CPU, minutes
  torchrun --nproc_per_node=8 train.py --corrupt 0.05 --cep
  python train.py my_config.py --max_steps=1000          # a config file, then overrides
  python train.py --latents=latents/in256 --model=DiT-XL/2   # on latents cached by data.py (the fast path)
  python train.py --data_path=imagenet/train --image_size=256 --vae=sd-vae-ft-ema --model=LDM-S  # encoded on the fly
  python train.py --model=LDM-S --text_encoder=small     # text-to-image on the built-in shapes' captions
  python train.py --init=out/ckpt.pt --adapter=controlnet --control=canny --out_dir=out_canny   # adaptation
  python train.py --teacher=out/ckpt.pt --ema_decay=0.95 --lr=2e-4 --skip_interval=200 --out_dir=out_lcm  # LCM

Defaults are the variables below (nanoGPT style, see configurator.py). The RNG is re-seeded at every step from
(seed, step, rank), so timesteps, noise, label dropout, CEP and random-mode corruption are a function of the step:
that is what makes --resume continue exactly, with no RNG state to save.
"""
import atexit
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cep import CEP, FixedCEP, input_perturbation
from configurator import atomic_write, configure
from control import cached_controls, control_image
from corrupt import check_corruption, corrupt_batch, corrupt_conditions
from data import CaptionPairs, ImageCaptions, ImageFolder, LatentDataset, StepBatches, SyntheticShapes
from diffusion import GaussianDiffusion
from model import DiT_models, UNet_models
from sample import build, class_rows, control_grid, load_checkpoint, sample_grid, text_args
from text import load_clip_text_encoder, tokenize
from vae import load_first_stage

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
text_encoder = ""         # "": class-conditional | clip: CLIP's text transformer, frozen | small: 4 layers, trained
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
# downstream adaptation (the paper's Section 3.2): the model of `init` frozen, an adapter trained (control.py)
init = ""                 # the pre-trained checkpoint (train.py's ckpt.pt; its EMA weights are adapted)
adapter = ""              # "": pre-training | controlnet (U-Net or DiT) | t2i (T2I-Adapter, U-Net)
control = "canny"         # canny: the images' Canny edges (100/200) | mask: the built-in shapes' masks | a folder
                          # of control images laid out as data_path (data/a.jpg -> control/a.png), each its image's size
# consistency distillation (LCM, Luo et al. 2023), on this run's data and conditions; ema_decay is the target's (0.95)
teacher = ""              # the teacher's checkpoint (train.py's ckpt.pt; its EMA weights)
w_min = 2.0               # w ~ U[w_min, w_max], in LCM's convention cond + w (cond - uncond): w = cfg_scale - 1. LCM:
w_max = 4.0               # 5..15 for Stable Diffusion; ours: around the CPU default's grid scale 4 (w = 3)
skip_interval = 20        # k: the teacher's DDIM step skips k of the 1000 timesteps (LCM's 20, a grid of 50; the CPU
                          # default's student learns far better with 200: docs/lcm.md)
control_cache = ""        # a folder: the controls are computed once and cached there, keyed by the dataset's content
                          # and the control's settings (control.cached_controls; needs flip=False); "": per batch
# -----------------------------------------------------------------------------


def check_config():
    """Every bad setting fails here, before any work, with the setting's name. The model name and the corruption
    settings are checked again where they are used, but only after the data is read, which can take minutes."""
    if teacher:  # first: a diffusers pipeline folder sets the model, its data and its settings
        check_distillation()
    if model not in DiT_models and model not in UNet_models:
        raise ValueError(f"model {model!r} is not one of {', '.join([*DiT_models, *UNet_models])}")
    check_corruption(corrupt, corrupt_type, corrupt_mode)
    if latents and data_path:
        raise ValueError(f"latents={latents!r} and data_path={data_path!r} are both set: the cache holds its dataset")
    if text_encoder not in ("", "clip", "small"):
        raise ValueError(f"text_encoder must be '' (class-conditional), clip or small, got {text_encoder!r}")
    if skip_bad_images and text_encoder:  # a stand-in image would be paired with the caption of the one it replaces
        raise ValueError("skip_bad_images=True works on class folders; drop it for an image-caption set")
    if text_encoder and model not in UNet_models:
        raise ValueError(f"text_encoder={text_encoder}: text enters through cross-attention, which the DiT has not; "
                         f"use a U-Net ({', '.join(UNet_models)})")
    if corrupt > 0 and (corrupt_type in ("swap", "rewrite")) != bool(text_encoder):
        raise ValueError(f"corrupt_type={corrupt_type} does not apply to this " +
                         ("text-conditional run: use swap or rewrite" if text_encoder else
                          "class-conditional run: use sym or asym (swap and rewrite need a text_encoder)"))
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
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {world_size} processes")
    for key in ("max_steps", "log_every", "ckpt_every", "global_batch_size", "image_size", "synthetic_size",
                "synthetic_scale"):
        if globals()[key] <= 0:
            raise ValueError(f"{key} must be > 0, got {globals()[key]}")
    if bool(adapter) != bool(init):
        raise ValueError("adaptation needs both init (the pre-trained checkpoint) and adapter (controlnet or t2i), "
                         f"got init={init!r}, adapter={adapter!r}")
    if adapter:
        check_adaptation()
    elif control_cache:
        raise ValueError(f"control_cache={control_cache!r} caches an adaptation's controls: it needs adapter and init")
    if grid_steps < 2:
        raise ValueError(f"grid_steps must be >= 2, got {grid_steps}")
    if compile_mode not in ("default", "reduce-overhead", "max-autotune"):
        raise ValueError(f"compile_mode must be default, reduce-overhead or max-autotune, got {compile_mode!r}")
    if dtype not in ("bfloat16", "float32"):  # float16 would need a gradient scaler; bf16 does not
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    if data_path and not os.path.exists(data_path):
        raise FileNotFoundError(f"data_path {data_path!r} does not exist (expected a folder root/<class>/<image>, or "
                                "with a text encoder images with .txt captions or a .tsv/.csv manifest)")
    if resume and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint {ckpt_path!r}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f".write_test{rank}"), "w"):
            pass
        os.remove(os.path.join(out_dir, f".write_test{rank}"))
    except OSError as e:
        raise PermissionError(f"out_dir {out_dir!r} cannot be written: {e}") from e


def check_adaptation():
    global pretrained
    if adapter not in ("controlnet", "t2i"):
        raise ValueError(f"adapter must be controlnet or t2i, got {adapter!r}")
    if latents:  # Canny needs the images, and a control folder mirrors an image folder
        raise ValueError("adaptation reads the images and their controls: use data_path or the built-in shapes, "
                         "not latents")
    if control == "mask" and data_path:
        raise ValueError("control=mask is the built-in shapes' masks: for data_path give a folder of control images")
    if control not in ("canny", "mask") and not (os.path.isdir(control) and data_path):
        raise FileNotFoundError(f"control {control!r} is not canny, mask, or a folder of control images beside "
                                "data_path's images")
    pretrained = load_pretrained("init", init)
    if adapter == "t2i" and pretrained["model_args"]["name"] not in UNet_models:
        raise ValueError(f"adapter=t2i adds multi-scale features to a U-Net's encoder, and the model of {init!r} is "
                         f"{pretrained['model_args']['name']}, which has none: use adapter=controlnet")


def load_pretrained(key, path):
    """The checkpoint (or pipeline folder) of `init` or `teacher`, once a pre-trained model: not adapted, no student."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key} {path!r}: no such checkpoint (a pre-trained model, train.py's ckpt.pt)")
    if os.path.realpath(path) == os.path.realpath(ckpt_path):
        raise ValueError(f"{key} {path!r} would be overwritten by this run's checkpoints: pass another out_dir")
    state = load_checkpoint(path)
    if not state.get("model_args") or "adapter" in state["model_args"] or state["model_args"].get("guidance_embed"):
        raise ValueError(f"{key} {path!r} is not a pre-trained checkpoint of train.py (it is adapted, or a student)")
    return state


def check_distillation():
    global pretrained
    if adapter or init:
        raise ValueError("teacher (distillation) and init/adapter (adaptation) are two kinds of run: set one of them")
    if not 0 <= w_min <= w_max:
        raise ValueError(f"w_min={w_min}, w_max={w_max}: the guidance range needs 0 <= w_min <= w_max")
    if skip_interval <= 0 or 1000 % skip_interval:
        raise ValueError(f"skip_interval={skip_interval} does not divide the 1000 timesteps: take 10, 20 (LCM's)...")
    pretrained = load_pretrained("teacher", teacher)
    if os.path.isdir(teacher):  # Stable Diffusion, or the paper's LDMs: their model, first stage, text encoder,
        config.update(pretrained["config"])  # schedule and resolution are this run's (sample.read_pipeline)
        globals().update(config)
    args = pretrained["model_args"]
    theirs, ours = (args["name"], args["learn_sigma"], pretrained["prediction"]), (model, learn_sigma, prediction)
    if theirs != ours:  # the rest (size, channels, classes, text) once the data is read: pretrained_model_args
        raise ValueError(f"teacher {teacher!r} is (model, learn_sigma, prediction) {theirs}, not {ours}: pass these")


def pretrained_model_args(model_args):
    """The model_args of the pre-trained checkpoint, once they agree with this run's data and settings, and the
    adapter's (the base frozen, the adapter new) or a consistency student's (a guidance embedding; no label dropout)."""
    ours = dict(model_args, prediction=prediction, schedule=schedule)
    theirs = dict(pretrained["model_args"], prediction=pretrained["prediction"],
                  schedule=pretrained.get("schedule", "linear"))
    differ = [f"{k}: {theirs.get(k)!r} in {init or teacher}, {ours[k]!r} here" for k in sorted(ours)  # not theirs:
              if k != "class_dropout_prob" and ours[k] != theirs.get(k)]  # a pipeline's U-Net records its layout
    if differ:
        raise ValueError("this run does not fit the pre-trained model (pass the pre-training's model, image_size, "
                         "vae, text_encoder, prediction and schedule): " + "; ".join(differ))
    if teacher:
        return dict(pretrained["model_args"], class_dropout_prob=0.0, guidance_embed=True)
    downsample = first_stage.factor if first_stage else 1
    return dict(pretrained["model_args"], adapter=dict(kind=adapter, downsample=downsample))


def hints(index, images, controls):
    """The control images of the dataset items `index` (their images [-1, 1], their control items if any): from the
    cache, or computed from the images and controls."""
    if cached is not None:
        return torch.from_numpy(cached[index]).to(device).div(255).expand(-1, 3, -1, -1)
    return control_image(control, images, *[c.to(device) for c in controls])


@torch.no_grad()
def update_ema(ema, model, decay):
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]  # frozen CLIP: as it is
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)


config = configure(globals(), sys.argv[1:])
ckpt_path = os.path.join(out_dir, "ckpt.pt")
ddp = "RANK" in os.environ
if ddp:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
master = rank == 0
cuda = torch.cuda.is_available()
device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
if cuda:
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
check_config()
# built before the data is read: their constructors check cep_type, cep_scale, prediction and schedule
perturb = FixedCEP(cep_type, cep_scale, cep_fixed, seed) if cep_fixed else CEP(cep_type, cep_scale) if cep else \
    nn.Dropout(emb_dropout) if emb_dropout > 0 else None
diffusion = GaussianDiffusion(learn_sigma=learn_sigma, prediction=prediction, schedule=schedule,
                              min_snr_gamma=min_snr_gamma)


def log(msg):
    if master:
        tqdm.write(msg)
        with open(os.path.join(out_dir, "log.txt"), "a") as f:
            f.write(msg + "\n")


# SIGTERM, a scheduler's notice before preemption: noted here, and at the next check every rank saves and exits
# cleanly. SLURM sends it to every process: the loader's workers ignore it, but for the one multiprocessing sends
# them at exit, once `exiting` is set
sigterm, exiting = threading.Event(), multiprocessing.Event()
signal.signal(signal.SIGTERM, lambda *_: sigterm.set())
atexit.register(exiting.set)  # runs before multiprocessing's own exit function, which stops the workers

# data, and the corruption of its labels or captions (decided once, from the seed: identical on every rank)
bad_images = multiprocessing.Value("q", 0)  # the count of images skipped (skip_bad_images), shared with the workers
controls = control if adapter and control not in ("canny", "mask") else ""  # a folder of control images
if latents:
    dataset = LatentDataset(latents)
elif data_path:
    dataset = ImageCaptions(data_path, image_size, controls) if text_encoder else \
        ImageFolder(data_path, image_size, flip, skipped=bad_images if skip_bad_images else None, controls=controls)
else:
    dataset = SyntheticShapes(synthetic_size, image_size, synthetic_seed, bool(adapter) and control == "mask",
                              synthetic_scale)
cached = None
if adapter and control_cache:  # rank 0 computes the cache while the others wait, then they read it
    if not master:
        dist.barrier()
    cached = cached_controls(dataset, control, control_cache, num_workers=num_workers)
    if master and ddp:
        dist.barrier()
    dataset.masks, dataset.controls = False, None  # the items' own controls are no longer read
if (text_encoder and dataset.captions is None) or (not text_encoder and dataset.labels is None):
    raise ValueError(f"the cache {latents!r} holds " + ("no captions: extract it from captioned images" if text_encoder
                     else "captions, not classes: set text_encoder"))
# the first stage: encodes images on the fly (without a cache) and decodes the sample grids
vae = vae or (dataset.meta["vae"] if latents else "")
first_stage = load_first_stage(vae).to(device).eval().requires_grad_(False) if vae else None
if latents:
    in_channels, input_size = dataset.meta["latent_shape"][:2]
    if (first_stage.scale, first_stage.latent_channels, dataset.resolution // first_stage.factor) != \
            (dataset.meta["scale"], in_channels, input_size):
        raise ValueError(f"vae {vae!r} is not the VAE that encoded the cache {latents!r} ({dataset.meta['vae']})")
elif first_stage:
    if image_size % first_stage.factor:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling {first_stage.factor}")
    in_channels, input_size = first_stage.latent_channels, image_size // first_stage.factor
else:
    in_channels, input_size = 3, image_size
if text_encoder:
    num_classes = 0
    grid_rows = [dataset.captions[i] for i in np.linspace(0, len(dataset) - 1, 8).round().astype(np.int64)]  # clean
    dataset.captions, corruption, record = corrupt_conditions(dataset.captions, corrupt, corrupt_type, corrupt_mode,
                                                              seed, rewrites=corrupt_rewrites)
    dataset = CaptionPairs(dataset, tokenize)  # the images and their (corrupted) captions' tokens
else:
    num_classes = len(dataset.classes)
    grid_rows = class_rows(num_classes)
    prior = torch.from_numpy(np.bincount(dataset.labels, minlength=num_classes)).float().to(device)
    dataset.labels, corruption, record = corrupt_conditions(dataset.labels, corrupt, corrupt_type, corrupt_mode, seed,
                                                            corrupt_subset, classes=dataset.classes)
if record and master:
    with atomic_write(os.path.join(out_dir, "corruption.json"), "w") as f:
        json.dump(record, f)
if ddp:  # every rank decided alone; a dataset listed differently on another node would silently differ
    records = [None] * world_size
    dist.all_gather_object(records, corruption)
    if any(r != corruption for r in records):
        raise RuntimeError(f"the ranks corrupted different labels (is the dataset the same on every node?): {records}")

# model, EMA, optimiser
# what sample.py needs to rebuild the model and decode its samples, in the checkpoint (plain types: weights_only loads)
model_args = dict(name=model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                  learn_sigma=learn_sigma, class_dropout_prob=class_dropout)
if text_encoder == "clip":
    clip_text = load_clip_text_encoder(clip_model)
    model_args.update(text_args(clip_text))
elif text_encoder == "small":
    model_args.update(text_layers=4)  # of the U-Net's context width (our choice: small enough for a CPU)
first_stage_args = dict(vae=os.path.abspath(vae), scale=first_stage.scale) if vae else None
model_args = pretrained_model_args(model_args) if adapter or teacher else model_args
torch.manual_seed(seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
net = build(model_args).to(device)
if text_encoder == "clip":
    net.y_embedder.encoder.load_state_dict(clip_text.state_dict())
    net.y_embedder.encoder.requires_grad_(False)
    del clip_text
if adapter:
    net.base.load_state_dict(pretrained["ema"])
if teacher:  # the student starts as the teacher: all its weights, and a guidance embedding of zeros
    teacher_net = build(pretrained["model_args"]).to(device).eval().requires_grad_(False)
    teacher_net.load_state_dict(pretrained["ema"])  # the checkpoint check_distillation read: not read twice
    net.load_state_dict({**net.state_dict(), **pretrained["ema"]})
pretrained = None
consistency = dict(teacher=teacher, w_min=w_min, w_max=w_max, skip_interval=skip_interval) if teacher else None
if model in UNet_models and not cuda:  # NHWC convolutions and group norms of oneDNN are faster on CPU; PyTorch's
    net = net.to(memory_format=torch.channels_last)  # eager CUDA group norm would convert back to NCHW at each norm
net.y_embedder.perturb = perturb
if label_smoothing:
    net.y_embedder.smoothing = label_smoothing
ema = deepcopy(net).requires_grad_(False).eval()
# fused: one kernel over all parameters, on GPU and on CPU (there far faster than the foreach implementation)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                        fused=True)
step = 0
if resume:
    state = load_checkpoint(ckpt_path, map_location=device)
    if "opt" not in state:
        raise ValueError(f"{ckpt_path!r} holds weights only (a bare state dict): sample.py can sample it, but a resume "
                         "needs what train.py saves beside them (optimiser, step, corruption); use another out_dir")
    if state["model_args"] != model_args:
        diff = "; ".join(f"{'model' if k == 'name' else k} {state['model_args'].get(k, '-')} in the checkpoint, "
                         f"{model_args.get(k, '-')} in this run" for k in sorted({*state["model_args"], *model_args})
                         if state["model_args"].get(k) != model_args.get(k))
        raise ValueError(f"{ckpt_path!r} holds another model than this run asks for ({diff}): resume with the "
                         "checkpoint's settings (its config is in it), or use another out_dir")
    if state["corruption"] != corruption:
        raise ValueError(f"the checkpoint was trained with corruption {state['corruption']}, this run has {corruption}")
    net.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    for group in opt.param_groups:  # this run's, not the checkpoint's: a resume may lower the lr
        group.update(lr=lr, weight_decay=weight_decay)
    step = state["step"]
    del state
    if step >= max_steps:  # a finished run: no data loader, no grid, checkpoint untouched (study.py resumes every run)
        log(f"{ckpt_path} is at step {step}, max_steps={max_steps}: nothing to train")
        if ddp:
            dist.destroy_process_group()
        sys.exit()
train_net = torch.compile(net, mode=compile_mode) if compile else net
if ddp:
    train_net = DDP(train_net, device_ids=[device] if cuda else None)
autocast = torch.autocast("cuda", dtype=getattr(torch, dtype)) if cuda and dtype != "float32" else nullcontext()
batches = StepBatches(len(dataset), global_batch_size, rank, world_size, seed, step)
loader = torch.utils.data.DataLoader(
    dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=cuda, persistent_workers=num_workers > 0,
    worker_init_fn=lambda _: signal.signal(signal.SIGTERM, lambda *_: exiting.is_set() and os._exit(0)))

space = f"latents {in_channels}x{input_size}x{input_size} {'from ' + latents if latents else 'encoded on the fly'}" \
    if vae else "pixel space"
conditions = f"{num_classes} classes" if not text_encoder else "captions, text encoder: " + \
    (f"CLIP {clip_model}, frozen" if text_encoder == "clip" else "small, trained")
log(f"{model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
    f"{sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6:.2f}M trained), {len(dataset)} images, "
    f"{space}, {conditions}, {world_size} process(es) on {device}; corruption: {corruption}; "
    f"CEP: {f'{cep_type} gamma={cep_scale}' if cep else 'off'}{f' fixed for {cep_fixed:.1%}' if cep_fixed else ''}; "
    f"IP: {ip}; embedding dropout: {emb_dropout}; label smoothing: {label_smoothing}" +
    (f"; adapting {init} (frozen) with {adapter}, control: {control}" if adapter else "") +
    (f"; distilling {teacher} (frozen), w in [{w_min}, {w_max}], k={skip_interval}" if teacher else ""))
net.train()
loss_sum = torch.zeros((), device=device)  # read at the checks only: no host-device sync per step
nonfinite = torch.zeros((), dtype=torch.bool, device=device)
preempted = False
last_log_step, last_log_time, start_time = step, time.time(), time.time()
progress = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True)
for (x, y, *controls), index in zip(loader, batches):  # a second pass of the sampler: the dataset indices
    if step >= max_steps:
        break
    if cep_fixed:
        perturb.index = torch.tensor(index)
    torch.manual_seed((seed * 1_000_003 + step) * 4096 + rank)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    hint = (hints(index, x, controls),) if adapter else ()  # from the images: before they are encoded
    if first_stage is not None and not latents:
        with torch.no_grad():  # in float32 outside autocast: the posterior mean, as data.py caches it
            x = first_stage.encode(x)
    if corrupt > 0 and corrupt_mode == "random":
        y = corrupt_batch(y, corrupt, prior)
    k = skip_interval if teacher else 1  # distillation: t = t_{n+k} on LCM's skipping grid k - 1, 2k - 1, ..., 999
    t = torch.randint(0, diffusion.num_timesteps // k, (len(x),), device=device) * k + k - 1
    noise = torch.randn_like(x)
    x_t = diffusion.q_sample(x, t, input_perturbation(noise, ip) if ip > 0 else noise)
    student = dict(w=w_min + (w_max - w_min) * torch.rand(len(x), device=device)) if teacher else {}  # its guidance
    with autocast:
        out = train_net(x_t, t, y, *hint, **student)
        if teacher:  # the teacher guided with w (LCM's cond + w (cond - uncond): cfg scale 1 + w), the EMA target
            loss = diffusion.consistency_loss(out, x_t, t, lambda x, s: teacher_net.forward_with_cfg(
                x, s, y, 1 + student["w"].view(-1, 1, 1, 1)), lambda x, s: ema(x, s, y, **student), skip_interval)
    loss = (loss if teacher else diffusion.training_loss(out, x, x_t, t, noise)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), grad_clip or float("inf"))  # the norm, for the NaN check
    opt.step()
    update_ema(ema, net, ema_decay)
    loss_sum += loss.detach()
    nonfinite |= ~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)  # NaN gradients make NaN weights
    step += 1
    progress.update()
    at_log, at_ckpt = step % log_every == 0 or step == max_steps, step % ckpt_every == 0 or step == max_steps
    if at_log or at_ckpt or step % 10 == 0:  # the host-device sync, every 10 steps at most: the loss, the checks
        if at_ckpt or sigterm.is_set():  # finite gradients can still overflow the weights: never checkpoint those
            nonfinite |= ~torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all()
        host = torch.tensor([sigterm.is_set(), bad_images.value], device=device)
        stats = torch.cat([torch.stack([loss_sum, nonfinite.float()]), host])
        if ddp:
            dist.all_reduce(stats)
        loss_total, nonfinite_ranks, preempted, skipped = stats.tolist()  # sums over the ranks: every rank agrees
        if nonfinite_ranks:
            kept = f"the last good checkpoint {ckpt_path!r} is kept" if os.path.isfile(ckpt_path) else \
                "no checkpoint was written"
            raise FloatingPointError(f"the loss or the weights became NaN or infinite between steps {last_log_step} "
                                     f"and {step}; {kept}")
    if at_log:
        now = time.time()
        log(f"step {step} | loss {loss_total / world_size / (step - last_log_step):.4f} | "
            f"{(step - last_log_step) * global_batch_size / (now - last_log_time):.1f} img/s | "
            f"elapsed {now - start_time:.0f}s" + (f" | {skipped:.0f} unreadable images skipped" if skipped else ""))
        loss_sum.zero_()
        last_log_step, last_log_time = step, now
    if (at_ckpt or preempted) and master:
        with atomic_write(ckpt_path) as f:  # a kill or a full disk mid-write leaves the previous checkpoint
            torch.save(dict(model=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                            config=config, corruption=corruption, model_args=model_args, prediction=prediction,
                            schedule=schedule, first_stage=first_stage_args, consistency=consistency), f)
    if preempted:
        log(f"SIGTERM: saved {ckpt_path} at step {step} and stopped; continue with --resume")
        break
    if master and (step == max_steps or (sample_every and step % sample_every == 0)):
        grid = os.path.join(out_dir, f"samples_{step:07d}.png")
        kwargs = dict(seed=seed, cfg_scale=grid_cfg_scale, sampler="lcm" if teacher else "dpm++", size=input_size,
                      num_steps=4 if teacher else grid_steps, skip_interval=skip_interval, vae=first_stage,
                      prediction=prediction, schedule=schedule)
        if adapter:  # the controls of 8 training images (sample.py: of held-out ones), a row each
            rows = np.linspace(0, len(dataset) - 1, 8).round().astype(np.int64)
            images, _, *controls = torch.utils.data.default_collate([dataset[i] for i in rows])
            control_grid(ema, grid, [dataset.captions[i] if text_encoder else int(dataset.labels[i]) for i in rows],
                         hints(rows, images.to(device), controls), **kwargs)
        else:
            sample_grid(ema, grid, grid_rows, **kwargs)
        log(f"sample grid (EMA, cfg {grid_cfg_scale}, {kwargs['num_steps']} {kwargs['sampler']} steps): {grid}")
progress.close()
if ddp:
    dist.barrier()
    dist.destroy_process_group()
