"""
Text encoders, the condition encoders of text-to-image models. Over CLIP's tokenizer: CLIP's text transformer, frozen
with OpenAI's weights, or the same architecture small and trained from scratch on machines without the weights.
`TextEmbedder` makes one the condition embedder of model.UNet (`UNet(..., y_embedder=TextEmbedder(...))`): caption
tokens in, the cross-attention context out. And BERT with its WordPiece tokenizer, the encoder the paper trains on
CC3M (bert-base-uncased, pre-trained, fully trainable): `load_bert_text_encoder`.

The clip package (clip-anytorch) supplies CLIP's tokenizer (its BPE vocabulary ships inside it: offline) and blocks;
BERT is written here, and reads a Hugging Face folder without transformers or safetensors.
Imports nothing from the project: copy this file into another project as it is.
"""
import json
import os
import unicodedata

import torch
import torch.nn as nn
import torch.nn.functional as F

def tokenize(captions):
    """Captions -> CLIP tokens [n, 77]: start, BPE, end, zero padding; longer captions are cut to 77 tokens. The BPE
    vocabulary ships inside the clip package, so this works offline."""
    import clip
    return clip.tokenize(list(captions), truncate=True)


class TextEncoder(nn.Module):
    """CLIP's text transformer from clip-anytorch's modules, with OpenAI's parameter names, so the text half of a CLIP
    checkpoint loads as it is: token and position embeddings, causally masked pre-LN blocks with heads of 64 channels,
    a final layer norm. Returns the embedding of every token [B, 77, width], as Stable Diffusion conditions on CLIP,
    not CLIP's pooled projection. Randomly initialised as CLIP is; `load_clip_text_encoder` gives OpenAI's weights.

    `pad`: the token that fills the positions after the end token. tokenize() pads with 0, as CLIP; Stable Diffusion
    v1's tokenizer pads with the end token 49407. The causal mask keeps the padding out of the real tokens'
    embeddings, but not out of the padding's own, which the U-Net's cross-attention attends to: a model takes the
    padding it was trained with."""

    def __init__(self, width, layers, vocab_size=49408, context_length=77, pad=0):
        super().__init__()
        from clip.model import LayerNorm, Transformer
        self.width, self.layers, self.pad = width, layers, pad
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.transformer = Transformer(width, layers, max(1, width // 64), attn_mask=mask)
        self.ln_final = LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialisation
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, tokens):
        if self.pad:  # the end token is the highest id (CLIP's argmax convention): after it, padding
            after_end = torch.arange(tokens.shape[1], device=tokens.device) > tokens.argmax(1, keepdim=True)
            tokens = tokens.masked_fill(after_end, self.pad)
        x = self.token_embedding(tokens) + self.positional_embedding
        return self.ln_final(self.transformer(x.transpose(0, 1)).transpose(0, 1))  # clip's blocks are sequence-first


def load_clip(name):
    """OpenAI's CLIP through clip-anytorch, in float32 and eval mode, and its image preprocessing (as clip.load).
    `name` is a checkpoint file (a TorchScript archive as OpenAI ships them, or a state dict), or one of clip's model
    names (ViT-B/32, ViT-L/14, ...), looked up in clip's cache ~/.cache/clip and downloaded there when the machine is
    online. A missing file is one error that names it and where to put it."""
    import clip
    path = name
    if not os.path.isfile(name):
        urls = clip.clip._MODELS
        if name not in urls:
            raise FileNotFoundError(f"CLIP weights {name!r}: no such file, and not one of clip's models "
                                    f"({', '.join(urls)})")
        root = os.path.expanduser("~/.cache/clip")
        path = os.path.join(root, os.path.basename(urls[name]))
        if not os.path.isfile(path):
            try:
                clip.clip._download(urls[name], root)
            except Exception as e:  # no internet: the error says where the file goes
                raise FileNotFoundError(f"CLIP {name} weights not found: {path} does not exist and the download "
                                        f"failed ({e}). Download {urls[name]} and save it as {path}, or pass the "
                                        f"path of the file.") from None
    model, preprocess = clip.load(path, device="cpu", jit=False)
    return model.float().eval(), preprocess


def load_clip_text_encoder(name):
    """The TextEncoder of a CLIP checkpoint (see load_clip), with its weights; or of a diffusers pipeline folder, as
    Stable Diffusion v1's text encoder is saved (load_transformers_text_encoder)."""
    if os.path.isdir(name):
        return load_transformers_text_encoder(name)
    clip_model, _ = load_clip(name)
    encoder = TextEncoder(clip_model.transformer.width, clip_model.transformer.layers, clip_model.vocab_size,
                          clip_model.context_length)
    encoder.load_state_dict({k: v for k, v in clip_model.state_dict().items() if k in encoder.state_dict()})
    return encoder


def text_encoder_from_transformers(config, state_dict, pad_token):
    """The TextEncoder with the weights of transformers' CLIPTextModel (`config`: its config.json as a dict), Stable
    Diffusion v1's text encoder, which is CLIP's text transformer under other names; `pad_token` its tokenizer's
    (tokenizer_pad_token). One explicit key map; separate q, k, v projections -> one in_proj."""
    width, heads = config["hidden_size"], config["num_attention_heads"]
    found = dict(hidden_act=config.get("hidden_act"), head_channels=width // heads, layer_norm_eps=config.get(
        "layer_norm_eps"), mlp_ratio=config["intermediate_size"] / width, context=config["max_position_embeddings"])
    clip_text = dict(hidden_act="quick_gelu", head_channels=64, layer_norm_eps=1e-5, mlp_ratio=4, context=77)
    if found != clip_text:
        raise ValueError(f"this CLIPTextModel is not CLIP's text transformer, which TextEncoder is: it has {found}, "
                         f"CLIP's has {clip_text}")
    names = [("embeddings.token_embedding.", "token_embedding."), ("embeddings.position_embedding.weight",
             "positional_embedding"), ("encoder.layers.", "transformer.resblocks."), ("self_attn.", "attn."),
             ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
             ("mlp.fc2.", "mlp.c_proj."), ("final_layer_norm.", "ln_final.")]
    ours = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")  # transformers 4 saved CLIPTextModel's weights under text_model., 5 not
        if key != "embeddings.position_ids":  # a buffer older transformers saved
            for old, new in names:
                key = key.replace(old, new)
            ours[key] = value
    for key in [k for k in ours if ".q_proj." in k]:
        ours[key.replace(".q_proj.", ".in_proj_")] = \
            torch.cat([ours.pop(key.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"])
    encoder = TextEncoder(width, config["num_hidden_layers"], config["vocab_size"], 77, pad_token)
    encoder.load_state_dict(ours)
    return encoder


def load_transformers_text_encoder(folder):
    """The TextEncoder of a diffusers pipeline folder: text_encoder/ holds transformers' CLIPTextModel (config.json,
    model.safetensors if the safetensors package is importable, or pytorch_model.bin), tokenizer/ its padding."""
    sub = os.path.join(folder, "text_encoder")
    try:
        from safetensors.torch import load_file
        readers = {"model.safetensors": load_file}
    except ImportError:
        readers = {}
    readers["pytorch_model.bin"] = lambda f: torch.load(f, map_location="cpu", weights_only=True)
    found = [os.path.join(sub, name) for name in readers if os.path.isfile(os.path.join(sub, name))]
    if not found or not os.path.isfile(os.path.join(sub, "config.json")):
        raise FileNotFoundError(f"{folder} holds no text encoder of Stable Diffusion: no text_encoder/config.json and "
                                f"{' or '.join(readers)} (transformers' CLIPTextModel)")
    with open(os.path.join(sub, "config.json")) as f:
        config = json.load(f)
    return text_encoder_from_transformers(config, readers[os.path.basename(found[0])](found[0]),
                                          tokenizer_pad_token(folder))


def tokenizer_pad_token(folder):
    """The padding token id of a diffusers pipeline's tokenizer/ (transformers' CLIPTokenizer, as saved by transformers
    4: vocab.json, special_tokens_map.json, or 5: tokenizer.json), once its vocabulary is CLIP's, which tokenize() uses.
    Stable Diffusion v1 pads with the end token 49407, v2 with "!" (0)."""
    def read(name):
        path = os.path.join(folder, "tokenizer", name)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from clip.simple_tokenizer import SimpleTokenizer
    settings = {**read("special_tokens_map.json"), **read("tokenizer_config.json")}
    vocab = read("vocab.json") or read("tokenizer.json").get("model", {}).get("vocab")
    pad = settings.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if vocab != SimpleTokenizer().encoder or settings.get("model_max_length", 77) != 77 or pad not in vocab:
        raise ValueError(f"{folder}/tokenizer is not CLIP's tokenizer of 77 tokens with a padding token (vocab.json or "
                         "tokenizer.json, tokenizer_config.json), which tokenize() is")
    return vocab[pad]


class TextEmbedder(nn.Module):
    """Caption tokens [B, L] -> the U-Net's context [B, L, width], through a text encoder: CLIP's TextEncoder over
    tokenize(), or BertTextEncoder over its WordPieceTokenizer's ids (`tokenizer`: captions -> ids, which the data
    and the samplers use too). The empty caption is the null condition of classifier-free guidance: in training, each
    caption is replaced by it with probability dropout_prob. `perturb` as in model.LabelEmbedder (CEP, a delta per
    token): training mode only, never on a null caption. A frozen encoder runs without gradients."""

    def __init__(self, encoder, dropout_prob, tokenizer=tokenize):
        super().__init__()
        self.encoder, self.dropout_prob, self.perturb, self.tokenizer = encoder, dropout_prob, None, tokenizer
        self.register_buffer("null", tokenizer([""])[0], persistent=False)

    def null_like(self, tokens):
        return self.null.expand_as(tokens)

    def forward(self, tokens, force_drop_ids=None):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(tokens.shape[0], device=tokens.device) < self.dropout_prob
            tokens = torch.where(drop[:, None], self.null, tokens)
        if force_drop_ids is not None:
            tokens = torch.where(force_drop_ids[:, None], self.null, tokens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and next(self.encoder.parameters()).requires_grad):
            emb = self.encoder(tokens)
        if isinstance(emb, tuple):  # BERT's (hidden states, mask)
            emb = emb[0]
        if self.perturb is not None and self.training:
            emb = torch.where((tokens != self.null).any(1)[:, None, None], self.perturb(emb), emb)
        return emb


# BERT (Devlin et al. 2019), the text encoder the paper trains on CC3M: bert-base-uncased, pre-trained, fully trainable.
# Written here, under transformers' parameter names, so that a Hugging Face folder loads without transformers.

def _is_control(c):
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_space(c):
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_punctuation(c):
    # BERT counts every non-alphanumeric ASCII character as punctuation, "$" and "^" included, which Unicode does not
    cp = ord(c)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(c)[0] == "P"


_CJK = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]  # CJK ideographs: written without spaces


class WordPieceTokenizer:
    """BERT's tokenizer over a vocab.txt (one token a line, its id the line number): captions -> (ids [B, L] long,
    mask [B, L] bool, True on the real tokens), as [CLS] pieces [SEP] then [PAD] up to context_length; longer
    captions lose their last pieces. First BERT's basic tokenizer: drop control characters, whitespace to spaces, a
    space around each CJK ideograph, split on whitespace; lower-case, strip accents (NFD, drop the combining marks);
    each punctuation character a word of its own. Then WordPiece: greedy longest match first, pieces after the first
    of a word prefixed ##; a word longer than 100 characters, or with a part no piece matches, is one [UNK].
    `lower_case`: False for the cased BERTs, which keep case and accents. Special tokens written in a caption are
    split as text, not read as special tokens (transformers' tokenizers read them)."""

    def __init__(self, vocab_file, context_length=77, lower_case=True):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.context_length, self.lower_case = context_length, lower_case

    def words(self, text):
        text = "".join(" " if _is_space(c) else c for c in text if c not in "\0\ufffd" and not _is_control(c))
        text = "".join(f" {c} " if any(a <= ord(c) <= b for a, b in _CJK) else c for c in text)
        words = []
        # NFC as transformers' Python BERT tokenizer: a cased vocabulary's "é" matches "e" + combining accent too
        for word in unicodedata.normalize("NFC", text).split():
            if self.lower_case:
                word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            words += "".join(f" {c} " if _is_punctuation(c) else c for c in word).split()
        return words

    def pieces(self, word):
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def __call__(self, captions):
        if isinstance(captions, str):
            captions = [captions]
        ids = torch.full((len(captions), self.context_length), self.vocab["[PAD]"])
        lengths = torch.zeros(len(captions), dtype=torch.long)
        for i, caption in enumerate(captions):
            pieces = [p for word in self.words(caption) for p in self.pieces(word)][:self.context_length - 2]
            row = [self.vocab[p] for p in ["[CLS]", *pieces, "[SEP]"]]
            ids[i, :len(row)] = torch.tensor(row)
            lengths[i] = len(row)
        return ids, torch.arange(self.context_length) < lengths[:, None]

    def ids(self, captions):
        """The ids alone: TextEmbedder's tokenizer (the encoder finds the padding again from the ids)."""
        return self(captions)[0]


class BertLayer(nn.Module):
    """One post-LN transformer block of BERT under transformers' names (attention.self.query, ...)."""

    def __init__(self, width, heads, mlp_width, eps, dropout, attention_dropout):
        super().__init__()
        self.heads, self.dropout, self.attention_dropout = heads, dropout, attention_dropout
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: nn.Linear(width, width) for name in ("query", "key", "value")}),
            "output": nn.ModuleDict(dict(dense=nn.Linear(width, width), LayerNorm=nn.LayerNorm(width, eps=eps)))})
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(width, mlp_width)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(mlp_width, width), LayerNorm=nn.LayerNorm(width, eps=eps)))

    def forward(self, x, mask):
        B, L, D = x.shape
        attention = self.attention["self"]
        q, k, v = [attention[n](x).view(B, L, self.heads, -1).transpose(1, 2) for n in ("query", "key", "value")]
        dropout = self.attention_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=dropout)
        a = self.attention["output"]["dense"](a.transpose(1, 2).reshape(B, L, D))
        x = self.attention["output"]["LayerNorm"](x + F.dropout(a, self.dropout, self.training))
        h = self.output["dense"](F.gelu(self.intermediate["dense"](x)))  # erf GELU, BERT's "gelu"
        return self.output["LayerNorm"](x + F.dropout(h, self.dropout, self.training))


class BertTextEncoder(nn.Module):
    """BERT's encoder under the parameter names of transformers' BertModel, so a Hugging Face BERT loads as it is
    (load_bert_text_encoder): word, position and token-type embeddings (one segment: type 0), a layer norm, dropout,
    post-LN blocks. (ids [B, L], mask [B, L] or None: ids != pad) -> (the last hidden state [B, L, width], the mask
    as bool): every token's embedding, which the U-Net's cross-attention reads (and CEP perturbs token by token).
    Padding is masked out of the keys, not out of the output: the padding's own embeddings stay in the context, as
    they do with CLIP. No pooler (a tanh layer on [CLS] for next-sentence prediction): nothing here reads one
    vector per caption. Initialised as BERT (normal, std 0.02) for training from scratch; dropout acts in training
    mode, as in BERT's pre-training and fine-tuning."""

    def __init__(self, vocab_size=30522, width=768, layers=12, heads=12, mlp_width=3072, max_positions=512,
                 type_vocab_size=2, eps=1e-12, dropout=0.1, attention_dropout=0.1, pad=0):
        super().__init__()
        self.width, self.pad, self.dropout = width, pad, dropout
        self.embeddings = nn.ModuleDict(dict(word_embeddings=nn.Embedding(vocab_size, width, padding_idx=pad),
                                             position_embeddings=nn.Embedding(max_positions, width),
                                             token_type_embeddings=nn.Embedding(type_vocab_size, width),
                                             LayerNorm=nn.LayerNorm(width, eps=eps)))
        layers = [BertLayer(width, heads, mlp_width, eps, dropout, attention_dropout) for _ in range(layers)]
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(layers)))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embeddings["word_embeddings"].weight[pad] = 0  # as nn.Embedding's padding_idx sets it

    def forward(self, ids, mask=None):
        if mask is None:
            mask = ids != self.pad
        mask = mask.bool()
        e = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = e["word_embeddings"](ids) + e["position_embeddings"](positions) + e["token_type_embeddings"].weight[0]
        x = F.dropout(e["LayerNorm"](x), self.dropout, self.training)
        for layer in self.encoder["layer"]:
            x = layer(x, mask)
        return x, mask


def read_safetensors(path):
    """The tensors of a .safetensors file, read without the safetensors package: 8 bytes (little-endian) give the
    header's length, the header is JSON {name: {dtype, shape, data_offsets}} (and __metadata__), then the raw
    little-endian bytes, offsets counted from the header's end."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    tensors = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            f.seek(8 + n + start)
            data = bytearray(f.read(end - start))  # a copy of its own: writable, and aligned for frombuffer
            if data:
                tensors[name] = torch.frombuffer(data, dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
            else:
                tensors[name] = torch.empty(entry["shape"], dtype=dtypes[entry["dtype"]])
    return tensors


def read_bert_folder(folder):
    """(config.json as a dict, the weights file) of a Hugging Face BERT folder, as bert-base-uncased's repo holds it:
    config.json, vocab.txt, model.safetensors or pytorch_model.bin. A missing file is one error that names it and
    where to get it."""
    get = (f"Download bert-base-uncased into {folder}: `hf download google-bert/bert-base-uncased config.json "
           f"vocab.txt model.safetensors --local-dir {folder}` (pip install huggingface_hub), or those files from "
           "https://huggingface.co/google-bert/bert-base-uncased/tree/main")
    for name in ("config.json", "vocab.txt"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"BERT text encoder: {os.path.join(folder, name)} not found. {get}")
    weights = [os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise FileNotFoundError(f"BERT text encoder: neither {os.path.join(folder, 'model.safetensors')} nor "
                                f"pytorch_model.bin found. {get}")
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f), weights[0]


def load_bert_text_encoder(folder, context_length=77):
    """(BertTextEncoder, WordPieceTokenizer) of a Hugging Face BERT folder (read_bert_folder; tokenizer_config.json,
    if there, says whether to lower-case). Takes a BertModel's weights as saved by transformers, or a
    BertForPreTraining's, as bert-base-uncased's own: under bert., with the pre-training heads cls.* and the pooler
    (dropped), and the layer norms' old names gamma and beta."""
    config, weights = read_bert_folder(folder)
    found = dict(hidden_act=config.get("hidden_act", "gelu"),
                 position_embedding_type=config.get("position_embedding_type", "absolute"))
    if found != dict(hidden_act="gelu", position_embedding_type="absolute"):
        raise ValueError(f"{folder}: BertTextEncoder is BERT with erf GELU and absolute positions, this has {found}")
    if context_length > config["max_position_embeddings"]:
        raise ValueError(f"context_length {context_length} > {config['max_position_embeddings']}, BERT's positions")
    lower_case = True
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            lower_case = json.load(f).get("do_lower_case", True)
    if weights.endswith(".safetensors"):
        state = read_safetensors(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    ours = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        if not key.startswith(("cls.", "pooler.", "embeddings.position_ids", "embeddings.token_type_ids")):
            ours[key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")] = value
    encoder = BertTextEncoder(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                              config["num_attention_heads"], config["intermediate_size"],
                              config["max_position_embeddings"], config["type_vocab_size"],
                              config.get("layer_norm_eps", 1e-12), config.get("hidden_dropout_prob", 0.1),
                              config.get("attention_probs_dropout_prob", 0.1), config.get("pad_token_id", 0))
    encoder.load_state_dict(ours)
    return encoder, WordPieceTokenizer(os.path.join(folder, "vocab.txt"), context_length, lower_case)
