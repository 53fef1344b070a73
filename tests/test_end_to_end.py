"""End to end: latent extraction (data.py), training from the cache or on the fly, text-to-image, decoding in
sample.py."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import SYNTH, extract, logged_losses, make_caption_folder, run, tiny_clip, train
from PIL import Image

import data
import evaluate
import metrics
import text
from vae import load_first_stage


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
                            "--classifier_size=2000", "--classifier_epochs=3", "--synthetic_ref_size=30"])
    model, preprocess = text.load_clip(str(tmp_path / "clip.pt"))
    direct = metrics.clip_score(evaluate.open_images(str(tmp_path / "s.npz")), prompts, model, preprocess, 3, "cpu")
    assert report["clip_score"] == pytest.approx(direct) and report["prompts"] == str(tmp_path / "s_prompts.txt")


@pytest.mark.slow
def test_bert_text_encoder_is_loaded_pretrained_trained_with_the_unet_and_samples_from_prompts(tmp_path):
    """--text_encoder bert, the paper's CC3M setting in miniature: a Hugging Face BERT folder (random weights, a
    vocabulary of the built-in captions' words) loaded as it is, then trained with the U-Net, with swapped captions
    and CEP on its token embeddings."""
    transformers = pytest.importorskip("transformers")
    words = {w for caption in data.SyntheticShapes(64, 8).captions for w in caption.lower().replace(",", " ").split()}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ","] + sorted(words)
    folder = tmp_path / "bert"
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=80))
    bert.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    pretrained = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
    # 3 steps: the U-Net's zero-initialised outputs pass no gradient back to the context in the first two
    args = ["--model=LDM-S", "--text_encoder=bert", f"--bert_path={folder}", "--image_size=8", "--max_steps=3",
            "--grid_steps=2", "--learn_sigma=False", "--corrupt=0.1", "--corrupt_type=swap", "--cep"]
    train(tmp_path / "frozen_by_lr", *args, "--lr=0")
    train(tmp_path / "run", *args)
    for run_dir, same in [("frozen_by_lr", True), ("run", False)]:
        state = torch.load(tmp_path / run_dir / "ckpt.pt", weights_only=True)
        encoder = {k[len("y_embedder.encoder."):]: v for k, v in state["model"].items()
                   if k.startswith("y_embedder.encoder.")}
        assert encoder.keys() == pretrained.keys()  # transformers' names, every one of them
        assert all(torch.equal(encoder[k], v) for k, v in pretrained.items()) == same  # loaded, then trained
    assert state["model_args"]["bert"] == str(folder) and state["model_args"]["context_dim"] == 32
    assert "captions, text encoder: bert, trained" in (tmp_path / "run" / "log.txt").read_text()
    (tmp_path / "prompts.txt").write_text("a large blue star on a red background\na small ring\n")
    run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'run' / 'ckpt.pt'}", "--num_steps=2", "--grid_per_class=2",
         f"--prompts={tmp_path / 'prompts.txt'}", f"--out={tmp_path / 'grid.png'}"])
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 8
