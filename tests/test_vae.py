"""vae.py: KL-f8 and VQ-f4 against diffusers, the key manifests, weight-file errors."""
import json
import os
import sys

import pytest
import torch
from conftest import MANIFESTS, TINY_VAE, randomize, run, save_vae, train
from PIL import Image

from model import DiT_models
from vae import AutoencoderKL, VQModel, load_first_stage


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


@pytest.mark.slow
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
