"""
Text encoders over CLIP's tokenizer, the condition encoders of text-to-image models: CLIP's text transformer, frozen
with OpenAI's weights (the paper trained a BERT; this project uses CLIP's), or the same architecture small and trained
from scratch on machines without the weights. `TextEmbedder` makes one the condition embedder of model.UNet
(`UNet(..., y_embedder=TextEmbedder(...))`): caption tokens in, the cross-attention context out.

The clip package (clip-anytorch) supplies the tokenizer (its BPE vocabulary ships inside it: offline) and the blocks.
Imports nothing from the project: copy this file into another project as it is.
"""
import os

import torch
import torch.nn as nn

def tokenize(captions):
    """Captions -> CLIP tokens [n, 77]: start, BPE, end, zero padding; longer captions are cut to 77 tokens. The BPE
    vocabulary ships inside the clip package, so this works offline."""
    import clip
    return clip.tokenize(list(captions), truncate=True)


class TextEncoder(nn.Module):
    """CLIP's text transformer from clip-anytorch's modules, with OpenAI's parameter names, so the text half of a CLIP
    checkpoint loads as it is: token and position embeddings, causally masked pre-LN blocks with heads of 64 channels,
    a final layer norm. Returns the embedding of every token [B, 77, width], as Stable Diffusion conditions on CLIP,
    not CLIP's pooled projection. Randomly initialised as CLIP is; `load_clip_text_encoder` gives OpenAI's weights."""

    def __init__(self, width, layers, vocab_size=49408, context_length=77):
        super().__init__()
        from clip.model import LayerNorm, Transformer
        self.width, self.layers = width, layers
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
    """The TextEncoder of a CLIP checkpoint (see load_clip), with its weights."""
    clip_model, _ = load_clip(name)
    encoder = TextEncoder(clip_model.transformer.width, clip_model.transformer.layers, clip_model.vocab_size,
                          clip_model.context_length)
    encoder.load_state_dict({k: v for k, v in clip_model.state_dict().items() if k in encoder.state_dict()})
    return encoder


class TextEmbedder(nn.Module):
    """Caption tokens [B, 77] -> the U-Net's context [B, 77, width], through a TextEncoder. The empty caption is the
    null condition of classifier-free guidance: in training, each caption is replaced by it with probability
    dropout_prob. `perturb` as in model.LabelEmbedder (CEP, a delta per token): training mode only, never on a null
    caption. A frozen encoder runs without gradients."""

    def __init__(self, encoder, dropout_prob):
        super().__init__()
        self.encoder, self.dropout_prob, self.perturb = encoder, dropout_prob, None
        self.register_buffer("null", tokenize([""])[0], persistent=False)

    def null_like(self, tokens):
        return self.null.expand_as(tokens)

    def forward(self, tokens, force_drop_ids=None):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(tokens.shape[0], device=tokens.device) < self.dropout_prob
            tokens = torch.where(drop[:, None], self.null, tokens)
        if force_drop_ids is not None:
            tokens = torch.where(force_drop_ids[:, None], self.null, tokens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder.token_embedding.weight.requires_grad):
            emb = self.encoder(tokens)
        if self.perturb is not None and self.training:
            emb = torch.where((tokens != self.null).any(1)[:, None, None], self.perturb(emb), emb)
        return emb
