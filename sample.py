"""
Sample from a trained model: DPM-Solver++, DDPM (ancestral, with the learned variance) or DDIM, with
classifier-free guidance; a consistency student (distill.py) in 1 to 8 steps with --sampler lcm.

  python sample.py --ckpt out/ckpt.pt                           # a grid PNG, one row per class
  torchrun --nproc_per_node=8 sample.py --ckpt out/ckpt.pt --num_samples 50000 --cfg_scale 1.5
      # an .npz for evaluate.py: uint8 images NHWC in arr_0, class labels in arr_1 (the ADM evaluator's format)
  python sample.py --ckpt out/ckpt.pt --prompts prompts.txt     # text-to-image: one row per prompt, captioned
  torchrun --nproc_per_node=8 sample.py --ckpt out/ckpt.pt --prompts captions_val2014.json --num_samples 30000
      # the .npz, and its prompts one per line beside it in <name>_prompts.txt
  python sample.py --ckpt out_lcm/ckpt.pt --sampler lcm --num_steps 4   # a consistency student, w = cfg_scale - 1
  python sample.py --ckpt out_canny/ckpt.pt --num_samples 1000  # an adapted model (adapt.py): samples for
      # the controls and conditions of held-out images (--data_path; default the built-in shapes' held-out split)

Checkpoints: ours (EMA weights by default; DiT or U-Net, in pixel or latent space), a bare DiT state dict
(official or diffusers layout), or a diffusers pipeline folder as the paper's released LDM-4s are saved
(python sample.py --ckpt DiffusionNoise-ldm-in1k-cep-u/ --cfg_scale 2.0). Latents are decoded with the VAE the
checkpoint records, or --vae; the official DiT checkpoints record none:
  python sample.py --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from configurator import atomic_write, configure
from control import control_image
from data import ImageCaptions, ImageFolder, SyntheticShapes, prompts_path, read_prompts
from pipeline import class_rows, control_grid, load_model, sample_grid, sample_npz
from text import TextEmbedder
from vae import load_first_stage

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"
use_ema = True
sampler = "dpm++"       # dpm++ (DPM-Solver++(2M), the paper's sampler) | ddpm | ddim | lcm (consistency students)
num_steps = 50          # the paper: DPM-Solver++ at 50; DDPM takes 250 for the same quality
ddim_eta = 0.0
cfg_scale = 4.0         # 1.0 = no guidance; DiT reports FID at 1.5, the paper at 1.75
num_samples = 0         # 0: a grid; N > 0: an .npz of N class-balanced samples, or of the prompts in turn
prompts = ""            # text-to-image: a file of prompts, one per line, or a COCO captions JSON
grid_classes = 10       # rows of the grid: classes evenly spaced, or the first prompts
grid_per_class = 8
walk = False            # the paper's Fig. 5: each row of the grid from initial noises along a circle, cos(theta) z1 +
                        # sin(theta) z2 (pipeline.circle_noise), as many as grid_per_class; a deterministic sampler
batch_size = 64
seed = 0
out = ""                # default: beside the checkpoint
vae = ""                # a folder of diffusers VAE weights, to decode latents; default: the one the checkpoint records
dtype = "float32"       # autocast of the denoiser and the VAE: float32 | bfloat16 (faster on GPU)
compile = False         # torch.compile the guided denoiser step; on GPU replayed as a CUDA graph (docs/speed.md)
# adapted models (adapt.py): held-out images give the controls and the conditions (labels or captions)
data_path = ""          # a class folder (an image-caption set for text models) of held-out images; "": the built-in
                        # shapes' held-out split, seed 1 (evaluate.py's "synthetic" reference, synthetic_ref_size=N)
control = ""            # "": the one the model was adapted with (canny, mask); or the held-out images' control folder
# -----------------------------------------------------------------------------


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
        if text:
            ds = ImageCaptions(data_path, resolution, folder)
        else:
            ds = ImageFolder(data_path, resolution, flip=False, controls=folder)
    else:
        ds = SyntheticShapes(n, resolution, 1, kind == "mask", scale)  # the shapes of the adaptation run
    conditions = ds.captions if text else ds.labels.tolist()

    def hints(indices):
        images, _, *controls = torch.utils.data.default_collate([ds[i % len(ds)] for i in indices])
        return control_image(kind, images, *controls)
    return [conditions[i % len(ds)] for i in range(n)], hints


def main():
    configure(globals(), sys.argv[1:])
    if dtype not in ("float32", "bfloat16"):  # as train.py
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if walk and (num_samples or sampler not in ("dpm++", "ddim") or ddim_eta):
        raise ValueError("walk=True draws a grid with a deterministic sampler, whose samples follow the initial noise: "
                         "sampler dpm++, or ddim with ddim_eta 0, and num_samples 0")
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":  # as train.py (and DiT's sample_ddp.py): TF32 matmuls and convolutions in float32
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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
                  vae=first_stage, prediction=info.get("prediction", "eps"),  # official DiT checkpoints: eps,
                  schedule=info.get("schedule", "linear"), dtype=getattr(torch, dtype), compile=compile,  # linear
                  skip_interval=(info.get("consistency") or {}).get("skip_interval", 20))
    guidance = f"cfg{cfg_scale}"
    if getattr(model, "w_embedder", None) is not None:  # a consistency student's input is w (pipeline.guided_step)
        guidance = f"w{cfg_scale - 1}"
    name = f"samples_{sampler}{num_steps}_{guidance}"
    if walk:
        name += "_walk"
    stem = out or os.path.join(os.path.dirname(ckpt) or ".", name)
    if adapted:
        conditions, hints = heldout_controls(info["model_args"], info["config"]["control"],
                                             info["config"]["synthetic_scale"], num_samples or grid_classes, text)
    if num_samples > 0:
        path = stem if stem.endswith(".npz") else stem + ".npz"
        if text and not adapted:
            conditions = [prompt_list[i % len(prompt_list)] for i in range(num_samples)]
        elif not adapted:
            conditions = (np.arange(num_samples) % model.num_classes).tolist()
        ckpt_stat = os.stat(ckpt)  # a checkpoint trained on since: its old batches are not reused
        settings = dict(ckpt=os.path.abspath(ckpt), ckpt_mtime=ckpt_stat.st_mtime_ns, ckpt_size=ckpt_stat.st_size,
                        use_ema=use_ema, vae=vae_path, control=control, data_path=data_path,
                        **{k: v for k, v in kwargs.items() if k != "vae" and k != "dtype"}, dtype=dtype)
        sample_npz(model, path, conditions, batch_size, seed, rank, world_size, hints if adapted else None, settings,
                   **kwargs)
        if rank == 0 and text:
            with atomic_write(prompts_path(path), "w") as f:  # evaluate.py reads them there
                f.write("\n".join(conditions) + "\n")
    elif rank == 0 and adapted:
        path = stem if stem.endswith(".png") else stem + ".png"
        control_grid(model, path, conditions, hints(range(len(conditions))).to(device), grid_per_class, seed,
                     progress=True, **kwargs)
    elif rank == 0:
        path = stem if stem.endswith(".png") else stem + ".png"
        if text:
            rows = prompt_list[:grid_classes]
        else:
            rows = class_rows(model.num_classes, grid_classes)
        sample_grid(model, path, rows, grid_per_class, seed, walk, progress=True, **kwargs)
    if rank == 0:
        print(f"wrote {path}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
