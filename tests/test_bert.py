"""text.py's BERT against transformers: the WordPiece tokenizer, the encoder, loading Hugging Face folders."""
import json
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import text  # noqa: E402

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
