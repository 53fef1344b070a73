"""The test suite: `python -m pytest -q test_all.py`. Tiny configs, CPU, real files, real torchrun.

Sections, in this order (find one by searching for its title; run one with -k and a word of a test's name):
  model.py       DiT and U-Net shapes, init, official/diffusers layouts, guidance; diffusers pipeline folders (the
                 paper's LDMs, Stable Diffusion v1, LCM-SD) against diffusers
  vae.py         KL-f8 and VQ-f4 against diffusers, key manifests (tests/manifests), weight-file errors
  text.py        CLIP's text transformer against clip-anytorch and transformers' CLIPTextModel (SD's padding), the
                 offline tokenizer
  diffusion.py   schedule, q_sample, hybrid / v / Min-SNR losses, DDIM, DDPM and DPM-Solver++ update rules; LCM's
                 consistency function, loss and sampler against diffusers' LCMScheduler
  data.py        built-in shapes, class folders, bad images, image modes (16-bit...), caption sets, the batch sampler
  corrupt.py     symmetric / asymmetric labels, swapped / rewritten captions, random mode, and in training
  cep.py         CEP-U / CEP-G statistics, null condition and sampling untouched, per token; IP
  control.py     Canny against OpenCV, ControlNet / T2I-Adapter: zero init, gradients only to the adapter
                 (adaptation runs of train.py are under train.py; control folders under data.py)
  configurator.py, train.py   overrides, config-file errors, one-line errors; exact resume, old checkpoints
                 (tests/fixtures), bad settings, NaN, SIGKILL / SIGTERM, damaged checkpoints, a full disk, torchrun;
                 consistency distillation (a frozen teacher, exact resume, its errors)
  latent diffusion and text-to-image end to end; sample.py grids and .npz files
  fid.py, evaluate.py and metrics.py   Inception against pytorch-fid / torch-fidelity, FID, IS, precision/recall, CLIP
                 score, ADM reference batches, RMD, sample entropy, TopP&R against top-pr, CLIP image features, too
                 few samples, caches written whole
  study.py, gmm.py, bench.py
"""
import contextlib
import csv
import glob
import io
import json
import math
import multiprocessing
import os
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import scipy.special
import scipy.stats
import torch
from PIL import Image

import cep
import control
import corrupt
import data
import evaluate
import fid
import gmm
import metrics
import study
import text
from configurator import configure
from diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood
from model import DiT, DiT_models, UNet, UNet_models, build_model, diffusers_to_dit, load_dit
from vae import AutoencoderKL, VQModel, load_first_stage
from sample import load_model, sample, sample_npz, unet_args, unet_keys

ROOT = os.path.dirname(os.path.abspath(__file__))
MANIFESTS = os.path.join(ROOT, "tests", "manifests")
TINY = ["--model=DiT-Ti/8", "--image_size=16", "--synthetic_size=64", "--global_batch_size=8", "--num_workers=0",
        "--grid_steps=4", "--log_every=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args, cwd=ROOT, check=True, **kw):
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def train_args(out_dir, *extra, torchrun=0):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone"] \
        if torchrun else [sys.executable]
    return launcher + ["train.py", f"--out_dir={out_dir}"] + TINY + list(extra)


def train(out_dir, *extra, torchrun=0, check=True):
    return run(train_args(out_dir, *extra, torchrun=torchrun), check=check)


@pytest.fixture
def start_train():
    """train.py in the background, to be killed; its output goes to out_dir.out (a pipe nobody reads would fill up
    and block it). Whatever still runs at the end of the test is killed (torchrun's workers have sessions of their
    own: the whole tree)."""
    procs = []

    def start(out_dir, *extra, torchrun=0):
        with open(f"{out_dir}.out", "w") as f:
            procs.append(subprocess.Popen(train_args(out_dir, *extra, torchrun=torchrun), cwd=ROOT, env=ENV,
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


# -----------------------------------------------------------------------------
# The standalone files


@pytest.mark.parametrize("name, use", [
    ("model", "model.build_model('DiT-Ti/8', 16, num_classes=3)(torch.zeros(1, 4, 16, 16), torch.zeros(1), "
              "torch.zeros(1, dtype=torch.long))"),
    ("vae", "vae.AutoencoderKL(block_out_channels=(32, 32), norm_num_groups=8).decode(torch.zeros(1, 4, 2, 2))"),
    ("text", "text.TextEmbedder(text.TextEncoder(64, 1), 0.1)(text.tokenize(['a red circle']))"),
    ("diffusion", "diffusion.GaussianDiffusion().respaced(4).sample(lambda x, t: torch.zeros(1, 6, 4, 4), "
                  "torch.randn(1, 3, 4, 4))"),
    ("corrupt", "corrupt.corrupt_conditions([0, 1, 2, 3] * 5, 0.1, seed=0)"),
    ("cep", "cep.CEP()(torch.zeros(2, 8))"),
    ("fid", "fid.frechet_distance(np.zeros(4), np.eye(4), np.ones(4), np.eye(4))")])
def test_a_standalone_file_works_copied_alone_into_an_empty_folder(tmp_path, name, use):
    shutil.copy(os.path.join(ROOT, name + ".py"), tmp_path)
    code = f"import sys\nassert {ROOT!r} not in sys.path\nimport numpy as np, torch, {name}\n{use}"
    run([sys.executable, "-c", code], cwd=tmp_path)
    assert sorted(os.listdir(tmp_path)) in ([f"{name}.py"], ["__pycache__", f"{name}.py"])


# -----------------------------------------------------------------------------
# model.py: DiT and the LDM U-Net


@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-S/2", "DiT-B/4"])
def test_dit_state_dict_matches_official_manifest(name):
    with open(os.path.join(MANIFESTS, "dit_official_keys.json")) as f:
        manifest = json.load(f)[name]
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_diffusers_layout_maps_to_official_names():
    with open(os.path.join(MANIFESTS, "dit_xl2_diffusers_keys.json")) as f:
        diffusers_manifest = json.load(f)
    with open(os.path.join(MANIFESTS, "dit_official_keys.json")) as f:
        official = json.load(f)["DiT-XL/2"]
    mapped = diffusers_to_dit({k: torch.empty(v, device="meta") for k, v in diffusers_manifest.items()})
    official.pop("pos_embed")  # diffusers computes it instead of storing it
    assert {k: list(v.shape) for k, v in mapped.items()} == official


def test_diffusers_dit_gives_the_same_output():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5,
                                          norm_eps=1e-6).eval()
    randomize(ref)
    # diffusers' DiT embeds timesteps with frequencies exp(-log(1e4) k / (half - 1)); the official DiT, whose
    # weights diffusers converts, and ours use k / half. Align the reference to the official definition.
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())  # copies, as in checkpoints
    ours = load_dit(ref.state_dict(), input_size=8, num_heads=2).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        assert torch.allclose(ours(x, t, y), ref(x, t, y).sample, atol=1e-5)


@pytest.mark.parametrize("name", list(DiT_models))
def test_output_shapes_for_every_size(name):
    with torch.device("meta"):  # shapes only: DiT-XL/2 would take seconds and gigabytes for real
        model = DiT_models[name](input_size=32, in_channels=4, num_classes=1000)
        out = model(torch.randn(2, 4, 32, 32), torch.tensor([0, 999]), torch.tensor([1, 1000]))
    assert out.shape == (2, 8, 32, 32)
    if name.startswith("DiT-S") or name.startswith("DiT-Ti"):  # and real numbers for the small ones
        model = DiT_models[name](input_size=16, in_channels=3, num_classes=10, learn_sigma=False)
        assert model(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.tensor([1, 10])).shape == (2, 3, 16, 16)


def test_output_is_zero_at_init_and_depends_on_the_class_after():
    model = tiny_dit()
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))
    assert torch.count_nonzero(model(x, t, torch.tensor([0, 1, 2, 5]))) == 0
    randomize(model).eval()
    assert not torch.allclose(model(x, t, torch.zeros(4, dtype=torch.long)), model(x, t, torch.ones(4, dtype=torch.long)))


def test_sincos_pos_embed_layout():
    # Official DiT: the first half of each vector encodes the column, the second half the row.
    pos = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=1, num_heads=2).pos_embed[0]
    assert torch.allclose(pos[0, :8], pos[4, :8]) and not torch.allclose(pos[0, 8:], pos[4, 8:])  # same column
    assert torch.allclose(pos[0, 8:], pos[1, 8:]) and not torch.allclose(pos[0, :8], pos[1, :8])  # same row
    assert torch.allclose(pos[0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1] * 2))


def test_label_dropout_rate_and_null_class():
    model = tiny_dit(class_dropout_prob=0.1)
    emb = model.y_embedder
    labels = torch.randint(0, 5, (100_000,))
    table = emb.embedding_table.weight
    null_rows = (emb(labels) == table[5]).all(dim=1).float().mean().item()
    assert abs(null_rows - 0.1) < 0.005
    emb.eval()
    assert torch.equal(emb(labels), table[labels])
    forced = emb(labels[:4], force_drop_ids=torch.tensor([True, False, True, False]))
    assert torch.equal(forced[0], table[5]) and torch.equal(forced[1], table[labels[1]])


def test_label_smoothing_mixes_in_the_mean_class_embedding_in_training_only():
    emb = tiny_dit(class_dropout_prob=0.0).y_embedder
    emb.smoothing = 0.1
    labels, table = torch.tensor([0, 3, 5]), emb.embedding_table.weight  # 5: the null class
    out = emb(labels)
    expected = 0.9 * table[labels[:2]] + 0.1 * table[:5].mean(0)
    torch.testing.assert_close(out[:2], expected)
    assert torch.equal(out[2], table[5]) and torch.equal(emb.eval()(labels), table[labels])


def test_forward_with_cfg_guides_all_channels():
    model = randomize(tiny_dit(learn_sigma=True)).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
        guided = model.forward_with_cfg(x, t, y, 3.0)
    assert torch.allclose(guided[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(guided[:, 3:], cond[:, 3:], atol=1e-6)


def test_load_dit_reads_architecture_from_an_official_style_state_dict(tmp_path):
    src = randomize(DiT_models["DiT-S/8"](input_size=16, in_channels=4, num_classes=7)).eval()
    torch.save(src.state_dict(), tmp_path / "official.pt")  # official checkpoints are a bare state dict
    model, _ = load_model(str(tmp_path / "official.pt"))
    assert (len(model.blocks), model.blocks[0].attn.num_heads, model.patch_size, model.num_classes) == (12, 6, 8, 7)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 4]), torch.tensor([0, 6])
    assert torch.equal(model(x, t, y), src(x, t, y))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(str(tmp_path / "missing.pt"))


TINY_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2,
                 context_dim=16, num_classes=10)


@pytest.mark.parametrize("cfg, size", [
    (dict(in_channels=4, **TINY_UNET), 16),
    (dict(in_channels=3, **{**TINY_UNET, "channel_mult": (1, 2, 3), "num_res_blocks": 2,
                            "attention_resolutions": (1, 4)}), 16),
    (dict(in_channels=3, learn_sigma=True, **UNet_models["LDM-S"], num_classes=5), 16),
])
def test_unet_shapes_and_zero_init(cfg, size):
    model = UNet(**cfg).train()
    x, t = torch.randn(2, cfg["in_channels"], size, size), torch.tensor([3, 999])
    out = model(x, t, torch.tensor([1, cfg["num_classes"]]))
    assert out.shape == (2, cfg["in_channels"] * (2 if cfg.get("learn_sigma") else 1), size, size)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()  # zero-init must not block gradients to the final conv
    assert model.out[-1].weight.grad.abs().sum() > 0


def test_ldm4_size():
    with torch.device("meta"):
        model = UNet(in_channels=3, num_classes=1000, **UNet_models["LDM-4"])
        out = model(torch.empty(2, 3, 64, 64), torch.empty(2, dtype=torch.long), torch.empty(2, dtype=torch.long))
    assert out.shape == (2, 3, 64, 64)
    n = sum(p.numel() for p in model.parameters())
    assert 380e6 < n < 420e6, n  # the paper: about 400M


def test_unet_output_depends_on_condition():
    torch.manual_seed(0)
    model = randomize(UNet(in_channels=4, **TINY_UNET)).eval()  # std 0.05 left the class's effect near 1e-4
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 10]))
        assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # both rows changed, the null class included
        # a class is exactly one context token from the table
        ctx = model.y_embedder.embedding_table(torch.tensor([1, 10]))[:, None]
        torch.testing.assert_close(model(x, t, context=ctx), b)
        c1, c2 = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
        assert (model(x, t, context=c1) - model(x, t, context=c2)).abs().max() > 1e-4
        assert (model(x, t + 100, context=c1) - model(x, t, context=c1)).abs().max() > 1e-4
    text_only = UNet(in_channels=4, **{**TINY_UNET, "num_classes": 0})
    assert text_only.y_embedder is None and text_only(x, t, context=c1).shape == x.shape


def test_forward_with_cfg():
    model = randomize(UNet(in_channels=4, learn_sigma=True, **TINY_UNET), std=0.05).eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 700]), torch.tensor([2, 5])
    with torch.no_grad():
        cond, null = model(x, t, y), model(x, t, torch.full_like(y, 10))
        out = model.forward_with_cfg(x, t, y, 3.0)
    torch.testing.assert_close(out[:, :4], null[:, :4] + 3.0 * (cond[:, :4] - null[:, :4]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 4:], cond[:, 4:], rtol=1e-4, atol=1e-5)
    assert (out[:, :4] - cond[:, :4]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_a_consistency_students_guidance_embedding_starts_at_zero_and_is_used(kind):
    torch.manual_seed(0)
    make = tiny_dit if kind == "dit" else lambda **kw: UNet(in_channels=3, **TINY_UNET, **kw)
    teacher, student = randomize(make()).eval(), make(guidance_embed=True).eval()
    assert student.load_state_dict(teacher.state_dict(), strict=False).missing_keys == ["w_embedder.cond_proj.weight"]
    x, t, y, w = torch.randn(2, 3, 8, 8), torch.tensor([19, 999]), torch.tensor([1, 2]), torch.tensor([2.0, 4.0])
    out = student(x, t, y, w=w)
    assert torch.equal(out, teacher(x, t, y))  # a zero projection: exactly the teacher, whatever w
    out.square().sum().backward()
    assert student.w_embedder.cond_proj.weight.grad.abs().sum() > 0  # and it learns from the first step
    with torch.no_grad():
        student.w_embedder.cond_proj.weight.normal_(0, 0.1)
        assert (student(x, t, y, w=w) - student(x, t, y, w=w + 1)).abs().amax(dim=(1, 2, 3)).min() > 1e-4


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


def guidance_embedding(w):
    """diffusers' own w embedding of LCM (LatentConsistencyModelPipeline.get_guidance_scale_embedding, 256 dims)."""
    from diffusers import LatentConsistencyModelPipeline
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)


@pytest.mark.parametrize("layout", DIFFUSERS_UNETS)
def test_unet_loads_diffusers_unet2dconditionmodel_and_computes_the_same(layout):
    ref = diffusers_unet(layout)
    ours = UNet(**unet_args(dict(ref.config)), num_classes=0).eval()
    ours.load_state_dict(unet_keys(dict(ref.config), ref.state_dict()))
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, ref.config.cross_attention_dim)
    w = torch.tensor([3.5, 14.0])  # LCM's guidance w: diffusers adds cond_proj of its embedding to the timestep's
    with torch.no_grad():
        out = ours(x, t, context=c, w=w if layout == "lcm" else None)
        _close(out, ref(x, t, encoder_hidden_states=c, timestep_cond=guidance_embedding(w) if layout == "lcm" else
                        None).sample, rel=1e-5)
        if layout == "lcm":  # and w matters
            assert (out - ours(x, t, context=c, w=w + 1)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="use_linear_projection"):
        unet_args(dict(ref.config, use_linear_projection=True))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        unet_args(dict(ref.config, time_cond_proj_dim=512))


def test_a_pipeline_folder_as_the_paper_released_samples_with_the_checkpoint_script(tmp_path):
    """LDMClassToImagePipeline's layout (the authors' diffusers fork): unet/, class_embedder/, vqvae/, scheduler/."""
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel as DiffusersVQ
    torch.manual_seed(0)
    folder = tmp_path / "ldm-in1k"
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, **DIFFUSERS_UNETS["ldm"])
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    unet.save_pretrained(folder / "unet")
    DiffusersVQ(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=3,
                up_block_types=("UpDecoderBlock2D",) * 2, num_vq_embeddings=16, norm_num_groups=8,
                layers_per_block=1).save_pretrained(folder / "vqvae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195).save_pretrained(folder / "scheduler")
    (folder / "class_embedder").mkdir()
    table = torch.randn(5 + 1, 24)  # 5 classes and the null one, last
    torch.save({"embedding.weight": table}, folder / "class_embedder" / "diffusion_pytorch_model.bin")
    (folder / "class_embedder" / "config.json").write_text(json.dumps({"n_classes": 6, "embed_dim": 24}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LDMClassToImagePipeline"}))
    model, info = load_model(str(folder))
    assert info["schedule"] == "scaled_linear" and info["prediction"] == "eps" and model.num_classes == 5
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.tensor([4, 5])
    with torch.no_grad():
        _close(model(x, t, y), unet.eval()(x, t, encoder_hidden_states=table[y][:, None]).sample, rel=1e-5)
    run([sys.executable, "sample.py", f"--ckpt={folder}", "--grid_classes=2", "--grid_per_class=2", "--num_steps=3",
         f"--out={tmp_path / 'grid.png'}"])
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 8


@pytest.mark.parametrize("lcm", [False, True])
def test_stable_diffusion_v15_and_lcm_sd_at_full_size_map_onto_our_unet_and_text_encoder(lcm):
    """Shapes only (meta tensors): every weight of SD-1.5's UNet2DConditionModel (LCM-SD's: time_cond_proj_dim 256)
    and of its text encoder, CLIP ViT-L/14's CLIPTextModel, has its place in ours, and ours has no other."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    config = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), sample_size=64,
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, time_cond_proj_dim=256 if lcm else None)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
        args = unet_args(dict(ref.config))
        ours = UNet(**args, num_classes=0)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu"))
        encoder = text.TextEncoder(768, 12)
        mapped = unet_keys(dict(ref.config), ref.state_dict())
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert {**UNet_models["SD-1.5"], "in_channels": 4, "guidance_embed": lcm} == args
    assert sum(v.numel() for v in mapped.values()) == sum(p.numel() for p in ref.parameters())  # 860M (+ 82K)
    with torch.device("meta"):  # text_encoder_from_transformers' key map, on shapes
        loaded = text.text_encoder_from_transformers(dict(clip_l.config.to_dict()), clip_l.state_dict(), 49407)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}


def clip_tokenizer(pad_token="<|endoftext|>"):
    """transformers' CLIPTokenizer with CLIP's BPE vocabulary (clip's own, written as vocab.json and merges.txt), as
    Stable Diffusion v1's tokenizer/ holds it: it pads with the end token."""
    from clip.simple_tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    import tempfile
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
    from diffusers import (AutoencoderKL as DiffusersKL, DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler,
                           StableDiffusionPipeline)
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


@pytest.mark.parametrize("lcm", [False, True])
def test_a_stable_diffusion_folder_loads_and_computes_what_diffusers_does(tmp_path, lcm):
    pipe = sd_pipeline(tmp_path / "sd", lcm)
    model, info = load_model(str(tmp_path / "sd"))
    assert (info["model_args"]["name"], info["model_args"]["text_pad"], info["schedule"], info["prediction"]) == \
        ("SD-1.5", 49407, "sd", "eps")
    assert info["first_stage"] == dict(vae=str(tmp_path / "sd" / "vae"), scale=0.18215)
    captions = ["a small red circle, top left", ""]
    ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    x, t, w = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([3.0, 7.5])
    with torch.no_grad():  # the whole condition path: tokens, the text encoder with SD's padding, the U-Net (and w)
        ref = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0],
                        timestep_cond=guidance_embedding(w) if lcm else None).sample
        _close(model(x, t, text.tokenize(captions), **(dict(w=w) if lcm else {})), ref, rel=1e-5)
    if not lcm:
        return
    assert info["consistency"] == dict(skip_interval=20)  # LCMScheduler's original_inference_steps 50
    # diffusers' own LCM pipeline, one step from the same noise, decoded: the images of sample.sample
    generator = torch.Generator().manual_seed(0)
    vae = load_first_stage(info["first_stage"]["vae"]).eval()
    ours = sample(model, text.tokenize(captions), cfg_scale=8.0, sampler="lcm", num_steps=1, generator=generator,
                  size=8, vae=vae, prediction="eps", schedule="sd")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = pipe(captions, num_inference_steps=1, guidance_scale=8.0, latents=latents, output_type="pt").images
    _close((ours / 2 + 0.5).clamp(0, 1), theirs, rel=1e-4)
    (tmp_path / "prompts.txt").write_text("a large blue star\na small red circle\n")
    run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'sd'}", "--sampler=lcm", "--num_steps=2", "--grid_per_class=2",
         f"--prompts={tmp_path / 'prompts.txt'}", f"--out={tmp_path / 'grid.png'}"])
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 16
    scheduler = json.loads((tmp_path / "sd" / "scheduler" / "scheduler_config.json").read_text())
    for change in (dict(beta_schedule="squaredcos_cap_v2"), dict(prediction_type="sample"),
                   dict(original_inference_steps=30), dict(timestep_scaling=5.0)):
        (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, **change}))
        with pytest.raises(ValueError, match="scheduler: .* is not ours"):
            load_model(str(tmp_path / "sd"))


# -----------------------------------------------------------------------------
# vae.py: the first stages (KL-f8 VAE, VQ-f4) and their weight files


TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


def _diffusers_tiny(cls, **kw):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return getattr(diffusers, cls)(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, **kw).eval()


def test_state_dicts_match_manifests():
    for cls, name in [(AutoencoderKL, "sd_vae_kl_f8_diffusers_keys.json"), (VQModel, "vq_f4_diffusers_keys.json")]:
        with torch.device("meta"):  # full size, shapes only
            model = cls()
        with open(os.path.join(MANIFESTS, name)) as f:
            manifest = json.load(f)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == manifest, name


def test_kl_vae_matches_diffusers():
    ref = _diffusers_tiny("AutoencoderKL", latent_channels=4)
    ours = AutoencoderKL(latent_channels=4, **TINY_VAE).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        z = ours.encode(x)
        assert z.shape == (2, 4, 16, 16)
        torch.testing.assert_close(z, dist.mean * 0.18215, rtol=1e-5, atol=1e-5)
        torch.manual_seed(3)
        zs = ours.encode(x, sample=True)
        torch.manual_seed(3)
        torch.testing.assert_close(zs, dist.sample() * 0.18215, rtol=1e-5, atol=1e-5)
        assert (zs - z).abs().mean() > 1e-3  # the sample really is noisy
        img = ours.decode(z)
        assert img.shape == x.shape
        torch.testing.assert_close(img, ref.decode(z / 0.18215).sample, rtol=1e-5, atol=1e-5)


def test_vq_matches_diffusers():
    ref = _diffusers_tiny("VQModel", latent_channels=3, num_vq_embeddings=64)
    ours = VQModel(latent_channels=3, num_codes=64, **TINY_VAE).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():  # spread the codebook over the latents' range so that quantization makes a difference
        ours.quantize.embedding.weight.normal_(0, 0.3)
        ref.quantize.embedding.weight.copy_(ours.quantize.embedding.weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = ours.encode(x)
        assert h.shape == (2, 3, 16, 16)
        torch.testing.assert_close(h, ref.encode(x).latents, rtol=1e-5, atol=1e-5)
        q = ours.quantize(h)
        torch.testing.assert_close(q, ref.quantize(h)[0], rtol=1e-5, atol=1e-5)
        codes = ours.quantize.embedding.weight
        assert all((codes - v).abs().sum(1).min() < 1e-6 for v in q.permute(0, 2, 3, 1).reshape(-1, 3))
        assert len({tuple(v.tolist()) for v in q.permute(0, 2, 3, 1).reshape(-1, 3)}) > 1
        img = ours.decode(h)
        torch.testing.assert_close(img, ref.decode(h).sample, rtol=1e-5, atol=1e-5)
        assert (img - ours.decoder(ours.post_quant_conv(h))).abs().max() > 1e-4  # decode does quantize


def test_load_pretrained_from_folder(tmp_path):
    src = randomize(AutoencoderKL(**TINY_VAE))
    (tmp_path / "vae").mkdir()
    torch.save(src.state_dict(), tmp_path / "vae" / "diffusion_pytorch_model.bin")
    loaded = AutoencoderKL(**TINY_VAE).load_pretrained(tmp_path)  # a folder laid out like a diffusers pipeline
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    safetensors = pytest.importorskip("safetensors.torch")
    vq = randomize(VQModel(num_codes=16, **TINY_VAE))
    safetensors.save_file(vq.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = VQModel(num_codes=16, **TINY_VAE).load_pretrained(tmp_path / "diffusion_pytorch_model.safetensors")
    assert torch.equal(loaded.quantize.embedding.weight, vq.quantize.embedding.weight)


def test_missing_weights_error_names_file_and_place(tmp_path):
    missing = tmp_path / "sd-vae-ft-ema"
    with pytest.raises(FileNotFoundError) as e:
        AutoencoderKL(**TINY_VAE).load_pretrained(missing)
    msg = str(e.value)
    assert "diffusion_pytorch_model" in msg and str(missing) in msg and "huggingface.co" in msg


def test_load_first_stage_builds_the_architecture_of_config_json(tmp_path):
    src = save_vae(tmp_path / "kl", scaling_factor=0.5)
    vae = load_first_stage(tmp_path / "kl")
    assert (vae.factor, vae.latent_channels, vae.scale) == (2, 4, 0.5)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x), src.encode(x) / 0.18215 * 0.5)
    vq = randomize(VQModel(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, num_codes=16))
    (tmp_path / "vq" / "vqvae").mkdir(parents=True)  # the layout of CompVis/ldm-celebahq-256
    torch.save(vq.state_dict(), tmp_path / "vq" / "vqvae" / "diffusion_pytorch_model.bin")
    (tmp_path / "vq" / "vqvae" / "config.json").write_text(json.dumps(dict(
        _class_name="VQModel", block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8,
        latent_channels=3, num_vq_embeddings=16, scaling_factor=0.18215)))
    loaded = load_first_stage(tmp_path / "vq")
    assert isinstance(loaded, VQModel) and (loaded.factor, loaded.latent_channels, loaded.scale) == (4, 3, 1.0)
    assert torch.equal(loaded.quantize.embedding.weight, vq.quantize.embedding.weight)


def test_missing_vae_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_first_stage(tmp_path / "nope")
    result = train(tmp_path / "t", f"--vae={tmp_path / 'nope'}", check=False)
    assert result.returncode != 0 and f"{tmp_path / 'nope'}" in result.stderr and \
        "diffusion_pytorch_model" in result.stderr, result.stderr[-2000:]
    # an official DiT checkpoint is a bare state dict of a 4-channel model: it needs --vae
    torch.save(DiT_models["DiT-S/8"](input_size=8, in_channels=4, num_classes=3).state_dict(), tmp_path / "dit.pt")
    result = run([sys.executable, "sample.py", f"--ckpt={tmp_path}/dit.pt", "--num_steps=2"], check=False)
    assert result.returncode != 0 and "--vae" in result.stderr.splitlines()[-1], result.stderr[-2000:]
    save_vae(tmp_path / "vae")
    run([sys.executable, "sample.py", f"--ckpt={tmp_path}/dit.pt", f"--vae={tmp_path}/vae", "--num_steps=2",
         "--grid_per_class=2", f"--out={tmp_path}/grid.png"])
    assert Image.open(tmp_path / "grid.png").size == (2 * 65 + 1, 3 * 65 + 1)  # 8x8 latents: 16 px images, shown at 64


# -----------------------------------------------------------------------------
# text.py: CLIP's text transformer and tokenizer


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


def test_clip_text_encoder_has_clips_names_and_computes_what_clip_does(tmp_path, monkeypatch):
    import clip
    # the text half of OpenAI's checkpoints (ViT-B/32, ViT-L/14 hyperparameters, built by clip's own model) loads as it is
    for width, embed in ((512, 512), (768, 768)):
        with torch.device("meta"):
            ref = clip.model.CLIP(**dict(CLIP_TINY, embed_dim=embed, transformer_width=width,
                                         transformer_heads=width // 64, transformer_layers=12))
            ours = text.TextEncoder(width, 12)
        text_half = {k: list(v.shape) for k, v in ref.state_dict().items()
                     if not k.startswith("visual.") and k not in ("text_projection", "logit_scale")}
        assert {k: list(v.shape) for k, v in ours.state_dict().items()} == text_half
        assert ours.transformer.resblocks[0].attn.num_heads == width // 64
    # random weights from a TorchScript archive: every token's embedding, and at the end token CLIP's own encode_text
    ref = tiny_clip(tmp_path / "clip.pt")
    encoder = text.load_clip_text_encoder(str(tmp_path / "clip.pt"))
    tokens = text.tokenize(["a small red circle", "un café 🙂", ""])
    with torch.no_grad():
        out = encoder(tokens)
        x = ref.ln_final(ref.transformer((ref.token_embedding(tokens) + ref.positional_embedding).permute(1, 0, 2)))
        torch.testing.assert_close(out, x.permute(1, 0, 2), rtol=1e-5, atol=1e-5)
        pooled = out[torch.arange(3), tokens.argmax(-1)] @ ref.text_projection
        torch.testing.assert_close(pooled, ref.encode_text(tokens), rtol=1e-5, atol=1e-5)
    assert out.shape == (3, 77, 64) and (out[0] - out[1]).abs().max() > 1e-3
    # missing weights: the file, or for a model name clip's cache file and where to get it
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        text.load_clip(str(tmp_path / "nope.pt"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(clip.clip.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError) as e:
        text.load_clip("ViT-B/32")
    expected = tmp_path / "home" / ".cache" / "clip" / "ViT-B-32.pt"
    assert f"save it as {expected}" in str(e.value) and "openaipublic" in str(e.value)


def test_stable_diffusions_text_encoder_is_transformers_clip_text_model_with_its_padding(tmp_path):
    ref, tokenizer = clip_text_model(), clip_tokenizer()
    ref.save_pretrained(tmp_path / "sd" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "sd" / "tokenizer")
    encoder = text.load_clip_text_encoder(str(tmp_path / "sd"))
    captions = ["a small red circle", "un café 🙂, top left", ""]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    tokens = text.tokenize(captions)  # clip's tokenizer: the same ids, but 0 as padding where SD pads with 49407
    real = (ids != 49407) | (torch.arange(77) <= (ids == 49407).int().argmax(1, keepdim=True))
    assert encoder.pad == 49407 and torch.equal(torch.where(real, tokens, 49407), ids) and (tokens[~real] == 0).all()
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        _close(encoder(tokens), expected, rel=1e-5)  # every position, the padding's too: SD attends to all 77
        encoder.pad = 0  # clip's padding: the real tokens' embeddings are the same, the padding's are not
        out = encoder(tokens)
    _close(out[real], expected[real], rel=1e-5)
    assert (out[~real] - expected[~real]).abs().max() > 1e-2
    # transformers 4's files: the keys under text_model., in pytorch_model.bin
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "sd", old)
    (old / "text_encoder" / "model.safetensors").unlink()
    torch.save({f"text_model.{k}": v for k, v in ref.state_dict().items()}, old / "text_encoder" / "pytorch_model.bin")
    with torch.no_grad():
        _close(text.load_clip_text_encoder(str(old))(tokens), expected, rel=1e-5)
    # what TextEncoder is not: another activation, another vocabulary or padding
    config = json.loads((old / "text_encoder" / "config.json").read_text())
    (old / "text_encoder" / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu")))
    with pytest.raises(ValueError, match="not CLIP's text transformer"):
        text.load_clip_text_encoder(str(old))
    (old / "text_encoder" / "config.json").write_text(json.dumps(config))
    clip_tokenizer(pad_token="<pad>").save_pretrained(old / "tokenizer")
    with pytest.raises(ValueError, match="not CLIP's tokenizer"):
        text.load_clip_text_encoder(str(old))


def test_tokenizer_works_offline():
    code = ("import socket\n"
            "def refuse(*a, **k): raise OSError('no network in this test')\n"
            "socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse\n"
            "import json, text\n"
            "print(json.dumps(text.tokenize(['a café', '', 'word ' * 100]).tolist()))")
    tokens = json.loads(run([sys.executable, "-c", code]).stdout.strip().splitlines()[-1])
    from clip.simple_tokenizer import SimpleTokenizer
    a, null, long = tokens
    assert len(a) == len(null) == len(long) == 77 and a[0] == null[0] == 49406  # start of text
    end = a.index(49407)
    assert SimpleTokenizer().decode(a[1:end]).strip() == "a café" and not any(a[end + 1:])
    assert null[:3] == [49406, 49407, 0] and long[-1] == 49407  # the empty caption; a long one cut to 77


# -----------------------------------------------------------------------------
# diffusion.py: schedule, losses, and the DDPM / DDIM / DPM-Solver++ update rules


def test_linear_schedule():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000 and d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert d.alphas_cumprod[-1] == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))


def test_scaled_linear_schedule_is_ldms_and_diffusers():
    from diffusers import DDPMScheduler
    d = GaussianDiffusion(schedule="scaled_linear")
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)  # CompVis cin256-v2
    np.testing.assert_allclose(d.betas, ref.betas.double().numpy(), rtol=1e-6)
    snr0 = lambda d: math.sqrt(d.alphas_cumprod[0] / (1 - d.alphas_cumprod[0]))
    assert snr0(d) == pytest.approx(25.8, abs=0.05) and snr0(GaussianDiffusion()) == pytest.approx(100, abs=0.01)
    with pytest.raises(ValueError, match="schedule must be"):
        GaussianDiffusion(schedule="cosine")
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion v1's
    np.testing.assert_allclose(GaussianDiffusion(schedule="sd").betas, sd.betas.double().numpy(), rtol=1e-6)


def test_q_sample_statistics():
    d = GaussianDiffusion()
    torch.manual_seed(0)
    for step in (0, 100, 500, 999):
        x0 = torch.full((200_000, 1, 1, 1), 0.7)
        x_t = d.q_sample(x0, torch.full((200_000,), step), torch.randn_like(x0))
        a = d.alphas_cumprod[step]
        assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.01)
        assert x_t.var().item() == pytest.approx(1 - a, rel=0.02, abs=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_hybrid_loss_against_a_direct_computation(prediction):
    d = GaussianDiffusion(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1
    noise, out = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g).clamp(-1, 1)
    t = torch.tensor([0, 1, 400, 999])
    x_t = d.q_sample(x0, t, noise)
    loss = d.training_loss(out, x0, x_t, t, noise).numpy()

    # improved DDPM, written out in float64 numpy
    b = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - b)
    ab_prev = np.append(1, ab[:-1])
    x0n, xtn, nn_, on = (v.double().numpy() for v in (x0, x_t, noise, out))
    for i, s in enumerate(t.tolist()):
        pred, v = on[i, :2], on[i, 2:]
        post_var = b * (1 - ab_prev) / (1 - ab)
        min_log = np.log(post_var[1]) if s == 0 else np.log(post_var[s])
        log_var = (v + 1) / 2 * np.log(b[s]) + (1 - v + 1 - 1) / 2 * min_log
        if prediction == "eps":
            target, pred_x0 = nn_[i], (xtn[i] - np.sqrt(1 - ab[s]) * pred) / np.sqrt(ab[s])
        else:
            target, pred_x0 = np.sqrt(ab[s]) * nn_[i] - np.sqrt(1 - ab[s]) * x0n[i], np.sqrt(ab[s]) * xtn[i] - np.sqrt(1 - ab[s]) * pred
        c1, c2 = b[s] * np.sqrt(ab_prev[s]) / (1 - ab[s]), (1 - ab_prev[s]) * np.sqrt(1 - b[s]) / (1 - ab[s])
        mean, true_mean = c1 * pred_x0 + c2 * xtn[i], c1 * x0n[i] + c2 * xtn[i]
        mse = np.mean((target - pred) ** 2)
        if s == 0:
            vb = -discretized_gaussian_log_likelihood(torch.tensor(x0n[i]), torch.tensor(mean),
                                                      torch.tensor(0.5 * log_var)).numpy().mean() / np.log(2)
        else:
            kl = 0.5 * (-1 + log_var - min_log + np.exp(min_log - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
            vb = kl.mean() / np.log(2)
        assert loss[i] == pytest.approx(mse + vb, rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_true_target_gives_back_x0(prediction):
    d = GaussianDiffusion(learn_sigma=False, prediction=prediction)
    x0, noise, t = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4), torch.tensor([0, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    a = torch.from_numpy(d.alphas_cumprod[t]).float().view(-1, 1, 1, 1)
    target = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert d.training_loss(target, x0, x_t, t, noise).abs().max() < 1e-10
    tol = 1e-4 if prediction == "v" else 0.05  # eps amplifies float32 rounding by 1 / sqrt(a) = 150 at t = 999
    torch.testing.assert_close(d.p_mean_variance(target, x_t, t)[2], x0, atol=tol, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighted_loss_counts_the_x0_error_min_snr_gamma_times(prediction):
    d = GaussianDiffusion(learn_sigma=False, prediction=prediction, min_snr_gamma=5.0)
    x0, noise, out = torch.rand(4, 2, 4, 4) * 2 - 1, torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    t = torch.tensor([0, 200, 500, 999])  # SNR from ~1e4 to ~4e-5: both sides of gamma
    x_t = d.q_sample(x0, t, noise)
    snr = torch.from_numpy(d.alphas_cumprod / (1 - d.alphas_cumprod))[t].float()
    x0_error = ((d.predict_x0(x_t, t, out) - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(d.training_loss(out, x0, x_t, t, noise), snr.clamp(max=5) * x0_error, rtol=1e-3, atol=0)


def test_discretized_likelihood_sums_to_one_over_the_bins():
    values = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(values, torch.tensor(0.3), torch.tensor(math.log(0.2)))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-3)


def test_hybrid_loss_trains_only_the_variance_through_the_vb_term():
    d = GaussianDiffusion()
    x0, noise = torch.rand(2, 1, 2, 2) * 2 - 1, torch.randn(2, 1, 2, 2)
    t = torch.tensor([10, 700])
    x_t = d.q_sample(x0, t, noise)
    out = torch.cat([noise, torch.zeros(2, 1, 2, 2)], 1).requires_grad_()  # exact eps: the MSE gradient is zero
    d.training_loss(out, x0, x_t, t, noise).sum().backward()
    assert torch.count_nonzero(out.grad[:, :1]) == 0 and torch.count_nonzero(out.grad[:, 1:]) > 0


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model, d = tiny_dit(class_dropout_prob=0.0), GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.from_numpy(data.SyntheticShapes(8, 8, seed=0).images_uint8()).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.arange(8) % 5
    t, noise = torch.randint(0, 1000, (8,)), torch.randn_like(x0)  # one fixed batch, fixed noise
    x_t = d.q_sample(x0, t, noise)
    losses = []
    for _ in range(150):
        loss = d.training_loss(model(x_t, t, y), x0, x_t, t, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    model = randomize(tiny_dit()).eval()
    y = torch.tensor([0, 1])
    g = lambda: torch.Generator().manual_seed(0)
    ddim = [sample(model, y, sampler="ddim", num_steps=5, generator=g()) for _ in range(2)]
    assert torch.equal(*ddim) and ddim[0].abs().max() <= 1 + 1e-6
    torch.manual_seed(0)
    x_T = torch.randn(2, 3, 8, 8, generator=g())
    # DDIM(eta=0) uses the generator for x_T only; DDPM also for the noise of every step
    ddpm = sample(model, y, sampler="ddpm", num_steps=5, generator=g())
    assert not torch.equal(ddpm, ddim[0]) and x_T.shape == ddpm.shape


class GaussianDataDenoiser(torch.nn.Module):
    """The exact eps-model of data N(mu, s^2) per pixel, whose probability-flow ODE has a closed form."""
    in_channels, learn_sigma, mu, s = 1, False, 0.3, 0.2

    def forward(self, x, t, y):
        a = torch.from_numpy(GaussianDiffusion().alphas_cumprod).float()[t].view(-1, 1, 1, 1)
        x0 = self.mu + a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a) * (x - a.sqrt() * self.mu)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def test_dpm_solver_is_second_order_on_gaussian_data():
    model, y = GaussianDataDenoiser(), torch.zeros(500, dtype=torch.long)
    run_ = lambda sampler, n: sample(model, y, 1.0, sampler, n, generator=torch.Generator().manual_seed(0), size=4)
    # exact: the flow keeps each pixel's standard score from x_T down to t = 0, where the last step takes x0
    a = GaussianDiffusion().alphas_cumprod
    x_T = torch.randn(500, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    z = (x_T - a[-1] ** 0.5 * model.mu) / (a[-1] * model.s ** 2 + 1 - a[-1]) ** 0.5
    x_0 = a[0] ** 0.5 * model.mu + (a[0] * model.s ** 2 + 1 - a[0]) ** 0.5 * z
    exact = model.mu + a[0] ** 0.5 * model.s ** 2 / (a[0] * model.s ** 2 + 1 - a[0]) * (x_0 - a[0] ** 0.5 * model.mu)
    error = {(k, n): (run_(k, n) - exact).abs().mean().item() for k in ("ddim", "dpm++") for n in (100, 200)}
    assert 1.7 < error["ddim", 100] / error["ddim", 200] < 2.3  # DDIM: first order, 2x the steps halve the error
    assert error["dpm++", 100] / error["dpm++", 200] > 3.5  # second order: at least a quarter
    assert error["dpm++", 100] < error["ddim", 100] / 5


def test_consistency_function_has_lcms_boundary_scalings_and_is_its_input_at_t0():
    from diffusers import LCMScheduler
    d, lcm = GaussianDiffusion(learn_sigma=False), LCMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    x, out = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = (torch.tensor([float(c) for c in cs]).view(-1, 1, 1, 1)
                     for cs in zip(*[lcm.get_scalings_for_boundary_condition_discrete(int(s)) for s in t]))
    _close(d.consistency_function(out, x, t), c_skip * x + c_out * d.predict_x0(x, t, out), rel=1e-6)
    assert torch.equal(d.consistency_function(out, x, torch.zeros(5, dtype=torch.long)), x)  # the boundary: f(x, 0) = x
    assert (d.consistency_function(out, x, t)[2:] - d.predict_x0(x, t, out)[2:]).abs().max() < 1e-4  # else ~ x0


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_consistency_sampler_is_diffusers_lcm_scheduler(num_steps):
    from diffusers import LCMScheduler
    d, lcm = GaussianDiffusion(learn_sigma=False), LCMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    denoise = GaussianDataDenoiser()
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = d.consistency_sample(lambda x, t: denoise(x, t, None), x, num_steps, generator=torch.Generator().manual_seed(0))
    lcm.set_timesteps(num_steps)  # LCM's grid of 50 (k = 20), from its top
    g, ref = torch.Generator().manual_seed(0), x
    for t in lcm.timesteps:
        ref, x0 = lcm.step(denoise(ref, t.view(1), None), t, ref, generator=g, return_dict=False)
    _close(ours, x0, rel=1e-3)  # x0 at t = 999 divides by sqrt(a) = 0.006: diffusers' float32 schedule shows
    with pytest.raises(ValueError, match="1 to 50 steps"):
        d.consistency_sample(lambda x, t: x, x, 51)


def test_consistency_loss_against_lcms_formulas():
    """One LCM step written as diffusers' train_lcm_distill_sd_wds.py writes it (its DDIMSolver, eps-prediction)."""
    d, k = GaussianDiffusion(learn_sigma=False), 20
    a = torch.from_numpy(d.alphas_cumprod).float()
    x_t, t, w = torch.randn(3, 3, 4, 4), torch.tensor([19, 519, 999]), torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1, 1)
    cond, uncond, student, target = (torch.randn(3, 3, 4, 4) for _ in range(4))
    loss = d.consistency_loss(student, x_t, t, lambda x, s: uncond + (1 + w) * (cond - uncond), lambda x, s: target, k)
    at, prev = a[t].view(-1, 1, 1, 1), torch.where(t - k < 0, 0, t - k)
    a_prev = a[prev].view(-1, 1, 1, 1)  # the solver's alphas_cumprod_prev: a[0] before the first grid point
    x0 = lambda x, at, eps: (x - (1 - at).sqrt() * eps) / at.sqrt()
    pred_x0 = x0(x_t, at, cond) + w * (x0(x_t, at, cond) - x0(x_t, at, uncond))
    pred_noise = cond + w * (cond - uncond)
    x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise

    def f(out, x, s):
        scaled = 10.0 * s.float().view(-1, 1, 1, 1)
        return 0.25 / (scaled ** 2 + 0.25) * x + scaled / (scaled ** 2 + 0.25) ** 0.5 * x0(x, a[s].view(-1, 1, 1, 1), out)
    _close(loss, ((f(student, x_t, t) - f(target, x_prev, prev)) ** 2).mean(dim=(1, 2, 3)), rel=1e-4)


# -----------------------------------------------------------------------------
# data.py: built-in shapes, class folders, caption sets, the distributed batch sampler


def test_synthetic_dataset_is_deterministic_and_varied():
    a, b = data.SyntheticShapes(50, 32, seed=3), data.SyntheticShapes(50, 32, seed=3)
    images = a.images_uint8()
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, b.images_uint8()) and a.captions == b.captions
    assert not np.array_equal(images, data.SyntheticShapes(50, 32, seed=4).images_uint8())
    assert len(a.classes) >= 10 and set(a.labels.tolist()) == set(range(10))
    same_class = images[a.labels == 0]
    assert len({im.tobytes() for im in same_class}) == len(same_class)  # variety within a class
    angles = np.degrees([p["angle"] for p in a.params])  # rotated, upright within 15 degrees
    assert np.abs(angles).max() <= 15 and angles.std() > 5
    x, y = a[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and y == a.labels[0]
    assert a.classes[a.labels[7]] in a.captions[7] and a.params[7]["fg"] in a.captions[7]
    assert data.SyntheticShapes(4, 64, seed=0).images_uint8().shape == (4, 64, 64, 3)  # any resolution


def test_synthetic_classes_are_visible():
    """The class shows in the image: 5-NN on four rotation- and position-invariant shape moments of the foreground
    mask recognises the class of held-out images."""
    ds = data.SyntheticShapes(600, 32, seed=0)
    def moments(im):
        mask = np.abs(im.astype(np.float32) - im[0, 0]).sum(-1) > 60  # a corner pixel shows the background
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
        mu20, mu02, mu11 = ((xs - cx) ** 2).mean(), ((ys - cy) ** 2).mean(), ((xs - cx) * (ys - cy)).mean()
        radius = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max() + 0.5
        return [(mu20 + mu02) / len(xs), ((mu20 - mu02) ** 2 + 4 * mu11 ** 2) / (mu20 + mu02) ** 2,
                mask[int(round(cy)), int(round(cx))], len(xs) / radius ** 2]
    f = np.array([moments(im) for im in ds.images_uint8()])
    f = (f - f.mean(0)) / f.std(0)
    nearest = np.argsort(((f[400:, None] - f[None, :400]) ** 2).sum(-1), axis=1)[:, :5]
    votes = np.array([np.bincount(ds.labels[:400][row], minlength=10).argmax() for row in nearest])
    assert (votes == ds.labels[400:]).mean() > 0.8


def make_folder(root, sizes=((40, 30), (64, 64))):
    for c, name in enumerate(["n02", "n01"]):
        os.makedirs(root / name)
        for i, size in enumerate(sizes):
            Image.new("RGB", size, (40 * c, 100, 7 * i)).save(root / name / f"{i}.{'png' if i else 'jpg'}")


def test_image_folder_classes_crop_and_flip(tmp_path):
    make_folder(tmp_path)
    ds = data.ImageFolder(str(tmp_path), 16)
    assert ds.classes == ["n01", "n02"] and ds.labels.tolist() == [0, 0, 1, 1]
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0
    # the ADM centre crop: short side to 16, then the centre
    im = Image.new("RGB", (40, 20))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    crop = data.center_crop_arr(im, 10)
    assert crop.shape == (10, 10, 3) and crop[:, :5, 0].mean() > 200 and crop[:, 5:, 0].mean() < 50
    # horizontal flip: about half the time
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3))).save(tmp_path / "n01" / "0.jpg")
    firsts = [data.ImageFolder(str(tmp_path), 16)[0][0][0, 0, 0].item() < 0 for _ in range(40)]
    assert 5 < sum(firsts) < 35


def test_bad_image_files_are_named_or_skipped_and_counted(tmp_path):
    make_folder(tmp_path)
    good = (tmp_path / "n01" / "0.jpg").read_bytes()
    (tmp_path / "n01" / "0.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (tmp_path / "n02" / "0.jpg").write_bytes(b"")  # empty
    (tmp_path / "n02" / "1.png").write_bytes(b"not an image at all")
    ds = data.ImageFolder(str(tmp_path), 16)
    for i, path in [(0, "n01/0.jpg"), (2, "n02/0.jpg"), (3, "n02/1.png")]:
        with pytest.raises(RuntimeError, match=re.escape(str(tmp_path / path)) + ".*skip_bad_images=True"):
            ds[i]
    skipping = data.ImageFolder(str(tmp_path), 16, flip=False, skipped=multiprocessing.Value("q", 0))
    x, y = skipping[2]  # 2, 3 and (wrapping round) 0 cannot be read: 1 stands in, with its label
    assert torch.equal(x, skipping[1][0]) and y == 0 and skipping.skipped.value == 3


def test_skipped_images_are_counted_in_the_log_across_loader_workers(tmp_path):
    make_folder(tmp_path / "images", sizes=[(20, 20)] * 8)
    for bad in ("n01/3.png", "n02/5.png"):
        (tmp_path / "images" / bad).write_bytes(b"")
    result = train(tmp_path / "run", f"--data_path={tmp_path}/images", "--skip_bad_images", "--num_workers=1",
                   "--max_steps=2")  # an epoch of 16 images: each bad one read once, or twice when prefetched
    last = (tmp_path / "run" / "log.txt").read_text().splitlines()[-2]
    assert last.startswith("step 2 |") and re.search(r"\| [234] unreadable images skipped$", last), last
    assert all(f"skipped: cannot read image {tmp_path}/images/{bad}" in result.stderr for bad in ("n01/3.png", "n02/5.png"))


def test_a_bad_image_read_in_a_loader_worker_ends_the_run_in_one_line(tmp_path):
    make_folder(tmp_path / "images", sizes=[(20, 20)] * 8)
    (tmp_path / "images" / "n02" / "5.png").write_bytes(b"")
    result = train(tmp_path / "run", f"--data_path={tmp_path}/images", "--num_workers=1", "--max_steps=2", check=False)
    last = result.stderr.splitlines()[-1]  # under the progress bar, not buried in the worker's traceback
    assert result.returncode == 1 and "Traceback" not in result.stderr and \
        last.startswith(f"error: cannot read image {tmp_path}/images/n02/5.png: ") and \
        last.endswith("Remove or replace this file. Or train on without it: skip_bad_images=True. (DEBUG=1 shows the "
                      "traceback)")


def make_controls(images, controls, resize=None):
    """A control folder mirroring the image folder: each image's colours inverted, as a PNG (the images are JPEGs
    and PNGs), optionally resized."""
    for path in sorted(images.rglob("*.*")):
        image = Image.open(path).convert("RGB")
        out = controls / path.relative_to(images).with_suffix(".png")
        os.makedirs(out.parent, exist_ok=True)
        Image.fromarray(255 - np.asarray(image)).resize(resize or image.size).save(out)


def test_control_folder_pairs_each_image_with_its_control_cropped_and_flipped_with_it(tmp_path):
    make_folder(tmp_path / "images", sizes=[(24, 20), (20, 20)])
    Image.fromarray(np.tile(np.arange(24, dtype=np.uint8)[None, :, None] * 10, (20, 1, 3))).save(
        tmp_path / "images" / "n01" / "0.jpg", quality=100)  # a ramp: a flip shows
    make_controls(tmp_path / "images", tmp_path / "controls")
    ds = data.ImageFolder(str(tmp_path / "images"), 16, controls=str(tmp_path / "controls"))
    flips = 0
    for _ in range(20):
        x, y, c = ds[0]
        assert y == 0 and c.shape == x.shape == (3, 16, 16)
        assert (x + c).abs().max() < 0.1  # the inverted image, cropped and flipped as the image was
        flips += x[0, 0, 0] > 0
    assert 2 < flips < 18
    shapes = data.SyntheticShapes(4, 16, 0, masks=True)
    x, y, mask = shapes[0]
    assert torch.equal(x, shapes.__class__(4, 16, 0)[0][0]) and set(mask.unique().tolist()) >= {-1.0, 1.0}
    inside = mask[0] > 0.9  # the shape's pixels have the shape's colour, the background's the background's
    assert x[:, inside].std(dim=1).max() < 0.1 and x[:, mask[0] < -0.9].std(dim=1).max() < 0.1
    small = data.SyntheticShapes(4, 16, 0, masks=True, scale=0.6)  # the downstream task: the same draws, smaller
    assert small.labels.tolist() == shapes.labels.tolist() and (small[0][2] > 0).sum() < 0.6 * (mask > 0).sum()


def test_control_folder_errors_name_the_image_before_any_work(tmp_path):
    make_folder(tmp_path / "images")
    make_controls(tmp_path / "images", tmp_path / "controls")
    os.remove(tmp_path / "controls" / "n02" / "1.png")
    with pytest.raises(FileNotFoundError, match=re.escape(f"image '{tmp_path}/images/n02/1.png' has no control image: "
                                                          f"expected {tmp_path}/controls/n02/1.png")):
        data.ImageFolder(str(tmp_path / "images"), 16, controls=str(tmp_path / "controls"))
    make_controls(tmp_path / "images", tmp_path / "small", resize=(32, 32))
    with pytest.raises(ValueError, match=re.escape("small/n01/0.png' is 32x32 but its image") + ".*is 40x30"):
        data.ImageFolder(str(tmp_path / "images"), 16, controls=str(tmp_path / "small"))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.ImageFolder(str(tmp_path / "nope"), 16)
    os.makedirs(tmp_path / "empty_class")
    with pytest.raises(FileNotFoundError, match="empty_class"):
        data.ImageFolder(str(tmp_path), 16)


def test_16_and_32_bit_palette_alpha_and_cmyk_images_read_as_8_bit_rgb(tmp_path):
    """Real files of each mode, through ImageFolder and evaluate.py's folder reader: PIL's convert("RGB") would make
    16-bit mid grey white (it clips at 255); integers are scaled from their full range, floats from [0, 1]."""
    rows = lambda values, dtype: Image.fromarray(np.array([values] * 4, dtype))  # 4x4, every row the same
    grey = {"i16.png": (rows([0, 32768, 65535, 25700], np.uint16), [0, 128, 255, 100]),
            "i32.tif": (rows([0, 2 ** 31 - 1, -5, 2 ** 30], np.int32), [0, 255, 0, 128]),
            "f32.tif": (rows([0, 0.5, 1, 2], np.float32), [0, 128, 255, 255])}
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0, 1, 2, 3])
    palette.putdata([0, 1, 2, 3] * 4)
    palette.info["transparency"] = 2  # a transparent entry: its colour, alpha dropped
    colour = {"p.png": (palette, [(10, 20, 30), (200, 100, 50), (0, 255, 0), (1, 2, 3)]),
              "la.png": (Image.new("LA", (4, 4), (100, 0)), [(100, 100, 100)] * 4),
              "rgba.png": (Image.new("RGBA", (4, 4), (1, 2, 3, 0)), [(1, 2, 3)] * 4),
              "cmyk.tif": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), [(255, 0, 0)] * 4)}
    expected = {**{k: [(v, v, v) for v in values] for k, (_, values) in grey.items()},
                **{k: values for k, (_, values) in colour.items()}}
    os.makedirs(tmp_path / "set" / "c")
    for name, (image, _) in {**grey, **colour}.items():
        image.save(tmp_path / "set" / "c" / name)
        with Image.open(tmp_path / "set" / "c" / name) as reread:
            assert reread.mode == image.mode, name  # the file holds the mode under test
    assert Image.open(tmp_path / "set" / "c" / "i16.png").mode == "I;16"
    ds = data.ImageFolder(str(tmp_path / "set"), 4, flip=False)
    images = evaluate.open_images(str(tmp_path / "set"))
    read = np.concatenate(list(images.batches(8)))  # the files in sorted order, as ImageFolder lists them
    for i, path in enumerate(ds.paths):
        want = np.array(expected[os.path.basename(path)], np.uint8)
        np.testing.assert_array_equal(np.asarray(data.load_image(path))[0], want, err_msg=path)
        np.testing.assert_array_equal(read[i][0], want, err_msg=path)
        np.testing.assert_allclose(((ds[i][0][:, 0] + 1) * 127.5).T.numpy(), want, atol=1e-4, err_msg=path)


def make_caption_folder(root, captions, size=(20, 12)):
    """Images in two shard folders, as img2dataset writes them, each with its caption in a same-named .txt."""
    for i, caption in enumerate(captions):
        stem = root / f"{i // 4:05d}" / f"{i:09d}"
        os.makedirs(stem.parent, exist_ok=True)
        Image.new("RGB", size, (10 * i % 256, 100, 50)).save(f"{stem}.{'png' if i % 2 else 'jpg'}")
        (stem.parent / f"{stem.name}.txt").write_text(caption + "\n", encoding="utf-8")


def test_caption_folder_and_manifests_read_non_ascii_and_fail_clearly(tmp_path):
    captions = ["un café crème — 日本語の猫 🙂", "a red circle", 'he said "hi", twice', "Zürich, naïve"]
    make_caption_folder(tmp_path / "folder", captions)
    ds = data.ImageCaptions(str(tmp_path / "folder"), 8)
    assert ds.captions == captions and len(ds) == 4 and ds.labels is None
    x, caption = ds[0]
    assert x.shape == (3, 8, 8) and -1 <= x.min() and x.max() <= 1 and caption == captions[0]
    files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "folder").rglob("*.[jp][pn]g"))
    (tmp_path / "m.tsv").write_text("caption\timage\n" + "".join(f"{c}\t{f}\n" for c, f in zip(captions, files)),
                                    encoding="utf-8")
    with open(tmp_path / "m.csv", "w", encoding="utf-8", newline="") as f:  # open_clip's column names
        csv_writer = __import__("csv").writer(f)
        csv_writer.writerows([["filepath", "title"]] + [[p, c] for p, c in zip(files, captions)])
    for manifest in ("m.tsv", "m.csv"):
        ds = data.ImageCaptions(str(tmp_path / manifest), 8)
        assert ds.captions == captions and torch.equal(ds[3][0], data.ImageCaptions(str(tmp_path / "folder"), 8)[3][0])
    # a missing caption file, a caption file that is not UTF-8, a manifest row whose image is missing
    missing = tmp_path / "folder" / "00000" / "000000002.txt"
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.ImageCaptions(str(tmp_path / "folder"), 8)
    missing.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{missing}.*not UTF-8"):
        data.ImageCaptions(str(tmp_path / "folder"), 8)
    (tmp_path / "bad.tsv").write_text("image\tcaption\nnope.png\ta cat\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        data.ImageCaptions(str(tmp_path / "bad.tsv"), 8)
    (tmp_path / "bad.csv").write_text("path,text\nx.png,a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match="caption column"):
        data.ImageCaptions(str(tmp_path / "bad.csv"), 8)


def test_step_batches_split_ranks_and_resume():
    ranks = [list(zip(range(24), data.StepBatches(100, 8, r, 2, seed=0, start_step=0))) for r in (0, 1)]
    epoch = [i for r in ranks for step, batch in r if step < 12 for i in batch]
    assert all(len(b) == 4 for r in ranks for _, b in r)
    assert len(epoch) == len(set(epoch)) == 96  # the ranks see different data, and no image twice in an epoch
    assert ranks[0][12][1] != ranks[0][0][1]  # a new permutation each epoch
    resumed = next(iter(data.StepBatches(100, 8, 1, 2, seed=0, start_step=17)))
    assert resumed == ranks[1][17][1]


# -----------------------------------------------------------------------------
# corrupt.py: label and caption corruption, alone and in training


def test_symmetric_corruption_is_exact_and_never_keeps_the_label():
    labels = np.random.default_rng(0).integers(0, 7, 1000)
    for eta in (0.0, 0.025, 0.05, 0.2, 0.999):
        new, record = corrupt.corrupt_labels(labels, eta, seed=1)
        changed = np.flatnonzero(new != labels)
        assert len(changed) == round(eta * 1000) and changed.tolist() == record["indices"]
        assert record["original"] == labels[changed].tolist() and record["new"] == new[changed].tolist()


def test_new_labels_follow_the_class_prior():
    prior = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    labels = np.random.default_rng(0).choice(5, size=200_000, p=prior)
    new, record = corrupt.corrupt_labels(labels, 0.2, seed=0)
    counts = np.bincount(labels, minlength=5).astype(float)
    for y in range(5):  # from class y, the new label follows the prior without y
        moved = np.array(record["new"])[np.array(record["original"]) == y]
        expected = counts.copy()
        expected[y] = 0
        expected *= len(moved) / expected.sum()
        observed = np.bincount(moved, minlength=5)
        assert observed[y] == 0
        keep = expected > 0
        assert scipy.stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3


def test_asymmetric_corruption_stays_in_the_subset():
    labels = np.arange(1000) % 10
    new, record = corrupt.corrupt_labels(labels, 0.1, seed=0, subset=[1, 4, 7])
    assert len(record["indices"]) == 100
    assert set(record["original"]) <= {1, 4, 7} and set(record["new"]) <= {1, 4, 7}
    assert all(o != n for o, n in zip(record["original"], record["new"]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        corrupt.corrupt_labels(labels, 0.1, seed=0, subset=[3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        corrupt.corrupt_labels(labels, 0.1, seed=0, subset=[])
    with pytest.raises(ValueError, match="eligible"):
        corrupt.corrupt_labels(labels, 0.5, seed=0, subset=[1, 4])


@pytest.mark.parametrize("eta", [-0.1, 1.0, 1.5])
def test_eta_outside_unit_interval_is_an_error(eta):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        corrupt.corrupt_labels(np.arange(10), eta, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        corrupt.swap_captions([str(i) for i in range(10)], eta, seed=0)


def test_corruption_record_depends_on_the_seed_only():
    labels = np.arange(5000) % 10
    a, b, c = (corrupt.corrupt_labels(labels, 0.05, seed=s)[1] for s in (3, 3, 4))
    assert a == b and a != c


def test_random_mode_flips_at_rate_eta():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (200_000,))
    new = corrupt.corrupt_batch(labels, 0.075, torch.ones(10))
    assert (new != labels).float().mean().item() == pytest.approx(0.075, abs=0.003)
    again = corrupt.corrupt_batch(labels, 0.075, torch.ones(10))
    assert not torch.equal(new, again)  # a fresh draw every call


def test_caption_swap_and_rewrite_counts():
    captions = [f"caption {i % 50}" for i in range(1000)]  # duplicates: swapping two equal ones would not count
    for eta in (0.05, 0.073, 0.2):
        new, record = corrupt.swap_captions(captions, eta, seed=0)
        wrong = [i for i in range(1000) if new[i] != captions[i]]
        assert len(wrong) == round(eta * 1000) and wrong == record["indices"]
        assert sorted(new) == sorted(captions)  # a permutation of the captions: nothing invented
    rewrites = {i: f"rewritten {i}" for i in range(0, 1000, 3)}
    new, record = corrupt.rewrite_captions(captions, 0.1, seed=0, rewrites=rewrites)
    assert sum(a != b for a, b in zip(new, captions)) == 100
    assert all(new[i] == rewrites[i] for i in record["indices"])
    with pytest.raises(ValueError, match="rewrites"):
        corrupt.rewrite_captions(captions, 0.5, seed=0, rewrites=rewrites)


def test_asymmetric_corruption_in_training_reads_a_subset_file(tmp_path):
    (tmp_path / "subset.txt").write_text("circle\nstar 1\n")  # class names (folder names) or indices
    train(tmp_path / "run", "--corrupt=0.1", "--corrupt_type=asym", f"--corrupt_subset={tmp_path}/subset.txt",
          "--max_steps=1")
    record = json.loads((tmp_path / "run" / "corruption.json").read_text())
    subset = {data.SyntheticShapes.classes.index(n) for n in ("circle", "star")} | {1}
    assert set(record["subset"]) == subset
    assert len(record["indices"]) == round(0.1 * 64) and set(record["original"]) | set(record["new"]) <= subset
    result = train(tmp_path / "bad", "--corrupt=0.1", "--corrupt_type=asym", "--corrupt_subset=circle,blob",
                   check=False)
    assert result.returncode != 0 and "'blob' is neither a class index nor a class name" in result.stderr


def test_caption_swap_and_rewrite_are_exact_in_training(tmp_path):
    captions = [f"caption {i}, ä" for i in range(30)]
    make_caption_folder(tmp_path / "folder", captions)
    args = [f"--data_path={tmp_path / 'folder'}", "--model=LDM-S", "--text_encoder=small", "--max_steps=1",
            "--grid_steps=2", "--image_size=8"]
    train(tmp_path / "swap", *args, "--corrupt=0.1", "--corrupt_type=swap")
    record = json.loads((tmp_path / "swap" / "corruption.json").read_text(encoding="utf-8"))
    assert len(record["indices"]) == round(0.1 * 30) == 3  # odd: one 3-cycle
    assert record["original"] == [captions[i] for i in record["indices"]]
    assert all(o != n for o, n in zip(record["original"], record["new"])) and sorted(record["new"]) == sorted(record["original"])
    _, direct = corrupt.swap_captions(captions, 0.1, seed=0)
    assert record["indices"] == direct["indices"] and record["new"] == direct["new"]
    state = torch.load(tmp_path / "swap" / "ckpt.pt", weights_only=True)
    assert state["corruption"]["count"] == 3 and state["corruption"]["type"] == "swap"
    assert "text encoder: small, trained" in (tmp_path / "swap" / "log.txt").read_text()
    (tmp_path / "rewrites.json").write_text(json.dumps({str(i): f"rewritten {i}" for i in range(0, 30, 2)}))
    train(tmp_path / "rewrite", *args, "--corrupt=0.2", "--corrupt_type=rewrite",
          f"--corrupt_rewrites={tmp_path / 'rewrites.json'}")
    record = json.loads((tmp_path / "rewrite" / "corruption.json").read_text(encoding="utf-8"))
    assert len(record["indices"]) == 6 and record["new"] == [f"rewritten {i}" for i in record["indices"]]


# -----------------------------------------------------------------------------
# cep.py: CEP on class and caption embeddings, the IP baseline


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
@pytest.mark.parametrize("gamma, d", [(0.1, 16), (1.0, 384), (5.0, 1152)])
def test_cep_statistics(kind, gamma, d):
    torch.manual_seed(0)
    emb = torch.randn(2000, d)
    delta = cep.CEP(kind, gamma).train()(emb) - emb
    bound = gamma / math.sqrt(d)
    assert abs(delta.mean().item()) < 0.02 * bound
    if kind == "uniform":
        assert delta.abs().max().item() <= bound * (1 + 1e-5) and delta.abs().max().item() > 0.99 * bound
        assert delta.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    else:
        assert delta.std().item() == pytest.approx(bound, rel=0.01)
        assert delta.abs().max().item() > 3 * bound  # Gaussian tails, not a bounded law


def test_cep_is_fresh_each_call_training_only_and_differentiable():
    layer = cep.CEP("gaussian", 1.0).train()
    emb = torch.randn(4, 8, 32, requires_grad=True)  # text: per token, d = 32
    first, second = layer(emb), layer(emb)
    assert not torch.equal(first, second)
    first.sum().backward()
    assert torch.equal(emb.grad, torch.ones_like(emb))
    assert torch.equal(layer.eval()(emb), emb)
    with pytest.raises(ValueError, match="cep_type"):
        cep.CEP("laplace")
    with pytest.raises(ValueError, match="cep_scale"):
        cep.CEP("uniform", -1.0)


def test_fixed_cep_keeps_one_delta_per_sample_on_a_fixed_subset():
    layer = cep.FixedCEP("uniform", 1.0, fraction=0.3, seed=7).train()
    emb = torch.zeros(2000, 64)
    layer.index = torch.arange(2000)
    delta = layer(emb)
    chosen = delta.abs().sum(1) > 0
    assert abs(chosen.float().mean().item() - 0.3) < 0.04  # the fraction, chosen from the seed and the index
    assert delta.abs().max() <= 1 / 8 + 1e-6 and delta[chosen].std().item() == pytest.approx(1 / 8 / math.sqrt(3),
                                                                                          rel=0.03)
    layer.index = torch.tensor([5, 1999, 5])  # the same sample gets the same delta at every step, in any batch
    again = layer(emb[:3])
    assert torch.equal(again[0], delta[5]) and torch.equal(again[1], delta[1999]) and torch.equal(again[2], delta[5])
    other_seed = cep.FixedCEP("uniform", 1.0, fraction=0.3, seed=8).train()
    other_seed.index = torch.arange(2000)
    assert not torch.equal(other_seed(emb), delta) and torch.equal(layer.eval()(emb), emb)
    with pytest.raises(ValueError, match="fraction"):
        cep.FixedCEP(fraction=0.0)


def test_cep_in_the_model_skips_the_null_class_and_sampling():
    model = tiny_dit(class_dropout_prob=0.5)
    model.y_embedder.perturb = cep.CEP("uniform", 1.0)
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (1000,))
    table = model.y_embedder.embedding_table.weight
    emb = model.y_embedder(labels)
    null = (emb == table[5]).all(dim=1)
    assert 400 < null.sum() < 600  # dropped labels got the exact, unperturbed null embedding
    real = ~null
    assert not torch.isclose(emb[real], table[labels[real]]).all(dim=1).any()  # every real one is perturbed
    model.eval()
    assert torch.equal(model.y_embedder(labels), table[labels])
    model.train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 50])
    randomize(model)
    model.y_embedder.dropout_prob = 0.0
    model(x, t, torch.tensor([0, 1])).sum().backward()
    assert model.y_embedder.embedding_table.weight.grad[:2].abs().sum() > 0


def test_label_dropout_and_cep_hook():
    model = UNet(in_channels=4, **{**TINY_UNET, "class_dropout_prob": 0.0})
    emb, table = model.y_embedder, model.y_embedder.embedding_table.weight
    labels = torch.tensor([0, 10, 3, 10])  # 10 is the null class
    emb.perturb = lambda e: e + 100.0
    model.train()
    out = emb(labels)
    torch.testing.assert_close(out[[0, 2]], table[[0, 3]] + 100.0)
    torch.testing.assert_close(out[[1, 3]], table[[10, 10]])  # null rows untouched
    model.eval()
    torch.testing.assert_close(emb(labels), table[labels])  # never at evaluation
    forced = emb(labels, force_drop_ids=torch.tensor([True, False, False, False]))
    torch.testing.assert_close(forced, table[[10, 10, 3, 10]])
    emb.dropout_prob = 1.0
    torch.testing.assert_close(emb(labels), table[labels])  # no dropout outside training
    model.train()
    torch.testing.assert_close(emb(labels), table[[10] * 4])  # dropped to null before the hook
    # through the U-Net: the hook changes the output in training mode only
    randomize(model, std=0.05)
    emb.dropout_prob, emb.perturb = 0.0, None
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([1, 2])
    with torch.no_grad():
        clean = model(x, t, y)
        emb.perturb = lambda e: e + torch.randn_like(e)
        assert (model(x, t, y) - clean).abs().max() > 1e-4
        model.eval()
        torch.testing.assert_close(model(x, t, y), clean)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_cep_per_token_skips_null_captions_and_sampling(kind):
    torch.manual_seed(0)
    embedder = text.TextEmbedder(text.TextEncoder(64, 1), dropout_prob=0.0)
    embedder.perturb = cep.CEP(kind, 2.0)
    captions = [f"a {c} shape number {i}" if i % 5 else "" for i, c in enumerate(["red", "blue"] * 100)]
    tokens = text.tokenize(captions)
    with torch.no_grad():
        clean = embedder.encoder(tokens)
        delta = embedder.train()(tokens) - clean
    null = torch.tensor([c == "" for c in captions])
    assert torch.equal(delta[null], torch.zeros_like(delta[null]))  # the null caption is never perturbed
    real = delta[~null]  # [160, 77, 64]: a delta per token, d = 64
    bound = 2.0 / math.sqrt(64)
    assert real.std().item() == pytest.approx(bound / math.sqrt(3) if kind == "uniform" else bound, rel=0.01)
    if kind == "uniform":
        assert real.abs().max().item() <= bound * (1 + 1e-4)
    per_token = real.std(dim=(0, 2))  # every token position is perturbed alike, each with its own draw
    assert per_token.min() > 0.95 * per_token.max() and not torch.allclose(real[:, 0], real[:, 1])
    with torch.no_grad():
        assert torch.equal(embedder.eval()(tokens), clean)  # never at sampling
    embedder.train().dropout_prob = 0.5
    with torch.no_grad():
        out = embedder(tokens)
    dropped = (out == embedder.encoder(embedder.null_like(tokens))).all(dim=(1, 2))
    assert 70 < dropped.sum() < 130 and dropped[null].all()  # dropped captions get the exact, unperturbed null


def test_input_perturbation():
    torch.manual_seed(0)
    noise = torch.randn(100_000)
    perturbed = cep.input_perturbation(noise, 0.1)
    assert (perturbed - noise).std().item() == pytest.approx(0.1, rel=0.02)


# -----------------------------------------------------------------------------
# control.py


def decoded_test_images():
    """Real decoded images: a photograph (a JPEG), and the built-in shapes through a JPEG round trip, as uint8 CHW."""
    photo = np.asarray(Image.open(os.path.join(ROOT, "tests", "fixtures", "grace_hopper.jpg")).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(list(data.SyntheticShapes(12, 64, 0).images_uint8()), axis=1)).save(buffer, "JPEG")
    shapes = np.asarray(Image.open(buffer).convert("RGB"))
    return [photo, photo[:, :, :1], shapes]


def test_canny_matches_opencv_on_decoded_images():
    cv2 = pytest.importorskip("cv2")
    for image in decoded_test_images():
        ours = control.canny(torch.from_numpy(image.copy()).permute(2, 0, 1))[0].numpy()
        reference = cv2.Canny(np.ascontiguousarray(image), 100, 200)  # the paper's thresholds
        assert 0.02 < (reference > 0).mean() < 0.2  # edges to find, not a blank image
        assert (ours == reference).mean() >= 0.99  # measured: 1.0 (every pixel) on all three
        blurred = control.canny(torch.from_numpy(image.copy()).permute(2, 0, 1), sigma=1.0)[0].numpy()
        reference = cv2.Canny(cv2.GaussianBlur(np.ascontiguousarray(image), (0, 0), 1.0), 100, 200)
        assert (blurred == reference).mean() >= 0.99  # measured: 99.97% on the photograph


ADAPTED = [("LDM-S", "controlnet", 1), ("LDM-S", "t2i", 4), ("DiT-Ti/4", "controlnet", 1),
           ("DiT-Ti/2", "controlnet", 2)]


def adapted_model(name, kind, downsample, size=8):
    torch.manual_seed(0)
    base = randomize(build_model(name, size, in_channels=3, num_classes=5), std=0.05)
    return base, control.adapt(base, kind, downsample).eval()


@pytest.mark.parametrize("name,kind,downsample", ADAPTED)
def test_zero_initialised_adapter_leaves_the_frozen_model_unchanged_exactly(name, kind, downsample):
    base, model = adapted_model(name, kind, downsample)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 3, 5])  # 5: the null class
    hint = torch.rand(3, 3, 8 * downsample, 8 * downsample)
    with torch.no_grad():
        assert base(x, t, y).abs().mean() > 0.01
        assert torch.equal(model(x, t, y, hint), base(x, t, y))
        assert torch.equal(model.forward_with_cfg(x, t, y, 3.0, hint=hint), base.forward_with_cfg(x, t, y, 3.0))


@pytest.mark.parametrize("name,kind,downsample", ADAPTED)
def test_gradients_reach_only_the_adapter_and_then_the_control_matters(name, kind, downsample):
    base, model = adapted_model(name, kind, downsample)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.adapter.parameters()}
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 400, 999]), torch.tensor([0, 3, 4])
    hint = torch.rand(3, 3, 8 * downsample, 8 * downsample)
    for _ in range(3):  # a step through each zero layer: the zero linears, then the hint encoder's last conv
        opt.zero_grad()
        model(x, t, y, hint).square().mean().backward()
        opt.step()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.adapter.parameters())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())
    with torch.no_grad():
        assert not torch.equal(model(x, t, y, hint), model(x, t, y, torch.rand_like(hint)))


def test_an_adapter_with_no_place_in_the_model_is_an_error():
    with pytest.raises(ValueError, match="DiT, which has none: use adapter=controlnet"):
        control.adapt(build_model("DiT-Ti/4", 8, in_channels=3, num_classes=5), "t2i", 1)
    with pytest.raises(ValueError, match="power of 2"):
        control.adapt(build_model("LDM-S", 8, in_channels=3, num_classes=5), "controlnet", 3)


def test_cached_controls_are_computed_once_keyed_by_content_and_read_back_identical(tmp_path, monkeypatch):
    make_folder(tmp_path / "images", sizes=[(20, 16)] * 3)
    make_controls(tmp_path / "images", tmp_path / "controls")
    folder = data.ImageFolder(str(tmp_path / "images"), 16, flip=False, controls=str(tmp_path / "controls"))
    cases = [(data.SyntheticShapes(40, 16, 0), "canny"), (data.SyntheticShapes(40, 16, 0, masks=True), "mask"),
             (folder, str(tmp_path / "controls"))]
    first = [np.array(control.cached_controls(ds, kind, str(tmp_path / "cache"), batch_size=16)) for ds, kind in cases]
    for (ds, kind), cached in zip(cases, first):  # what adaptation computes per batch, to the 8 bits it came from
        images, _, *controls = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
        fresh = control.control_image(kind, images, *controls)
        assert cached.dtype == np.uint8 and cached.shape == (len(ds), 1 if kind == "canny" else 3, 16, 16)
        assert np.array_equal(cached, fresh[:, :cached.shape[1]].mul(255).round().byte().numpy())
        assert 0 < cached.mean() < 255  # edges, shapes, inverted colours: not blank
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 3 and all(f.startswith("controls-") and f.endswith(".npy") for f in files)
    monkeypatch.setattr(control, "control_image", None)  # a second run reads the cache: nothing is computed
    for (ds, kind), cached in zip(cases, first):
        assert np.array_equal(control.cached_controls(ds, kind, str(tmp_path / "cache")), cached)
    assert sorted(os.listdir(tmp_path / "cache")) == files
    monkeypatch.undo()
    # other content or other settings: another key, computed anew
    os.utime(folder.controls[0], ns=(0, 0))
    control.cached_controls(folder, str(tmp_path / "controls"), str(tmp_path / "cache"))
    control.cached_controls(data.SyntheticShapes(40, 16, 0, scale=0.6), "canny", str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 5
    with pytest.raises(ValueError, match="cached controls are of the unflipped images: set flip=False"):
        control.cached_controls(data.ImageFolder(str(tmp_path / "images"), 16), "canny", str(tmp_path / "cache"))


# -----------------------------------------------------------------------------
# configurator.py


def test_configure_parses_files_flags_and_space_separated_values(tmp_path):
    scope = dict(lr=1e-4, steps=10, cep=False, name="a", corrupt=0.0)
    (tmp_path / "cfg.py").write_text("steps = 20\nname = 'b'\n")
    config = configure(scope, [str(tmp_path / "cfg.py"), "--corrupt", "0.05", "--cep", "--lr=3e-4", "--steps", "7"])
    assert config == dict(lr=3e-4, steps=7, cep=True, name="b", corrupt=0.05)
    assert configure(dict(cep=True), ["--cep=False"]) == dict(cep=False)
    assert configure(dict(x=1.0), ["--x=2"]) == dict(x=2.0)
    # a string's value may start with -- (study.py's pass-through arguments); a flag before another key stays a flag
    assert configure(dict(train_args="", cep=False, steps=1), ["--train_args", "--max_steps 100 --cep", "--cep",
                                                               "--steps", "2"]) == \
        dict(train_args="--max_steps 100 --cep", cep=True, steps=2)


@pytest.mark.parametrize("argv, message", [(["--nope=1"], "unknown config key 'nope'"),
                                           (["--steps=1.5"], "steps"), (["--steps=abc"], "steps"),
                                           (["--cep=maybe"], "cep"), (["stray", "--x"], "stray")])
def test_configure_errors_name_the_key(argv, message, tmp_path):
    os.chdir(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        configure(dict(steps=10, cep=False), argv)


def test_config_file_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "syntax.py").write_text("max_steps = 3\nlr = = 2\n")
    (tmp_path / "name.py").write_text("max_steps = 3\n\nlr = three\n")
    for name, message in [("syntax.py", "line 2: invalid syntax: lr = = 2"), ("name.py", "line 3: NameError")]:
        with pytest.raises(ValueError, match=re.escape(f"config file {tmp_path / name}, {message}")):
            configure(dict(max_steps=1, lr=0.1), [str(tmp_path / name)])


def test_expected_errors_end_in_one_line_unexpected_ones_keep_their_traceback(tmp_path):
    (tmp_path / "cfg.py").write_text("max_steps = 3\nlr = = 2\n")
    result = run([sys.executable, "train.py", str(tmp_path / "cfg.py")], check=False)
    assert result.returncode == 1 and result.stderr == \
        f"error: config file {tmp_path / 'cfg.py'}, line 2: invalid syntax: lr = = 2 (DEBUG=1 shows the traceback)\n"
    debug = subprocess.run([sys.executable, "train.py", str(tmp_path / "cfg.py")], cwd=ROOT, capture_output=True,
                           text=True, env=dict(ENV, DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and debug.stderr.endswith("lr = = 2\n")
    # a bug (here a shape error inside torch) is no expected error: its traceback stays
    bug = run([sys.executable, "-c", "import configurator, torch\nconfigurator.configure({}, [])\n"
               "torch.zeros(2) @ torch.zeros(3)"], check=False)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "error: " not in bug.stderr


# -----------------------------------------------------------------------------
# train.py: resume, bad settings, faults, torchrun


@pytest.mark.parametrize("args", [["--cep", "--corrupt=0.1", "--corrupt_mode=random"],
                                  ["--cep", "--cep_fixed=0.5", "--label_smoothing=0.1", "--schedule=scaled_linear"]])
def test_exact_resume(tmp_path, args):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(straight, "--max_steps=6", "--ckpt_every=3", *args)
    train(halves, "--max_steps=3", *args)
    train(halves, "--max_steps=6", "--resume", *args)
    assert logged_losses(straight) == logged_losses(halves) and len(logged_losses(halves)) == 6
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, halves))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and not any(k.startswith("_orig_mod") for k in a[key])
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["config"]["cep"] is True and isinstance(a["config"], dict)
    assert os.path.isfile(straight / "samples_0000006.png")
    assert load_model(str(halves / "ckpt.pt"))[1]["schedule"] == a["config"]["schedule"]  # sample.py follows it


def test_resume_takes_this_runs_lr_not_the_checkpoints(tmp_path):
    train(tmp_path, "--max_steps=2")
    before = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    train(tmp_path, "--max_steps=4", "--resume", "--lr=0")
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert after["step"] == 4 and after["opt"]["param_groups"][0]["lr"] == 0
    assert all(torch.equal(before[k], after["model"][k]) for k in before)  # lr 0: two steps that change nothing


@pytest.mark.parametrize("name, args", [
    ("dit", []),
    ("text", ["--model=LDM-S", "--text_encoder=small", "--image_size=8", "--corrupt_type=swap"])])
def test_checkpoints_written_before_the_split_load_and_resume(tmp_path, name, args):
    """tests/fixtures: checkpoints of the code before model.py was split (their weights a pattern of their own)."""
    import lzma
    with lzma.open(os.path.join(ROOT, "tests", "fixtures", f"ckpt_pre_split_{name}.pt.xz")) as f:
        (tmp_path / "ckpt.pt").write_bytes(f.read())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, info = load_model(str(tmp_path / "ckpt.pt"))
    loaded = model.state_dict()
    assert info["model_args"] == state["model_args"] and set(state["ema"]) <= set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in state["ema"].items())
    assert len({tuple(v.flatten()[:2].tolist()) for v in state["ema"].values() if v.numel() > 1}) > 10  # not blank
    result = train(tmp_path, *args, "--resume", "--corrupt=0.1", "--max_steps=3", "--grid_steps=2")
    assert "step 3 |" in result.stdout + result.stderr + (tmp_path / "log.txt").read_text()
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["corruption"] == state["corruption"]


BAD_CONFIGS = [
    (["--resume"], "no checkpoint"), (["--corrupt_tpye=sym"], "unknown config key 'corrupt_tpye'"),
    (["--max_steps=1.5"], "--max_steps=1.5: expected a int"), (["--corrupt=1.0"], "eta=1.0 must be in [0, 1)"),
    (["--cep", "--cep_scale=-1"], "cep_scale (gamma) must be >= 0"), (["--cep", "--cep_type=u"], "cep_type must be"),
    (["--corrupt_mode=random", "--corrupt_type=asym"], "random mode flips labels symmetrically"),
    (["--model=DiT-Q/2"], "model 'DiT-Q/2' is not one of"),
    (["--data_path=/nonexistent"], "data_path '/nonexistent' does not exist"),
    (["--out_dir=/dev/null/run"], "out_dir '/dev/null/run' cannot be written"),
    (["--text_encoder=small"], "cross-attention"), (["--grid_steps=1"], "grid_steps"),
    (["--prediction=x0"], "prediction"), (["--schedule=cosine"], "schedule must be"),
    (["--cep", "--emb_dropout=0.1"], "cep and emb_dropout are alternatives"), (["--cep_fixed=0.1"], "add --cep"),
    (["--model=LDM-S", "--text_encoder=small", "--label_smoothing=0.1"], "label_smoothing mixes class embeddings"),
    (["--compile", "--compile_mode=max"], "compile_mode must be default, reduce-overhead or max-autotune"),
    (["--corrupt=0.1", "--corrupt_type=swap"], "swap and rewrite need a text_encoder"),
    (["--model=LDM-S", "--text_encoder=small", "--corrupt=0.1", "--corrupt_type=rewrite"], "corrupt_rewrites"),
    (["--model=LDM-S", "--text_encoder=clip", "--clip_model=/nonexistent/clip.pt"], "/nonexistent/clip.pt"),
    (["--model=LDM-S", "--text_encoder=small", "--skip_bad_images"], "skip_bad_images=True works on class folders")]


@pytest.fixture(scope="module")
def bad_config_errors(tmp_path_factory):
    """train.py's error under each of BAD_CONFIGS, and whether it logged (began work): the script run by runpy, as
    `python train.py` runs it, in one process (torch imported once, not once a case)."""
    out = tmp_path_factory.mktemp("bad")
    errors = train_errors([train_args(out / str(i), *args)[1:] for i, (args, _) in enumerate(BAD_CONFIGS)])
    return [(error, os.path.exists(out / str(i) / "log.txt")) for i, error in enumerate(errors)]


def train_errors(argvs):
    """The error of train.py under each argv ("no error" if none), all in one process."""
    code = ("import json, runpy, sys\nerrors = []\n"
            "for sys.argv in json.loads(sys.argv[1]):\n"
            "    try:\n        runpy.run_path('train.py', run_name='__main__')\n        errors.append('no error')\n"
            "    except Exception as e:\n        errors.append(f'{type(e).__name__}: {e}')\n"
            "print(json.dumps(errors))")
    return json.loads(run([sys.executable, "-c", code, json.dumps(argvs)]).stdout.splitlines()[-1])


def test_presets_set_only_train_py_keys_and_the_papers_values(tmp_path):
    """config/*.py as `train.py config/X.py` reads them: every key known, then check_config's first failure (our
    --max_steps=0) proves the file was applied. The values the paper fixes are checked against it."""
    presets = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))
    code = ("import json, runpy, sys\nout = []\n"
            "for sys.argv in json.loads(sys.argv[1]):\n"
            "    try:\n        runpy.run_path('train.py', run_name='__main__')\n    except Exception as e:\n"
            "        out.append(str(e))\n"
            "print(json.dumps(out))")
    argvs = [["train.py", p, f"--out_dir={tmp_path}", "--max_steps=0"] for p in presets]
    errors = json.loads(run([sys.executable, "-c", code, json.dumps(argvs)]).stdout.splitlines()[-1])
    assert len(presets) >= 3 and errors == ["max_steps must be > 0, got 0"] * len(presets)
    scope = lambda name: runpy.run_path(os.path.join(ROOT, "config", name))
    dit, ldm, cc3m = scope("dit_xl2_in256.py"), scope("ldm4_in256.py"), scope("ldm4_cc3m.py")
    assert (dit["model"], dit["schedule"], dit["global_batch_size"], dit["lr"], dit["ema_decay"]) == \
        ("DiT-XL/2", "linear", 256, 1e-4, 0.9999) and dit["learn_sigma"] and dit["grid_cfg_scale"] == 1.75
    assert (ldm["model"], ldm["schedule"], ldm["global_batch_size"], ldm["learn_sigma"]) == \
        ("LDM-4", "scaled_linear", 512, False) and ldm["grid_cfg_scale"] == 2.0
    assert cc3m["text_encoder"] == "clip" and cc3m["schedule"] == "scaled_linear" and cc3m["grid_cfg_scale"] == 3.0
    assert not any(k in p for p in (dit, ldm, cc3m) for k in ("corrupt", "cep"))  # a preset is neither
    canny = scope("controlnet_canny.py")  # diffusers' train_controlnet.py defaults: 4 per GPU on 8, 5e-6, 1e-2, 1.0
    assert (canny["global_batch_size"], canny["lr"], canny["weight_decay"], canny["grad_clip"], canny["flip"]) == \
        (32, 5e-6, 1e-2, 1.0, False)


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[" ".join(args) for args, _ in BAD_CONFIGS])
def test_bad_config_and_missing_files_fail_before_work(case, bad_config_errors):
    error, logged = bad_config_errors[case]
    assert BAD_CONFIGS[case][1] in error and not logged, error


def test_global_batch_not_divisible_by_the_processes_under_torchrun(tmp_path):
    result = train(tmp_path, "--global_batch_size=7", torchrun=2, check=False)
    assert result.returncode != 0 and "global_batch_size=7 is not divisible by the 2 processes" in result.stderr
    assert not os.path.exists(tmp_path / "log.txt")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = train(tmp_path, "--max_steps=5", "--ckpt_every=1", "--lr=1e30", check=False)  # weights blow up at once
    assert result.returncode != 0 and "NaN or infinite between steps 1 and 2" in result.stderr
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.txt"]  # no temporary file left, no sample grid


def test_torchrun_design_card_command(tmp_path):
    """`torchrun --nproc_per_node=8 train.py --corrupt 0.05 --cep`, with 2 processes and a tiny config."""
    out = tmp_path / "run"
    result = train(out, "--corrupt", "0.05", "--cep", "--max_steps=4", torchrun=2)
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log and "'eta': 0.05" in log and "CEP: uniform gamma=1.0" in log
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["corrupt"] == 0.05 and state["config"]["cep"] is True
    record = json.loads((out / "corruption.json").read_text())
    assert len(record["indices"]) == round(0.05 * 64) == state["corruption"]["count"]
    # the record is the one every process computes alone, from the seed: the same with one process
    labels = data.SyntheticShapes(64, 16, seed=0).labels
    _, direct = corrupt.corrupt_labels(labels, 0.05, seed=0)
    assert record["indices"] == direct["indices"] and record["new"] == direct["new"]
    assert result.returncode == 0


def test_damaged_foreign_or_other_model_checkpoints_are_named_on_resume_and_in_sample_py(tmp_path):
    train(tmp_path / "good", "--max_steps=2")
    good = (tmp_path / "good" / "ckpt.pt").read_bytes()
    state = torch.load(tmp_path / "good" / "ckpt.pt", weights_only=True)
    files = {"truncated": good[:len(good) // 2], "text": b"not a checkpoint\n", "tmp": good[:4096]}
    for name, content in files.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "ckpt.pt").write_bytes(content)
    os.makedirs(tmp_path / "bare")
    torch.save(state["ema"], tmp_path / "bare" / "ckpt.pt")  # weights only, as an official DiT checkpoint
    cases = [(name, []) for name in files] + [("bare", []), ("good", ["--model=DiT-S/8"])]
    errors = train_errors([train_args(tmp_path / name, "--resume", "--max_steps=3", *args)[1:] for name, args in cases])
    for (name, _), error in zip(cases[:3], errors):
        assert error.startswith(f"ValueError: checkpoint '{tmp_path / name / 'ckpt.pt'}' is damaged (truncated?) or "
                                "not a checkpoint of this project (") and "ckpt.pt.tmp: never a good one" in error
        assert "weights_only" not in error  # torch's advice to load it unsafely: wrong for a damaged file
        with pytest.raises(ValueError, match="is damaged"):
            load_model(str(tmp_path / name / "ckpt.pt"))
    assert errors[3].startswith(f"ValueError: '{tmp_path / 'bare' / 'ckpt.pt'}' holds weights only") and \
        "sample.py can sample it" in errors[3]
    loaded = load_model(str(tmp_path / "bare" / "ckpt.pt"))[0].state_dict()  # it can
    assert all(torch.equal(loaded[k], v) for k, v in state["ema"].items())
    assert "holds another model than this run asks for (model DiT-Ti/8 in the checkpoint, DiT-S/8 in this run)" \
        in errors[4]
    assert (tmp_path / "good" / "ckpt.pt").read_bytes() == good  # nothing was overwritten
    result = train(tmp_path / "truncated", "--resume", check=False)  # as a user sees it: one line
    assert result.returncode == 1 and result.stderr.startswith("error: checkpoint ") and "Traceback" not in \
        result.stderr and len(result.stderr.splitlines()) == 1


def test_a_full_disk_during_a_save_names_the_file_removes_the_partial_one_and_keeps_the_previous(tmp_path):
    train(tmp_path, "--max_steps=2")
    before = (tmp_path / "ckpt.pt").read_bytes()

    def file_size_limit():  # what a full disk does to a write, for real: the write fails (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 4,) * 2)
    result = run(train_args(tmp_path, "--max_steps=4", "--resume"), check=False, preexec_fn=file_size_limit)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == \
        f"error: cannot write {tmp_path / 'ckpt.pt'}: File too large (out of space: a full disk, a quota or a " \
        "file-size limit); the previous ckpt.pt, if any, is kept (DEBUG=1 shows the traceback)"
    assert "Traceback" not in result.stderr and "step 4 |" in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "ckpt.pt.tmp").exists()


def test_adaptation_keeps_the_base_bit_identical_and_resumes_exactly(tmp_path):
    train(tmp_path / "pre", "--max_steps=2")
    pre = torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=True)["ema"]
    adapt = ["--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter", "controlnet", "--cep"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(straight, *adapt, "--max_steps=4", "--ckpt_every=2")
    train(halves, *adapt, "--max_steps=2")
    train(halves, *adapt, "--max_steps=4", "--resume")
    assert logged_losses(straight) == logged_losses(halves) and len(logged_losses(halves)) == 4
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, halves))
    assert a["model_args"]["adapter"] == dict(kind="controlnet", downsample=1) and a["step"] == 4
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        assert all(torch.equal(a[key][f"base.{k}"], v) for k, v in pre.items())  # the frozen model, bit for bit
        assert any(k.startswith("adapter.zero_linears") and v.abs().sum() > 0 for k, v in a[key].items())
    log = (straight / "log.txt").read_text()
    assert "adapting" in log and "control: canny" in log and "CEP: uniform" in log
    assert os.path.isfile(straight / "samples_0000004.png")


def test_adaptation_on_cached_controls_trains_as_on_controls_made_per_batch(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    adapt = ["--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=controlnet", "--max_steps=2"]
    for name, cache in [("fresh", []), ("cached", [f"--control_cache={tmp_path}/cache"])]:
        train(tmp_path / name, *adapt, *cache)
    assert len(os.listdir(tmp_path / "cache")) == 1
    a, b = (torch.load(tmp_path / p / "ckpt.pt", weights_only=True) for p in ("fresh", "cached"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # Canny: the same hints, bit for bit
    assert logged_losses(tmp_path / "fresh") == logged_losses(tmp_path / "cached")


def test_adaptation_under_torchrun_with_masks_and_a_t2i_adapter_on_a_folder(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    init = ["--init", str(tmp_path / "pre" / "ckpt.pt")]
    train(tmp_path / "ddp", *init, "--adapter=controlnet", "--control=mask", "--max_steps=2",
          f"--control_cache={tmp_path}/cache", torchrun=2)  # rank 0 writes the cache, rank 1 waits and reads it
    state = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert "2 process(es)" in (tmp_path / "ddp" / "log.txt").read_text() and state["step"] == 2
    assert len(os.listdir(tmp_path / "cache")) == 1
    make_folder(tmp_path / "images", sizes=[(20, 16)] * 4)
    make_controls(tmp_path / "images", tmp_path / "controls")
    unet = ["--model=LDM-S", "--image_size=8", f"--data_path={tmp_path}/images", "--learn_sigma=False"]
    train(tmp_path / "unet", *unet, "--max_steps=1")
    train(tmp_path / "t2i", *unet, "--init", str(tmp_path / "unet" / "ckpt.pt"), "--adapter=t2i",
          f"--control={tmp_path}/controls", "--max_steps=2")
    assert "control: " + str(tmp_path / "controls") in (tmp_path / "t2i" / "log.txt").read_text()


def test_adaptation_errors_come_before_any_work(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    init = ["--init", str(tmp_path / "pre" / "ckpt.pt")]
    make_folder(tmp_path / "images")
    make_controls(tmp_path / "images", tmp_path / "controls", resize=(8, 8))
    for args, message in [
            (["--adapter=t2i"], "the model of '" + str(tmp_path / "pre" / "ckpt.pt") + "' is DiT-Ti/8, which has none"),
            (["--adapter=controlnet", "--image_size=32"], "input_size: 16 in"),
            (["--adapter=controlnet", "--init", str(tmp_path / "nope.pt")], "no such checkpoint"),
            (["--adapter=controlnet", f"--data_path={tmp_path}/images", f"--control={tmp_path}/controls"],
             "is 8x8 but its image"),
            (["--adapter=controlnet", "--control=mask", f"--data_path={tmp_path}/images"], "control=mask"),
            (["--adapter=controlnet", f"--control={tmp_path}/controls"], "beside data_path's images")]:
        result = train(tmp_path / "run", *init, *args, check=False)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
        assert not os.path.exists(tmp_path / "run" / "log.txt")
    result = train(tmp_path / "run", f"--control_cache={tmp_path}/cache", check=False)
    assert result.returncode != 0 and "caches an adaptation's controls: it needs adapter and init" in result.stderr


def test_distillation_freezes_the_teacher_trains_the_student_and_resumes_exactly(tmp_path):
    train(tmp_path / "pre", "--max_steps=2")
    teacher = str(tmp_path / "pre" / "ckpt.pt")
    lcm = ["--teacher", teacher, "--cep", "--ema_decay=0.95", "--w_min=1", "--w_max=3"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    # in one process, as `python train.py` runs it, to look at the teacher in memory after the last step
    code = ("import runpy, sys, torch\nsys.argv = sys.argv[1:]\ng = runpy.run_path('train.py', run_name='__main__')\n"
            "ema = torch.load(g['teacher'], weights_only=True)['ema']\n"
            "teacher = g['teacher_net'].state_dict()\n"
            "print('teacher unchanged:', teacher.keys() == ema.keys() and all(torch.equal(teacher[k], v) "
            "for k, v in ema.items()), all(not p.requires_grad for p in g['teacher_net'].parameters()))")
    result = run([sys.executable, "-c", code, *train_args(straight, *lcm, "--max_steps=4", "--ckpt_every=2")[1:]])
    assert "teacher unchanged: True True" in result.stdout
    train(halves, *lcm, "--max_steps=2")
    train(halves, *lcm, "--max_steps=4", "--resume")
    assert logged_losses(straight) == logged_losses(halves) and len(logged_losses(halves)) == 4
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, halves))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    pre = torch.load(teacher, weights_only=True)["ema"]
    assert set(a["model"]) - set(pre) == {"w_embedder.cond_proj.weight"} and a["model"]["w_embedder.cond_proj.weight"].any()
    assert not all(torch.equal(a["model"][k], v) for k, v in pre.items())  # the student learnt
    assert a["consistency"] == dict(teacher=teacher, w_min=1.0, w_max=3.0, skip_interval=20)
    assert a["model_args"]["guidance_embed"] and a["model_args"]["class_dropout_prob"] == 0.0
    log = (straight / "log.txt").read_text()
    assert "distilling" in log and "CEP: uniform" in log and "4 lcm steps" in log
    model, info = load_model(str(halves / "ckpt.pt"))
    y = torch.tensor([0, 3])
    for n in (1, 2):
        x = sample(model, y, sampler="lcm", num_steps=n, generator=torch.Generator().manual_seed(0), size=16,
                   prediction=info["prediction"], skip_interval=info["consistency"]["skip_interval"])
        assert x.shape == (2, 3, 16, 16) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="sampler=lcm"):
        sample(model, y, size=16)


def test_a_stable_diffusion_folder_is_a_teacher_and_its_student_samples_with_lcm(tmp_path):
    """LCM-v1.5's setting in miniature: a Stable Diffusion folder distilled on captions (swapped, and CEP); the
    folder gives the model, VAE, text encoder, schedule and resolution (TINY's --model and --image_size give way)."""
    sd_pipeline(tmp_path / "sd")
    train(tmp_path / "lcm", "--teacher", str(tmp_path / "sd"), "--max_steps=2", "--w_min=1", "--w_max=3",
          "--corrupt=0.25", "--corrupt_type=swap", "--cep")
    state = torch.load(tmp_path / "lcm" / "ckpt.pt", weights_only=True)
    args, teacher = state["model_args"], load_model(str(tmp_path / "sd"))[1]["model_args"]
    assert args == dict(teacher, class_dropout_prob=0.0, guidance_embed=True) and args["text_pad"] == 49407
    assert (state["config"]["model"], state["config"]["image_size"], state["config"]["text_encoder"], state["schedule"],
            state["first_stage"]) == ("SD-1.5", 16, "clip", "sd", dict(vae=str(tmp_path / "sd" / "vae"), scale=0.18215))
    assert len(json.loads((tmp_path / "lcm" / "corruption.json").read_text())["indices"]) == 16
    log = (tmp_path / "lcm" / "log.txt").read_text()
    assert "distilling" in log and "captions, text encoder: CLIP" in log and "4 lcm steps" in log
    (tmp_path / "prompts.txt").write_text("a large blue star on a red background\n")
    run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'lcm' / 'ckpt.pt'}", "--sampler=lcm", "--num_steps=2",
         "--grid_per_class=2", f"--prompts={tmp_path / 'prompts.txt'}", f"--out={tmp_path / 'grid.png'}"])
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 16
    sd_pipeline(tmp_path / "lcm_sd", lcm=True)
    (tmp_path / "empty").mkdir()
    for folder, message in [("lcm_sd", "is not a pre-trained checkpoint of train.py (it is adapted, or a student)"),
                            ("empty", "or of a diffusers pipeline folder (model_index.json)")]:
        result = train(tmp_path / f"run_{folder}", "--teacher", str(tmp_path / folder), check=False)
        assert result.returncode != 0 and message in result.stderr and not (tmp_path / f"run_{folder}").exists()


def test_distillation_errors_come_before_any_work(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    teacher = ["--teacher", str(tmp_path / "pre" / "ckpt.pt")]
    cases = [(["--w_min=3", "--w_max=2"], "the guidance range needs 0 <= w_min <= w_max"),
             (["--w_min=-1"], "the guidance range"), (["--skip_interval=30"], "does not divide the 1000 timesteps"),
             (["--teacher", str(tmp_path / "nope.pt")], "no such checkpoint"),
             (["--out_dir", str(tmp_path / "pre")], "would be overwritten by this run's checkpoints"),
             (["--model=DiT-Ti/4"], "(model, learn_sigma, prediction) ('DiT-Ti/8', True, 'v'), not ('DiT-Ti/4'"),
             (["--image_size=32"], "input_size: 16 in"),
             (["--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=controlnet"], "two kinds of run")]
    errors = train_errors([train_args(tmp_path / str(i), *teacher, *args)[1:] for i, (args, _) in enumerate(cases)])
    for i, (error, (args, message)) in enumerate(zip(errors, cases)):
        assert message in error and not os.path.exists(tmp_path / str(i) / "log.txt"), (args, error)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, start_train):
    train(tmp_path, "--max_steps=2")
    tmp = tmp_path / "ckpt.pt.tmp"
    os.mkfifo(tmp)  # torch.save blocks writing into it: the kill lands mid-write, every time
    proc = start_train(tmp_path, "--max_steps=4", "--resume")
    with open(os.open(tmp, os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as fifo:
        partial = wait_until(lambda: fifo.read(4096), proc)  # the first bytes of the checkpoint of step 4
        proc.kill()
    assert proc.wait() == -signal.SIGKILL and partial.startswith(b"PK")  # killed inside a zip being written
    tmp.unlink()
    tmp.write_bytes(partial)  # what the kill leaves on a real disk
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    train(tmp_path, "--max_steps=4", "--resume")
    losses = logged_losses(tmp_path)  # steps 1-2; 3-4 of the killed run; 3-4 again, continued from step 2
    assert len(losses) == 6 and losses[2:4] == losses[4:6]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4 and not tmp.exists()


def test_sigterm_under_torchrun_saves_and_stops_every_rank_then_resumes_on_one_process(tmp_path, start_train):
    args = ["--corrupt=0.1", "--log_every=1000", "--max_steps=100000"]
    proc = start_train(tmp_path, *args, "--num_workers=1", torchrun=2)
    wait_until(lambda: re.search(r"\| [1-9]\d*/100000", read(f"{tmp_path}.out")), proc)  # rank 0 made a step
    rank1 = rank_pid(proc, 1)
    for pid in [rank1] + children(rank1):  # one rank only, and its loader's worker (SLURM signals every process)
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, read(f"{tmp_path}.out")[-3000:]  # every rank exited cleanly
    stop = int(re.search(r"SIGTERM: saved \S+ at step (\d+) and stopped", read(tmp_path / "log.txt"))[1])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == stop and stop % 10 == 0  # the ranks agree at a check, every 10 steps when logs are rare
    record = read(tmp_path / "corruption.json")
    train(tmp_path, *args[:2], f"--max_steps={stop + 2}", "--resume")  # 2 processes, then 1: the same global batch
    log = read(tmp_path / "log.txt")
    assert "1 process(es)" in log and f"step {stop + 2} |" in log and read(tmp_path / "corruption.json") == record
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert resumed["step"] == stop + 2 and resumed["corruption"] == state["corruption"]


def test_a_rank_killed_under_torchrun_brings_the_others_down(tmp_path, start_train):
    proc = start_train(tmp_path, "--max_steps=100000", torchrun=2)
    wait_until(lambda: "step 2 |" in read(tmp_path / "log.txt"), proc)
    start = time.time()
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0 and time.time() - start < 60


# -----------------------------------------------------------------------------
# Latent diffusion end to end: extraction (data.py), training from the cache or on the fly, decoding in sample.py.
# A tiny random-weight KL VAE stands in for SD's (no downloads here); it downsamples 2x, not 8x: nothing may assume 8.


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


def test_cache_equals_encoding_on_the_fly_for_image_and_flip(tmp_path, cache):
    for c, name in enumerate(["b", "a"]):  # left-right asymmetric images, so that flips differ
        os.makedirs(tmp_path / "images" / name)
        for i, (w, h) in enumerate([(40, 30), (16, 20)]):
            ramp = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None] * np.array([1, c, i], dtype=np.uint8)
            Image.fromarray(np.broadcast_to(ramp, (h, w, 3)).copy()).save(tmp_path / "images" / name / f"{i}.png")
    extract(tmp_path / "cache", cache / "vae", f"--data_path={tmp_path / 'images'}", "--image_size=16",
            "--shard_size=3", "--batch_size=2", "--num_workers=0")
    ds, vae = data.LatentDataset(str(tmp_path / "cache")), load_first_stage(cache / "vae")
    images = data.ImageFolder(str(tmp_path / "images"), 16, flip=False)
    assert (ds.classes, ds.labels.tolist(), len(ds.offsets)) == (images.classes, images.labels.tolist(), 2)
    with torch.no_grad():
        for i in range(len(images)):
            x = images[i][0][None]
            torch.testing.assert_close(ds.latent(i), vae.encode(x)[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ds.latent(i, flipped=True), vae.encode(x.flip(3))[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ds.latent(0), ds.latent(0, flipped=True), atol=1e-3)
    flips = [torch.equal(ds[1][0], ds.latent(1, flipped=True)) for _ in range(40)]  # a random flip, as for pixels
    assert 5 < sum(flips) < 35 and ds[1][1] == 0 and ds[1][0].dtype == torch.float32
    synthetic = data.LatentDataset(str(cache / "cache"))  # no flips: the captions say left and right
    assert synthetic.views == 1 and synthetic.captions == data.SyntheticShapes(64, 16).captions
    assert torch.equal(synthetic[5][0], synthetic.latent(5))


def test_extraction_resumes_and_torchrun_gives_the_same_cache(tmp_path, cache):
    shards = [data.shard_path(str(cache / "cache"), k) for k in range(4)]
    reference = [np.load(p) for p in shards]
    work = tmp_path / "cache"
    shutil.copytree(cache / "cache", work)
    paths = [data.shard_path(str(work), k) for k in range(4)]
    os.remove(paths[2])  # never written
    with open(paths[1], "r+b") as f:  # cut short, as by a copy that did not finish
        f.truncate(1000)
    (work / "shard_00003.npy.tmp").write_bytes(b"left by a killed run")
    with pytest.raises(FileNotFoundError, match="shard_00001.npy"):
        data.LatentDataset(str(work))
    mtimes = [os.stat(p).st_mtime_ns for p in (paths[0], paths[3])]
    result = extract(work, cache / "vae", *SYNTH)
    assert "encoded 2 shards, 2 were already complete" in result.stdout
    assert mtimes == [os.stat(p).st_mtime_ns for p in (paths[0], paths[3])]
    for p, ref in zip(paths, reference):
        np.testing.assert_allclose(np.load(p), ref, rtol=1e-5, atol=1e-6)
    result = extract(work, cache / "vae", *SYNTH[1:], "--synthetic_size=32", check=False)
    assert result.returncode != 0 and "labels" in result.stderr  # another dataset into the same folder
    # two processes share the shards out and write the same cache
    extract(tmp_path / "two", cache / "vae", *SYNTH, torchrun=2)
    meta = [json.loads((p / "meta.json").read_text()) for p in (tmp_path / "two", cache / "cache")]
    assert meta[0] == meta[1]
    for k, ref in enumerate(reference):
        np.testing.assert_allclose(np.load(data.shard_path(str(tmp_path / "two"), k)), ref, rtol=1e-5, atol=1e-6)


def test_latent_dit_from_the_cache_trains_like_on_the_fly_and_samples(tmp_path, cache):
    args = ["--model=DiT-Ti/4", "--max_steps=3", "--synthetic_size=64", "--image_size=16"]
    train(tmp_path / "cached", f"--latents={cache / 'cache'}", *args)
    train(tmp_path / "fly", f"--vae={cache / 'vae'}", *args)
    assert len(logged_losses(tmp_path / "cached")) == 3
    np.testing.assert_allclose(logged_losses(tmp_path / "cached"), logged_losses(tmp_path / "fly"), atol=2e-4)
    assert "latents 4x8x8 from" in (tmp_path / "cached" / "log.txt").read_text()
    state = torch.load(tmp_path / "cached" / "ckpt.pt", weights_only=True)
    assert state["model_args"] == dict(name="DiT-Ti/4", input_size=8, in_channels=4, num_classes=10, learn_sigma=True,
                                       class_dropout_prob=0.1)
    assert state["first_stage"] == dict(vae=str(cache / "vae"), scale=0.18215)
    assert Image.open(tmp_path / "cached" / "samples_0000003.png").size == (8 * 65 + 1, 10 * 65 + 1)
    args = [sys.executable, "sample.py", f"--ckpt={tmp_path}/cached/ckpt.pt", "--num_steps=2"]
    run(args + [f"--out={tmp_path}/grid.png", "--grid_classes=3", "--grid_per_class=2"])
    assert Image.open(tmp_path / "grid.png").size == (2 * 65 + 1, 3 * 65 + 1)  # decoded by the VAE it records
    sample_npz_script(tmp_path / "cached")


def sample_npz_script(run_dir):
    run([sys.executable, "sample.py", f"--ckpt={run_dir}/ckpt.pt", "--num_steps=2", "--num_samples=5",
         "--batch_size=4", f"--out={run_dir}/s.npz"])
    npz = np.load(run_dir / "s.npz")
    assert npz["arr_0"].shape == (5, 16, 16, 3) and npz["arr_0"].dtype == np.uint8 and npz["arr_0"].std() > 0


def test_ldm_unet_trains_from_the_cache_with_cep_and_samples(tmp_path, cache):
    train(tmp_path / "unet", f"--latents={cache / 'cache'}", "--model=LDM-S", "--max_steps=2", "--cep")
    log = (tmp_path / "unet" / "log.txt").read_text()
    assert "LDM-S" in log and "CEP: uniform" in log and len(logged_losses(tmp_path / "unet")) == 2
    state = torch.load(tmp_path / "unet" / "ckpt.pt", weights_only=True)
    assert state["model_args"]["name"] == "LDM-S" and "input_blocks.0.0.weight" in state["ema"]
    assert Image.open(tmp_path / "unet" / "samples_0000002.png").size == (8 * 65 + 1, 10 * 65 + 1)
    sample_npz_script(tmp_path / "unet")


def test_caption_latents_keep_the_captions(tmp_path, cache):
    captions = [f"caption {i} ü" for i in range(5)]
    make_caption_folder(tmp_path / "folder", captions)
    extract(tmp_path / "cache", cache / "vae", f"--data_path={tmp_path / 'folder'}", "--captions", "--image_size=16",
            "--shard_size=2", "--batch_size=2", "--num_workers=0")
    ds = data.LatentDataset(str(tmp_path / "cache"))
    assert ds.captions == captions and ds.labels is None and ds.views == 1 and len(ds) == 5
    latent, caption = ds[4]
    assert latent.shape == (4, 8, 8) and caption == captions[4]


# -----------------------------------------------------------------------------
# Text-to-image end to end: the built-in captions, a small text encoder, prompts


def test_text_to_image_end_to_end_on_the_builtin_captions(tmp_path):
    """Train with a frozen CLIP text encoder (random weights in a local file) on the built-in captions, with CEP;
    sample a captioned grid and an .npz from prompts; CLIP score it."""
    ref = tiny_clip(tmp_path / "clip.pt", torchscript=False)
    out = tmp_path / "run"
    train(out, "--model=LDM-S", "--text_encoder=clip", f"--clip_model={tmp_path / 'clip.pt'}", "--max_steps=2",
          "--grid_steps=2", "--cep")
    log = (out / "log.txt").read_text()
    assert f"CLIP {tmp_path / 'clip.pt'}, frozen" in log and "CEP: uniform" in log and len(logged_losses(out)) == 2
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["model_args"]["text_layers"] == 2 and state["model_args"]["context_dim"] == 64
    for weights in (state["model"], state["ema"]):  # frozen: trained around, never changed
        assert torch.equal(weights["y_embedder.encoder.token_embedding.weight"], ref.token_embedding.weight)
        assert torch.equal(weights["y_embedder.encoder.transformer.resblocks.1.mlp.c_fc.weight"],
                           ref.transformer.resblocks[1].mlp.c_fc.weight)
    assert state["model"]["out.2.weight"].abs().sum() > 0  # the U-Net did train
    assert Image.open(out / "samples_0000002.png").size[0] == 8 * 130
    (tmp_path / "prompts.txt").write_text("a red circle\n\n  un cœur  rouge 🙂 \n", encoding="utf-8")
    args = [sys.executable, "sample.py", f"--ckpt={out}/ckpt.pt", "--num_steps=2"]
    run(args + [f"--prompts={tmp_path / 'prompts.txt'}", "--grid_per_class=3", f"--out={tmp_path}/grid.png"])
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[1] == 3 * 130 and grid.shape[0] > 2 * 130  # two prompts, three samples each, text beneath
    assert (grid[128:150, :120] < 100).any()  # the caption is written under the first image
    coco = {"annotations": [{"image_id": 1, "caption": "A large blue star."}, {"image_id": 2, "caption": "a ring"}]}
    (tmp_path / "captions_val.json").write_text(json.dumps(coco))
    run(args + [f"--prompts={tmp_path / 'captions_val.json'}", "--num_samples=4", "--batch_size=3",
                f"--out={tmp_path}/s.npz"])
    npz = np.load(tmp_path / "s.npz")
    assert list(npz.keys()) == ["arr_0"] and npz["arr_0"].shape == (4, 16, 16, 3)
    prompts = ["A large blue star.", "a ring"] * 2  # in turn
    assert (tmp_path / "s_prompts.txt").read_text(encoding="utf-8") == "\n".join(prompts) + "\n"
    result = run(args, check=False)
    assert result.returncode != 0 and "--prompts" in result.stderr.splitlines()[-1]
    report = evaluate.main(["--samples", str(tmp_path / "s.npz"), f"--clip_model={tmp_path / 'clip.pt'}",
                            "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu",
                            "--classifier_size=100", "--classifier_epochs=1", "--synthetic_ref_size=30"])
    model, preprocess = text.load_clip(str(tmp_path / "clip.pt"))
    direct = metrics.clip_score(evaluate.open_images(str(tmp_path / "s.npz")), prompts, model, preprocess, 3, "cpu")
    assert report["clip_score"] == pytest.approx(direct) and report["prompts"] == str(tmp_path / "s_prompts.txt")


# -----------------------------------------------------------------------------
# sample.py: guidance, grids, .npz files


def test_npz_format_and_reproducibility(tmp_path):
    model = randomize(tiny_dit()).eval()
    kwargs = dict(conditions=[i % 5 for i in range(13)], batch_size=4, seed=1, cfg_scale=2.0, num_steps=3)
    sample_npz(model, str(tmp_path / "a.npz"), **kwargs)
    sample_npz(model, str(tmp_path / "b.npz"), **kwargs)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (13, 8, 8, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].tolist() == [i % 5 for i in range(13)]
    assert np.array_equal(a["arr_0"], b["arr_0"])
    sample_npz(model, str(tmp_path / "c.npz"), **dict(kwargs, seed=2))
    assert not np.array_equal(a["arr_0"], np.load(tmp_path / "c.npz")["arr_0"])


def test_guided_sampling_is_one_forward_a_step_on_both_halves():
    model = randomize(tiny_dit()).eval()
    batches = []
    model.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    sample(model, torch.tensor([0, 1, 2]), cfg_scale=4.0, num_steps=5)
    assert batches == [6] * 5


def test_compiled_sampling_gives_the_eager_samples():
    """sample(compile=True) runs the guided denoiser step as one Inductor graph (on GPU a CUDA graph): the same seeds
    give the same images as eager, to float32 rounding, and one graph serves every step."""
    model = randomize(tiny_dit()).eval()
    y = torch.tensor([0, 1, 2])
    eager = sample(model, y, cfg_scale=4.0, num_steps=4, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = sample(model, y, cfg_scale=4.0, num_steps=4, generator=torch.Generator().manual_seed(0),
                          compile=True)
    assert eager.abs().max() > 0.1  # not the zeros of an untrained DiT
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)  # outputs ~1: float32 rounding


def test_sample_script_rejects_a_bad_dtype(tmp_path):
    r = run([sys.executable, "sample.py", "--dtype=float16", f"--ckpt={tmp_path}/none.pt"], check=False)
    assert r.returncode != 0 and "dtype must be float32 or bfloat16, got 'float16'" in r.stderr


def test_sample_script_grid_and_torchrun_npz(tmp_path):
    out = tmp_path / "run"
    train(out, "--max_steps=2")
    run([sys.executable, "sample.py", f"--ckpt={out}/ckpt.pt", "--num_steps=3", f"--out={tmp_path}/grid.png",
         "--grid_classes=3", "--grid_per_class=2"])
    assert Image.open(tmp_path / "grid.png").size == (2 * 65 + 1, 3 * 65 + 1)
    args = ["sample.py", f"--ckpt={out}/ckpt.pt", "--num_steps=2", "--num_samples=10", "--batch_size=4"]
    run([sys.executable] + args + [f"--out={tmp_path}/one.npz"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + args
        + [f"--out={tmp_path}/two.npz"])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert one["arr_1"].tolist() == [i % 10 for i in range(10)]
    # compiled: the same images, but for a rare rounding to the next uint8 value (Inductor fuses differently)
    run([sys.executable, "sample.py", f"--ckpt={out}/ckpt.pt", "--num_steps=2", "--num_samples=8", "--batch_size=4",
         "--compile", f"--out={tmp_path}/compiled.npz"])
    compiled = np.load(tmp_path / "compiled.npz")["arr_0"]
    assert np.abs(compiled.astype(int) - one["arr_0"][:8]).max() <= 1


def test_an_adapted_model_samples_for_the_controls_of_held_out_images(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    train(tmp_path / "mask", "--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=controlnet", "--control=mask",
          "--synthetic_scale=0.6", "--max_steps=1")
    args = [sys.executable, "sample.py", f"--ckpt={tmp_path}/mask/ckpt.pt", "--num_steps=2"]
    run(args + [f"--out={tmp_path}/grid.png", "--grid_classes=3", "--grid_per_class=2"])
    assert Image.open(tmp_path / "grid.png").size == (3 * 65 + 1, 3 * 65 + 1)  # a row: the control, 2 samples
    run(args + [f"--out={tmp_path}/held.npz", "--num_samples=6", "--batch_size=4"])
    # the held-out split is evaluate.py's "synthetic" reference of synthetic_ref_size=6: the same images
    assert np.load(tmp_path / "held.npz")["arr_1"].tolist() == data.SyntheticShapes(6, 16, seed=1).labels.tolist()
    images = evaluate.synthetic_images(6, 1, 16, scale=0.6)
    assert np.array_equal(next(iter(images.batches(6))), data.SyntheticShapes(6, 16, 1, scale=0.6).images_uint8())
    model, info = load_model(str(tmp_path / "mask" / "ckpt.pt"))
    randomize(model.adapter, std=0.05)  # as if trained longer: no zero layer left, the control steers the samples
    with torch.no_grad():
        y, hint = torch.tensor([1, 2]), torch.rand(2, 3, 16, 16)
        x = [sample(model, y, num_steps=2, size=16, hint=h, generator=torch.Generator().manual_seed(0))
             for h in (hint, 1 - hint)]
    assert not torch.equal(*x)
    result = run(args + [f"--out={tmp_path}/p.png", f"--control={tmp_path}/nope"], check=False)
    assert "a control folder goes with --data_path" in result.stderr
    make_folder(tmp_path / "val")
    result = run(args + [f"--out={tmp_path}/p.png", f"--control={tmp_path}/nope", f"--data_path={tmp_path}/val"],
                 check=False)
    assert f"control folder '{tmp_path}/nope' does not exist" in result.stderr


def test_a_text_to_image_model_adapts_and_samples_for_held_out_captions(tmp_path):
    text_args = ["--model=LDM-S", "--text_encoder=small", "--image_size=8", "--learn_sigma=False"]
    train(tmp_path / "pre", *text_args, "--max_steps=1")
    train(tmp_path / "t2i", *text_args, "--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=t2i", "--max_steps=1")
    run([sys.executable, "sample.py", f"--ckpt={tmp_path}/t2i/ckpt.pt", "--num_steps=2", "--num_samples=3",
         f"--out={tmp_path}/held.npz"])
    assert read(tmp_path / "held_prompts.txt").splitlines() == data.SyntheticShapes(3, 8, seed=1).captions


# -----------------------------------------------------------------------------
# fid.py, evaluate.py and metrics.py


def _random_inception_state_dict(seed=0):
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
    sd = _random_inception_state_dict()
    path = str(tmp_path_factory.mktemp("inception") / fid.FID_WEIGHTS_NAME)
    torch.save(sd, path)
    return sd, path


def _pytorch_fid_model(sd, monkeypatch):
    import pytorch_fid.inception as pfi
    # pytorch-fid always downloads its weights; hand it ours instead
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
    return pfi.InceptionV3([3]).eval()


def _close(a, b, rel=1e-4):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = b.abs().max().item()
    assert scale > 1e-3, "degenerate reference output"
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


def test_inception_state_dict_matches_manifest():
    with open(os.path.join(MANIFESTS, "pt_inception_fid_keys.json")) as f:
        manifest = json.load(f)
    ours = {k: list(v.shape) for k, v in fid.InceptionV3().state_dict().items()}
    assert list(ours) == list(manifest)
    assert ours == manifest


def test_inception_matches_pytorch_fid(weights, monkeypatch):
    sd, _ = weights
    ref = _pytorch_fid_model(sd, monkeypatch)
    spatial = {}
    # ADM's sFID tensor "mixed_6/conv" is the 1x1 branch of Mixed_6d (block 2, index 6 in pytorch-fid)
    ref.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("x", o))
    ours = fid.InceptionV3()
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    x = torch.randint(0, 256, (3, 3, 40, 52), dtype=torch.uint8)
    with torch.no_grad():
        out = ours(x)
        ref_pool = ref(x.float() / 255)[0].flatten(1)
    _close(out["pool"], ref_pool)
    _close(out["spatial"], spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    _close(out["logits"], ref_pool @ sd["fc.weight"].t())
    assert out["pool"].shape == (3, 2048) and out["spatial"].shape == (3, 2023) and out["logits"].shape == (3, 1008)


def test_inception_tf1_resize_matches_torch_fidelity(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    sd, path = weights
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                      feature_extractor_weights_path=path)
    ours = fid.load_inception(path, "cpu", resize="tf1")
    x = torch.randint(0, 256, (2, 3, 37, 45), dtype=torch.uint8)
    with torch.no_grad():
        pool, logits_unbiased, logits = ref(x)
        out = ours(x)
    _close(out["pool"], pool)
    _close(out["logits"], logits_unbiased)  # the IS logits (no bias), as in ADM's graph
    _close(out["logits"] + sd["fc.bias"], logits)
    # and the two resizes really differ off 299x299, so the option is not a no-op
    assert not torch.allclose(fid.InceptionV3("tf1").preprocess(x), fid.InceptionV3().preprocess(x), atol=1e-3)


def test_compute_features_input_formats(weights):
    _, path = weights
    model = fid.load_inception(path, "cpu")
    imgs = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    a = fid.compute_features(imgs, model, batch_size=3, progress=False)
    b = fid.compute_features(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, model, batch_size=4,
                             progress=False)
    c = fid.compute_features(iter([imgs[:1], imgs[1:]]), model, progress=False)
    for k in ("pool", "spatial", "logits"):
        assert a[k].shape[0] == 4 and a[k].dtype == np.float32
        _close(b[k], a[k])
        _close(c[k], a[k])


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 32)), rng.normal(0.3, 1.2, size=(250, 32)) @ rng.normal(size=(32, 32)) * 0.3
    s1, s2 = fid.statistics(x), fid.statistics(y)
    ours = fid.frechet_distance(*s1, *s2)
    assert ours > 1
    assert ours == pytest.approx(calculate_frechet_distance(*s1, *s2), rel=1e-8)
    assert ours == pytest.approx(fid.frechet_distance(*s1, *s2, method="eigh"), rel=1e-9)
    assert abs(fid.frechet_distance(*s1, *s1)) < 1e-6 and abs(fid.frechet_distance(*s1, *s1, method="eigh")) < 1e-6
    # fewer samples than dimensions: singular covariances (the eps fallback or round-off path)
    s3, s4 = fid.statistics(x[:10]), fid.statistics(y[:12])
    singular = fid.frechet_distance(*s3, *s4)
    assert np.isfinite(singular)
    assert singular == pytest.approx(calculate_frechet_distance(*s3, *s4), rel=1e-5)
    assert fid.frechet_distance(*s3, *s4, method="eigh") == pytest.approx(singular, rel=1e-4)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.from_numpy(np.random.default_rng(0).normal(0, 3, size=(1000, 1008)))
    mean, std = fid.inception_score(logits.numpy(), splits=10)
    ref = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert mean > 2
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-7)
    # ADM's rule: chunks of split_size, the last one possibly shorter (re-implemented here from evaluator.py)
    p = torch.softmax(logits, 1).numpy()
    scores = []
    for i in range(0, len(p), 300):
        part = p[i:i + 300]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert fid.inception_score(logits.numpy(), split_size=300)[0] == pytest.approx(np.mean(scores), rel=1e-9)
    assert fid.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0)


def test_precision_recall_match_brute_force():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(150, 16)).astype(np.float32)
    fake = (rng.normal(size=(120, 16)) * 1.3 + 0.4).astype(np.float32)
    d = lambda a, b: np.sqrt(((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1))
    r_real = np.sort(d(real, real), 1)[:, 3]  # index 0 is the point itself
    r_fake = np.sort(d(fake, fake), 1)[:, 3]
    precision = (d(fake, real) <= r_real[None]).any(1).mean()
    recall = (d(real, fake) <= r_fake[None]).any(1).mean()
    assert 0 < precision < 1 and 0 < recall < 1
    # small blocks, so that the batching (and the running top-k across blocks) is exercised
    p, r = fid.precision_recall(real, fake, k=3, batch_size=32, device=torch.device("cpu"))
    assert p == pytest.approx(precision) and r == pytest.approx(recall)
    nn = fid.nearest_distances(fake, real, 5, batch_size=16, device=torch.device("cpu"))
    np.testing.assert_allclose(nn, np.sort(d(fake, real), 1)[:, :5], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="need more than 3 real and fake samples, got 150 and 3"):
        fid.precision_recall(real, fake[:3], k=3)


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    dest = os.path.join(str(tmp_path), "checkpoints", fid.FID_WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception(download=False)
    for s in (fid.FID_WEIGHTS_NAME, fid.FID_WEIGHTS_URL, dest):
        assert s in str(e.value)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception()
    assert fid.FID_WEIGHTS_URL in str(e.value) and dest in str(e.value) and "no network" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception(str(tmp_path / "nope.pth"))
    assert "nope.pth" in str(e.value) and fid.FID_WEIGHTS_URL in str(e.value)


def test_load_inception_from_hub_cache(tmp_path, monkeypatch, weights):
    sd, path = weights
    os.makedirs(tmp_path / "checkpoints")
    os.symlink(path, tmp_path / "checkpoints" / fid.FID_WEIGHTS_NAME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = fid.load_inception(download=False, device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_npz_streaming_reader(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        p = str(tmp_path / f"{save.__name__}.npz")
        save(p, a, np.arange(7))
        imgs = evaluate.open_images(p)
        assert len(imgs) == 7 and imgs.resolution == 5 and list(imgs.labels) == list(range(7))
        np.testing.assert_array_equal(np.concatenate(list(imgs.batches(3))), a)
        assert len(imgs.batches(3)) == 3
        np.testing.assert_array_equal(np.concatenate(list(evaluate.open_images(p, limit=4).batches(3))), a[:4])


def test_relative_mahalanobis_is_eq_38_to_40_literally():
    rng = np.random.default_rng(0)
    labels = np.repeat([3, 7, 9], [60, 70, 50])  # the samples' own labels, not 0..K-1
    feats = rng.normal(0, 3, size=(3, 6))[np.searchsorted([3, 7, 9], labels)] + rng.normal(size=(180, 6))
    feats[:2] += 25  # two samples far from everything
    # Eq. 38-40, one sample at a time: class means and the shared covariance from these features and labels (1/N)
    mus = {k: feats[labels == k].mean(0) for k in (3, 7, 9)}
    shared = sum(np.outer(x - mus[y], x - mus[y]) for x, y in zip(feats, labels)) / len(feats)
    mu_agn, cov_agn = feats.mean(0), sum(np.outer(x - feats.mean(0), x - feats.mean(0)) for x in feats) / len(feats)
    M = lambda x, mu, cov: -(x - mu) @ np.linalg.inv(cov) @ (x - mu)
    rmd = np.array([M(x, mus[y], shared) - M(x, mu_agn, cov_agn) for x, y in zip(feats, labels)])
    ours = metrics.relative_mahalanobis(feats, labels)
    np.testing.assert_allclose(ours, rmd, rtol=1e-4, atol=1e-4 * np.abs(rmd).max())
    assert metrics.top_mean(ours, 0.01) == pytest.approx(np.sort(rmd)[-2:].mean(), rel=1e-4)  # 1% of 180: 1.8
    assert metrics.top_mean(ours, 0.05) == pytest.approx(np.sort(rmd)[-9:].mean(), rel=1e-4)
    assert rmd.std() > 1


def test_sample_entropy_against_a_direct_computation():
    torch.manual_seed(0)
    codebook = torch.randn(12, 3)
    latents = [torch.randn(2, 3, 4, 5), torch.randn(1, 3, 4, 5) * 2]
    tau = 0.7
    direct = []
    for z in latents:
        for x in z.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy():
            logits = -((x - codebook.double().numpy()) ** 2).sum(1) / tau
            p = np.exp(logits - logits.max())
            p /= p.sum()
            direct.append(-(p * np.log(p)).sum())
    assert len(direct) == 60 and 0.1 < np.mean(direct) < np.log(12)
    assert metrics.sample_entropy(iter(latents), codebook, tau, chunk=7) == pytest.approx(np.mean(direct), rel=1e-5)
    nearest = np.sort(scipy.spatial.distance.cdist(codebook.numpy(), codebook.numpy()), 1)[:, 1]
    assert metrics.codebook_tau(codebook) == pytest.approx((nearest ** 2).mean(), rel=1e-9)
    # a vector on a code with a small tau: all mass on that code
    assert metrics.sample_entropy([codebook[:4].T.reshape(1, 3, 2, 2)], codebook, 1e-4) < 1e-6


@pytest.mark.parametrize("dim, n_real, n_fake", [(48, 400, 330), (16, 260, 300)])
def test_top_pr_matches_the_top_pr_package(dim, n_real, n_fake):
    top_pr = pytest.importorskip("top_pr")
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(n_real, dim)).astype(np.float32)
    real[: n_real // 3] += 3  # two modes; the fake set covers one of them, and some of it lies off the real support
    fake = np.concatenate([rng.normal(size=(n_fake - 40, dim)), rng.normal(6, 1, size=(40, dim))]).astype(np.float32)
    np.random.seed(42)  # the package draws its bootstrap from numpy's global generator (seeded 42 when it projects)
    ref = top_pr.compute_top_pr(real_features=real, fake_features=fake)
    precision, recall, f1 = metrics.top_pr(real, fake, block=100)  # small blocks: the blocking is exercised
    assert 0.5 < ref["fidelity"] < 1 and 0.5 < ref["diversity"] < 0.7  # not a trivial case: one mode is missed
    assert (precision, recall, f1) == pytest.approx((ref["fidelity"], ref["diversity"], ref["Top_F1"]), rel=1e-6)
    with pytest.raises(ValueError, match="needs at least"):
        metrics.top_pr(real, fake[:5 * min(dim, 32) + 1])


def test_clip_image_features_are_clips_encode_image(tmp_path):
    import clip
    ref = tiny_clip(tmp_path / "clip.pt", torchscript=False)
    space = metrics.ClipSpace(str(tmp_path / "clip.pt"), torch.device("cpu"))
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 30, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images)
    ours = space.extract(evaluate.open_images(str(tmp_path / "s.npz")), 2)["pool"]
    with torch.no_grad():
        direct = torch.cat([ref.encode_image(space.preprocess(Image.fromarray(im))[None]) for im in images])
    assert ours.shape == (5, CLIP_TINY["embed_dim"]) and space.dims == {"mu": CLIP_TINY["embed_dim"]}
    torch.testing.assert_close(torch.from_numpy(ours), direct, rtol=1e-5, atol=1e-5)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3
    # ViT-B/16 is clip's own model: its image tower's layout is what clip.load builds for OpenAI's file
    with torch.device("meta"):
        vit_b16 = clip.model.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                  vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                                  transformer_heads=8, transformer_layers=12)
    assert vit_b16.visual.output_dim == 512 and vit_b16.visual.conv1.kernel_size == (16, 16)
    assert metrics.clip_path("ViT-B/16").endswith(os.path.join(".cache", "clip", "ViT-B-16.pt"))


def test_evaluate_unknown_key():
    with pytest.raises(ValueError, match="bogus"):
        evaluate.main(["--samples", "x.npz", "--bogus", "1"])


def test_evaluate_end_to_end_inception_with_cache(tmp_path, weights, monkeypatch):
    _, path = weights
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 3)
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    calls = []
    real_compute = fid.compute_features
    monkeypatch.setattr(fid, "compute_features", lambda images, *a, **k: calls.append(1) or real_compute(images, *a, **k))
    args = ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--features=inception",
            f"--inception_weights={path}", "--cache_dir", str(tmp_path / "cache"), "--progress=False",
            "--device=cpu", "--out", str(tmp_path / "m.json"), "--fd_method=eigh",  # eigh: 2048-d in seconds
            "--is_split_size=4"]  # ADM's rule in chunks of 4: [0:4], [4:6]
    first = evaluate.main(args)
    assert len(calls) == 2 and first["ref_cache"] == "miss"
    logits = fid.compute_features(np.load(tmp_path / "samples.npz")["arr_0"], fid.load_inception(path, "cpu"),
                                  progress=False)["logits"]
    calls.clear()
    direct = []
    for part in (logits[:4], logits[4:]):
        p = scipy.special.softmax(part.astype(np.float64), axis=1)
        direct.append(np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()))
    assert first["is"] == pytest.approx(np.mean(direct), rel=1e-6) and first["is_splits"] == "chunks of 4 (ADM)"
    assert first["ref_statistics"] == "computed by this script from 8 reference images"
    assert first["num_ref_statistics"] == 8 and "8 < 50000 reference images" in first["warnings"][0]
    with open(tmp_path / "m.json") as f:
        report = json.load(f)
    assert report["feature_space"] == "inception-2015-12-05" and "resize=pytorch-fid" in report["feature_space_detail"]
    for k in ("is", "precision", "recall"):
        assert report[k] is not None and np.isfinite(report[k]), k
    assert report["is"] >= 1 and report["num_samples"] == 6 and report["num_ref"] == 8
    assert report["fid"] is report["sfid"] is None  # FID on 6 samples would mean nothing: skipped, with the reason
    assert {k: report["skipped"][k] for k in ("fid", "sfid")} == {
        "fid": "6 samples and 8 reference images, fewer than the 2048 feature dimensions: each set needs as many",
        "sfid": "6 samples and 8 reference images, fewer than the 2023 feature dimensions: each set needs as many"}
    assert "is_classifier" not in report
    second = evaluate.main(args)
    assert len(calls) == 1 and second["ref_cache"] == "hit"  # only the samples were run through the network
    for k in ("is", "precision", "recall"):
        assert second[k] == pytest.approx(first[k], rel=1e-9)
    # the cache file is itself a statistics file usable as --ref, features (for precision/recall) included
    space = type("Space", (), {"name": fid.FEATURE_SPACE, "dims": metrics.InceptionSpace.dims})()
    stats, how, _ = evaluate.reference(first["ref_cache_path"], space, 8, "", 32, 0, 0, "ref")
    assert how == "statistics file" and stats["features"].shape == (8, 2048) and stats["sigma_s"].shape == (2023, 2023)
    # a pytorch-fid style statistics file (mu, sigma only) is read as statistics, without features
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    stats, how, _ = evaluate.reference(str(tmp_path / "stats.npz"), space, 8, "", 32, 0, 0, "ref")
    assert how == "statistics file" and "features" not in stats and stats["sigma"].shape == (2048, 2048)
    space.name = "synthetic-classifier"
    with pytest.raises(ValueError, match="feature space"):
        evaluate.reference(str(tmp_path / "stats.npz"), space, 8, "", 32, 0, 0, "ref")


def test_evaluate_against_an_adm_reference_batch_uses_its_stored_statistics(tmp_path, weights, monkeypatch):
    _, path = weights
    monkeypatch.setattr(fid, "unmeasurable", lambda *a, **k: {})  # which statistics FID uses, not how many samples
    rng = np.random.default_rng(1)
    samples, images = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (6, 8))
    # ADM's format: 10K images for precision/recall beside the statistics of the whole reference set
    stored = dict(mu=rng.normal(0, 0.1, 2048), sigma=np.diag(rng.uniform(0.01, 0.1, 2048)),
                  mu_s=rng.normal(0, 0.1, 2023), sigma_s=np.diag(rng.uniform(0.01, 0.1, 2023)))
    np.savez(tmp_path / "VIRTUAL_ref.npz", images, **stored)
    np.savez(tmp_path / "s.npz", samples)
    args = ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "VIRTUAL_ref.npz"), "--device=cpu",
            f"--inception_weights={path}", "--cache_dir", str(tmp_path / "cache"), "--progress=False",
            "--fd_method=eigh", "--is_split_size=0", "--is_splits=2"]
    res = evaluate.main(args)
    model = fid.load_inception(path, "cpu", resize="tf1")  # ADM's input pipeline, the default against its batch
    s, r = (fid.compute_features(x, model, progress=False) for x in (samples, images))
    assert "resize=tf1" in res["feature_space_detail"] and res["is_splits"] == "2 equal splits"
    assert res["fid"] == pytest.approx(fid.frechet_distance(*fid.statistics(s["pool"]), stored["mu"],
                                                            stored["sigma"], method="eigh"), rel=1e-6)
    assert res["sfid"] == pytest.approx(fid.frechet_distance(*fid.statistics(s["spatial"]), stored["mu_s"],
                                                             stored["sigma_s"], method="eigh"), rel=1e-6)
    recomputed = fid.frechet_distance(*fid.statistics(s["pool"]), *fid.statistics(r["pool"]), method="eigh")
    assert abs(res["fid"] - recomputed) > 1  # the stored statistics, not the 8 images', made the FID
    assert (res["precision"], res["recall"]) == pytest.approx(fid.precision_recall(r["pool"], s["pool"]))
    assert res["num_ref"] == 8 and res["num_ref_statistics"] is None
    assert res["ref_statistics"].startswith(f"stored in {tmp_path / 'VIRTUAL_ref.npz'} (ADM's reference batch")
    assert res["warnings"] == []
    res = evaluate.main(args + ["--resize=pytorch-fid"])
    assert "resize=pytorch-fid" in res["feature_space_detail"] and "mix two pipelines" in res["warnings"][0]


def test_evaluate_bad_input_fails_before_any_work(tmp_path, weights, monkeypatch):
    import clip
    _, path = weights
    np.savez(tmp_path / "s.npz", np.zeros((6, 32, 32, 3), np.uint8), np.arange(6))
    calls = []
    monkeypatch.setattr(fid, "compute_features", lambda *a, **k: calls.append(1))
    base = ["--samples", str(tmp_path / "s.npz"), "--device=cpu", f"--inception_weights={path}",
            "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--is_split_size=0", "--ref"]
    np.savez(tmp_path / "neither.npz", labels=np.arange(3))
    with pytest.raises(ValueError, match="has neither images .arr_0. nor statistics .mu, sigma."):
        evaluate.main(base + [str(tmp_path / "neither.npz")])
    np.savez(tmp_path / "clip_stats.npz", mu=np.zeros(512), sigma=np.eye(512))
    with pytest.raises(ValueError, match=r"mu \(512,\) / sigma \(512, 512\) do not fit the 2048-d mu features"):
        evaluate.main(base + [str(tmp_path / "clip_stats.npz")])
    np.savez(tmp_path / "adm.npz", np.zeros((4, 32, 32, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2048), sigma_s=np.eye(2048))
    with pytest.raises(ValueError, match="mu_s .2048,. / sigma_s .2048, 2048. do not fit the 2023-d"):
        evaluate.main(base + [str(tmp_path / "adm.npz")])
    with pytest.raises(ValueError, match="6 samples are fewer than one Inception Score chunk .is_split_size=5000"):
        evaluate.main(base[:-2] + ["--ref", str(tmp_path / "adm.npz")])
    # the paper's CLIP ViT-B/16 named but absent, offline: the error says which file and where it goes
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(clip.clip.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError, match=re.escape(f"save it as {tmp_path}/home/.cache/clip/ViT-B-16.pt")):
        evaluate.main(base + ["synthetic", "--diversity_features=clip"])
    assert calls == [] and not os.path.exists(tmp_path / "cache")


def test_evaluate_synthetic_reports_every_metric_in_named_spaces(tmp_path):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=170, resolution=16, seed=5)  # TopP&R in 32 projected dimensions needs 162
    np.savez(tmp_path / "s.npz", ds.images_uint8(), ds.labels)
    vq = randomize(VQModel(num_codes=16, **TINY_VAE), std=0.2)
    (tmp_path / "vq").mkdir()
    torch.save(vq.state_dict(), tmp_path / "vq" / "diffusion_pytorch_model.bin")
    (tmp_path / "vq" / "config.json").write_text(json.dumps(dict(_class_name="VQModel", latent_channels=3,
                                                                 num_vq_embeddings=16, **TINY_VAE)))
    base = ["--samples", str(tmp_path / "s.npz"), "--cache_dir", str(tmp_path / "cache"), "--progress=False",
            "--device=cpu", "--classifier_size=400", "--classifier_epochs=3", "--synthetic_ref_size=170",
            "--out", str(tmp_path / "m.json")]
    res = evaluate.main(base + ["--train=synthetic", "--synthetic_train_size=50", f"--entropy_vq={tmp_path / 'vq'}"])
    assert res["feature_space"] == res["diversity_space"] == "synthetic-classifier" and res["skipped"] == {}
    assert res["is"] is None and res["sfid"] is None and res["is_splits"] == "10 equal splits"
    assert 0 <= res["class_accuracy"] <= 1 and 0 <= res["precision"] <= 1 and res["fid"] >= 0
    assert 0 <= res["memorisation_ratio"] <= 1 and res["avg_l2_top5"] > 0 and np.isfinite(res["rmd_top1"])
    assert 0 < res["toppr_f1"] <= 1 and 0 < res["sample_entropy"] < np.log(16) and res["entropy_tau"] > 0
    with Image.open(res["rmd_plot"]) as image:
        assert res["rmd_plot"] == str(tmp_path / "m_rmd.png") and image.format == "PNG"
    with open(tmp_path / "m.json") as f:
        assert json.load(f)["toppr_f1"] == res["toppr_f1"]
    # each metric against its own computation from the features the report used
    space = metrics.ClassifierSpace(glob.glob(str(tmp_path / "cache" / "synthetic_classifier*.pt"))[0], "cpu")
    g = space.extract(evaluate.open_images(str(tmp_path / "s.npz")), 64)["pool"]
    ref = space.extract(evaluate.synthetic_images(170, 1, 16), 64)["pool"]
    assert res["rmd_top1"] == pytest.approx(metrics.top_mean(metrics.relative_mahalanobis(g, ds.labels)), rel=1e-6)
    assert res["toppr_f1"] == pytest.approx(metrics.top_pr(ref, g)[2], rel=1e-9)
    with torch.no_grad():
        z = vq.eval().encode(torch.from_numpy(ds.images_uint8()).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert res["sample_entropy"] == pytest.approx(metrics.sample_entropy([z], vq.quantize.embedding.weight,
                                                                         res["entropy_tau"]), rel=1e-5)
    assert len([f for f in os.listdir(tmp_path / "cache") if f.startswith("synthetic_classifier")]) == 1
    # samples that are the training images themselves: every one is memorised (nearest distance ~0)
    again = evaluate.main(base + ["--train", str(tmp_path / "s.npz")])
    assert again["memorisation_ratio"] == 1.0 and again["ref_cache"] == "hit"
    assert again["classifier_val_accuracy"] == res["classifier_val_accuracy"]  # the cached classifier, reused
    assert set(again["skipped"]) == {"sample_entropy"} and "entropy_vq" in again["skipped"]["sample_entropy"]
    none = evaluate.main(base + ["--diversity_features=none"])
    assert none["diversity_space"] is None and "memorisation_ratio" not in none and "rmd_top1" not in none
    assert none["skipped"]["rmd_top1"] == "--diversity_features none"


def test_classifier_is_is_the_is_formula_on_its_softmax(tmp_path):
    from data import SyntheticShapes
    torch.manual_seed(0)
    net = metrics.SmallCNN(10, 16)
    with torch.no_grad():
        net.head.weight.normal_(0, 300)  # the untrained features barely vary: large weights spread the softmax
    torch.save({"model": net.state_dict(), "resolution": 16, "num_classes": 10, "val_accuracy": 0.5}, tmp_path / "c.pt")
    images = SyntheticShapes(size=40, resolution=16, seed=5).images_uint8()
    np.savez(tmp_path / "s.npz", images)
    res = evaluate.main(["--samples", str(tmp_path / "s.npz"), "--classifier_path", str(tmp_path / "c.pt"),
                         "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--is_splits=4",
                         "--synthetic_ref_size=20"])
    with torch.no_grad():
        p = net.eval()(torch.from_numpy(images))[1].double().softmax(1).numpy()
    # exp(E_x KL(p(y|x) || p(y))) on each of 4 equal splits, p(y) the split's mean prediction
    direct = [np.exp((q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean()) for q in np.split(p, 4)]
    assert res["is_classifier"] == pytest.approx(np.mean(direct), rel=1e-6) and res["is_classifier"] > 1.5
    assert res["is_classifier_std"] == pytest.approx(np.std(direct), rel=1e-5, abs=1e-9)
    assert res["is"] is None and res["is_splits"] == "4 equal splits"  # never under the Inception IS's name


def test_evaluate_cli_on_a_folder(tmp_path):
    import subprocess
    import sys
    from PIL import Image
    from data import SyntheticShapes
    ds = SyntheticShapes(size=12, resolution=16, seed=3)
    os.makedirs(tmp_path / "imgs")
    for i, img in enumerate(ds.images_uint8()):
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i:03d}.png")
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--samples", str(tmp_path / "imgs"),
           "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--classifier_size=100",
           "--classifier_epochs=1", "--synthetic_ref_size=30", "--out", str(tmp_path / "r.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "synthetic-classifier" in p.stdout and "fid" in p.stdout
    with open(tmp_path / "r.json") as f:
        report = json.load(f)
    assert report["num_samples"] == 12 and report["feature_space"] == "synthetic-classifier"
    assert "class_accuracy" not in report  # a flat folder has no labels
    p = subprocess.run(cmd + ["--bogus_key=1"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert p.returncode != 0 and "bogus_key" in p.stderr


def test_evaluate_skips_what_too_few_samples_cannot_measure(tmp_path):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=5, resolution=16, seed=5)
    args = ["--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--classifier_size=100",
            "--classifier_epochs=1", "--synthetic_ref_size=30"]
    for n in (1, 5):  # 1 sample crashed in scipy's sqrtm; 5 gave FID 0.087 and IS 1.0 (splits of one sample)
        np.savez(tmp_path / f"s{n}.npz", ds.images_uint8()[:n], ds.labels[:n])
        res = evaluate.main(["--samples", str(tmp_path / f"s{n}.npz"), *args])
        assert res["fid"] is res["is_classifier"] is None and 0 <= res["class_accuracy"] <= 1
        assert res["skipped"]["fid"] == f"{n} samples and 30 reference images, fewer than the 96 feature dimensions: " \
            "each set needs as many"
        assert res["skipped"]["is_classifier"] == f"{n} samples in 10 splits: each split needs 2 at least"
        assert (res["precision"] is None) == (n <= 3) == ("precision" in res["skipped"])
    assert fid.unmeasurable(10000, None, {"fid": 2048}, split_size=5000) == {}  # ADM's rule: 2 chunks of 5000
    assert fid.unmeasurable(3, None, {}, split_size=1) == {"is": "3 samples in 3 splits: each split needs 2 at least",
                                                           "precision": "3 samples: k=3 needs more than 3 of each",
                                                           "recall": "3 samples: k=3 needs more than 3 of each"}
    assert set(fid.unmeasurable(2047, 50000, {"fid": 2048, "sfid": 2023})) == {"fid"}


def test_evaluate_caches_and_report_are_written_whole_and_unreadable_caches_made_again(tmp_path, capsys):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=12, resolution=16, seed=5)
    np.savez(tmp_path / "s.npz", ds.images_uint8(), ds.labels)
    classifier, report = tmp_path / "classifier.pt", tmp_path / "report.json"
    args = ["--samples", str(tmp_path / "s.npz"), "--classifier_path", str(classifier), "--cache_dir",
            str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--classifier_size=100",
            "--classifier_epochs=1", "--synthetic_ref_size=30", "--out", str(report)]
    # a kill while the classifier is written: torch.save blocks writing into a FIFO, so the kill lands mid-write
    os.mkfifo(f"{classifier}.tmp")
    proc = subprocess.Popen([sys.executable, "evaluate.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        with open(os.open(f"{classifier}.tmp", os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as fifo:
            partial = wait_until(lambda: fifo.read(4096), proc)
            proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert partial.startswith(b"PK") and not classifier.exists()  # the final name was never written
    os.remove(f"{classifier}.tmp")
    with open(f"{classifier}.tmp", "wb") as f:  # what the kill leaves on a real disk
        f.write(partial)
    first = evaluate.main(args)  # trains it again, as if absent
    assert classifier.exists() and not os.path.exists(f"{classifier}.tmp") and json.loads(report.read_text()) == first
    # caches cut short (a copy, or a kill in a version that wrote in place): made again, said once
    for path in (first["ref_cache_path"], str(classifier)):  # the features, then the classifier (and its features)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        capsys.readouterr()
        again = evaluate.main(args)
        out = capsys.readouterr().out
        assert out.count("is unreadable") == out.count(f"the cache {path} is unreadable (") == 1, out
        assert again["ref_cache"] == "miss" and again["precision"] == first["precision"]
        assert again["classifier_val_accuracy"] == first["classifier_val_accuracy"]  # retrained from the same seed
    # a full disk while the report is written: the previous report stays whole, and the error names the file

    def file_size_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
    before = report.read_text()
    result = run([sys.executable, "evaluate.py", *args], check=False, preexec_fn=file_size_limit)
    assert result.returncode == 1 and result.stderr.startswith(f"error: cannot write {report}: File too large")
    assert "Traceback" not in result.stderr and report.read_text() == before and not os.path.exists(f"{report}.tmp")


def test_clip_score_matches_a_direct_computation(tmp_path):
    import clip
    ref = tiny_clip(tmp_path / "clip.pt", torchscript=False)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 24, 24, 3), dtype=np.uint8)
    prompts = [f"a photo of {w}" for w in ("a cat", "a dog", "cafés", "red", "blue", "two birds", "the sea")]
    np.savez(tmp_path / "s.npz", images)
    model, preprocess = text.load_clip(str(tmp_path / "clip.pt"))
    score = metrics.clip_score(evaluate.open_images(str(tmp_path / "s.npz")), prompts, model, preprocess, 3, "cpu")
    cos = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            logits, _ = ref(preprocess(Image.fromarray(image))[None], clip.tokenize([prompt]))
            cos.append(logits.item() / ref.logit_scale.exp().item())
    cos = np.array(cos)
    assert (cos < 0).any() and (cos > 0).any()  # the clamp at 0 matters here
    assert score == pytest.approx(np.mean(np.maximum(100 * cos, 0)), rel=1e-5)


def test_classifier_space_of_a_class_folder_learns_the_train_split_and_never_reads_held_out_images(tmp_path,
                                                                                                      monkeypatch):
    import data
    study.write_digits(tmp_path / "d", per_class=12, held_out=3)
    train_dir, held = tmp_path / "d" / "train", tmp_path / "d" / "heldout"
    train_files = {str(p) for p in train_dir.glob("*/*.png")}
    held_files = {str(p) for p in held.glob("*/*.png")}
    samples = np.stack([np.asarray(data.load_image(f)) for f in sorted(held_files)])  # made-up samples: 30 images
    np.savez(tmp_path / "s.npz", samples, np.arange(len(samples)) // 3)
    # every image read, under the phase of evaluate.py that read it
    phase, reads, load_image = ["samples"], [], data.load_image

    def recorded(f, name):
        def wrapper(*a, **kw):
            phase.append(name if name != "reference" else a[7])  # reference's `what`: ref or train
            try:
                return f(*a, **kw)
            finally:
                phase.pop()
        return wrapper
    monkeypatch.setattr(data, "load_image", lambda f: reads.append((phase[-1], str(f))) or load_image(f))
    monkeypatch.setattr(evaluate, "classifier_source", recorded(evaluate.classifier_source, "classifier"))
    monkeypatch.setattr(metrics.ClassifierSpace, "__init__", recorded(metrics.ClassifierSpace.__init__, "classifier"))
    monkeypatch.setattr(evaluate, "reference", recorded(evaluate.reference, "reference"))
    args = ["--samples", str(tmp_path / "s.npz"), "--ref", str(held), "--train", str(train_dir), "--features",
            "classifier", "--classifier_epochs=2", "--diversity_features=pixels", "--cache_dir",
            str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--out", str(tmp_path / "m.json")]
    res = evaluate.main(args)
    read = lambda name: {f for p, f in reads if p == name}
    assert read("ref") == held_files and res["num_ref"] == 30  # the reference: the held-out images, all, only
    assert read("classifier") == read("train") == train_files  # the classifier and memorisation: the train split
    assert not {f for p, f in reads if p not in ("ref",)} & held_files  # no other phase reads a held-out image
    assert {p for p, _ in reads} == {"ref", "classifier", "train"}
    assert res["feature_space"] == "folder-classifier" and res["classifier_data"] == str(train_dir)
    assert str(train_dir) in res["feature_space_detail"] and res["diversity_space"] == "pixels"
    assert 0 <= res["class_accuracy"] <= 1 and res["fid"] is None  # 30 samples < 96 dimensions: skipped, named
    # the samples are the held-out images: none is a training image (in pixels, not within 0.12 of one)
    assert res["memorisation_ratio"] == 0 and res["avg_l2_top5"] > 0.12
    cached = glob.glob(str(tmp_path / "cache" / "folder_classifier_*.pt"))
    ck = torch.load(cached[0], weights_only=True)
    assert len(cached) == 1 and ck["num_val"] == 12 and ck["source"] == str(train_dir)  # a tenth of 120, held out
    # cached by content: a copy of the folder reuses it, reading no training image; a changed image trains anew
    shutil.copytree(train_dir, tmp_path / "copy")
    reads.clear()
    again = evaluate.main(args[:5] + [str(tmp_path / "copy")] + args[6:])
    assert not read("classifier") and again["classifier_val_accuracy"] == res["classifier_val_accuracy"]
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(sorted((tmp_path / "copy").glob("*/*.png"))[0])
    evaluate.main(args[:5] + [str(tmp_path / "copy")] + args[6:])
    assert len(glob.glob(str(tmp_path / "cache" / "folder_classifier_*.pt"))) == 2
    # one clear error each, before any work
    flat, few, other = tmp_path / "flat", tmp_path / "few", tmp_path / "other"
    shutil.copytree(train_dir / "3", flat)
    shutil.copytree(train_dir, few)
    for f in sorted((few / "7").glob("*.png"))[3:]:
        os.remove(f)
    shutil.copytree(held, other)
    os.rename(other / "9", other / "nine")
    for bad, message in [(["--train", str(flat)], "has images outside class subfolders"),
                         (["--train", str(few)], "class '7' has 3 images; the classifier needs 10 of each class"),
                         (["--ref", str(other)], "has the classes ['0', '1', '2', '3', '4', '5', '6', '7', '8', "
                                                 "'nine'], the classifier's"),
                         (["--train", ""], "ref '" + str(held) + "' has the classes")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate.main(args + bad)


# -----------------------------------------------------------------------------
# study.py


STUDY_EVAL = ("--train=synthetic --synthetic_train_size=64 --synthetic_ref_size=100 --classifier_size=200 "
              "--classifier_epochs=1 --progress=False --device=cpu")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A 2-run study (clean, eta 10%) of 2 training steps, 100 samples at one scale (FID needs as many as the 96
    feature dimensions): (its arguments, out_dir, rows)."""
    out = tmp_path_factory.mktemp("study")
    args = [f"--out_dir={out}", "--runs=clean,eta10", "--cfg_scales=2", "--samplers=dpm++3", "--num_samples=100",
            "--train_args=" + " ".join(TINY + ["--max_steps=2"]), f"--eval_args={STUDY_EVAL} --cache_dir={out}/cache"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        rows = study.main(args)
    return args, out, rows


def test_study_trains_each_run_and_writes_the_table_and_plots(tiny_study):
    _, out, rows = tiny_study
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["run", "eta", "sampler", "cfg_scale", "num_samples", "feature_space", "seeds",
                              *[c for k in study.METRICS for c in (k, k + "_seed_std")], "beyond_noise"]
    assert {"rmd_top1", "sample_entropy", "toppr_f1"} <= set(table[0])  # the paper's diversity metrics have columns
    assert [(r["run"], r["eta"], r["sampler"], r["cfg_scale"], r["num_samples"]) for r in table] == \
        [("clean", "0.0", "dpm++3", "2.0", "100"), ("eta10", "10.0", "dpm++3", "2.0", "100")]
    report = json.loads((out / "eta10" / "samples_dpm++3_cfg2.0_n100_metrics.json").read_text())
    for key in ("fid", "is_classifier", "precision", "recall", "class_accuracy", "memorisation_ratio", "avg_l2_top5",
                "rmd_top1"):
        assert float(table[1][key]) == report[key] == rows[1][key], key  # evaluate.py's numbers, every metric
    assert table[1]["feature_space"] == "synthetic-classifier" and table[1]["is"] == table[1]["sfid"] == ""
    markdown = (out / "results.md").read_text()
    assert "| eta10 | 10 | dpm++3 | 2 | 100 |" in markdown and "IS (classifier) ↑" in markdown
    assert "sFID" not in markdown
    # the runs are what their names say
    assert json.loads((out / "eta10" / "corruption.json").read_text())["eta"] == 0.1
    assert not os.path.exists(out / "clean" / "corruption.json")
    for png, size in [("metrics_vs_eta.png", None), ("guidance.png", None), ("grids.png", (2 * 280, 360))]:
        with Image.open(out / png) as image:
            assert image.format == "PNG" and (size is None or image.size == size), png
            image.verify()


def test_digits_export_splits_held_out_images_and_trains_through_image_folder(tmp_path):
    from sklearn.datasets import load_digits
    study.main([f"--export_digits={tmp_path / 'd3'}", "--digits_per_class=3", "--digits_held_out=2"])
    study.write_digits(tmp_path / "d5", per_class=5, held_out=2)
    files = lambda root, split: {p.relative_to(root / split) for p in (root / split).glob("*/*.png")}
    train3, held3 = files(tmp_path / "d3", "train"), files(tmp_path / "d3", "heldout")
    assert len(train3) == 30 and len(held3) == 20 and {p.parent.name for p in train3} == set("0123456789")
    assert not {p.name for p in train3} & {p.name for p in held3}  # no image is in both
    assert train3 <= files(tmp_path / "d5", "train") and held3 == files(tmp_path / "d5", "heldout")  # nested
    digits = load_digits()
    some = sorted(train3)[0]
    index = int(some.stem)
    assert digits.target[index] == int(some.parent.name)
    with Image.open(tmp_path / "d3" / "train" / some) as image:
        assert image.mode == "L" and image.size == (16, 16)
        small = np.asarray(image.resize((8, 8), Image.BOX), dtype=np.float64)  # back to the 8x8 grid, roughly
    assert np.corrcoef(small.ravel(), digits.images[index].ravel())[0, 1] > 0.9
    train(tmp_path / "run", f"--data_path={tmp_path / 'd3' / 'train'}", "--flip=False", "--max_steps=1",
          "--grid_steps=2")
    assert "10 classes" in (tmp_path / "run" / "log.txt").read_text()


def test_study_aggregates_seeds_and_marks_what_is_beyond_the_noise(tmp_path):
    def row(run, seed, fid, recall):
        return dict(dict.fromkeys(study.METRICS), run=run, seed=seed, eta=5.0 if run == "eta5" else 0.0,
                    sampler="dpm++50", cfg_scale=2.0, num_samples=100, feature_space="x", fid=fid, recall=recall,
                    is_classifier_std=0.1)
    rows = [row("clean", 0, 10.0, 0.50), row("clean", 1, 10.4, 0.60), row("clean", 2, 9.8, 0.40),
            row("eta5", 0, 14.0, 0.52), row("eta5", 1, 14.5, 0.45), row("eta5", 2, 13.9, 0.58),
            row("cep-u", 0, 9.0, 0.5)]
    clean, eta5, cep = study.aggregate(rows)
    assert (clean["seeds"], eta5["seeds"], cep["seeds"]) == (3, 3, 1)
    assert eta5["fid"] == pytest.approx(14.133333) and eta5["fid_seed_std"] == pytest.approx(np.std([14, 14.5, 13.9],
                                                                                                  ddof=1))
    assert scipy.stats.ttest_ind([14, 14.5, 13.9], [10, 10.4, 9.8], equal_var=False).pvalue < 0.05
    assert eta5["beyond_noise"] == "fid"  # recall's difference is inside the spread
    assert clean["beyond_noise"] == cep["beyond_noise"] == "" and cep["fid_seed_std"] is None  # one seed: no test
    study.write_table([clean, eta5, cep], str(tmp_path / "r"))
    markdown = (tmp_path / "r.md").read_text()
    assert "is_classifier_std" in (tmp_path / "r.csv").read_text() and " std" not in markdown.split("\n")[3]
    assert "| eta5 | 5 | dpm++50 | 2 | 100 | 14.13 ± 0.32 * |" in markdown and "| cep-u | 0 | dpm++50 | 2 | 100 | 9 |" in \
        markdown


def test_study_digits_sweeps_n_against_the_held_out_images_in_one_classifier_space(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main([f"--out_dir={tmp_path}", "--digits=5,10", "--digits_held_out=10", "--runs=clean",
                       "--samplers=dpm++2", "--cfg_scales=2", "--num_samples=100",
                       "--train_args=--model=DiT-Ti/8 --global_batch_size=8 --num_workers=0 --grid_steps=2 "
                       "--max_steps=2", "--eval_args=--classifier_epochs=1 --diversity_features=pixels "
                       f"--progress=False --device=cpu --cache_dir={tmp_path / 'cache'}"])
    assert [(r["run"], r["n"]) for r in rows] == [("clean", 5), ("clean", 10)]
    for n in (5, 10):
        report = json.loads((tmp_path / f"n{n}" / "clean" / "samples_dpm++2_cfg2.0_n100_metrics.json").read_text())
        assert report["ref"] == str(tmp_path / f"n{n}" / "heldout") and report["num_ref"] == 100
        assert report["config"]["train"] == str(tmp_path / f"n{n}" / "train")  # memorisation: the n-image split
        # one classifier for every n, of the whole training split: the FIDs of different n are comparable
        assert report["classifier_data"] == str(tmp_path / "digits" / "train")
        assert report["feature_space"] == "folder-classifier" and report["diversity_space"] == "pixels"
        assert len(list((tmp_path / f"n{n}" / "train").glob("*/*.png"))) == 10 * n
    assert len(glob.glob(str(tmp_path / "cache" / "folder_classifier_*.pt"))) == 1
    assert "| clean | 5 | 0 | dpm++2 | 2 | 100 |" in (tmp_path / "results_vs_n.md").read_text()
    with Image.open(tmp_path / "metrics_vs_n.png") as image:
        assert image.format == "PNG"


def test_study_reuses_what_exists_and_sweeps_guidance_scales(tiny_study, monkeypatch):
    args, out, _ = tiny_study
    done = [out / "clean" / name for name in ("ckpt.pt", "samples_0000002.png", "samples_dpm++3_cfg2.0_n100.npz",
                                               "samples_dpm++3_cfg2.0_n100_metrics.json")]
    before = [os.path.getmtime(p) for p in done]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main(args + ["--runs=clean", "--cfg_scales=2,4"])
    assert [os.path.getmtime(p) for p in done] == before  # not retrained, resampled or re-evaluated
    assert "ckpt.pt is at step 2, max_steps=2: nothing to train" in (out / "clean" / "log.txt").read_text()
    assert [(r["run"], r["cfg_scale"]) for r in rows] == [("clean", 2.0), ("clean", 4.0)]
    assert np.load(out / "clean" / "samples_dpm++3_cfg4.0_n100.npz")["arr_0"].shape == (100, 16, 16, 3)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_study_sweeps_a_checkpoint_with_two_samplers_through_torchrun(tiny_study, monkeypatch):
    args, out, _ = tiny_study
    log = (out / "eta10" / "log.txt").read_text()
    reused = out / "eta10" / "samples_dpm++3_cfg2.0_n100.npz"
    before = os.path.getmtime(reused)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main(args + [f"--ckpt={out}/eta10/ckpt.pt", "--samplers=dpm++3,ddpm4", "--nproc=2"])
    assert (out / "eta10" / "log.txt").read_text() == log and os.path.getmtime(reused) == before  # trains nothing
    assert [(r["run"], r["sampler"], r["eta"]) for r in rows] == [("eta10", "dpm++3", None), ("eta10", "ddpm4", None)]
    assert rows[1]["num_samples"] == 100 and np.isfinite(rows[1]["fid"])


def test_study_runs_name_the_papers_baselines():
    assert study.run_flags("eta5-random") == (5.0, ["--corrupt=0.05", "--corrupt_mode=random"])
    assert study.run_flags("ls") == (0.0, ["--label_smoothing=0.1"]) and study.run_flags("dropout")[0] == 0.0
    assert "--cep_fixed=0.05" in study.run_flags("cep-u-fixed")[1]
    assert study.run_flags("cep-u4.5") == (0.0, ["--cep", "--cep_type=uniform", "--cep_scale=4.5"])
    assert study.run_flags("cep-g2")[1][1:] == ["--cep_type=gaussian", "--cep_scale=2.0"]
    assert study.on_eta_axis({"run": "eta5"}) and not study.on_eta_axis({"run": "eta5-random"})
    train_keys = set(re.findall(r"^(\w+) = ", open(os.path.join(ROOT, "train.py")).read(), re.M))
    flags = {f[2:].split("=")[0] for _, args in study.RUNS.items() for f in args}
    assert flags <= train_keys and flags | {"corrupt", "corrupt_mode"} <= study.OWNED["train.py"]
    for bad in ("eta", "cep-u0", "cep-x2"):
        with pytest.raises(ValueError, match="cep-u-fixed"):
            study.run_flags(bad)


def test_study_downstream_stage_adapts_each_run_and_tables_it(tiny_study, monkeypatch):
    args, out, _ = tiny_study
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study.main(args + ["--adapters=controlnet-mask", "--adapt_args=--max_steps=1 --synthetic_scale=0.6",
                       "--downstream_eval_args=--classifier_size=200 --classifier_epochs=1 --progress=False "
                       f"--device=cpu --cache_dir={out}/cache"])
    with open(out / "downstream.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["eta"], r["sampler"], r["num_samples"]) for r in table] == \
        [("clean", "0.0", "controlnet-mask", "100"), ("eta10", "10.0", "controlnet-mask", "100")]
    for run in ("clean", "eta10"):
        state = torch.load(out / run / "controlnet-mask" / "ckpt.pt", weights_only=True)
        assert state["config"]["init"] == str(out / run / "ckpt.pt") and state["config"]["synthetic_scale"] == 0.6
        assert state["config"]["cep"] is False  # CEP is not carried into the adaptation unless asked
    assert "adapted with" in (out / "downstream.md").read_text()
    with Image.open(out / "downstream_vs_eta.png") as image:
        assert image.format == "PNG"


def test_study_distils_each_run_and_tables_the_students_beside_the_teachers(tiny_study, monkeypatch):
    args, out, _ = tiny_study
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main(args + ["--distill_steps=1,2", "--distill_args=--max_steps 2 --ema_decay 0.95"])
    assert sorted((r["run"], r["sampler"]) for r in rows) == [(run, s) for run in ("clean", "eta10")
                                                              for s in ("dpm++3", "lcm1", "lcm2")]
    assert all(np.isfinite(r["fid"]) and r["num_samples"] == 100 for r in rows)
    state = torch.load(out / "eta10" / "lcm" / "ckpt.pt", weights_only=True)
    assert state["consistency"]["teacher"] == str(out / "eta10" / "ckpt.pt") and state["config"]["corrupt"] == 0.1
    assert os.path.isfile(out / "eta10" / "lcm" / "samples_lcm2_cfg2.0_n100_metrics.json")


@pytest.mark.parametrize("arg, message", [
    ("--distill_steps=4x", "distill_steps"), ("--distill_args=--teacher a.pt", "set teacher"),
    ("--adapters=lora-canny", "lora-canny"), ("--adapt_args=--control canny", "set control"),
    ("--runs=clean,eta150", "eta150"), ("--runs=cep", "'cep'"), ("--samplers=dpm50", "dpm50"),
    ("--train_args=--max_steps 9 --corrupt 0.1", "set corrupt"), ("--sample_args=--cfg_scale 2", "set cfg_scale"),
    ("--eval_args=--reff synthetic", "reff"), ("--ckpt=/nonexistent/ckpt.pt", "not found"),
    ("--seeds=0,0", "seeds='0,0'"), ("--seeds=a", "seeds='a'")])
def test_study_rejects_bad_settings_before_any_work(tmp_path, arg, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        study.main([f"--out_dir={tmp_path}/study", arg])
    assert not os.path.exists(tmp_path / "study")


def test_study_plots_cep_and_ip_as_reference_lines(tmp_path):
    rows = [dict(dict.fromkeys(study.METRICS), run=run, eta=eta, sampler="dpm++50", cfg_scale=scale, num_samples=100,
                 feature_space="synthetic-classifier", fid=10 + eta - scale, is_classifier=5 + scale,
                 is_classifier_std=0.1, precision=0.5, recall=0.4)
            for run, eta in [("clean", 0.0), ("eta5", 5.0), ("eta20", 20.0), ("cep-u", 0.0), ("ip", 0.0)]
            for scale in (1.5, 4.0)]
    study.plot_metrics_vs_eta(study.aggregate(rows), tmp_path / "eta.png")
    study.plot_guidance(study.aggregate(rows), tmp_path / "guidance.png")
    with Image.open(tmp_path / "eta.png") as image:
        assert image.size == (4 * 4 * 80, int(3.2 * 80))  # a panel per measured metric, none for the stds
    with Image.open(tmp_path / "guidance.png") as image:
        assert image.format == "PNG"


# -----------------------------------------------------------------------------
# gmm.py: the theory


def _spd(rng, d):
    A = rng.standard_normal((d, d))
    return A @ A.T / d + 0.2 * np.eye(d)


def _exact_field(m, S, gamma, ts):
    """Closed-form LS optimum at each time (module docstring): W = s (a^2 S' + s^2 I)^-1, bias = -a W m'."""
    mp, Sp = gmm.generated(m, S, gamma, "r1")
    a, s = np.exp(-ts), np.sqrt(-np.expm1(-2 * ts))
    Ws = np.array([si * np.linalg.inv(ai**2 * Sp + si**2 * np.eye(len(m))) for ai, si in zip(a, s)])
    return Ws, -a[:, None] * np.einsum("tij,j->ti", Ws, mp)


def _pushed_moments(Ws, bs, ts, d):
    # the ODE is affine in x, so pushing 0 and the unit vectors gives the generated N(0, I) -> N(mean, A A^T) exactly
    y = gmm.generate(Ws, bs, ts, np.vstack([np.zeros(d), np.eye(d)]))
    A = (y[1:] - y[0]).T
    return y[0], A @ A.T


def test_w2_general_formula_matches_sqrtm_and_identity_case():
    rng = np.random.default_rng(0)
    d = 4
    m1, m2, S1, S2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
    r = scipy.linalg.sqrtm(S2).real
    ref = ((m1 - m2) ** 2).sum() + np.trace(S1 + S2 - 2 * scipy.linalg.sqrtm(r @ S1 @ r).real)
    assert gmm.w2sq(m1, S1, m2, S2) == pytest.approx(ref, rel=1e-8)
    assert gmm.w2sq(m1, S1, m2, S2) == pytest.approx(gmm.w2sq(m2, S2, m1, S1), rel=1e-8)
    assert gmm.w2sq_to_standard(m1, m2, S2) == pytest.approx(gmm.w2sq(m1, np.eye(d), m2, S2), rel=1e-8)
    # d = 1: W2 is the distance of the quantile functions, |m1-m2|^2 + (s1-s2)^2
    assert gmm.w2sq(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[0.25]])) == pytest.approx(4 + 1.5**2)


def test_w2_is_the_cost_of_the_optimal_map_and_other_couplings_cost_more():
    rng = np.random.default_rng(1)
    d = 3
    m1, m2, S1, S2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
    r1, r1i = scipy.linalg.sqrtm(S1).real, np.linalg.inv(scipy.linalg.sqrtm(S1).real)
    T = r1i @ scipy.linalg.sqrtm(r1 @ S2 @ r1).real @ r1i  # the Brenier map N(m1,S1) -> N(m2,S2)
    np.testing.assert_allclose(T @ S1 @ T.T, S2, atol=1e-10)
    cost = lambda T: ((m1 - m2) ** 2).sum() + np.trace(S1 - 2 * T @ S1 + T @ S1 @ T.T)  # E|X - (m2 + T(X - m1))|^2
    w = gmm.w2sq(m1, S1, m2, S2)
    assert cost(T) == pytest.approx(w, rel=1e-8)
    r2 = scipy.linalg.sqrtm(S2).real
    for _ in range(50):  # every linear coupling S2^1/2 Q S1^-1/2 also pushes S1 to S2; none is cheaper
        Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        assert cost(r2 @ Q @ r1i) >= w - 1e-9


def test_entropy_formula_vs_monte_carlo_and_rank_one_lemma():
    rng = np.random.default_rng(2)
    d = 5
    m, S = rng.standard_normal(d), _spd(rng, d)
    x = rng.multivariate_normal(m, S, size=200_000)
    mc = -scipy.stats.multivariate_normal(m, S).logpdf(x).mean()
    assert gmm.entropy(S) == pytest.approx(mc, abs=0.02)
    gamma = 0.7
    kappa = gamma**2 / (1 + gamma**2)
    gain = gmm.entropy(gmm.generated(m, S, gamma, "r1")[1]) - gmm.entropy(S)
    assert gain == pytest.approx(0.5 * np.log1p(kappa * m @ np.linalg.solve(S, m)), rel=1e-10)
    gain_iso = gmm.entropy(gmm.generated(m, S, gamma, "iso")[1]) - gmm.entropy(S)
    lam = np.linalg.eigvalsh(S)
    assert gain_iso == pytest.approx(0.5 * np.log1p(kappa * (m @ m) / lam).sum(), rel=1e-10)


def test_mean_shrinkage_w2_term_vs_monte_carlo():
    # E|m/(1+g^2) - mu|^2 = rho^2 d/n + (1-rho)^2 |mu|^2 with rho = 1/(1+g^2): the source of the Omega(g^2 d/n) gain
    rng = np.random.default_rng(3)
    d, n, gamma = 8, 20, 0.3
    mu = gmm.class_means(rng, 1, d, 2.0)
    m, S = gmm.training_moments(rng, mu, [n], 40_000)
    rho = 1 / (1 + gamma**2)
    mp = gmm.generated(m, S, gamma, "r1")[0]
    mc = ((mp - mu) ** 2).sum(-1).mean()
    assert mc == pytest.approx(rho**2 * d / n + (1 - rho) ** 2 * 4.0, rel=0.02)
    assert ((m - mu) ** 2).sum(-1).mean() == pytest.approx(d / n, rel=0.02)
    assert np.mean(np.trace(S, axis1=-2, axis2=-1)) == pytest.approx(d * (n - 1) / n, rel=0.01)


def test_least_squares_fit_matches_closed_form_optimum():
    rng = np.random.default_rng(4)
    d, n = 3, 30
    x0 = gmm.class_means(rng, 1, d, 2.0)[0] + rng.standard_normal((n, d))
    m, S = gmm.moments(x0)
    ts = np.array([0.05, 0.5, 2.0])
    for gamma in (0.0, 1.0):
        Ws, bs = gmm.fit_denoiser(rng, x0, np.eye(4)[1], gamma, ts, 4000)
        We, be = _exact_field(m, S, gamma, ts)
        np.testing.assert_allclose(Ws, We, atol=0.03)
        np.testing.assert_allclose(bs, be, atol=0.03)
    # the isotropic form is not the optimum: its W differs by far more than the fitting noise
    Sp = gmm.generated(m, S, 1.0, "iso")[1]
    a, s = np.exp(-0.5), np.sqrt(-np.expm1(-1.0))
    assert np.abs(s * np.linalg.inv(a**2 * Sp + s**2 * np.eye(d)) - Ws[1]).max() > 0.1


def test_ode_with_exact_field_generates_the_closed_form():
    rng = np.random.default_rng(5)
    d = 3
    m, S = rng.standard_normal(d), _spd(rng, d)
    mr, Sr = gmm.generated(m, S, 0.6, "r1")
    errs = []
    for steps in (40, 160):  # Heun is second order: 4x the steps, ~16x less error
        ts = gmm.ode_times(steps)
        mg, Sg = _pushed_moments(*_exact_field(m, S, 0.6, ts), ts, d)
        errs.append(max(np.abs(mg - mr).max(), np.abs(Sg - Sr).max()))
    assert errs[1] < 1.5e-3 and errs[1] < errs[0] / 8


def test_simulated_generator_matches_exact_ls_form_not_isotropic():
    rng = np.random.default_rng(6)
    d, n = 3, 40
    x0 = gmm.class_means(rng, 1, d, 2.0)[0] + rng.standard_normal((n, d))
    m, S = gmm.moments(x0)
    ts = gmm.ode_times(60)
    for gamma in (0.0, 0.7):
        mg, Sg = _pushed_moments(*gmm.fit_denoiser(rng, x0, np.eye(2)[0], gamma, ts, 1500), ts, d)
        mr, Sr = gmm.generated(m, S, gamma, "r1")
        np.testing.assert_allclose(mg, mr, atol=0.05)
        np.testing.assert_allclose(Sg, Sr, atol=0.05)
        if gamma:
            assert np.abs(Sg - gmm.generated(m, S, gamma, "iso")[1]).max() > 0.5
            samples = gmm.generate(*gmm.fit_denoiser(rng, x0, np.eye(2)[0], gamma, ts, 300), ts,
                                   rng.standard_normal((20_000, d)))
            assert gmm.w2sq(*gmm.moments(samples), mr, Sr) < 0.02


def test_slight_corruption_helps_w2_severe_hurts_entropy_always_grows():
    rng = np.random.default_rng(7)
    d, sizes = 8, [20, 80]
    mus = gmm.class_means(rng, 2, d, np.sqrt(d))
    m, S = gmm.training_moments(rng, mus, sizes, 2000)
    for form in gmm.FORMS:
        dH_small, dW_small = gmm.gains(mus, m, S, 0.3 / np.sqrt(np.array(sizes)), form)
        dH_big, dW_big = gmm.gains(mus, m, S, 2.0, form)
        assert (dW_small > 0).all() and (dW_big < 0).all()
        assert (dH_small > 0).all() and (dH_big > dH_small).all()


def test_configure_overrides_and_rejects_unknown_keys(monkeypatch):
    monkeypatch.setattr(gmm, "draws", gmm.draws)
    monkeypatch.setattr(gmm, "class_sizes", gmm.class_sizes)
    gmm.configure(["--draws=7", "--class_sizes=(30, 40)"])
    assert gmm.draws == 7 and gmm.class_sizes == (30, 40)
    with pytest.raises(SystemExit, match="nonsense"):
        gmm.configure(["--nonsense=1"])
    with pytest.raises(SystemExit, match="draws"):
        gmm.configure(["--draws=many"])


# -----------------------------------------------------------------------------
# bench.py


def test_forward_flops_match_the_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    import bench
    three_levels = {**TINY_UNET, "channel_mult": (1, 2, 3), "attention_resolutions": (1, 4)}
    for model, size in [(tiny_dit(), 8), (UNet(in_channels=4, **TINY_UNET), 16), (UNet(in_channels=3, **three_levels), 16)]:
        x, t, y = torch.randn(2, model.in_channels, size, size), torch.tensor([1, 999]), torch.tensor([0, 1])
        # the math backend: FlopCounterMode does not count the CPU flash-attention kernel
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
            loss = model(x, t, y).square().mean()
        assert forward.get_total_flops() == 2 * bench.forward_flops(model, size)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as backward:
            loss.backward()
        # a training step as 3 forwards: the backward is 2, less the input gradient of the first layer
        assert 1.9 < backward.get_total_flops() / forward.get_total_flops() <= 2


def test_bench_table_rows_with_and_without_diffusers(tmp_path, monkeypatch, capsys):
    import bench
    args = ["--models=DiT-Ti/8,LDM-S", "--batch_size=2", "--sample_batch_size=1", "--sample_steps=2", "--steps=1",
            "--warmup=0", "--dtypes=float32", "--fid_images=1", f"--csv={tmp_path}/bench.csv"]
    table = bench.main(args)
    out = capsys.readouterr().out
    sample = "sample, dpm++ 2 steps, cfg 4.0"
    assert [row[:2] for row in table] == [
        ["train", "DiT-Ti/8"], ["train", "DiT-Ti/8 (diffusers)"], [sample, "DiT-Ti/8"], ["train", "LDM-S"],
        [sample, "LDM-S"], ["FID Inception features", "Inception-v3 (fid.py)"],
        ["FID Inception features", "Inception-v3 (pytorch-fid)"]], out
    assert all(float(row[6]) > 0 for row in table)
    assert "| train | DiT-Ti/8 (diffusers) | 32x32x4 | 2 | no | float32 |" in out
    assert "ours and diffusers' outputs differ by 0.0e+00" in out and "as fast as diffusers'" in out
    with open(tmp_path / "bench.csv", newline="") as f:
        assert list(csv.reader(f)) == [["task", "model", "input", "batch", "compile", "dtype", "images/s", "TFLOP/s",
                                        "MFU"]] + [list(map(str, row)) for row in table]
    # without diffusers (its import fails): the same table less its row, and a message that says so
    monkeypatch.setitem(sys.modules, "diffusers", None)
    table = bench.main(args[:-2] + ["--fid_images=0"])
    assert [row[:2] for row in table] == [["train", "DiT-Ti/8"], [sample, "DiT-Ti/8"], ["train", "LDM-S"],
                                          [sample, "LDM-S"]]
    assert "diffusers is not installed: the diffusers row of DiT-Ti/8 is skipped" in capsys.readouterr().out


def test_bench_speedups_rows_before_and_after(tmp_path, monkeypatch, capsys):
    """The GPU suite on CPU, on tiny models (and a tiny first stage): every row and note, the CSV and markdown beside
    it, and the batch halved when the eager step runs out of memory. torch.compile runs with the aot_eager backend here, to take seconds (the
    Inductor samples are checked in test_compiled_sampling_gives_the_eager_samples): the compiled path then computes
    the eager arithmetic exactly."""
    import bench
    real_compile, real_step = torch.compile, bench.train_step
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(bench, "AutoencoderKL", lambda: AutoencoderKL(block_out_channels=(32, 32), norm_num_groups=8))

    def train_step(*args):  # a GPU that holds batches of 2 at most
        step = real_step(*args)
        if args[-1] <= 2:
            return step
        def out_of_memory():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return out_of_memory
    monkeypatch.setattr(bench, "train_step", train_step)
    csv_path = tmp_path / "gpu" / "speedups.csv"
    table = bench.main(["--suite=speedups", "--sample_models=DiT-Ti/8", "--graph_models=DiT-Ti/8",
                        "--mfu_model=DiT-Ti/8", "--mfu_batch_size=8", "--batch_size=2", "--sample_batch_size=2",
                        "--sample_steps=2", "--steps=1", "--warmup=0", f"--csv={csv_path}"])
    out = capsys.readouterr().out
    sample = "sample, dpm++ 2 steps, cfg 4.0, AutoencoderKL decode"
    attention = "attention ({}), forward and backward, 3 heads of 64"  # 64: a power of two, nothing to pad
    assert [[row[i] for i in (0, 3, 4, 5)] for row in table] == [
        [sample, 2, "no", "bfloat16"], [sample, 2, "no", "float32"], [sample, 2, "no", "bfloat16"],
        [sample, 2, "default", "bfloat16"],
        ["train", 2, "no", "bfloat16"], ["train", 2, "default", "bfloat16"],  # batch_size: eager, CUDA graphs
        ["train", 2, "no", "bfloat16"], ["train", 2, "default", "bfloat16"],  # the MFU rows, halved twice
        [attention.format("flash_attention"), 8, "no", "bfloat16"], [attention.format("math"), 8, "no", "bfloat16"]], out
    assert all(float(row[6]) > 0 for row in table)
    assert re.search(r"compiled \S+x as fast as eager; from the same seeds, images that differ by 0\.0e\+00", out)
    assert re.search(r"where bfloat16 and float32 eager differ by [1-9]", out)  # bf16 does round
    assert re.search(r"DiT-Ti/8: 50K images take \d+ minutes eager at batch 2 and \d+ compiled at batch 2", out)
    assert "DiT-Ti/8, training at batch 2 (8 did not fit): compiled" in out
    with open(csv_path, newline="") as f:
        assert list(csv.reader(f))[1:] == [list(map(str, row)) for row in table]
    assert (tmp_path / "gpu" / "speedups.md").read_text() == out


def test_bench_attention_kernels_and_padded_head_dim(monkeypatch):
    """DiT-XL/2's heads of 72 padded to 128 with zeros give the unpadded attention exactly; every kernel agrees."""
    import bench
    for name, value in {"mfu_model": "DiT-XL/8", "mfu_batch_size": 2, "steps": 1, "warmup": 0}.items():
        monkeypatch.setattr(bench, name, value)
    rows, notes = bench.attention_rows()
    assert [r["task"].split(",")[0] for r in rows] == [
        "attention (flash_attention)", "attention (math)", "attention (flash_attention", "attention (math"]
    assert all(r["task"].endswith("16 heads of 72") and r["input"] == "16 tokens" for r in rows)
    differences = {n.split(" differs")[0]: float(n.split(" by ")[1].split()[0]) for n in notes}
    assert differences["attention (flash_attention, head dim padded to 128)"] == 0
    assert 0 < differences["attention (math)"] < 1e-2 and differences["attention (math, head dim padded to 128)"] < 1e-2

