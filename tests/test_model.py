"""model.py: DiT and the LDM U-Net: shapes, init, official and diffusers layouts, guidance, diffusers pipeline
folders."""
import json
import os
import sys

import pytest
import torch
from conftest import (
    DIFFUSERS_UNETS, MANIFESTS, TINY_UNET, diffusers_unet, randomize, rel_close, run, sd_pipeline, tiny_dit
)
from PIL import Image

import text
from model import DiT, DiT_models, UNet, UNet_models
from pipeline import diffusers_to_dit, load_dit, load_model, sample, unet_args, unet_keys
from vae import load_first_stage


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
        rel_close(out, ref(x, t, encoder_hidden_states=c, timestep_cond=guidance_embedding(w) if layout == "lcm" else
                        None).sample, rel=1e-5)
        if layout == "lcm":  # and w matters
            assert (out - ours(x, t, context=c, w=w + 1)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="use_linear_projection"):
        unet_args(dict(ref.config, use_linear_projection=True))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        unet_args(dict(ref.config, time_cond_proj_dim=512))


@pytest.mark.slow
def test_a_pipeline_folder_as_the_paper_released_samples_with_the_checkpoint_script(tmp_path):
    """LDMClassToImagePipeline's layout (the authors' diffusers fork): unet/, class_embedder/, vqvae/, scheduler/."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers import VQModel as DiffusersVQ
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
        rel_close(model(x, t, y), unet.eval()(x, t, encoder_hidden_states=table[y][:, None]).sample, rel=1e-5)
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


@pytest.mark.slow
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
        rel_close(model(x, t, text.tokenize(captions), **(dict(w=w) if lcm else {})), ref, rel=1e-5)
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
    rel_close((ours / 2 + 0.5).clamp(0, 1), theirs, rel=1e-4)
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
