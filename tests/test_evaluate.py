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
from conftest import ENV, ROOT, TINY_VAE, randomize, run, wait_until
from PIL import Image

import evaluate
import fid
import metrics
import study
from vae import VQModel


def test_evaluate_unknown_key():
    with pytest.raises(ValueError, match="bogus"):
        evaluate.main(["--samples", "x.npz", "--bogus", "1"])


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
            "--device=cpu", "--classifier_size=400", "--classifier_epochs=3", "--synthetic_ref_size=170",
            "--out", str(tmp_path / "m.json")]
    res = evaluate.main(base + ["--train=synthetic", "--synthetic_train_size=50", f"--entropy_vq={tmp_path / 'vq'}"])
    assert res["feature_space"] == res["diversity_space"] == "synthetic-classifier" and res["skipped"] == {}
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
    torch.save({"model": net.state_dict(), "resolution": 16, "num_classes": 10, "val_accuracy": 0.5}, tmp_path / "c.pt")
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


def test_evaluate_cli_on_a_folder(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from data import SyntheticShapes
    ds = SyntheticShapes(size=12, resolution=16, seed=3)
    os.makedirs(tmp_path / "imgs")
    for i, img in enumerate(ds.images_uint8()):
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i:03d}.png")
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--samples", str(tmp_path / "imgs"),
           "--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--classifier_size=100",
           "--classifier_epochs=1", "--synthetic_ref_size=30", "--out", str(tmp_path / "r.json")]
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


def test_evaluate_skips_what_too_few_samples_cannot_measure(tmp_path):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=5, resolution=16, seed=5)
    args = ["--cache_dir", str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--classifier_size=100",
            "--classifier_epochs=1", "--synthetic_ref_size=30"]
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


def test_evaluate_caches_and_report_are_written_whole_and_unreadable_caches_made_again(tmp_path, capsys):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=12, resolution=16, seed=5)
    np.savez(tmp_path / "s.npz", ds.images_uint8(), ds.labels)
    classifier, report = tmp_path / "classifier.pt", tmp_path / "report.json"
    args = ["--samples", str(tmp_path / "s.npz"), "--classifier_path", str(classifier), "--cache_dir",
            str(tmp_path / "cache"), "--progress=False", "--device=cpu", "--classifier_size=100",
            "--classifier_epochs=1", "--synthetic_ref_size=30", "--out", str(report)]
    # a kill while the classifier is written: torch.save blocks writing into a FIFO, so the kill lands mid-write
    os.mkfifo(f"{classifier}.tmp")
    proc = subprocess.Popen([sys.executable, "evaluate.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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
    assert classifier.exists() and not os.path.exists(f"{classifier}.tmp") and json.loads(report.read_text()) == first
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
    assert "Traceback" not in result.stderr and report.read_text() == before and not os.path.exists(f"{report}.tmp")


def test_classifier_space_of_a_class_folder_learns_the_train_split_and_never_reads_held_out_images(tmp_path,
                                                                                                      monkeypatch):
    import data
    study.write_digits(tmp_path / "d", per_class=12, held_out=3)
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
            "classifier", "--classifier_epochs=2", "--diversity_features=pixels", "--cache_dir",
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
    assert len(cached) == 1 and ck["num_val"] == 12 and ck["source"] == str(train_dir)  # a tenth of 120, held out
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
