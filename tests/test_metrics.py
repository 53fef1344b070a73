"""metrics.py: RMD (Eq. 38-40), sample entropy, TopP&R against top-pr, CLIP image features."""
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import scipy.special
import scipy.stats
import torch
from conftest import CLIP_TINY, tiny_clip
from PIL import Image

import evaluate
import metrics
import text


def test_relative_mahalanobis_is_eq_38_to_40_literally():
    rng = np.random.default_rng(0)
    labels = np.repeat([3, 7, 9], [60, 70, 50])  # the samples' own labels, not 0..K-1
    feats = rng.normal(0, 3, size=(3, 6))[np.searchsorted([3, 7, 9], labels)] + rng.normal(size=(180, 6))
    feats[:2] += 25  # two samples far from everything
    # Eq. 38-40, one sample at a time: class means and the shared covariance from these features and labels (1/N)
    mus = {k: feats[labels == k].mean(0) for k in (3, 7, 9)}
    shared = sum(np.outer(x - mus[y], x - mus[y]) for x, y in zip(feats, labels)) / len(feats)
    mu_agn, cov_agn = feats.mean(0), sum(np.outer(x - feats.mean(0), x - feats.mean(0)) for x in feats) / len(feats)
    M = lambda x, mu, cov: -(x - mu) @ np.linalg.inv(cov) @ (x - mu)
    rmd = np.array([M(x, mus[y], shared) - M(x, mu_agn, cov_agn) for x, y in zip(feats, labels)])
    ours = metrics.relative_mahalanobis(feats, labels)
    np.testing.assert_allclose(ours, rmd, rtol=1e-4, atol=1e-4 * np.abs(rmd).max())
    assert metrics.top_mean(ours, 0.01) == pytest.approx(np.sort(rmd)[-2:].mean(), rel=1e-4)  # 1% of 180: 1.8
    assert metrics.top_mean(ours, 0.05) == pytest.approx(np.sort(rmd)[-9:].mean(), rel=1e-4)
    assert rmd.std() > 1


def test_sample_entropy_against_a_direct_computation():
    torch.manual_seed(0)
    codebook = torch.randn(12, 3)
    latents = [torch.randn(2, 3, 4, 5), torch.randn(1, 3, 4, 5) * 2]
    tau = 0.7
    direct = []
    for z in latents:
        for x in z.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy():
            logits = -((x - codebook.double().numpy()) ** 2).sum(1) / tau
            p = np.exp(logits - logits.max())
            p /= p.sum()
            direct.append(-(p * np.log(p)).sum())
    assert len(direct) == 60 and 0.1 < np.mean(direct) < np.log(12)
    assert metrics.sample_entropy(iter(latents), codebook, tau, chunk=7) == pytest.approx(np.mean(direct), rel=1e-5)
    nearest = np.sort(scipy.spatial.distance.cdist(codebook.numpy(), codebook.numpy()), 1)[:, 1]
    assert metrics.codebook_tau(codebook) == pytest.approx((nearest ** 2).mean(), rel=1e-9)
    # a vector on a code with a small tau: all mass on that code
    assert metrics.sample_entropy([codebook[:4].T.reshape(1, 3, 2, 2)], codebook, 1e-4) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("dim, n_real, n_fake", [(48, 400, 330), (16, 260, 300)])
def test_top_pr_matches_the_top_pr_package(dim, n_real, n_fake):
    top_pr = pytest.importorskip("top_pr")
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(n_real, dim)).astype(np.float32)
    real[: n_real // 3] += 3  # two modes; the fake set covers one of them, and some of it lies off the real support
    fake = np.concatenate([rng.normal(size=(n_fake - 40, dim)), rng.normal(6, 1, size=(40, dim))]).astype(np.float32)
    np.random.seed(42)  # the package draws its bootstrap from numpy's global generator (seeded 42 when it projects)
    ref = top_pr.compute_top_pr(real_features=real, fake_features=fake)
    precision, recall, f1 = metrics.top_pr(real, fake, block=100)  # small blocks: the blocking is exercised
    assert 0.5 < ref["fidelity"] < 1 and 0.5 < ref["diversity"] < 0.7  # not a trivial case: one mode is missed
    assert (precision, recall, f1) == pytest.approx((ref["fidelity"], ref["diversity"], ref["Top_F1"]), rel=1e-6)
    with pytest.raises(ValueError, match="needs at least"):
        metrics.top_pr(real, fake[:5 * min(dim, 32) + 1])


def test_clip_image_features_are_clips_encode_image(tmp_path):
    import clip
    ref = tiny_clip(tmp_path / "clip.pt", torchscript=False)
    space = metrics.ClipSpace(str(tmp_path / "clip.pt"), torch.device("cpu"))
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 30, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images)
    ours = space.extract(evaluate.open_images(str(tmp_path / "s.npz")), 2)["pool"]
    with torch.no_grad():
        direct = torch.cat([ref.encode_image(space.preprocess(Image.fromarray(im))[None]) for im in images])
    assert ours.shape == (5, CLIP_TINY["embed_dim"]) and space.dims == {"mu": CLIP_TINY["embed_dim"]}
    torch.testing.assert_close(torch.from_numpy(ours), direct, rtol=1e-5, atol=1e-5)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3
    # ViT-B/16 is clip's own model: its image tower's layout is what clip.load builds for OpenAI's file
    with torch.device("meta"):
        vit_b16 = clip.model.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                  vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                                  transformer_heads=8, transformer_layers=12)
    assert vit_b16.visual.output_dim == 512 and vit_b16.visual.conv1.kernel_size == (16, 16)
    assert metrics.clip_path("ViT-B/16").endswith(os.path.join(".cache", "clip", "ViT-B-16.pt"))


@pytest.mark.slow
def test_clip_score_matches_a_direct_computation(tmp_path):
    import clip
    ref = tiny_clip(tmp_path / "clip.pt", torchscript=False)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 24, 24, 3), dtype=np.uint8)
    prompts = [f"a photo of {w}" for w in ("a cat", "a dog", "cafés", "red", "blue", "two birds", "the sea")]
    np.savez(tmp_path / "s.npz", images)
    model, preprocess = text.load_clip(str(tmp_path / "clip.pt"))
    score = metrics.clip_score(evaluate.open_images(str(tmp_path / "s.npz")), prompts, model, preprocess, 3, "cpu")
    cos = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            logits, _ = ref(preprocess(Image.fromarray(image))[None], clip.tokenize([prompt]))
            cos.append(logits.item() / ref.logit_scale.exp().item())
    cos = np.array(cos)
    assert (cos < 0).any() and (cos > 0).any()  # the clamp at 0 matters here
    assert score == pytest.approx(np.mean(np.maximum(100 * cos, 0)), rel=1e-5)


def test_embedding_shift_is_eq_42_and_43_literally():
    import cep
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 16))  # a clean run's class embeddings
    labels = rng.integers(0, 10, 300)
    corrupted = labels.copy()
    flipped = rng.choice(300, 30, replace=False)
    corrupted[flipped] = (labels[flipped] + rng.integers(1, 10, 30)) % 10
    # Eq. 42 over all N samples, one at a time; the unchanged ones add 0
    eq42 = sum(np.sum((table[c] - table[y]) ** 2) for c, y in zip(corrupted, labels)) / len(labels)
    assert metrics.embedding_shift(table[labels], table[corrupted]) == pytest.approx(eq42, rel=1e-12)
    # only the changed rows (what corruption.json records), averaged over N
    only = metrics.embedding_shift(table[labels[flipped]], table[corrupted[flipped]], n=len(labels))
    assert only == pytest.approx(eq42, rel=1e-12)
    norms = [np.linalg.norm(table[c] - table[y]) for c, y in zip(corrupted, labels)]
    assert metrics.embedding_shift(table[labels], table[corrupted], squared=False) == pytest.approx(np.mean(norms))
    # Eq. 43 on token embeddings [N, tokens, d]: a sample's deltas are one vector; E|delta|^2 = tokens * gamma^2
    # (CEP-G), tokens * gamma^2 / 3 (CEP-U), whatever d
    emb = torch.randn(4000, 3, 64)
    for kind, expected in (("gaussian", 3 * 4.0), ("uniform", 3 * 4.0 / 3)):
        perturbed = cep.CEP(kind, 2.0).train()(emb)
        delta = (perturbed - emb).double()
        assert metrics.embedding_shift(emb, perturbed) == pytest.approx(delta.pow(2).sum((1, 2)).mean().item())
        assert metrics.embedding_shift(emb, perturbed) == pytest.approx(expected, rel=0.03)
    with pytest.raises(ValueError, match="N >= 30"):
        metrics.embedding_shift(table[labels[flipped]], table[corrupted[flipped]], n=10)
