"""
Sample from a trained model: DPM-Solver++, DDPM (ancestral, with the learned variance) or DDIM, with
classifier-free guidance; a consistency student (train.py --teacher) in 1 to 8 steps with --sampler lcm.

  python sample.py --ckpt out/ckpt.pt                           # a grid PNG, one row per class
  torchrun --nproc_per_node=8 sample.py --ckpt out/ckpt.pt --num_samples 50000 --cfg_scale 1.5
      # an .npz for evaluate.py: uint8 images NHWC in arr_0, class labels in arr_1 (the ADM evaluator's format)
  python sample.py --ckpt out/ckpt.pt --prompts prompts.txt     # text-to-image: one row per prompt, captioned
  torchrun --nproc_per_node=8 sample.py --ckpt out/ckpt.pt --prompts captions_val2014.json --num_samples 30000
      # the .npz, and its prompts one per line beside it in <name>_prompts.txt
  python sample.py --ckpt out_lcm/ckpt.pt --sampler lcm --num_steps 4   # a consistency student, w = cfg_scale - 1
  python sample.py --ckpt out_canny/ckpt.pt --num_samples 1000  # an adapted model (train.py --adapter): samples for
      # the controls and conditions of held-out images (--data_path; default the built-in shapes' held-out split)

Checkpoints: ours (EMA weights by default; DiT or U-Net, in pixel or latent space), a bare DiT state dict
(official or diffusers layout), or a diffusers pipeline folder as the paper's released LDM-4s are saved
(python sample.py --ckpt DiffusionNoise-ldm-in1k-cep-u/ --cfg_scale 2.0). Latents are decoded with the VAE the
checkpoint records, or --vae; the official DiT checkpoints record none:
  python sample.py --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema
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

from configurator import atomic_write, configure
from control import adapt, control_image
from data import ImageCaptions, ImageFolder, SyntheticShapes
from diffusion import GaussianDiffusion
from model import UNet_models, build_model, load_dit
from text import TextEmbedder, TextEncoder, load_clip_text_encoder, tokenize
from vae import load_first_stage, read_diffusers_weights

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
batch_size = 64
seed = 0
out = ""                # default: beside the checkpoint
vae = ""                # a folder of diffusers VAE weights, to decode latents; default: the one the checkpoint records
dtype = "float32"       # autocast of the denoiser and the VAE: float32 | bfloat16 (faster on GPU)
compile = False         # torch.compile the guided denoiser step; on GPU replayed as a CUDA graph (docs/speed.md)
# adapted models (train.py --adapter): held-out images give the controls and the conditions (labels or captions)
data_path = ""          # a class folder (an image-caption set for text models) of held-out images; "": the built-in
                        # shapes' held-out split, seed 1 (evaluate.py's "synthetic" reference, synthetic_ref_size=N)
control = ""            # "": the one the model was adapted with (canny, mask); or the held-out images' control folder
# -----------------------------------------------------------------------------


def build(model_args):
    """The model that train.py's model_args describe; a text-to-image U-Net with its text encoder (text_layers); an
    adapted model (control.Adapted) with its adapter."""
    args = dict(model_args)
    text_layers, text_pad, adapter = args.pop("text_layers", 0), args.pop("text_pad", 0), args.pop("adapter", None)
    if text_layers:
        width = args.get("context_dim", UNet_models[args["name"]]["context_dim"])
        args["y_embedder"] = TextEmbedder(TextEncoder(width, text_layers, pad=text_pad),
                                          args["class_dropout_prob"])
    return adapt(build_model(**args), **adapter) if adapter else build_model(**args)


def unet_args(config):
    """Our UNet's arguments for diffusers' UNet2DConditionModel `config` (its config.json as a dict): Stable Diffusion
    v1's layout, LCM-SD's (time_cond_proj_dim 256: our model.GuidanceEmbedder) and LDM's converted to diffusers, which
    are the same network under other names. Any other layout is an error that names what differs."""
    chans, n = config["block_out_channels"], config["layers_per_block"]
    heads = config.get("num_attention_heads") or config["attention_head_dim"]  # diffusers' name for the head count
    heads = set(heads) if isinstance(heads, (list, tuple)) else {heads}
    layout = dict(flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, transformer_layers_per_block=1,
                  mid_block_type="UNetMidBlock2DCrossAttn", resnet_time_scale_shift="default", act_fn="silu",
                  time_cond_proj_dim=config.get("time_cond_proj_dim") and 256, out_channels=config["in_channels"])
    other = [k for k in ("use_linear_projection", "upcast_attention", "only_cross_attention", "class_embed_type",
                         "addition_embed_type", "encoder_hid_dim", "center_input_sample", "num_class_embeds")
             if config.get(k)] + [k for k, v in layout.items() if config.get(k, v) != v]
    if len(heads) > 1 or other:
        raise ValueError(f"this UNet2DConditionModel's {', '.join(other) or 'attention_head_dim'} is not the SD-1 / "
                         "LCM-SD / LDM layout our UNet has")
    return dict(in_channels=config["in_channels"], model_channels=chans[0], channel_mult=tuple(c // chans[0] for c in
                chans), num_res_blocks=n, attention_resolutions=tuple(2 ** i for i in range(len(chans)) if
                config["down_block_types"][i].startswith("CrossAttn")), num_heads=heads.pop(),
                context_dim=config["cross_attention_dim"], guidance_embed=bool(config.get("time_cond_proj_dim")))


def unet_keys(config, state_dict):
    """diffusers' UNet2DConditionModel weights under our UNet's names. One explicit key map: down/up/mid blocks ->
    input/output/middle blocks, to_q -> q, to_k and to_v -> one kv, time_embedding.cond_proj -> w_embedder.cond_proj."""
    chans, n = config["block_out_channels"], config["layers_per_block"]
    levels = range(len(chans))
    prefixes = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
                "time_embedding.linear_2.": "time_embed.2.", "time_embedding.cond_proj.": "w_embedder.cond_proj.",
                "conv_norm_out.": "out.0.", "conv_out.": "out.2.", "mid_block.resnets.0.": "middle_block.0.",
                "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.1.": "middle_block.2."}
    k = 1
    for i in levels:
        for j in range(n):
            prefixes.update({f"down_blocks.{i}.resnets.{j}.": f"input_blocks.{k}.0.",
                             f"down_blocks.{i}.attentions.{j}.": f"input_blocks.{k}.1."})
            k += 1
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{k}.0."
        k += 1
    for k, (i, j) in enumerate((i, j) for i in levels for j in range(n + 1)):  # up_blocks[0] is the deepest
        attention = config["up_block_types"][i].startswith("CrossAttn")
        prefixes.update({f"up_blocks.{i}.resnets.{j}.": f"output_blocks.{k}.0.",
                         f"up_blocks.{i}.attentions.{j}.": f"output_blocks.{k}.1.",
                         f"up_blocks.{i}.upsamplers.0.conv.": f"output_blocks.{k}.{1 + attention}.1."})
    names = [("time_emb_proj.", "emb."), ("conv_shortcut.", "skip."), ("transformer_blocks.0.", ""),
             ("attn1.to_out.0.", "attn1.proj."), ("attn2.to_out.0.", "attn2.proj."), ("to_q.", "q."),
             ("ff.net.0.proj.", "ff_in."), ("ff.net.2.", "ff_out.")]
    ours = {}
    for key, value in state_dict.items():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len)
        rest = key[len(prefix):]
        for old, new in names:
            rest = rest.replace(old, new)
        ours[prefixes[prefix] + rest] = value
    for key in [k for k in ours if ".to_k." in k]:  # separate k, v -> one kv projection
        ours[key.replace(".to_k.", ".kv.")] = torch.cat([ours.pop(key), ours.pop(key.replace(".to_k.", ".to_v."))])
    return ours


def text_args(encoder):
    """What model_args record of a text encoder, for build to make it again."""
    pad = {"text_pad": encoder.pad} if encoder.pad else {}  # absent for CLIP's 0: older checkpoints stay equal
    return dict(context_dim=encoder.width, text_layers=encoder.layers, **pad)


def read_pipeline(folder):
    """A diffusers pipeline folder as the dict of a checkpoint of train.py: `ema` its weights under our names,
    model_args, prediction, schedule, first_stage, consistency (an LCM's), and `config`, the settings of train.py
    that make this model (train.py --teacher <folder> takes them). unet/ (unet_args), scheduler/, and either
    - text_encoder/, tokenizer/ (text.load_clip_text_encoder) and vae/ (KL-f8, scaled by its scaling_factor):
      Stable Diffusion v1 and LCM-SD, or
    - class_embedder/ (one nn.Embedding whose last row is the null class) and vqvae/ (VQ-f4, latents unscaled): the
      paper's released LDM-4s (huggingface.co/DiffusionNoise, saved by the authors' fork: LDMClassToImagePipeline)."""
    def config(sub, name="config.json"):
        if not os.path.isfile(os.path.join(folder, sub, name)):
            raise FileNotFoundError(f"{folder} is not a diffusers pipeline of Stable Diffusion, LCM-SD or the paper's "
                                    f"LDMs: no {sub}/{name}")
        with open(os.path.join(folder, sub, name)) as f:
            return json.load(f)
    unet_config, scheduler = config("unet"), config("scheduler", "scheduler_config.json")
    model_args = dict(name="LDM-4", input_size=unet_config["sample_size"], learn_sigma=False, class_dropout_prob=0.0,
                      **unet_args(unet_config))
    ema = unet_keys(unet_config, read_diffusers_weights(os.path.join(folder, "unet"), "unet"))
    if os.path.isdir(os.path.join(folder, "text_encoder")):
        encoder = load_clip_text_encoder(folder)
        if encoder.width != model_args["context_dim"]:
            raise ValueError(f"{folder}: the text encoder's width {encoder.width} is not the U-Net's context's")
        ema.update({f"y_embedder.encoder.{k}": v for k, v in encoder.state_dict().items()})
        model_args.update(name="SD-1.5", num_classes=0, **text_args(encoder))
        settings, vae_config = dict(text_encoder="clip", clip_model=folder), config("vae")
        vae = dict(vae=os.path.join(folder, "vae"), scale=vae_config.get("scaling_factor", 0.18215))
    else:
        table = read_diffusers_weights(os.path.join(folder, "class_embedder"), "class_embedder")["embedding.weight"]
        ema["y_embedder.embedding_table.weight"] = table
        model_args.update(num_classes=table.shape[0] - 1)
        settings, vae_config = dict(text_encoder=""), config("vqvae")
        vae = dict(vae=os.path.join(folder, "vqvae"), scale=1.0)
    betas = (scheduler.get("beta_schedule"), scheduler.get("beta_start"), scheduler.get("beta_end"))
    schedule = {("scaled_linear", 0.0015, 0.0195): "scaled_linear", ("scaled_linear", 0.00085, 0.012): "sd",
                ("linear", 1e-4, 0.02): "linear"}.get(betas)
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(scheduler.get("prediction_type", "epsilon"))
    lcm_steps = scheduler.get("original_inference_steps", 50)  # LCMScheduler's skipping grid: k = 1000 / 50
    if schedule is None or prediction is None or scheduler.get("num_train_timesteps", 1000) != 1000 or \
            scheduler.get("trained_betas") or scheduler.get("rescale_betas_zero_snr") or \
            (model_args["guidance_embed"] and (1000 % lcm_steps or scheduler.get("timestep_scaling", 10) != 10)):
        raise ValueError(f"{folder}/scheduler: {scheduler} is not ours: DiT's, LDM's or SD's betas over 1000 steps, "
                         "eps or v prediction; for an LCM a grid dividing them and timestep_scaling 10")
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    settings.update(model=model_args["name"], learn_sigma=False, prediction=prediction, schedule=schedule,
                    vae=vae["vae"], image_size=model_args["input_size"] * factor)
    return dict(ema=ema, model_args=model_args, prediction=prediction, schedule=schedule, first_stage=vae,
                config=settings, consistency=dict(skip_interval=1000 // lcm_steps) if model_args["guidance_embed"]
                else None)


def load_checkpoint(path, map_location="cpu"):
    """The dict a checkpoint holds: train.py's (model, ema, opt, step, model_args, ...) or a bare state dict. A
    missing, damaged (truncated) or foreign file is an error that names it and says what to do. A diffusers pipeline
    folder (model_index.json) is read as one (read_pipeline)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return read_pipeline(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found: train one with train.py, or pass --ckpt with the path "
                                "of an official DiT checkpoint (e.g. DiT-XL-2-256x256.pt) or of a diffusers pipeline "
                                "folder (model_index.json)")
    def damaged(reason):
        return ValueError(f"checkpoint {path!r} is damaged (truncated?) or not a checkpoint of this project "
                          f"({reason}); use the previous one (a kill mid-save leaves {os.path.basename(path)}.tmp: "
                          "never a good one), or train again")
    try:  # weights only: a checkpoint holds tensors and plain types, nothing a file could execute
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch's own messages (a zip reader's, or advice to load unsafely) would mislead here
        raise damaged(f"{type(e).__name__}: {str(e).split('. ')[0].splitlines()[0][:150]}") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in dict(state.get("model", state)).values()):
        raise damaged(f"it holds no weights: a {type(state).__name__}")
    return state


def load_model(path, use_ema=True):
    """The model of a checkpoint, in eval mode, and what train.py recorded beside it: model_args (input_size...),
    first_stage (dict(vae=path, scale), None in pixel space), prediction and schedule; {} for a bare state dict. A
    diffusers pipeline folder (read_pipeline) loads too."""
    state = load_checkpoint(path)
    if "ema" not in state:  # a bare DiT state dict
        try:
            return load_dit(state).eval(), {}
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"checkpoint {path!r} is a bare state dict but not of a DiT ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120]}): pass a checkpoint of train.py or an official DiT "
                             "checkpoint") from e
    model = build(state["model_args"])
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.eval(), dict(model_args=state["model_args"], first_stage=state["first_stage"],
                              prediction=state["prediction"], schedule=state.get("schedule", "linear"),
                              config=state.get("config"), consistency=state.get("consistency"))


def guided_step(model, x, t, labels, cfg_scale, hint=None):
    """The denoiser of one sampling step: the model, with guidance one forward of both halves; an adapted model
    (control.py) with its control images `hint`. A consistency student takes the guidance as its input w, in LCM's
    convention cond + w (cond - uncond): w = cfg_scale - 1, as diffusers' LCM pipeline."""
    inputs = {} if hint is None else dict(hint=hint)
    if getattr(model, "w_embedder", None) is not None:
        return model(x, t, labels, w=torch.full(t.shape, cfg_scale - 1.0, device=x.device), **inputs)
    return model(x, t, labels, **inputs) if cfg_scale == 1 else \
        model.forward_with_cfg(x, t, labels, cfg_scale, **inputs)


@torch.no_grad()
def sample(model, labels, cfg_scale=4.0, sampler="dpm++", num_steps=50, ddim_eta=0.0, generator=None,
           progress=False, size=None, vae=None, prediction="eps", schedule="linear", dtype=torch.float32,
           compile=False, hint=None, skip_interval=20):
    """Images (float, about [-1, 1]) for `labels`, from `num_steps` evenly spaced steps of the 1000 (diffusion.py's
    samplers). The model denoises size x size inputs (default: the DiT's input size): pixels, or with a first stage
    `vae` its latents, decoded at the end. The predicted x0 is clipped to [-1, 1] in pixel space only: latents are
    unbounded (DiT does not clip). `prediction` ("eps" or "v") and `schedule` are the model's training settings. The
    denoiser and the VAE run under autocast to `dtype`, and with `compile` the denoiser as one compiled graph (on GPU
    a CUDA graph: the shapes are the same at every step); the update rules run in float32, eagerly. An adapted model
    (control.py) takes its control images `hint` [N, 3, H, W], one per label. A consistency student (train.py
    --teacher) samples with sampler "lcm" on the skipping grid of its distillation (`skip_interval`)."""
    if (getattr(model, "w_embedder", None) is not None) != (sampler == "lcm"):
        raise ValueError("a consistency student (train.py --teacher) samples with sampler=lcm, 1 to 8 steps" if
                         sampler != "lcm" else "sampler=lcm takes a consistency student (train.py --teacher)")
    diffusion = GaussianDiffusion(learn_sigma=model.learn_sigma, prediction=prediction, schedule=schedule)
    size = size or model.x_embedder.proj.kernel_size[0] * int(model.pos_embed.shape[1] ** 0.5)
    x = torch.randn(len(labels), model.in_channels, size, size, device=labels.device, generator=generator)
    step = guided_step
    if compile:  # one wrapper per call is free: torch.compile caches the graph on guided_step's code
        compiled = torch.compile(guided_step, fullgraph=True, mode="reduce-overhead" if x.is_cuda else None)

        def step(*args):
            torch.compiler.cudagraph_mark_step_begin()  # the last output is consumed: the graph may overwrite it
            return compiled(*args)
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def denoise(x, t):
        with autocast:
            return step(model, x, t, labels, cfg_scale, hint)
    x = diffusion.consistency_sample(denoise, x, num_steps, skip_interval, vae is None, generator, progress) \
        if sampler == "lcm" else diffusion.respaced(num_steps).sample(denoise, x, sampler, ddim_eta, vae is None,
                                                                       generator, progress)
    if vae is None:
        return x
    # in chunks: at 256 px the KL-f8 decoder holds ~0.2 GB of activations an image, too many for a batch of 256. In
    # `dtype` too: it costs about one guided step of DiT-XL/2 in FLOPs, which float32 would run several times slower
    with autocast:
        return torch.cat([vae.decode(z).float() for z in x.split(32)])


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
        raise ValueError(f"prompts file {path!r} is not UTF-8 ({e.reason} at byte {e.start}): save it as UTF-8") \
            from None
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
    """A PNG with one row per condition, `per_row` samples a row: class labels, or prompts (under each image)."""
    device = next(model.parameters()).device
    y = as_condition(rows, device).repeat_interleave(per_row, dim=0)
    x = sample(model, y, generator=torch.Generator(device).manual_seed(seed), **kwargs)
    with atomic_write(path) as f:  # study.py shows the last grid of each run: never a half-written one
        if isinstance(rows[0], str):
            captioned_grid(to_uint8(x), [r for r in rows for _ in range(per_row)], per_row).save(f, format="PNG")
        else:  # small images enlarged (nearest) to at least 64 px, so that a grid of 16 px samples can be looked at
            save_image(F.interpolate((x + 1) / 2, scale_factor=max(1, 64 // x.shape[-1]), mode="nearest"), f,
                       nrow=per_row, padding=1, format="png")


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
        if isinstance(conditions[0], str):
            with atomic_write(prompts_path(path), "w") as f:
                f.write("\n".join(conditions) + "\n")
        with atomic_write(path) as f:
            np.savez(f, *([images] if isinstance(conditions[0], str) else [images, np.asarray(conditions)]))


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
    configure(globals(), sys.argv[1:])
    if dtype not in ("float32", "bfloat16"):  # as train.py
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
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
