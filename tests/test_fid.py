"""fid.py: Inception against pytorch-fid / torch-fidelity, FID, IS, precision/recall, weight loading."""
import json
import os
import urllib.error

import numpy as np
import pytest
import torch
from conftest import MANIFESTS, rel_close

import evaluate
import fid


def _pytorch_fid_model(sd, monkeypatch):
    import pytorch_fid.inception as pfi

    # pytorch-fid always downloads its weights; hand it ours instead
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
    return pfi.InceptionV3([3]).eval()


def test_inception_state_dict_matches_manifest():
    with open(os.path.join(MANIFESTS, "pt_inception_fid_keys.json")) as f:
        manifest = json.load(f)
    ours = {k: list(v.shape) for k, v in fid.InceptionV3().state_dict().items()}
    assert list(ours) == list(manifest)
    assert ours == manifest


@pytest.mark.slow
def test_inception_matches_pytorch_fid(weights, monkeypatch):
    sd, _ = weights
    ref = _pytorch_fid_model(sd, monkeypatch)
    spatial = {}
    # ADM's sFID tensor "mixed_6/conv" is the 1x1 branch of Mixed_6d (block 2, index 6 in pytorch-fid)
    ref.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("x", o))
    ours = fid.InceptionV3()
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    x = torch.randint(0, 256, (3, 3, 40, 52), dtype=torch.uint8)
    with torch.no_grad():
        out = ours(x)
        ref_pool = ref(x.float() / 255)[0].flatten(1)
    rel_close(out["pool"], ref_pool)
    rel_close(out["spatial"], spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    rel_close(out["logits"], ref_pool @ sd["fc.weight"].t())
    assert out["pool"].shape == (3, 2048) and out["spatial"].shape == (3, 2023) and out["logits"].shape == (3, 1008)


@pytest.mark.slow
def test_inception_tf1_resize_matches_torch_fidelity(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    sd, path = weights
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                      feature_extractor_weights_path=path)
    ours = fid.load_inception(path, "cpu", resize="tf1")
    x = torch.randint(0, 256, (2, 3, 37, 45), dtype=torch.uint8)
    with torch.no_grad():
        pool, logits_unbiased, logits = ref(x)
        out = ours(x)
    rel_close(out["pool"], pool)
    rel_close(out["logits"], logits_unbiased)  # the IS logits (no bias), as in ADM's graph
    rel_close(out["logits"] + sd["fc.bias"], logits)
    # and the two resizes really differ off 299x299, so the option is not a no-op
    assert not torch.allclose(fid.InceptionV3("tf1").preprocess(x), fid.InceptionV3().preprocess(x), atol=1e-3)


@pytest.mark.slow
def test_compute_features_input_formats(weights):
    _, path = weights
    model = fid.load_inception(path, "cpu")
    imgs = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    a = fid.compute_features(imgs, model, batch_size=3, progress=False)
    b = fid.compute_features(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, model, batch_size=4,
                             progress=False)
    c = fid.compute_features(iter([imgs[:1], imgs[1:]]), model, progress=False)
    for k in ("pool", "spatial", "logits"):
        assert a[k].shape[0] == 4 and a[k].dtype == np.float32
        rel_close(b[k], a[k])
        rel_close(c[k], a[k])


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 32)), rng.normal(0.3, 1.2, size=(250, 32)) @ rng.normal(size=(32, 32)) * 0.3
    s1, s2 = fid.statistics(x), fid.statistics(y)
    ours = fid.frechet_distance(*s1, *s2)
    assert ours > 1
    assert ours == pytest.approx(calculate_frechet_distance(*s1, *s2), rel=1e-8)
    assert ours == pytest.approx(fid.frechet_distance(*s1, *s2, method="eigh"), rel=1e-9)
    assert abs(fid.frechet_distance(*s1, *s1)) < 1e-6 and abs(fid.frechet_distance(*s1, *s1, method="eigh")) < 1e-6
    # fewer samples than dimensions: singular covariances (the eps fallback or round-off path)
    s3, s4 = fid.statistics(x[:10]), fid.statistics(y[:12])
    singular = fid.frechet_distance(*s3, *s4)
    assert np.isfinite(singular)
    assert singular == pytest.approx(calculate_frechet_distance(*s3, *s4), rel=1e-5)
    assert fid.frechet_distance(*s3, *s4, method="eigh") == pytest.approx(singular, rel=1e-4)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.from_numpy(np.random.default_rng(0).normal(0, 3, size=(1000, 1008)))
    mean, std = fid.inception_score(logits.numpy(), splits=10)
    ref = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert mean > 2
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-7)
    # ADM's rule: chunks of split_size, the last one possibly shorter (re-implemented here from evaluator.py)
    p = torch.softmax(logits, 1).numpy()
    scores = []
    for i in range(0, len(p), 300):
        part = p[i:i + 300]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert fid.inception_score(logits.numpy(), split_size=300)[0] == pytest.approx(np.mean(scores), rel=1e-9)
    assert fid.inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0)


def test_precision_recall_match_brute_force():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(150, 16)).astype(np.float32)
    fake = (rng.normal(size=(120, 16)) * 1.3 + 0.4).astype(np.float32)
    d = lambda a, b: np.sqrt(((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1))
    r_real = np.sort(d(real, real), 1)[:, 3]  # index 0 is the point itself
    r_fake = np.sort(d(fake, fake), 1)[:, 3]
    precision = (d(fake, real) <= r_real[None]).any(1).mean()
    recall = (d(real, fake) <= r_fake[None]).any(1).mean()
    assert 0 < precision < 1 and 0 < recall < 1
    # small blocks, so that the batching (and the running top-k across blocks) is exercised
    p, r = fid.precision_recall(real, fake, k=3, batch_size=32, device=torch.device("cpu"))
    assert p == pytest.approx(precision) and r == pytest.approx(recall)
    nn = fid.nearest_distances(fake, real, 5, batch_size=16, device=torch.device("cpu"))
    np.testing.assert_allclose(nn, np.sort(d(fake, real), 1)[:, :5], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="need more than 3 real and fake samples, got 150 and 3"):
        fid.precision_recall(real, fake[:3], k=3)


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    dest = os.path.join(str(tmp_path), "checkpoints", fid.FID_WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception(download=False)
    for s in (fid.FID_WEIGHTS_NAME, fid.FID_WEIGHTS_URL, dest):
        assert s in str(e.value)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception()
    assert fid.FID_WEIGHTS_URL in str(e.value) and dest in str(e.value) and "no network" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception(str(tmp_path / "nope.pth"))
    assert "nope.pth" in str(e.value) and fid.FID_WEIGHTS_URL in str(e.value)


@pytest.mark.slow
def test_load_inception_from_hub_cache(tmp_path, monkeypatch, weights):
    sd, path = weights
    os.makedirs(tmp_path / "checkpoints")
    os.symlink(path, tmp_path / "checkpoints" / fid.FID_WEIGHTS_NAME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = fid.load_inception(download=False, device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_npz_streaming_reader(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        p = str(tmp_path / f"{save.__name__}.npz")
        save(p, a, np.arange(7))
        imgs = evaluate.open_images(p)
        assert len(imgs) == 7 and imgs.resolution == 5 and list(imgs.labels) == list(range(7))
        np.testing.assert_array_equal(np.concatenate(list(imgs.batches(3))), a)
        assert len(imgs.batches(3)) == 3
        np.testing.assert_array_equal(np.concatenate(list(evaluate.open_images(p, limit=4).batches(3))), a[:4])
