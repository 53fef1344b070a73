"""cep.py: CEP-U / CEP-G statistics, the null condition and sampling untouched, per token; the IP baseline."""
import math

import pytest
import torch
from conftest import TINY_UNET, randomize, tiny_dit

import cep
import text
from model import UNet


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
