"""evaluate.py: end to end on Inception, ADM reference batches, the synthetic and classifier spaces, too few samples,
caches written whole, CLI."""
import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import scipy.special
import scipy.stats
import torch
from conftest import ENV, FIXED_TMP, ROOT, TINY_VAE, leftovers, randomize, run, wait_until
from PIL import Image

import evaluate
import fid
import metrics
import study
from vae import VQModel


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A classifier of the built-in shapes at 16x16 that tells them apart (80% of its 200 held-out images), trained
    once for the tests that use the classifier space but do not test its training."""
    from data import SyntheticShapes
    path = str(tmp_path_factory.mktemp("classifier") / "shapes16.pt")
    ds = SyntheticShapes(size=2000, resolution=16, seed=2)
    metrics.train_classifier(path, ds.images_uint8(), ds.labels, 10, 3, 2, torch.device("cpu"), "synthetic")
    return path


def untrained_classifier(path, val_accuracy, num_val=100, resolution=16):
    """A random SmallCNN saved as train_classifier saves one, said to be right on val_accuracy of num_val held-out
    images (None: not said, as in classifiers cached before it was recorded)."""
    torch.manual_seed(0)
    ck = {"model": metrics.SmallCNN(10, resolution).state_dict(), "resolution": resolution, "num_classes": 10,
          "val_accuracy": val_accuracy, "source": "synthetic"}
    if num_val is not None:
        ck["num_val"] = num_val
    torch.save(ck, path)
    return str(path)


def as_images(arr):
    return evaluate.Images(len(arr), lambda bs: (arr[i:i + bs] for i in range(0, len(arr), bs)), None, "", arr.shape[1])


def test_evaluate_unknown_key():
    with pytest.raises(ValueError, match="bogus"):
        evaluate.main(["--samples", "x.npz", "--bogus", "1"])


@pytest.mark.slow
def test_evaluate_end_to_end_inception_with_cache(tmp_path, weights, monkeypatch):
    _, path = weights
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 3)
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    calls = []
    real_compute = fid.compute_features
    monkeypatch.setattr(fid, "compute_features", lambda images, *a, **k: calls.append(1) or real_compute(images, *a, **k))
    args = ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--features=inception",
            f"--inception_weights={path}", "--cache_dir", str(tmp_path / "cache"), "--progress=False",
            "--device=cpu", "--out", str(tmp_path / "m.json"), "--fd_method=eigh",  # eigh: 2048-d in seconds
            "--is_split_size=4"]  # ADM's rule in chunks of 4: [0:4], [4:6]
    first = evaluate.main(args)
    assert len(calls) == 2 and first["ref_cache"] == "miss"
    logits = fid.compute_features(np.load(tmp_path / "samples.npz")["arr_0"], fid.load_inception(path, "cpu"),
                                  progress=False)["logits"]
    calls.clear()
    direct = []
    for part in (logits[:4], logits[4:]):
        p = scipy.special.softmax(part.astype(np.float64), axis=1)
        direct.append(np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()))
    assert first["is"] == pytest.approx(np.mean(direct), rel=1e-6) and first["is_splits"] == "chunks of 4 (ADM)"
    assert first["ref_statistics"] == "computed by this script from 8 reference images"
    assert first["num_ref_statistics"] == 8 and "8 < 50000 reference images" in first["warnings"][0]
    with open(tmp_path / "m.json") as f:
        report = json.load(f)
    assert report["feature_space"] == "inception-2015-12-05" and "resize=pytorch-fid" in report["feature_space_detail"]
    for k in ("is", "precision", "recall"):
        assert report[k] is not None and np.isfinite(report[k]), k
    assert report["is"] >= 1 and report["num_samples"] == 6 and report["num_ref"] == 8
    assert report["fid"] is report["sfid"] is None  # FID on 6 samples would mean nothing: skipped, with the reason
    assert {k: report["skipped"][k] for k in ("fid", "sfid")} == {
        "fid": "6 samples and 8 reference images, fewer than the 2048 feature dimensions: each set needs as many",
        "sfid": "6 samples and 8 reference images, fewer than the 2023 feature dimensions: each set needs as many"}
    assert "is_classifier" not in report
    second = evaluate.main(args)
    assert len(calls) == 1 and second["ref_cache"] == "hit"  # only the samples were run through the network
    for k in ("is", "precision", "recall"):
        assert second[k] == pytest.approx(first[k], rel=1e-9)
    # the cache file is itself a statistics file usable as --ref, features (for precision/recall) included
    space = type("Space", (), {"name": fid.FEATURE_SPACE, "dims": metrics.InceptionSpace.dims})()
    stats, how, _ = evaluate.reference(first["ref_cache_path"], space, 8, "", 32, 0, 0, "ref")
    assert how == "statistics file" and stats["features"].shape == (8, 2048) and stats["sigma_s"].shape == (2023, 2023)
    # a pytorch-fid style statistics file (mu, sigma only) is read as statistics, without features
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    stats, how, _ = evaluate.reference(str(tmp_path / "stats.npz"), space, 8, "", 32, 0, 0, "ref")
    assert how == "statistics file" and "features" not in stats and stats["sigma"].shape == (2048, 2048)
    space.name = "synthetic-classifier"
    with pytest.raises(ValueError, match="feature space"):
        evaluate.reference(str(tmp_path / "stats.npz"), space, 8, "", 32, 0, 0, "ref")


@pytest.mark.slow
def test_evaluate_against_an_adm_reference_batch_uses_its_stored_statistics(tmp_path, weights, monkeypatch):
    _, path = weights
    monkeypatch.setattr(fid, "unmeasurable", lambda *a, **k: {})  # which statistics FID uses, not how many samples
    rng = np.random.default_rng(1)
    samples, images = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (6, 8))
    # ADM's format: 10K images for precision/recall beside the statistics of the whole reference set
    stored = dict(mu=rng.normal(0, 0.1, 2048), sigma=np.diag(rng.uniform(0.01, 0.1, 2048)),
                  mu_s=rng.normal(0, 0.1, 2023), sigma_s=np.diag(rng.uniform(0.01, 0.1, 2023)))
    np.savez(tmp_path / "VIRTUAL_ref.npz", images, **stored)
    np.savez(tmp_path / "s.npz", samples)
    args = ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "VIRTUAL_ref.npz"), "--device=cpu",
            f"--inception_weights={path}", "--cache_dir", str(tmp_path / "cache"), "--progress=False",
            "--fd_method=eigh", "--is_split_size=0", "--is_splits=2"]
    res = evaluate.main(args)
    model = fid.load_inception(path, "cpu", resize="tf1")  # ADM's input pipeline, the default against its batch
    s, r = (fid.compute_features(x, model, progress=False) for x in (samples, images))
    assert "resize=tf1" in res["feature_space_detail"] and res["is_splits"] == "2 equal splits"
    assert res["fid"] == pytest.approx(fid.frechet_distance(*fid.statistics(s["pool"]), stored["mu"],
                                                            stored["sigma"], method="eigh"), rel=1e-6)
    assert res["sfid"] == pytest.approx(fid.frechet_distance(*fid.statistics(s["spatial"]), stored["mu_s"],
                                                             stored["sigma_s"], method="eigh"), rel=1e-6)
    recomputed = fid.frechet_distance(*fid.statistics(s["pool"]), *fid.statistics(r["pool"]), method="eigh")
    assert abs(res["fid"] - recomputed) > 1  # the stored statistics, not the 8 images', made the FID
    assert (res["precision"], res["recall"]) == pytest.approx(fid.precision_recall(r["pool"], s["pool"]))
    assert res["num_ref"] == 8 and res["num_ref_statistics"] is None
    assert res["ref_statistics"].startswith(f"stored in {tmp_path / 'VIRTUAL_ref.npz'} (ADM's reference batch")
    assert res["warnings"] == []
    res = evaluate.main(args + ["--resize=pytorch-fid"])
    assert "resize=pytorch-fid" in res["feature_space_detail"] and "mix two pipelines" in res["warnings"][0]


@pytest.mark.slow
def test_evaluate_bad_input_fails_before_any_work(tmp_path, weights, monkeypatch):
    import clip
    _, path = weights
    np.savez(tmp_path / "s.npz", np.zeros((6, 32, 32, 3), np.uint8), np.arange(6))
    calls = []
    monkeypatch.setattr(fid, "compute_features", lambda *a, **k: calls.append(1))
    base = ["--samples", str(tmp_path / "s.npz"), "--device=cpu", f"--inception_weights={path}",
            "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--is_split_size=0", "--ref"]
    np.savez(tmp_path / "neither.npz", labels=np.arange(3))
    with pytest.raises(ValueError, match="has neither images .arr_0. nor statistics .mu, sigma."):
        evaluate.main(base + [str(tmp_path / "neither.npz")])
    np.savez(tmp_path / "clip_stats.npz", mu=np.zeros(512), sigma=np.eye(512))
    with pytest.raises(ValueError, match=r"mu \(512,\) / sigma \(512, 512\) do not fit the 2048-d mu features"):
        evaluate.main(base + [str(tmp_path / "clip_stats.npz")])
    np.savez(tmp_path / "adm.npz", np.zeros((4, 32, 32, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2048), sigma_s=np.eye(2048))
    with pytest.raises(ValueError, match="mu_s .2048,. / sigma_s .2048, 2048. do not fit the 2023-d"):
        evaluate.main(base + [str(tmp_path / "adm.npz")])
    with pytest.raises(ValueError, match="6 samples are fewer than one Inception Score chunk .is_split_size=5000"):
        evaluate.main(base[:-2] + ["--ref", str(tmp_path / "adm.npz")])
    # the paper's CLIP ViT-B/16 named but absent, offline: the error says which file and where it goes
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(clip.clip.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError, match=re.escape(f"save it as {tmp_path}/home/.cache/clip/ViT-B-16.pt")):
        evaluate.main(base + ["synthetic", "--diversity_features=clip"])
    assert calls == [] and not os.path.exists(tmp_path / "cache")


@pytest.mark.slow
def test_evaluate_synthetic_reports_every_metric_in_named_spaces(tmp_path):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=170, resolution=16, seed=5)  # TopP&R in 32 projected dimensions needs 162
    np.savez(tmp_path / "s.npz", ds.images_uint8(), ds.labels)
    vq = randomize(VQModel(num_codes=16, **TINY_VAE), std=0.2)
    (tmp_path / "vq").mkdir()
    torch.save(vq.state_dict(), tmp_path / "vq" / "diffusion_pytorch_model.bin")
    (tmp_path / "vq" / "config.json").write_text(json.dumps(dict(_class_name="VQModel", latent_channels=3,
                                                                 num_vq_embeddings=16, **TINY_VAE)))
    base = ["--samples", str(tmp_path / "s.npz"), "--cache_dir", str(tmp_path / "cache"), "--progress=False",
            "--device=cpu", "--classifier_size=2000", "--classifier_epochs=3", "--synthetic_ref_size=170",
            "--out", str(tmp_path / "m.json")]
    res = evaluate.main(base + ["--train=synthetic", "--synthetic_train_size=50", f"--entropy_vq={tmp_path / 'vq'}"])
    assert res["feature_space"] == res["diversity_space"] == "synthetic-classifier" and res["skipped"] == {}
    assert res["warnings"] == ["the Frechet distance in synthetic-classifier features against 170 reference images is "
                               "biased upward, by less the more images: compare numbers of equal sample and reference "
                               "sizes"]  # not an FID, and no word of ImageNet's 50K
    assert res["classifier_val_images"] == 200 and res["classifier_val_accuracy"] >= 0.5  # a tenth of 2000, held out
    assert res["classifier_chance"] == pytest.approx(0.1, abs=0.01)
    assert res["is"] is None and res["sfid"] is None and res["is_splits"] == "10 equal splits"
    assert 0 <= res["class_accuracy"] <= 1 and 0 <= res["precision"] <= 1 and res["fid"] >= 0
    assert 0 <= res["memorisation_ratio"] <= 1 and res["avg_l2_top5"] > 0 and np.isfinite(res["rmd_top1"])
    assert 0 < res["toppr_f1"] <= 1 and 0 < res["sample_entropy"] < np.log(16) and res["entropy_tau"] > 0
    with Image.open(res["rmd_plot"]) as image:
        assert res["rmd_plot"] == str(tmp_path / "m_rmd.png") and image.format == "PNG"
    with open(tmp_path / "m.json") as f:
        assert json.load(f)["toppr_f1"] == res["toppr_f1"]
    # each metric against its own computation from the features the report used
    space = metrics.ClassifierSpace(glob.glob(str(tmp_path / "cache" / "synthetic_classifier*.pt"))[0], "cpu")
    g = space.extract(evaluate.open_images(str(tmp_path / "s.npz")), 64)["pool"]
    ref = space.extract(evaluate.synthetic_images(170, 1, 16), 64)["pool"]
    assert res["rmd_top1"] == pytest.approx(metrics.top_mean(metrics.relative_mahalanobis(g, ds.labels)), rel=1e-6)
    assert res["toppr_f1"] == pytest.approx(metrics.top_pr(ref, g)[2], rel=1e-9)
    with torch.no_grad():
        z = vq.eval().encode(torch.from_numpy(ds.images_uint8()).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert res["sample_entropy"] == pytest.approx(metrics.sample_entropy([z], vq.quantize.embedding.weight,
                                                                         res["entropy_tau"]), rel=1e-5)
    assert len([f for f in os.listdir(tmp_path / "cache") if f.startswith("synthetic_classifier")]) == 1
    # samples that are the training images themselves: every one is memorised (nearest distance ~0)
    again = evaluate.main(base + ["--train", str(tmp_path / "s.npz")])
    assert again["memorisation_ratio"] == 1.0 and again["ref_cache"] == "hit"
    assert again["classifier_val_accuracy"] == res["classifier_val_accuracy"]  # the cached classifier, reused
    assert set(again["skipped"]) == {"sample_entropy"} and "entropy_vq" in again["skipped"]["sample_entropy"]
    none = evaluate.main(base + ["--diversity_features=none"])
    assert none["diversity_space"] is None and "memorisation_ratio" not in none and "rmd_top1" not in none
    assert none["skipped"]["rmd_top1"] == "--diversity_features none"


def test_classifier_is_is_the_is_formula_on_its_softmax(tmp_path):
    from data import SyntheticShapes
    torch.manual_seed(0)
    net = metrics.SmallCNN(10, 16)
    with torch.no_grad():
        net.head.weight.normal_(0, 300)  # the untrained features barely vary: large weights spread the softmax
    torch.save({"model": net.state_dict(), "resolution": 16, "num_classes": 10, "val_accuracy": 0.5, "num_val": 100},
               tmp_path / "c.pt")
    images = SyntheticShapes(size=40, resolution=16, seed=5).images_uint8()
    np.savez(tmp_path / "s.npz", images)
    res = evaluate.main(["--samples", str(tmp_path / "s.npz"), "--classifier_path", str(tmp_path / "c.pt"),
                         "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--is_splits=4",
                         "--synthetic_ref_size=20"])
    with torch.no_grad():
        p = net.eval()(torch.from_numpy(images))[1].double().softmax(1).numpy()
    # exp(E_x KL(p(y|x) || p(y))) on each of 4 equal splits, p(y) the split's mean prediction
    direct = [np.exp((q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean()) for q in np.split(p, 4)]
    assert res["is_classifier"] == pytest.approx(np.mean(direct), rel=1e-6) and res["is_classifier"] > 1.5
    assert res["is_classifier_std"] == pytest.approx(np.std(direct), rel=1e-5, abs=1e-9)
    assert res["is"] is None and res["is_splits"] == "4 equal splits"  # never under the Inception IS's name


@pytest.mark.slow
def test_evaluate_cli_on_a_folder(tmp_path, classifier):
    import subprocess
    import sys

    from PIL import Image

    from data import SyntheticShapes
    ds = SyntheticShapes(size=12, resolution=16, seed=3)
    os.makedirs(tmp_path / "imgs")
    for i, img in enumerate(ds.images_uint8()):
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i:03d}.png")
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--samples", str(tmp_path / "imgs"),
           "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu",
           f"--classifier_path={classifier}", "--synthetic_ref_size=30", "--out", str(tmp_path / "r.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "synthetic-classifier" in p.stdout and "fid" in p.stdout
    with open(tmp_path / "r.json") as f:
        report = json.load(f)
    assert report["num_samples"] == 12 and report["feature_space"] == "synthetic-classifier"
    assert "class_accuracy" not in report  # a flat folder has no labels
    p = subprocess.run(cmd + ["--bogus_key=1"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert p.returncode != 0 and "bogus_key" in p.stderr


def test_evaluate_skips_what_too_few_samples_cannot_measure(tmp_path, classifier):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=5, resolution=16, seed=5)
    args = ["--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu",
            f"--classifier_path={classifier}", "--synthetic_ref_size=30"]
    for n in (1, 5):  # 1 sample crashed in scipy's sqrtm; 5 gave FID 0.087 and IS 1.0 (splits of one sample)
        np.savez(tmp_path / f"s{n}.npz", ds.images_uint8()[:n], ds.labels[:n])
        res = evaluate.main(["--samples", str(tmp_path / f"s{n}.npz"), *args])
        assert res["fid"] is res["is_classifier"] is None and 0 <= res["class_accuracy"] <= 1
        assert res["skipped"]["fid"] == f"{n} samples and 30 reference images, fewer than the 96 feature dimensions: " \
            "each set needs as many"
        assert res["skipped"]["is_classifier"] == f"{n} samples in 10 splits: each split needs 2 at least"
        assert (res["precision"] is None) == (n <= 3) == ("precision" in res["skipped"])
    assert fid.unmeasurable(10000, None, {"fid": 2048}, split_size=5000) == {}  # ADM's rule: 2 chunks of 5000
    assert fid.unmeasurable(3, None, {}, split_size=1) == {"is": "3 samples in 3 splits: each split needs 2 at least",
                                                           "precision": "3 samples: k=3 needs more than 3 of each",
                                                           "recall": "3 samples: k=3 needs more than 3 of each"}
    assert set(fid.unmeasurable(2047, 50000, {"fid": 2048, "sfid": 2023})) == {"fid"}


@pytest.mark.slow
def test_evaluate_caches_and_report_are_written_whole_and_unreadable_caches_made_again(tmp_path, capsys):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=12, resolution=16, seed=5)
    np.savez(tmp_path / "s.npz", ds.images_uint8(), ds.labels)
    classifier, report = tmp_path / "classifier.pt", tmp_path / "report.json"
    args = ["--samples", str(tmp_path / "s.npz"), "--classifier_path", str(classifier), "--cache_dir",
            str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--classifier_size=2000",
            "--classifier_epochs=3", "--synthetic_ref_size=30", "--out", str(report)]
    # a kill while the classifier is written: torch.save blocks writing into a FIFO, so the kill lands mid-write
    os.mkfifo(f"{classifier}.tmp")
    proc = subprocess.Popen([sys.executable, "-c", FIXED_TMP, "evaluate.py", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with open(os.open(f"{classifier}.tmp", os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as fifo:
            partial = wait_until(lambda: fifo.read(4096), proc)
            proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert partial.startswith(b"PK") and not classifier.exists()  # the final name was never written
    os.remove(f"{classifier}.tmp")
    with open(f"{classifier}.tmp", "wb") as f:  # what the kill leaves on a real disk
        f.write(partial)
    first = evaluate.main(args)  # trains it again, as if absent
    assert classifier.exists() and json.loads(report.read_text()) == first
    # caches cut short (a copy, or a kill in a version that wrote in place): made again, said once
    for path in (first["ref_cache_path"], str(classifier)):  # the features, then the classifier (and its features)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        capsys.readouterr()
        again = evaluate.main(args)
        out = capsys.readouterr().out
        assert out.count("is unreadable") == out.count(f"the cache {path} is unreadable (") == 1, out
        assert again["ref_cache"] == "miss" and again["precision"] == first["precision"]
        assert again["classifier_val_accuracy"] == first["classifier_val_accuracy"]  # retrained from the same seed
    # a full disk while the report is written: the previous report stays whole, and the error names the file

    def file_size_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
    before = report.read_text()
    result = run([sys.executable, "evaluate.py", *args], check=False, preexec_fn=file_size_limit)
    assert result.returncode == 1 and result.stderr.startswith(f"error: cannot write {report}: File too large")
    assert "Traceback" not in result.stderr and report.read_text() == before and not leftovers(report)


@pytest.mark.slow
def test_classifier_space_of_a_class_folder_learns_the_train_split_and_never_reads_held_out_images(tmp_path,
                                                                                                      monkeypatch):
    import data
    study.write_digits(tmp_path / "d", per_class=40, held_out=3)
    train_dir, held = tmp_path / "d" / "train", tmp_path / "d" / "heldout"
    train_files = {str(p) for p in train_dir.glob("*/*.png")}
    held_files = {str(p) for p in held.glob("*/*.png")}
    samples = np.stack([np.asarray(data.load_image(f)) for f in sorted(held_files)])  # made-up samples: 30 images
    np.savez(tmp_path / "s.npz", samples, np.arange(len(samples)) // 3)
    # every image read, under the phase of evaluate.py that read it
    phase, reads, load_image = ["samples"], [], data.load_image

    def recorded(f, name):
        def wrapper(*a, **kw):
            phase.append(name if name != "reference" else a[7])  # reference's `what`: ref or train
            try:
                return f(*a, **kw)
            finally:
                phase.pop()
        return wrapper
    monkeypatch.setattr(data, "load_image", lambda f: reads.append((phase[-1], str(f))) or load_image(f))
    monkeypatch.setattr(evaluate, "classifier_source", recorded(evaluate.classifier_source, "classifier"))
    monkeypatch.setattr(metrics.ClassifierSpace, "__init__", recorded(metrics.ClassifierSpace.__init__, "classifier"))
    monkeypatch.setattr(evaluate, "reference", recorded(evaluate.reference, "reference"))
    args = ["--samples", str(tmp_path / "s.npz"), "--ref", str(held), "--train", str(train_dir), "--features",
            "classifier", "--classifier_epochs=6", "--diversity_features=pixels", "--cache_dir",
            str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--out", str(tmp_path / "m.json")]
    res = evaluate.main(args)
    read = lambda name: {f for p, f in reads if p == name}
    assert read("ref") == held_files and res["num_ref"] == 30  # the reference: the held-out images, all, only
    assert read("classifier") == read("train") == train_files  # the classifier and memorisation: the train split
    assert not {f for p, f in reads if p not in ("ref",)} & held_files  # no other phase reads a held-out image
    assert {p for p, _ in reads} == {"ref", "classifier", "train"}
    assert res["feature_space"] == "folder-classifier" and res["classifier_data"] == str(train_dir)
    assert str(train_dir) in res["feature_space_detail"] and res["diversity_space"] == "pixels"
    assert 0 <= res["class_accuracy"] <= 1 and res["fid"] is None  # 30 samples < 96 dimensions: skipped, named
    # the samples are the held-out images: none is a training image (in pixels, not within 0.12 of one)
    assert res["memorisation_ratio"] == 0 and res["avg_l2_top5"] > 0.12
    cached = glob.glob(str(tmp_path / "cache" / "folder_classifier_*.pt"))
    ck = torch.load(cached[0], weights_only=True)
    assert len(cached) == 1 and ck["num_val"] == 40 and ck["source"] == str(train_dir)  # a tenth of 400, held out
    # cached by content: a copy of the folder reuses it, reading no training image; a changed image trains anew
    shutil.copytree(train_dir, tmp_path / "copy")
    reads.clear()
    again = evaluate.main(args[:5] + [str(tmp_path / "copy")] + args[6:])
    assert not read("classifier") and again["classifier_val_accuracy"] == res["classifier_val_accuracy"]
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(sorted((tmp_path / "copy").glob("*/*.png"))[0])
    evaluate.main(args[:5] + [str(tmp_path / "copy")] + args[6:])
    assert len(glob.glob(str(tmp_path / "cache" / "folder_classifier_*.pt"))) == 2
    # one clear error each, before any work
    flat, few, other = tmp_path / "flat", tmp_path / "few", tmp_path / "other"
    shutil.copytree(train_dir / "3", flat)
    shutil.copytree(train_dir, few)
    for f in sorted((few / "7").glob("*.png"))[3:]:
        os.remove(f)
    shutil.copytree(held, other)
    os.rename(other / "9", other / "nine")
    for bad, message in [(["--train", str(flat)], "has images outside class subfolders"),
                         (["--train", str(few)], "class '7' has 3 images; the classifier needs 10 of each class"),
                         (["--ref", str(other)], "has the classes ['0', '1', '2', '3', '4', '5', '6', '7', '8', "
                                                 "'nine'], the classifier's"),
                         (["--train", ""], "ref '" + str(held) + "' has the classes")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate.main(args + bad)


def test_a_classifier_that_cannot_tell_the_classes_apart_is_refused_before_any_metric(tmp_path, monkeypatch):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=20, resolution=16, seed=5)
    np.savez(tmp_path / "s.npz", ds.images_uint8(), ds.labels)
    calls = []
    extract = metrics.ClassifierSpace.extract
    monkeypatch.setattr(metrics.ClassifierSpace, "extract", lambda *a, **k: calls.append(1) or extract(*a, **k))
    base = ["--samples", str(tmp_path / "s.npz"), "--cache_dir", str(tmp_path / "cache"), "--progress=False",
            "--device=cpu", "--synthetic_ref_size=30", "--classifier_path"]
    # our rule: right on half the held-out images at least, and beating chance (1 in 10) at p < 0.001
    at_chance = ("the classifier space cannot tell the classes apart, so its FID, precision and recall would be noise: "
                 "its classifier (synthetic) is right on 2 of its 20 held-out images (10%; chance 10%), and "
                 "evaluate.py needs 10 of them right (at least 50%, and beating chance at p < 0.001 by a binomial "
                 "test). Train it on more images (--classifier_size), for more epochs (--classifier_epochs, now 6), "
                 "or use --features inception (--classifier_path")
    for accuracy, num_val, message in [
            (0.1, 20, at_chance),
            (0.45, 20, "right on 9 of its 20 held-out images (45%; chance 10%), and evaluate.py needs 10"),  # floor
            (0.5, 10, "right on 5 of its 10 held-out images (50%; chance 10%), and evaluate.py needs 6"),  # p 0.0016
            (1.0, 2, "needs more than 2 held-out images (no count of so few can show it beats chance)"),
            (0.9, None, "does not record how many held-out images measured its accuracy")]:
        path = untrained_classifier(tmp_path / "c.pt", accuracy, num_val)
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate.main(base + [path])
    assert calls == [] and not os.path.exists(tmp_path / "cache")  # refused before any image went through it
    assert [evaluate.correct_needed(n, 0.1) for n in (2, 10, 20, 200)] == [None, 6, 10, 100]
    # 6 of 10 pass; the report says how the classifier was measured
    res = evaluate.main(base + [untrained_classifier(tmp_path / "c.pt", 0.6, 10), "--diversity_features=none"])
    assert (res["classifier_val_accuracy"], res["classifier_val_images"], res["classifier_chance"]) == (0.6, 10, 0.1)
    with open(os.path.splitext(tmp_path / "s.npz")[0] + "_metrics.json") as f:
        assert json.load(f)["classifier_chance"] == 0.1


@pytest.mark.slow
def test_the_digits_classifier_of_too_few_images_is_refused_in_one_line(tmp_path):
    # the run: a class-folder classifier trained on too little, a quarter right where a tenth is chance
    study.write_digits(tmp_path / "d", per_class=12, held_out=3)
    result = run([sys.executable, "evaluate.py", "--samples", str(tmp_path / "d" / "heldout"), "--ref",
                  str(tmp_path / "d" / "heldout"), "--train", str(tmp_path / "d" / "train"), "--features",
                  "classifier", "--classifier_epochs=2", "--cache_dir", str(tmp_path / "cache"), "--progress=False",
                  "--device=cpu", "--out", str(tmp_path / "m.json")], check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: the classifier space cannot tell the classes apart")
    assert f"its classifier ({tmp_path / 'd' / 'train'}) is right on 3 of its 12 held-out images" in result.stderr
    assert f"more images in {tmp_path / 'd' / 'train'}" in result.stderr and "--features inception" in result.stderr
    assert not os.path.exists(tmp_path / "m.json")


def test_fid_against_stored_statistics_counts_only_the_samples(tmp_path):
    # a reference batch in ADM's layout (in the classifier space: 96-d): statistics of its whole set, and 20 images
    from data import SyntheticShapes
    path = untrained_classifier(tmp_path / "c.pt", 0.9)
    space = metrics.ClassifierSpace(path, "cpu")
    images = SyntheticShapes(size=20, resolution=16, seed=7).images_uint8()
    whole_set = space.extract(evaluate.synthetic_images(300, 8, 16), 100)["pool"]
    mu, sigma = fid.statistics(whole_set)
    np.savez(tmp_path / "ref.npz", images, mu=mu, sigma=sigma, feature_space=np.array(space.name))
    base = ["--ref", str(tmp_path / "ref.npz"), "--classifier_path", path, "--features=classifier",
            "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--diversity_features=none"]
    samples = SyntheticShapes(size=100, resolution=16, seed=9).images_uint8()
    np.savez(tmp_path / "s.npz", samples)
    res = evaluate.main(base + ["--samples", str(tmp_path / "s.npz")])
    # 100 samples, more than the 96 dimensions: FID against the stored statistics, though the file holds 20 images
    s = space.extract(as_images(samples), 100)["pool"]
    assert res["fid"] == pytest.approx(fid.frechet_distance(*fid.statistics(s), mu, sigma), rel=1e-6)
    assert "fid" not in res["skipped"] and res["num_ref"] == 20
    # precision and recall come from the 20 images
    r = space.extract(as_images(images), 100)["pool"]
    assert (res["precision"], res["recall"]) == pytest.approx(fid.precision_recall(r, s))
    # the samples' side still counts: 50 samples are too few for a 96-d covariance
    np.savez(tmp_path / "s50.npz", samples[:50])
    res = evaluate.main(base + ["--samples", str(tmp_path / "s50.npz")])
    assert res["fid"] is None
    assert res["skipped"]["fid"] == "50 samples, fewer than the 96 feature dimensions: each set needs as many"


@pytest.mark.slow
def test_save_ref_writes_a_reference_that_gives_the_fid_of_its_folder(tmp_path, weights, monkeypatch):
    _, path = weights
    monkeypatch.setattr(fid, "unmeasurable", lambda *a, **k: {})  # which statistics FID uses, not how many samples
    rng = np.random.default_rng(3)
    os.makedirs(tmp_path / "val")
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "val" / f"{i:02d}.png")
    np.savez(tmp_path / "s.npz", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    base = ["--device=cpu", f"--inception_weights={path}", "--cache_dir", str(tmp_path / "cache"), "--progress=False",
            "--fd_method=eigh", "--is_split_size=0", "--is_splits=2", "--diversity_features=none"]
    written = evaluate.main(base + ["--ref", str(tmp_path / "val"), "--save_ref", str(tmp_path / "ref.npz"),
                                    "--save_ref_images=4"])
    assert (written["num_images"], written["num_kept"]) == (10, 4)
    with np.load(tmp_path / "ref.npz") as z:
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(z.files)  # ADM's layout
        np.testing.assert_array_equal(z["arr_0"], images[[0, 3, 6, 9]])  # evenly spread over the folder
        assert z["mu"].shape == (2048,) and z["sigma_s"].shape == (2023, 2023) and int(z["num_images"]) == 10
        assert str(z["resize"]) == "pytorch-fid" and str(z["feature_space"]) == fid.FEATURE_SPACE
    assert not leftovers(tmp_path / "ref.npz")
    folder = evaluate.main(base + ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "val")])
    stored = evaluate.main(base + ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz")])
    assert stored["fid"] == pytest.approx(folder["fid"], rel=1e-9) and folder["fid"] > 0
    assert stored["sfid"] == pytest.approx(folder["sfid"], rel=1e-9)
    # the resize the statistics were made with (recorded), not ADM's tf1; the 4 images for precision/recall
    assert "resize=pytorch-fid" in stored["feature_space_detail"] and stored["num_ref"] == 4
    assert stored["num_ref_statistics"] == 10 and "10 < 50000 reference images" in stored["warnings"][0]
    assert stored["ref_statistics"] == (f"stored in {tmp_path / 'ref.npz'} by evaluate.py --save_ref, over 10 "
                                        "reference images; its 4 images give precision/recall")


def test_save_ref_crops_a_folder_of_many_sizes_and_bad_input_fails_first(tmp_path, classifier):
    from data import center_crop_arr, load_image
    rng = np.random.default_rng(4)
    os.makedirs(tmp_path / "val")
    for i, size in enumerate([(40, 30), (16, 16), (64, 20), (33, 17), (20, 50)] * 4):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "val" / f"{i}.png")
    base = ["--features=classifier", f"--classifier_path={classifier}", "--cache_dir", str(tmp_path / "cache"),
            "--progress=False", "--device=cpu", "--ref", str(tmp_path / "val")]
    with pytest.raises(ValueError, match=re.escape("all images of a folder must have one size (--save_ref_crop")):
        evaluate.main(base + ["--save_ref", str(tmp_path / "ref.npz")])
    evaluate.main(base + ["--save_ref", str(tmp_path / "ref.npz"), "--save_ref_crop=16"])
    files = sorted(glob.glob(str(tmp_path / "val" / "*.png")))
    cropped = np.stack([center_crop_arr(load_image(f), 16) for f in files])
    space = metrics.ClassifierSpace(classifier, "cpu")
    with np.load(tmp_path / "ref.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], cropped)  # 20 images, fewer than 10K: every one
        np.testing.assert_allclose(z["mu"], space.extract(as_images(cropped), 50)["pool"].mean(0), rtol=1e-5, atol=1e-6)
        assert "resize" not in z.files and str(z["feature_space"]) == "synthetic-classifier"
    # 0 images: statistics only, as pytorch-fid's --save-stats
    evaluate.main(base + ["--save_ref", str(tmp_path / "stats.npz"), "--save_ref_crop=16", "--save_ref_images=0"])
    with np.load(tmp_path / "stats.npz") as z:
        assert "arr_0" not in z.files and int(z["num_images"]) == 20
    np.savez(tmp_path / "s.npz", cropped)
    for bad, message in [(["--samples", str(tmp_path / "s.npz")], "evaluates no samples: drop --samples"),
                         (["--ref", str(tmp_path / "stats.npz")], "holds statistics already"),
                         (["--ref", "synthetic"], "--save_ref needs --ref, a folder or an .npz"),
                         (["--ref", str(tmp_path / "s.npz"), "--save_ref_crop=16"], "crops the images of a folder")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate.main(base + ["--save_ref", str(tmp_path / "x.npz")] + bad)
    assert not os.path.exists(tmp_path / "x.npz")


def test_clip_score_reads_the_prompts_as_sample_py_does(tmp_path, classifier):
    from conftest import tiny_clip

    import text
    tiny_clip(tmp_path / "clip.pt", torchscript=False)
    images = np.random.default_rng(5).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images)
    prompts = ["a red circle", "un cœur rouge", "a ring", "a blue star"]
    # blank lines and runs of spaces: data.read_prompts drops and normalises them, as sample.py did on reading
    (tmp_path / "s_prompts.txt").write_text("a red circle\n\n  un cœur   rouge \na ring\na blue star\n",
                                            encoding="utf-8")
    args = ["--samples", str(tmp_path / "s.npz"), f"--clip_model={tmp_path / 'clip.pt'}", f"--classifier_path="
            f"{classifier}", "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu",
            "--synthetic_ref_size=30", "--diversity_features=none"]
    res = evaluate.main(args)
    model, preprocess = text.load_clip(str(tmp_path / "clip.pt"))
    direct = metrics.clip_score(evaluate.open_images(str(tmp_path / "s.npz")), prompts, model, preprocess, 3, "cpu")
    assert res["clip_score"] == pytest.approx(direct) and res["prompts"] == str(tmp_path / "s_prompts.txt")
    (tmp_path / "few.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=re.escape("4 samples need as many prompts, it holds 2")):
        evaluate.main(args + ["--prompts", str(tmp_path / "few.txt"), "--cache_dir", str(tmp_path / "none")])
    assert not os.path.exists(tmp_path / "none")
