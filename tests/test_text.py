"""text.py: CLIP's text transformer against clip-anytorch and transformers' CLIPTextModel, the offline tokenizer;
BERT's WordPiece tokenizer and encoder against transformers."""
import json
import os
import shutil
import sys

import pytest
import torch
from conftest import CLIP_TINY, ROOT, clip_text_model, clip_tokenizer, rel_close, run, tiny_clip

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


transformers = pytest.importorskip("transformers")

# [PAD] is not id 0 here, as it is in bert-base-uncased, so that the tests see it read from the vocabulary
VOCAB = ["[unused0]", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "dog", "cat", "run", "##ning", "##s",
         "un", "##want", "##ed", ",", ".", "!", "'", "-", "$", "5", "cafe", "naive", "resume", "hello", "world",
         "猫", "狗", "##a", "h", "##e", "##l", "##o", "Hello", "World", "café", "I", "é"]
CAPTIONS = [
    "The dog's running, unwanted un-cats!",
    "Café naïve résumé, cafe\u0301",  # precomposed and combining accents
    "HELLO World\tthe\ncat\u3000a",  # a tab, a newline, an ideographic space
    "猫和狗",  # CJK: a word each; 和 is not in the vocabulary
    "a" * 100 + " " + "a" * 101,  # 100 characters are pieced, 101 are [UNK]
    "xyz dogx $5 hello\x00\u200bworld",  # unmatchable words, a NUL and a zero-width space dropped
    "",
    "the dog " * 20,  # truncated
    "Hello World I é",  # for the cased tokenizer
]
L = 16


@pytest.fixture
def vocab_folder(tmp_path):
    folder = tmp_path / "vocab"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return folder


def tiny_config(**kw):
    return transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, pad_token_id=VOCAB.index("[PAD]"),
                                   **kw)


@pytest.mark.parametrize("lower_case", [True, False])
@pytest.mark.parametrize("reference", ["BertTokenizer", "BertTokenizerLegacy"])
def test_bert_tokenizer_matches_transformers(vocab_folder, lower_case, reference):
    if reference == "BertTokenizer":
        theirs = transformers.BertTokenizer.from_pretrained(vocab_folder, do_lower_case=lower_case)
    else:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
        theirs = BertTokenizerLegacy(str(vocab_folder / "vocab.txt"), do_lower_case=lower_case)
    captions = CAPTIONS
    if not lower_case:  # transformers' two tokenizers disagree on combining accents they keep (only one applies NFC)
        captions = [c.replace("e\u0301", "e") for c in CAPTIONS]
    expected = theirs(captions, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    ids, mask = text.WordPieceTokenizer(vocab_folder / "vocab.txt", L, lower_case)(captions)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (len(captions), L)
    assert ids.tolist() == expected["input_ids"].tolist()
    assert mask.tolist() == expected["attention_mask"].bool().tolist()
    unk = VOCAB.index("[UNK]")
    assert (ids == unk).any() and (ids == VOCAB.index("##want")).any() and not mask.all()  # the cases are exercised


def save_bert(model, folder, weights):
    """A Hugging Face folder as bert-base-uncased's: config.json, vocab.txt, and model.safetensors or
    pytorch_model.bin."""
    model.save_pretrained(folder)
    shutil.copy(os.path.join(os.path.dirname(folder), "vocab", "vocab.txt"), folder)
    if weights == "bin":
        os.remove(folder / "model.safetensors")
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_bert_encoder_matches_transformers(tmp_path, vocab_folder, weights):
    torch.manual_seed(0)
    theirs = transformers.BertModel(tiny_config()).eval()  # with its pooler, which loading drops
    save_bert(theirs, tmp_path / "bert", weights)
    ours, tokenizer = text.load_bert_text_encoder(tmp_path / "bert", context_length=L)
    ours.eval()
    assert ours.width == 32
    ids, mask = tokenizer(CAPTIONS)
    full = torch.randint(6, len(VOCAB), (3, L))  # no padding at all
    for ids, mask in [(ids, mask), (full, torch.ones_like(full, dtype=torch.bool))]:
        with torch.no_grad():
            expected = theirs(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            hidden, out_mask = ours(ids, mask)
            hidden_default, _ = ours(ids)  # the mask from the padding token
        assert hidden.shape == (ids.shape[0], L, 32) and torch.equal(out_mask, mask)
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden_default, expected, atol=1e-5, rtol=1e-5)


def test_bert_loads_pretraining_checkpoint_layout(tmp_path, vocab_folder):
    """bert-base-uncased's own file is a BertForPreTraining's: bert.*, the heads cls.*, LayerNorm.gamma / .beta."""
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    theirs = transformers.BertForPreTraining(tiny_config()).eval()
    save_bert(theirs, tmp_path / "bert", "safetensors")
    state = safetensors.load_file(tmp_path / "bert" / "model.safetensors")
    assert any(k.startswith("cls.") for k in state) and all(k.startswith(("bert.", "cls.")) for k in state)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    old["bert.embeddings.position_ids"] = torch.arange(64)[None]  # a buffer older transformers saved
    safetensors.save_file(old, tmp_path / "bert" / "model.safetensors")
    ours, tokenizer = text.load_bert_text_encoder(tmp_path / "bert", context_length=L)
    ids, mask = tokenizer(CAPTIONS)
    with torch.no_grad():
        expected = theirs.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        torch.testing.assert_close(ours.eval()(ids, mask)[0], expected, atol=1e-5, rtol=1e-5)


def test_bert_safetensors_reader_matches_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "i64": torch.arange(9).view(3, 3), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    safetensors.save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    read = text.read_safetensors(tmp_path / "t.safetensors")
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_bert_state_dict_matches_bert_base_uncased_manifest():
    """bert-base-uncased's encoder (transformers' BertModel without its pooler), tests/manifests."""
    with open(os.path.join(ROOT, "tests", "manifests", "bert_base_uncased_keys.json")) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        ours = text.BertTextEncoder()
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == manifest
    assert ours.width == 768


@pytest.mark.parametrize("missing", ["folder", "config.json", "vocab.txt", "weights"])
def test_bert_missing_file_is_one_line_naming_it(tmp_path, vocab_folder, missing):
    folder = tmp_path / "bert"
    if missing != "folder":
        save_bert(transformers.BertModel(tiny_config()), folder, "safetensors")
        if missing == "weights":
            os.remove(folder / "model.safetensors")
        else:
            os.remove(folder / missing)
    with pytest.raises(FileNotFoundError) as e:
        text.load_bert_text_encoder(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message and "bert-base-uncased" in message
    assert {"folder": "config.json", "weights": "model.safetensors"}.get(missing, missing) in message


def test_bert_is_trainable(tmp_path, vocab_folder):
    save_bert(transformers.BertModel(tiny_config()), tmp_path / "bert", "safetensors")
    ours, tokenizer = text.load_bert_text_encoder(tmp_path / "bert", context_length=L)
    ours.train()
    ids, mask = tokenizer(CAPTIONS)
    hidden, _ = ours(ids, mask)
    (hidden ** 2).mean().backward()
    for name, p in ours.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
