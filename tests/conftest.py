"""What the test files share: running the scripts, waiting on processes, tiny models, fixtures."""
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from model import DiT
from vae import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

MANIFESTS = os.path.join(ROOT, "tests", "manifests")


TINY = ["--model=DiT-Ti/8", "--image_size=16", "--synthetic_size=64", "--global_batch_size=8", "--num_workers=0",
        "--grid_steps=4", "--log_every=1"]

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args, cwd=ROOT, check=True, **kw):
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


ADAPT = ["--synthetic_size=64", "--global_batch_size=8", "--num_workers=0", "--grid_steps=4", "--log_every=1"]
DISTILL = ["--synthetic_size=64", "--global_batch_size=8", "--num_workers=0", "--log_every=1"]


def script_args(script, out_dir, tiny, *extra, torchrun=0):
    launcher = [sys.executable]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone"]
    return launcher + [script, f"--out_dir={out_dir}"] + tiny + list(extra)


# a script run so that atomic_write's temporary file has a name known in advance (a test puts a FIFO there)
FIXED_TMP = ("import configurator, runpy, sys\nconfigurator.temporary_path = lambda path: path + '.tmp'\n"
             "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')")


def leftovers(path):
    """The temporary files atomic_write left beside path."""
    return glob.glob(f"{path}.*tmp")


def train_args(out_dir, *extra, torchrun=0):
    return script_args("train.py", out_dir, TINY, *extra, torchrun=torchrun)


def train(out_dir, *extra, torchrun=0, check=True):
    return run(train_args(out_dir, *extra, torchrun=torchrun), check=check)


def adapt(out_dir, *extra, torchrun=0, check=True):
    """adapt.py with a tiny config; the model's settings come from --init."""
    return run(script_args("adapt.py", out_dir, ADAPT, *extra, torchrun=torchrun), check=check)


def distill(out_dir, *extra, torchrun=0, check=True):
    """distill.py with a tiny config; the model's settings come from --teacher."""
    return run(script_args("distill.py", out_dir, DISTILL, *extra, torchrun=torchrun), check=check)


def script_errors(script, argvs):
    """The error of the script under each argv ("no error" if none), all in one process."""
    code = ("import json, runpy, sys\nerrors = []\n"
            "for sys.argv in json.loads(sys.argv[1]):\n"
            f"    try:\n        runpy.run_path({script!r}, run_name='__main__')\n        errors.append('no error')\n"
            "    except (Exception, SystemExit) as e:\n        errors.append(f'{type(e).__name__}: {e}')\n"
            "print(json.dumps(errors))")
    return json.loads(run([sys.executable, "-c", code, json.dumps(argvs)]).stdout.splitlines()[-1])


@pytest.fixture
def start_train():
    """train.py in the background, to be killed; its output goes to out_dir.out (a pipe nobody reads would fill up
    and block it). Whatever still runs at the end of the test is killed (torchrun's workers have sessions of their
    own: the whole tree)."""
    procs = []

    def start(out_dir, *extra, torchrun=0, fixed_tmp=False):
        args = train_args(out_dir, *extra, torchrun=torchrun)
        if fixed_tmp:
            args = [sys.executable, "-c", FIXED_TMP] + args[1:]
        with open(f"{out_dir}.out", "w") as f:
            procs.append(subprocess.Popen(args, cwd=ROOT, env=ENV,
                                          stdout=f, stderr=subprocess.STDOUT))
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            for pid in [proc.pid] + descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


def wait_until(condition, proc, timeout=120):
    """Polls condition() while proc runs; returns its first true value."""
    deadline = time.time() + timeout
    while not (value := condition()):
        assert proc.poll() is None and time.time() < deadline, f"exit code {proc.returncode}, or {timeout}s passed"
        time.sleep(0.02)
    return value


def children(pid):
    return [int(c) for f in glob.glob(f"/proc/{pid}/task/*/children") for c in open(f).read().split()]


def descendants(pid):
    return [d for c in children(pid) for d in [c] + descendants(c)]


def rank_pid(launcher, rank):
    """The pid of torchrun's worker process of this rank, once it runs."""
    for pid in children(launcher.pid):
        with open(f"/proc/{pid}/environ") as f:
            if f"RANK={rank}" in f.read().split("\0"):
                return pid


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG", path


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def logged_losses(out_dir):
    with open(os.path.join(out_dir, "log.txt")) as f:
        return [float(line.split("|")[1].split()[1]) for line in f if line.startswith("step ")]


def tiny_dit(**kw):
    return DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5, **kw)


def randomize(model, seed=0, std=0.1):
    """Non-zero weights everywhere (zero-initialised outputs would hide bugs); frozen ones are left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


TINY_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2,
                 context_dim=16, num_classes=10)

DIFFUSERS_UNETS = {  # small UNet2DConditionModel configs with the block types of Stable Diffusion v1, LCM-SD and LDM-4
    "sd": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2, cross_attention_dim=16,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "ldm": dict(block_out_channels=(32, 64, 96), layers_per_block=2, attention_head_dim=1, cross_attention_dim=24,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))}


DIFFUSERS_UNETS["lcm"] = dict(DIFFUSERS_UNETS["sd"], time_cond_proj_dim=256)  # LCM-SD: a guidance embedding


def diffusers_unet(layout, **kw):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**dict(sample_size=8, in_channels=3, out_channels=3), **DIFFUSERS_UNETS[layout], **kw})
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    return unet.eval()


def clip_tokenizer(pad_token="<|endoftext|>"):
    """transformers' CLIPTokenizer with CLIP's BPE vocabulary (clip's own, written as vocab.json and merges.txt), as
    Stable Diffusion v1's tokenizer/ holds it: it pads with the end token."""
    import tempfile

    from clip.simple_tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    bpe = SimpleTokenizer()
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(bpe.encoder, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)))
        return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                             pad_token=pad_token, model_max_length=77)


def clip_text_model(**kw):
    """transformers' CLIPTextModel, tiny, with CLIP's activation and heads of 64 channels, as Stable Diffusion v1's."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**{**dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                  num_attention_heads=1, hidden_act="quick_gelu"), **kw})).eval()


def sd_pipeline(folder, lcm=False):
    """A tiny Stable Diffusion v1 (or LCM-SD) pipeline folder, saved by diffusers' and transformers' save_pretrained:
    the U-Net on 8x8x4 latents of a KL VAE that halves 16-px images, a 2-layer CLIP text encoder of width 64."""
    from diffusers import AutoencoderKL as DiffusersKL
    from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
    unet = diffusers_unet("lcm" if lcm else "sd", in_channels=4, out_channels=4, cross_attention_dim=64)
    torch.manual_seed(0)
    vae = DiffusersKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, layers_per_block=1).eval()
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's
    parts = dict(vae=vae, text_encoder=clip_text_model(), tokenizer=clip_tokenizer(), unet=unet, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    pipe = LatentConsistencyModelPipeline(scheduler=LCMScheduler(**betas), **parts) if lcm else \
        StableDiffusionPipeline(scheduler=DDPMScheduler(**betas, clip_sample=False, steps_offset=1), **parts)
    pipe.save_pretrained(folder)
    return pipe


TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)

CLIP_TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)


def tiny_clip(path, seed=0, torchscript=True):
    """A random CLIP with OpenAI's layout, its weights rounded to float16 as OpenAI ships them, saved as a TorchScript
    archive (the form of OpenAI's files) or a state dict; returns it in float32."""
    import clip
    torch.manual_seed(seed)
    model = clip.model.CLIP(**CLIP_TINY).eval()
    clip.model.convert_weights(model)
    model.float()
    if torchscript:
        torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), clip.tokenize(["a"]))).save(str(path))
    else:
        torch.save(model.state_dict(), path)
    return model


def make_folder(root, sizes=((40, 30), (64, 64))):
    for c, name in enumerate(["n02", "n01"]):
        os.makedirs(root / name)
        for i, size in enumerate(sizes):
            Image.new("RGB", size, (40 * c, 100, 7 * i)).save(root / name / f"{i}.{'png' if i else 'jpg'}")


def make_controls(images, controls, resize=None):
    """A control folder mirroring the image folder: each image's colours inverted, as a PNG (the images are JPEGs
    and PNGs), optionally resized."""
    for path in sorted(images.rglob("*.*")):
        image = Image.open(path).convert("RGB")
        out = controls / path.relative_to(images).with_suffix(".png")
        os.makedirs(out.parent, exist_ok=True)
        Image.fromarray(255 - np.asarray(image)).resize(resize or image.size).save(out)


def make_caption_folder(root, captions, size=(20, 12)):
    """Images in two shard folders, as img2dataset writes them, each with its caption in a same-named .txt."""
    for i, caption in enumerate(captions):
        stem = root / f"{i // 4:05d}" / f"{i:09d}"
        os.makedirs(stem.parent, exist_ok=True)
        Image.new("RGB", size, (10 * i % 256, 100, 50)).save(f"{stem}.{'png' if i % 2 else 'jpg'}")
        (stem.parent / f"{stem.name}.txt").write_text(caption + "\n", encoding="utf-8")


TINY_VAE_CONFIG = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, latent_channels=4)

SYNTH = ["--synthetic_size=64", "--image_size=16", "--shard_size=16", "--batch_size=8", "--num_workers=0"]


def save_vae(folder, **config):
    """A diffusers-style folder: diffusion_pytorch_model.bin and config.json."""
    cfg = dict(TINY_VAE_CONFIG, **config)
    vae = randomize(AutoencoderKL(**dict(TINY_VAE_CONFIG, block_out_channels=(32, 64))), std=0.2)  # input-sensitive latents
    os.makedirs(folder, exist_ok=True)
    torch.save(vae.state_dict(), os.path.join(folder, "diffusion_pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(_class_name="AutoencoderKL", **cfg), f)
    return vae.eval()


def extract(out, vae, *extra, torchrun=0, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone"] \
        if torchrun else [sys.executable]
    return run(launcher + ["data.py", f"--out={out}", f"--vae={vae}"] + list(extra), check=check)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny VAE and the synthetic shapes (64 images, 16px) cached as 4 shards of 8x8x4 latents."""
    root = tmp_path_factory.mktemp("latents")
    save_vae(root / "vae")
    extract(root / "cache", root / "vae", *SYNTH)
    return root


def random_inception_state_dict(seed=0):
    """Random weights with non-trivial batch-norm statistics that keep activations O(1) through all layers, so
    a wrong branch, pool or ordering shows in the output."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in fid.InceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            sd[k] = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "running_mean")):
            sd[k] = 0.2 * torch.rand(v.shape, generator=g) - 0.1
        elif k.startswith("fc."):
            sd[k] = torch.randn(v.shape, generator=g) * 0.05
        else:
            sd[k] = v.clone()
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(state dict, path of a .pth holding it) shared by the tests of this module."""
    sd = random_inception_state_dict()
    path = str(tmp_path_factory.mktemp("inception") / fid.FID_WEIGHTS_NAME)
    torch.save(sd, path)
    return sd, path


def rel_close(a, b, rel=1e-4):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = b.abs().max().item()
    assert scale > 1e-3, "degenerate reference output"
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)
