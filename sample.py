"""
Sample from a trained model: DPM-Solver++, DDPM (ancestral, with the learned variance) or DDIM, with
classifier-free guidance.

  python sample.py --ckpt out/ckpt.pt                           # a grid PNG, one row per class
  torchrun --nproc_per_node=8 sample.py --ckpt out/ckpt.pt --num_samples 50000 --cfg_scale 1.5
      # an .npz for evaluate.py: uint8 images NHWC in arr_0, class labels in arr_1 (the ADM evaluator's format)
  python sample.py --ckpt out/ckpt.pt --prompts prompts.txt     # text-to-image: one row per prompt, captioned
  torchrun --nproc_per_node=8 sample.py --ckpt out/ckpt.pt --prompts captions_val2014.json --num_samples 30000
      # the .npz, and its prompts one per line beside it in <name>_prompts.txt
  python sample.py --ckpt out_canny/ckpt.pt --num_samples 1000  # an adapted model (train.py --adapter): samples for
      # the controls and conditions of held-out images (--data_path; default the built-in shapes' held-out split)

Checkpoints: ours (EMA weights by default; DiT or U-Net, in pixel or latent space) or a bare DiT state dict
(official or diffusers layout). Latents are decoded with the VAE the checkpoint records, or --vae; the official
DiT checkpoints record none: python sample.py --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema
"""
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

from control import adapt, control_image
from data import ImageCaptions, ImageFolder, SyntheticShapes
from diffusion import GaussianDiffusion
from model import UNet_models, build_model, load_dit
from text import TextEmbedder, TextEncoder, tokenize
from vae import load_first_stage

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"
use_ema = True
sampler = "dpm++"       # dpm++ (DPM-Solver++(2M), the paper's sampler) | ddpm | ddim
num_steps = 50          # the paper: DPM-Solver++ at 50; DDPM takes 250 for the same quality
ddim_eta = 0.0
cfg_scale = 4.0         # 1.0 = no guidance; DiT reports FID at 1.5, the paper at 1.75
num_samples = 0         # 0: a grid; N > 0: an .npz of N class-balanced samples, or of the prompts in turn
prompts = ""            # text-to-image: a file of prompts, one per line, or a COCO captions JSON
grid_classes = 10       # rows of the grid: classes evenly spaced, or the first prompts
grid_per_class = 8
batch_size = 64
seed = 0
out = ""                # default: beside the checkpoint
vae = ""                # a folder of diffusers VAE weights, to decode latents; default: the one the checkpoint records
# adapted models (train.py --adapter): held-out images give the controls and the conditions (labels or captions)
data_path = ""          # a class folder (an image-caption set for text models) of held-out images; "": the built-in
                        # shapes' held-out split, seed 1 (evaluate.py's "synthetic" reference, synthetic_ref_size=N)
control = ""            # "": the one the model was adapted with (canny, mask); or the held-out images' control folder
# -----------------------------------------------------------------------------


def build(model_args):
    """The model that train.py's model_args describe; a text-to-image U-Net with its text encoder (text_layers); an
    adapted model (control.Adapted) with its adapter."""
    args = dict(model_args)
    text_layers, adapter = args.pop("text_layers", 0), args.pop("adapter", None)
    if text_layers:
        width = args.get("context_dim", UNet_models[args["name"]]["context_dim"])
        args["y_embedder"] = TextEmbedder(TextEncoder(width, text_layers), args["class_dropout_prob"])
    return adapt(build_model(**args), **adapter) if adapter else build_model(**args)


def load_model(path, use_ema=True):
    """The model of a checkpoint, in eval mode, and what train.py recorded beside it: model_args (input_size...),
    first_stage (dict(vae=path, scale), None in pixel space) and prediction; {} for a bare state dict. Missing file:
    an error that names it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found: train one with train.py, or pass --ckpt "
                                "with the path of an official DiT checkpoint (e.g. DiT-XL-2-256x256.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "ema" not in state:  # a bare DiT state dict
        return load_dit(state).eval(), {}
    model = build(state["model_args"])
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.eval(), dict(model_args=state["model_args"], first_stage=state["first_stage"],
                              prediction=state["prediction"], config=state["config"])


@torch.no_grad()
def sample(model, labels, cfg_scale=4.0, sampler="dpm++", num_steps=50, ddim_eta=0.0, generator=None,
           progress=False, size=None, vae=None, prediction="eps", hint=None):
    """Images (float, about [-1, 1]) for `labels`, from `num_steps` evenly spaced steps of the 1000 (diffusion.py's
    samplers). The model denoises size x size inputs (default: the DiT's input size): pixels, or with a first stage
    `vae` its latents, decoded at the end. The predicted x0 is clipped to [-1, 1] in pixel space only: latents are
    unbounded (DiT does not clip). `prediction`: what the model predicts, "eps" or "v". An adapted model
    (control.py) takes its control images `hint` [N, 3, H, W], one per label."""
    diffusion = GaussianDiffusion(learn_sigma=model.learn_sigma, prediction=prediction).respaced(num_steps)
    size = size or model.x_embedder.proj.kernel_size[0] * int(model.pos_embed.shape[1] ** 0.5)
    x = torch.randn(len(labels), model.in_channels, size, size, device=labels.device, generator=generator)
    inputs = {} if hint is None else dict(hint=hint)
    denoise = (lambda x, t: model(x, t, labels, **inputs)) if cfg_scale == 1 else \
        (lambda x, t: model.forward_with_cfg(x, t, labels, cfg_scale, **inputs))
    x = diffusion.sample(denoise, x, sampler, ddim_eta, clip_denoised=vae is None, generator=generator,
                         progress=progress)
    return x if vae is None else vae.decode(x)


def to_uint8(x):
    """[-1, 1] NCHW float -> uint8 NHWC, rounded as the ADM/DiT scripts do."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def read_prompts(path):
    """Prompts from a text file, one per line, or a COCO-style captions JSON ({"annotations": [{"caption": ...}]}, in
    the file's order); whitespace is normalised and empty prompts are dropped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} not found (one prompt per line, or a COCO captions JSON)")
    try:
        with open(path, encoding="utf-8-sig") as f:
            if not path.endswith(".json"):
                prompts = f.read().split("\n")
            else:
                try:
                    prompts = [a["caption"] for a in json.load(f)["annotations"]]
                except (KeyError, TypeError):
                    raise ValueError(f"prompts {path!r} is not a COCO captions JSON: it needs "
                                     '{"annotations": [{"caption": ...}, ...]}') from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path!r} is not UTF-8 ({e.reason} at byte {e.start}): save it as UTF-8") from None
    prompts = [p for p in (" ".join(p.split()) for p in prompts) if p]
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompts")
    return prompts


def prompts_path(npz):
    """Where the prompts of a text-to-image .npz are, one per line (evaluate.py reads them from there)."""
    return os.path.splitext(npz)[0] + "_prompts.txt"


def class_rows(num_classes, n=10):
    """n classes evenly spaced over the classes: the rows of a grid."""
    return np.unique(np.linspace(0, num_classes - 1, min(n, num_classes)).round().astype(np.int64)).tolist()


def as_condition(conditions, device):
    """Class labels -> LongTensor [n]; prompts -> CLIP tokens [n, 77]."""
    return (tokenize(conditions) if isinstance(conditions[0], str) else torch.as_tensor(conditions)).to(device)


def captioned_grid(images, captions, ncol, cell=128):
    """uint8 NHWC images in a grid, each scaled up (nearest) to at least `cell` pixels with its caption beneath."""
    from PIL import Image, ImageDraw, ImageFont
    font, size = ImageFont.load_default(), max(cell, images.shape[2])
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrap(text):
        lines = [""]
        for word in text.split():
            if lines[-1] and measure.textlength(f"{lines[-1]} {word}", font=font) > size - 4:
                lines.append(word)
            else:
                lines[-1] = f"{lines[-1]} {word}".strip()
        return "\n".join(lines)

    texts = [wrap(c) for c in captions]
    text_h = max(measure.multiline_textbbox((0, 0), t, font=font)[3] for t in texts) + 6
    rows = -(-len(images) // ncol)
    grid = Image.new("RGB", (ncol * (size + 2), rows * (size + text_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, text) in enumerate(zip(images, texts)):
        x, y = (k % ncol) * (size + 2), (k // ncol) * (size + text_h + 2)
        grid.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + size + 2), text, fill="black", font=font)
    return grid


def sample_grid(model, path, rows, per_row=8, seed=0, **kwargs):
    """A PNG with one row per condition, `per_row` samples a row: class labels, or prompts (written under each image)."""
    device = next(model.parameters()).device
    y = as_condition(rows, device).repeat_interleave(per_row, dim=0)
    x = sample(model, y, generator=torch.Generator(device).manual_seed(seed), **kwargs)
    if isinstance(rows[0], str):
        captioned_grid(to_uint8(x), [r for r in rows for _ in range(per_row)], per_row).save(path)
    else:  # small images enlarged (nearest) to at least 64 px, so that a grid of 16 px samples can be looked at
        save_image(F.interpolate((x + 1) / 2, scale_factor=max(1, 64 // x.shape[-1]), mode="nearest"), path,
                   nrow=per_row, padding=1)


def control_grid(model, path, conditions, hints, per_row=7, seed=0, **kwargs):
    """A PNG with one row per control image `hints` [n, 3, H, W] ([0, 1]): the control, then `per_row` samples of the
    adapted model for it and its condition (class label or prompt)."""
    y = as_condition(conditions, hints.device).repeat_interleave(per_row, dim=0)
    x = sample(model, y, generator=torch.Generator(hints.device).manual_seed(seed),
               hint=hints.repeat_interleave(per_row, dim=0), **kwargs)
    x = torch.cat([hints[:, None] * 2 - 1, x.view(len(hints), per_row, *x.shape[1:])], dim=1).flatten(0, 1)
    save_image(F.interpolate((x + 1) / 2, scale_factor=max(1, 64 // x.shape[-1]), mode="nearest"), path,
               nrow=per_row + 1, padding=1)


def sample_npz(model, path, conditions, batch_size, seed=0, rank=0, world_size=1, hints=None, **kwargs):
    """A sample for each of the conditions, in an .npz: arr_0 the uint8 NHWC images, arr_1 the class labels, or for
    prompts the prompts beside it (prompts_path). Batch b is drawn by rank b % world_size from a generator seeded
    with (seed, b), so the file does not depend on the number of ranks. An adapted model: hints(indices) gives
    the control images of those conditions."""
    device = next(model.parameters()).device
    shard = {}
    batches = range(rank, (len(conditions) + batch_size - 1) // batch_size, world_size)
    for b in tqdm(batches, disable=rank != 0, desc=f"sampling {len(conditions)}"):
        y = as_condition(conditions[b * batch_size:(b + 1) * batch_size], device)
        hint = None if hints is None else hints(range(b * batch_size, b * batch_size + len(y))).to(device)
        x = sample(model, y, generator=torch.Generator(device).manual_seed(seed * 1_000_003 + b), hint=hint, **kwargs)
        shard[b] = to_uint8(x)
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, shard)
        shard = {b: v for part in gathered for b, v in part.items()}
    if rank == 0:
        images = np.concatenate([shard[b] for b in sorted(shard)])
        tmp = path + ".tmp.npz"
        if isinstance(conditions[0], str):
            with open(prompts_path(path) + ".tmp", "w", encoding="utf-8") as f:
                f.write("\n".join(conditions) + "\n")
            os.replace(prompts_path(path) + ".tmp", prompts_path(path))
            np.savez(tmp, images)
        else:
            np.savez(tmp, images, np.asarray(conditions))
        os.replace(tmp, path)


def heldout_controls(model_args, trained_with, scale, n, text):
    """For an adapted model: the conditions of n held-out images (data_path's, or the built-in shapes' held-out
    split), in turn, and hints(indices), their control images."""
    kind = control or trained_with
    if kind not in ("canny", "mask") and not control:
        raise ValueError(f"the model was adapted with the controls of the folder {trained_with!r}: pass --control, "
                         "the folder of the held-out images' controls (and --data_path, the held-out images)")
    if kind == "mask" and data_path:
        raise ValueError("control=mask is the built-in shapes' masks: for data_path give a folder of control images")
    resolution = model_args["input_size"] * model_args["adapter"]["downsample"]
    folder = "" if kind in ("canny", "mask") else kind
    if folder and not data_path:
        raise ValueError(f"control={folder!r}: a control folder goes with --data_path, the held-out images it mirrors")
    if data_path:
        ds = ImageCaptions(data_path, resolution, folder) if text else \
            ImageFolder(data_path, resolution, flip=False, controls=folder)
    else:
        ds = SyntheticShapes(n, resolution, 1, kind == "mask", scale)  # the shapes of the adaptation run
    conditions = ds.captions if text else ds.labels.tolist()

    def hints(indices):
        images, _, *controls = torch.utils.data.default_collate([ds[i % len(ds)] for i in indices])
        return control_image(kind, images, *controls)
    return [conditions[i % len(ds)] for i in range(n)], hints


def main():
    from configurator import configure
    configure(globals(), sys.argv[1:])
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model, info = load_model(ckpt, use_ema)
    model = model.to(device)
    recorded = info.get("first_stage")
    vae_path = vae or (recorded["vae"] if recorded else "")
    if not vae_path and model.in_channels != 3:
        raise ValueError(f"{ckpt} is a latent-space model ({model.in_channels} channels) that records no VAE: pass "
                         "--vae with the folder of the VAE weights it was trained on (the official DiT: sd-vae-ft-ema "
                         "or sd-vae-ft-mse, diffusion_pytorch_model.bin and config.json)")
    first_stage = load_first_stage(vae_path).to(device).eval() if vae_path else None
    if first_stage and (first_stage.latent_channels != model.in_channels
                        or (recorded and first_stage.scale != recorded["scale"])):
        trained = f"{model.in_channels} channels" + (f", scale {recorded['scale']}" if recorded else "")
        raise ValueError(f"vae {vae_path!r} ({first_stage.latent_channels} latent channels, scale {first_stage.scale}) "
                         f"does not match the model of {ckpt} ({trained})")
    text = isinstance(model.y_embedder, TextEmbedder)
    adapted = "adapter" in info.get("model_args", {})
    if adapted and prompts:
        raise ValueError(f"--prompts: {ckpt} is an adapted model, its conditions are the held-out images' "
                         "(--data_path)")
    if text != bool(prompts) and not adapted:
        raise ValueError(f"{ckpt} is a text-to-image model: pass --prompts, a file of prompts one per line or a COCO "
                         "captions JSON" if text else f"--prompts: {ckpt} is class-conditional, it takes no prompts")
    prompt_list = read_prompts(prompts) if text and not adapted else None
    size = info["model_args"]["input_size"] if info else None
    kwargs = dict(cfg_scale=cfg_scale, sampler=sampler, num_steps=num_steps, ddim_eta=ddim_eta, size=size,
                  vae=first_stage, prediction=info.get("prediction", "eps"))  # official DiT checkpoints: eps
    stem = out or os.path.join(os.path.dirname(ckpt) or ".", f"samples_{sampler}{num_steps}_cfg{cfg_scale}")
    if adapted:
        conditions, hints = heldout_controls(info["model_args"], info["config"]["control"],
                                             info["config"]["synthetic_scale"], num_samples or grid_classes, text)
    if num_samples > 0:
        path = stem if stem.endswith(".npz") else stem + ".npz"
        if not adapted:
            conditions = [prompt_list[i % len(prompt_list)] for i in range(num_samples)] if text else \
                (np.arange(num_samples) % model.num_classes).tolist()
        sample_npz(model, path, conditions, batch_size, seed, rank, world_size, hints if adapted else None, **kwargs)
    elif rank == 0 and adapted:
        path = stem if stem.endswith(".png") else stem + ".png"
        control_grid(model, path, conditions, hints(range(len(conditions))).to(device), grid_per_class, seed,
                     progress=True, **kwargs)
    elif rank == 0:
        path = stem if stem.endswith(".png") else stem + ".png"
        rows = prompt_list[:grid_classes] if text else class_rows(model.num_classes, grid_classes)
        sample_grid(model, path, rows, grid_per_class, seed, progress=True, **kwargs)
    if rank == 0:
        print(f"wrote {path}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
