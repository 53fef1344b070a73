"""
From files to models and images: build a model from the arguments a checkpoint records, read our checkpoints, official
DiT state dicts and diffusers pipeline folders (Stable Diffusion v1, LCM-SD, the paper's released LDM-4s), and sample
them with classifier-free guidance, decoded by their first stage, into grids and .npz files.

What every script shares between a checkpoint and its pixels; the model, the first stage and the samplers themselves
are model.py, vae.py, text.py, diffusion.py and control.py.
"""
import hashlib
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

from configurator import atomic_write
from control import adapt
from diffusion import GaussianDiffusion
from model import DiT, DiT_sizes, UNet_models, build_model
from text import TextEmbedder, TextEncoder, load_bert_text_encoder, load_clip_text_encoder
from vae import read_diffusers_weights


def build(model_args):
    """The model that train.py's model_args describe; a text-to-image U-Net with its text encoder: CLIP's architecture
    (text_layers), or BERT's from the Hugging Face folder `bert` with its pre-trained weights (train.py starts from
    them; a checkpoint's replace them); an adapted model (control.Adapted) with its adapter."""
    args = dict(model_args)
    text_layers = args.pop("text_layers", 0)
    text_pad = args.pop("text_pad", 0)
    bert_folder = args.pop("bert", "")
    adapter = args.pop("adapter", None)
    if text_layers:
        width = args.get("context_dim", UNet_models[args["name"]]["context_dim"])
        args["y_embedder"] = TextEmbedder(TextEncoder(width, text_layers, pad=text_pad), args["class_dropout_prob"])
    if bert_folder:
        encoder, tokenizer = load_bert_text_encoder(bert_folder)
        args["y_embedder"] = TextEmbedder(encoder, args["class_dropout_prob"], tokenizer.ids)
    model = build_model(**args)
    if adapter:
        return adapt(model, **adapter)
    return model


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
                          f"({reason}); use the previous one (a kill mid-save leaves {os.path.basename(path)}.*.tmp: "
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


def text_args(encoder):
    """What model_args record of a text encoder, for build to make it again."""
    pad = {"text_pad": encoder.pad} if encoder.pad else {}  # absent for CLIP's 0: older checkpoints stay equal
    return dict(context_dim=encoder.width, text_layers=encoder.layers, **pad)


def load_dit(state_dict, input_size=None, num_heads=None):
    """Build a DiT from a bare state dict (official checkpoint, diffusers layout, or ours) and load it strictly.
    The architecture is read off the tensor shapes; diffusers does not store the position embedding, so the input
    size (latent side, e.g. 32 for 256px images) must be given for it. The number of heads leaves no trace in the
    weights: it is taken from DiT_sizes unless given."""
    sd = diffusers_to_dit(state_dict) if "pos_embed.proj.weight" in state_dict else dict(state_dict)
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or next((h for d, w, h in DiT_sizes.values() if (d, w) == (depth, hidden)), None)
    if heads is None:
        raise ValueError(f"depth {depth} and width {hidden} are not a size of DiT_sizes: pass num_heads")
    if "pos_embed" in sd:
        input_size = int(sd["pos_embed"].shape[1] ** 0.5) * patch
    elif input_size is None:
        raise ValueError("this state dict has no pos_embed (diffusers layout): pass input_size, e.g. 32 for 256px")
    out_channels = sd["final_layer.linear.weight"].shape[0] // patch ** 2
    model = DiT(input_size=input_size, patch_size=patch, in_channels=in_channels,
                hidden_size=hidden, depth=depth, num_heads=heads,
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
                learn_sigma=out_channels == 2 * in_channels)
    sd.setdefault("pos_embed", model.pos_embed.data)
    model.load_state_dict(sd, strict=True)
    return model


def diffusers_to_dit(sd):
    """Map a diffusers DiTTransformer2DModel state dict to the official DiT names. Diffusers keeps a copy of the
    timestep and class embedders in every block; they are identical, block 0's is taken. Note that diffusers runs
    these weights with timestep frequencies exp(-log(1e4) k / (128 - 1)) where DiT (and this file) uses k / 128,
    so our outputs for converted official weights are the official DiT's, not diffusers'."""
    out = {}
    for key, value in sd.items():
        if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):  # a copy of block 0's
            continue
        new = key
        for old, rep in [("pos_embed.proj.", "x_embedder.proj."),
                         ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
                         ("transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
                         ("transformer_blocks.0.norm1.emb.class_embedder.", "y_embedder."),
                         ("transformer_blocks.", "blocks."), (".norm1.linear.", ".adaLN_modulation.1."),
                         (".attn1.to_out.0.", ".attn.proj."), (".ff.net.0.proj.", ".mlp.fc1."),
                         (".ff.net.2.", ".mlp.fc2."), ("proj_out_1.", "final_layer.adaLN_modulation.1."),
                         ("proj_out_2.", "final_layer.linear.")]:
            new = new.replace(old, rep)
        out[new] = value
    for key in [k for k in out if ".attn1.to_q." in k]:  # separate q, k, v -> one qkv projection
        prefix, kind = key.split(".attn1.to_q.")
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([out.pop(f"{prefix}.attn1.to_{n}.{kind}") for n in "qkv"])
    return out


def read_pipeline(folder):
    """A diffusers pipeline folder as the dict of a checkpoint of train.py: `ema` its weights under our names,
    model_args, prediction, schedule, first_stage, consistency (an LCM's), and `config`, the settings of train.py
    that make this model (distill.py --teacher <folder> takes them). unet/ (unet_args), scheduler/, and either
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
    ours = schedule is not None and prediction is not None and scheduler.get("num_train_timesteps", 1000) == 1000
    ours = ours and not scheduler.get("trained_betas") and not scheduler.get("rescale_betas_zero_snr")
    if model_args["guidance_embed"]:
        ours = ours and 1000 % lcm_steps == 0 and scheduler.get("timestep_scaling", 10) == 10
    if not ours:
        raise ValueError(f"{folder}/scheduler: {scheduler} is not ours: DiT's, LDM's or SD's betas over 1000 steps, "
                         "eps or v prediction; for an LCM a grid dividing them and timestep_scaling 10")
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    settings.update(model=model_args["name"], learn_sigma=False, prediction=prediction, schedule=schedule,
                    vae=vae["vae"], image_size=model_args["input_size"] * factor)
    return dict(ema=ema, model_args=model_args, prediction=prediction, schedule=schedule, first_stage=vae,
                config=settings, consistency=dict(skip_interval=1000 // lcm_steps) if model_args["guidance_embed"]
                else None)


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


def guided_step(model, x, t, labels, cfg_scale, hint=None):
    """The denoiser of one sampling step: the model, with guidance one forward of both halves; an adapted model
    (control.py) with its control images `hint`. A consistency student takes the guidance as its input w, in LCM's
    convention cond + w (cond - uncond): w = cfg_scale - 1, as diffusers' LCM pipeline."""
    inputs = {} if hint is None else dict(hint=hint)
    if getattr(model, "w_embedder", None) is not None:
        return model(x, t, labels, w=torch.full(t.shape, cfg_scale - 1.0, device=x.device), **inputs)
    if cfg_scale == 1:
        return model(x, t, labels, **inputs)
    return model.forward_with_cfg(x, t, labels, cfg_scale, **inputs)


@torch.no_grad()
def sample(model, labels, cfg_scale=4.0, sampler="dpm++", num_steps=50, ddim_eta=0.0, generator=None,
           progress=False, size=None, vae=None, prediction="eps", schedule="linear", dtype=torch.float32,
           compile=False, hint=None, skip_interval=20, noise=None):
    """Images (float, about [-1, 1]) for `labels`, from `num_steps` evenly spaced steps of the 1000 (diffusion.py's
    samplers). The model denoises size x size inputs (default: the DiT's input size): pixels, or with a first stage
    `vae` its latents, decoded at the end. The predicted x0 is clipped to [-1, 1] in pixel space only: latents are
    unbounded (DiT does not clip). `prediction` ("eps" or "v") and `schedule` are the model's training settings. The
    denoiser and the VAE run under autocast to `dtype`, and with `compile` the denoiser as one compiled graph (on GPU
    a CUDA graph: the shapes are the same at every step); the update rules run in float32, eagerly. An adapted model
    (control.py) takes its control images `hint` [N, 3, H, W], one per label. A consistency student (train.py
    --teacher) samples with sampler "lcm" on the skipping grid of its distillation (`skip_interval`)."""
    if (getattr(model, "w_embedder", None) is not None) != (sampler == "lcm"):
        raise ValueError("a consistency student (distill.py) samples with sampler=lcm, 1 to 8 steps" if
                         sampler != "lcm" else "sampler=lcm takes a consistency student (distill.py)")
    diffusion = GaussianDiffusion(learn_sigma=model.learn_sigma, prediction=prediction, schedule=schedule)
    x = noise
    if x is None:
        size = size or dit_input_size(model)
        x = torch.randn(len(labels), model.in_channels, size, size, device=labels.device, generator=generator)
    step = guided_step
    if compile:  # one wrapper per call is free: torch.compile caches the graph on guided_step's code
        step = compiled_step(guided_step, "reduce-overhead" if x.is_cuda else None)
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def denoise(x, t):
        with autocast:
            return step(model, x, t, labels, cfg_scale, hint)
    if sampler == "lcm":
        x = diffusion.consistency_sample(denoise, x, num_steps, skip_interval, vae is None, generator, progress)
    else:
        x = diffusion.respaced(num_steps).sample(denoise, x, sampler, ddim_eta, vae is None, generator, progress)
    if vae is None:
        return x
    # in chunks: at 256 px the KL-f8 decoder holds ~0.2 GB of activations an image, too many for a batch of 256. In
    # `dtype` too: it costs about one guided step of DiT-XL/2 in FLOPs, which float32 would run several times slower
    with autocast:
        return torch.cat([vae.decode(z).float() for z in x.split(32)])


def compiled_step(step, mode):
    compiled = torch.compile(step, fullgraph=True, mode=mode)

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()  # the last output is consumed: the graph may overwrite it
        return compiled(*args)
    return run


def to_uint8(x):
    """[-1, 1] NCHW float -> uint8 NHWC, rounded as the ADM/DiT scripts do."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def class_rows(num_classes, n=10):
    """n classes evenly spaced over the classes: the rows of a grid."""
    return np.unique(np.linspace(0, num_classes - 1, min(n, num_classes)).round().astype(np.int64)).tolist()


def as_condition(model, conditions, device):
    """Class labels -> LongTensor [n]; prompts -> the model's tokens [n, L] (its text encoder's tokenizer)."""
    if isinstance(conditions[0], str):
        return model.y_embedder.tokenizer(conditions).to(device)
    return torch.as_tensor(conditions).to(device)


def dit_input_size(model):
    """The side of a DiT's input: its patch times the side of its position embedding's grid."""
    return model.x_embedder.proj.kernel_size[0] * int(model.pos_embed.shape[1] ** 0.5)


def circle_noise(rows, frames, shape, generator):
    """The paper's circular walk (its Fig. 5): for each row, initial noises cos(theta) z1 + sin(theta) z2 at `frames`
    angles evenly spaced over [0, 2 pi). Each is a standard normal draw (cos^2 + sin^2 = 1), and neighbours are close,
    so a deterministic sampler shows how the samples change along the circle. [rows * frames, *shape]."""
    z = torch.randn(rows, 2, 1, *shape, generator=generator, device=generator.device)
    theta = torch.arange(frames, device=generator.device) * 2 * math.pi / frames
    weights = torch.stack([torch.cos(theta), torch.sin(theta)]).view(1, 2, frames, *[1] * len(shape))
    return (weights * z).sum(1).flatten(0, 1)


def sample_grid(model, path, rows, per_row=8, seed=0, walk=False, **kwargs):
    """A PNG with one row per condition, `per_row` samples a row: class labels, or prompts (under each image). walk:
    each row's samples from the noises of a circular walk (circle_noise), in order along the circle."""
    device = next(model.parameters()).device
    y = as_condition(model, rows, device).repeat_interleave(per_row, dim=0)
    generator = torch.Generator(device).manual_seed(seed)
    noise = None
    if walk:
        size = kwargs.get("size") or dit_input_size(model)
        noise = circle_noise(len(rows), per_row, (model.in_channels, size, size), generator)
    x = sample(model, y, generator=generator, noise=noise, **kwargs)
    with atomic_write(path) as f:  # study.py shows the last grid of each run: never a half-written one
        if isinstance(rows[0], str):
            captioned_grid(to_uint8(x), [r for r in rows for _ in range(per_row)], per_row).save(f, format="PNG")
        else:  # small images enlarged (nearest) to at least 64 px, so that a grid of 16 px samples can be looked at
            save_image(F.interpolate((x + 1) / 2, scale_factor=max(1, 64 // x.shape[-1]), mode="nearest"), f,
                       nrow=per_row, padding=1, format="png")


def control_grid(model, path, conditions, hints, per_row=7, seed=0, **kwargs):
    """A PNG with one row per control image `hints` [n, 3, H, W] ([0, 1]): the control, then `per_row` samples of the
    adapted model for it and its condition (class label or prompt)."""
    y = as_condition(model, conditions, hints.device).repeat_interleave(per_row, dim=0)
    x = sample(model, y, generator=torch.Generator(hints.device).manual_seed(seed),
               hint=hints.repeat_interleave(per_row, dim=0), **kwargs)
    x = torch.cat([hints[:, None] * 2 - 1, x.view(len(hints), per_row, *x.shape[1:])], dim=1).flatten(0, 1)
    save_image(F.interpolate((x + 1) / 2, scale_factor=max(1, 64 // x.shape[-1]), mode="nearest"), path,
               nrow=per_row + 1, padding=1)


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


def sample_npz(model, path, conditions, batch_size, seed=0, rank=0, world_size=1, hints=None, settings=None,
               **kwargs):
    """A sample for each of the conditions, in an .npz: arr_0 the uint8 NHWC images, arr_1 the class labels (none for
    prompts). Batch b is drawn by rank b % world_size from a generator seeded with (seed, b), so the file does not
    depend on the number of ranks. An adapted model: hints(indices) gives the control images of those conditions.

    Each finished batch is written at once, atomically, to the folder <path>.parts: a run stopped at any point and
    started again with the same `settings` (plain values that make the samples: checkpoint, sampler...) and
    conditions samples only the batches that are missing, and writes the same .npz as a run never stopped. The folder
    goes once the .npz is written."""
    device = next(model.parameters()).device
    parts = path + ".parts"
    marker = os.path.join(parts, "settings.json")
    run = dict(settings=settings, batch_size=batch_size, seed=seed,
               conditions=hashlib.sha256(json.dumps(list(conditions)).encode()).hexdigest())
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) != run:
                raise ValueError(f"{parts} holds the batches of a sampling run with other settings: remove it to "
                                 "start again, or pass another --out")
    else:  # every rank, for nodes that share no file system; the same content, written whole
        os.makedirs(parts, exist_ok=True)
        with atomic_write(marker, "w") as f:
            json.dump(run, f)
    num_batches = (len(conditions) + batch_size - 1) // batch_size
    batches = range(rank, num_batches, world_size)
    todo = [b for b in batches if not os.path.isfile(os.path.join(parts, f"{b:06d}.npy"))]
    progress = tqdm(total=len(batches), initial=len(batches) - len(todo), disable=rank != 0,
                    desc=f"sampling {len(conditions)}")
    for b in todo:
        y = as_condition(model, conditions[b * batch_size:(b + 1) * batch_size], device)
        hint = None
        if hints is not None:
            hint = hints(range(b * batch_size, b * batch_size + len(y))).to(device)
        x = sample(model, y, generator=torch.Generator(device).manual_seed(seed * 1_000_003 + b), hint=hint, **kwargs)
        with atomic_write(os.path.join(parts, f"{b:06d}.npy")) as f:
            np.save(f, to_uint8(x))
        progress.update()
    progress.close()
    shard = {b: np.load(os.path.join(parts, f"{b:06d}.npy")) for b in batches}
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, shard)
        shard = {b: v for part in gathered for b, v in part.items()}
    if rank == 0:
        arrays = [np.concatenate([shard[b] for b in range(num_batches)])]
        if not isinstance(conditions[0], str):
            arrays.append(np.asarray(conditions))
        with atomic_write(path) as f:
            np.savez(f, *arrays)
        shutil.rmtree(parts)
