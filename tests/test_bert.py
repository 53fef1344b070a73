"""text.py's BERT against transformers: the WordPiece tokenizer."""
import os
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

