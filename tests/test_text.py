"""text.py: CLIP's text transformer against clip-anytorch and transformers' CLIPTextModel, the offline tokenizer."""
import json
import shutil
import sys

import pytest
import torch
from conftest import CLIP_TINY, clip_text_model, clip_tokenizer, rel_close, run, tiny_clip

import text


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
        rel_close(encoder(tokens), expected, rel=1e-5)  # every position, the padding's too: SD attends to all 77
        encoder.pad = 0  # clip's padding: the real tokens' embeddings are the same, the padding's are not
        out = encoder(tokens)
    rel_close(out[real], expected[real], rel=1e-5)
    assert (out[~real] - expected[~real]).abs().max() > 1e-2
    # transformers 4's files: the keys under text_model., in pytorch_model.bin
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "sd", old)
    (old / "text_encoder" / "model.safetensors").unlink()
    torch.save({f"text_model.{k}": v for k, v in ref.state_dict().items()}, old / "text_encoder" / "pytorch_model.bin")
    with torch.no_grad():
        rel_close(text.load_clip_text_encoder(str(old))(tokens), expected, rel=1e-5)
    # what TextEncoder is not: another activation, another vocabulary or padding
    config = json.loads((old / "text_encoder" / "config.json").read_text())
    (old / "text_encoder" / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu")))
    with pytest.raises(ValueError, match="not CLIP's text transformer"):
        text.load_clip_text_encoder(str(old))
    (old / "text_encoder" / "config.json").write_text(json.dumps(config))
    clip_tokenizer(pad_token="<pad>").save_pretrained(old / "tokenizer")
    with pytest.raises(ValueError, match="not CLIP's tokenizer"):
        text.load_clip_text_encoder(str(old))


@pytest.mark.slow
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
