"""study.py: runs, tables, plots, seeds and marks, the digits export, downstream and distillation stages."""
import contextlib
import csv
import glob
import json
import os
import re
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
from conftest import ENV, ROOT, TINY, assert_png, descendants, read, train, wait_until
from PIL import Image

import study

STUDY_EVAL = ("--train=synthetic --synthetic_train_size=64 --synthetic_ref_size=100 --classifier_size=2000 "
              "--classifier_epochs=3 --progress=False --device=cpu")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A 2-run study (clean, eta 10%) of 2 training steps, 100 samples at one scale (FID needs as many as the 96
    feature dimensions): (its arguments, out_dir, rows)."""
    out = tmp_path_factory.mktemp("study")
    args = [f"--out_dir={out}", "--runs=clean,eta10", "--cfg_scales=2", "--samplers=dpm++3", "--num_samples=100",
            "--train_args=" + " ".join(TINY + ["--max_steps=2"]), f"--eval_args={STUDY_EVAL} --cache_dir={out}/cache"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        rows = study.main(args)
    return args, out, rows


@pytest.mark.slow
def test_study_trains_each_run_and_writes_the_table_and_plots(tiny_study):
    _, out, rows = tiny_study
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["run", "eta", "sampler", "cfg_scale", "num_samples", "feature_space", "seeds",
                              *[c for k in study.METRICS for c in (k, k + "_seed_std")],
                              *[k + c for k in study.COMPARED
                                for c in ("_diff", "_ci_low", "_ci_high", "_p", "_p_holm")],
                              "beyond_noise", "no_test", "test_family"]
    assert table[1]["no_test"].endswith(": no test, fewer than 2 seeds a side") and table[1]["fid_p"] == ""
    assert float(table[1]["fid_diff"]) == pytest.approx(rows[1]["fid"] - rows[0]["fid"])
    assert {"rmd_top1", "sample_entropy", "toppr_f1"} <= set(table[0])  # the paper's diversity metrics have columns
    assert [(r["run"], r["eta"], r["sampler"], r["cfg_scale"], r["num_samples"]) for r in table] == \
        [("clean", "0.0", "dpm++3", "2.0", "100"), ("eta10", "10.0", "dpm++3", "2.0", "100")]
    report = json.loads((out / "eta10" / "samples_dpm++3_cfg2.0_n100_metrics.json").read_text())
    for key in ("fid", "is_classifier", "precision", "recall", "class_accuracy", "memorisation_ratio", "avg_l2_top5",
                "rmd_top1"):
        assert float(table[1][key]) == report[key] == rows[1][key], key  # evaluate.py's numbers, every metric
    assert table[1]["feature_space"] == "synthetic-classifier" and table[1]["is"] == table[1]["sfid"] == ""
    markdown = (out / "results.md").read_text()
    assert "| eta10 | 10 | dpm++3 | 2 | 100 |" in markdown and "IS (classifier) ↑" in markdown
    assert "sFID" not in markdown
    # the runs are what their names say
    assert json.loads((out / "eta10" / "corruption.json").read_text())["eta"] == 0.1
    assert not os.path.exists(out / "clean" / "corruption.json")
    for png, size in [("metrics_vs_eta.png", None), ("guidance.png", None), ("grids.png", (2 * 280, 360))]:
        with Image.open(out / png) as image:
            assert image.format == "PNG" and (size is None or image.size == size), png
            image.verify()


@pytest.mark.slow
def test_digits_export_splits_held_out_images_and_trains_through_image_folder(tmp_path):
    from sklearn.datasets import load_digits
    study.main([f"--export_digits={tmp_path / 'd3'}", "--digits_per_class=3", "--digits_held_out=2"])
    study.write_digits(tmp_path / "d5", per_class=5, held_out=2)
    files = lambda root, split: {p.relative_to(root / split) for p in (root / split).glob("*/*.png")}
    train3, held3 = files(tmp_path / "d3", "train"), files(tmp_path / "d3", "heldout")
    assert len(train3) == 30 and len(held3) == 20 and {p.parent.name for p in train3} == set("0123456789")
    assert not {p.name for p in train3} & {p.name for p in held3}  # no image is in both
    assert train3 <= files(tmp_path / "d5", "train") and held3 == files(tmp_path / "d5", "heldout")  # nested
    digits = load_digits()
    some = sorted(train3)[0]
    index = int(some.stem)
    assert digits.target[index] == int(some.parent.name)
    with Image.open(tmp_path / "d3" / "train" / some) as image:
        assert image.mode == "L" and image.size == (16, 16)
        small = np.asarray(image.resize((8, 8), Image.BOX), dtype=np.float64)  # back to the 8x8 grid, roughly
    assert np.corrcoef(small.ravel(), digits.images[index].ravel())[0, 1] > 0.9
    train(tmp_path / "run", f"--data_path={tmp_path / 'd3' / 'train'}", "--flip=False", "--max_steps=1",
          "--grid_steps=2")
    assert "10 classes" in (tmp_path / "run" / "log.txt").read_text()


def test_study_aggregates_seeds_and_marks_what_is_beyond_the_noise(tmp_path):
    def row(run, seed, fid, recall):
        return dict(dict.fromkeys(study.METRICS), run=run, seed=seed, eta=5.0 if run == "eta5" else 0.0,
                    sampler="dpm++50", cfg_scale=2.0, num_samples=100, feature_space="x", fid=fid, recall=recall,
                    is_classifier_std=0.1)
    rows = [row("clean", 0, 10.0, 0.50), row("clean", 1, 10.4, 0.60), row("clean", 2, 9.8, 0.40),
            row("eta5", 0, 14.0, 0.52), row("eta5", 1, 14.5, 0.45), row("eta5", 2, 13.9, 0.58),
            row("cep-u", 0, 9.0, 0.5)]
    clean, eta5, cep = study.aggregate(rows)
    assert (clean["seeds"], eta5["seeds"], cep["seeds"]) == (3, 3, 1)
    assert eta5["fid"] == pytest.approx(14.133333) and eta5["fid_seed_std"] == pytest.approx(np.std([14, 14.5, 13.9],
                                                                                                  ddof=1))
    assert scipy.stats.ttest_ind([14, 14.5, 13.9], [10, 10.4, 9.8], equal_var=False).pvalue < 0.05
    assert eta5["beyond_noise"] == "fid"  # recall's difference is inside the spread
    assert clean["beyond_noise"] == cep["beyond_noise"] == "" and cep["fid_seed_std"] is None  # one seed: no test
    study.write_table([clean, eta5, cep], str(tmp_path / "r"))
    markdown = (tmp_path / "r.md").read_text()
    assert "is_classifier_std" in (tmp_path / "r.csv").read_text() and " std" not in markdown.split("\n")[3]
    assert "| eta5 | 5 | dpm++50 | 2 | 100 | 14.13 ± 0.32 * |" in markdown
    assert "| cep-u | 0 | dpm++50 | 2 | 100 | 9 |" in markdown
    assert "Welch's t, Holm over the 2 run-vs-clean comparisons of this table" in markdown  # eta5's FID and recall
    assert "| eta5 | 5 | dpm++50 | 2 | 100 | +4.07 (+3.36 to +4.78) * | +0.0167 (-0.188 to +0.221) |" in markdown
    assert "| cep-u | 0 | dpm++50 | 2 | 100 | -1.07 (no test) | +0 (no test) |" in markdown
    assert "| FID ↓ | recall ↑ |" in markdown  # feature space "x": FID's label
    study.write_table(study.aggregate([dict(r, feature_space="folder-classifier") for r in rows]), str(tmp_path / "c"))
    markdown = (tmp_path / "c.md").read_text()  # a Frechet distance in a classifier's features is named so
    assert "| FD (classifier features) ↓ | recall ↑ |" in markdown and "FID" not in markdown


def metric_rows(runs, seeds, rng, shift=0.0):
    """Made-up rows of a study: every compared metric of every run and seed drawn from N(0, 1), the first run after
    clean's FID moved by `shift`."""
    return [dict(dict.fromkeys(study.METRICS), run=run, seed=seed, eta=0.0, sampler="dpm++50", cfg_scale=2.0,
                 num_samples=100, feature_space="x",
                 **{k: rng.normal() + (shift if (run, k) == (runs[1], "fid") else 0) for k in study.COMPARED})
            for run in runs for seed in range(seeds)]


@pytest.mark.slow
def test_marks_on_null_data_keep_the_stated_family_wise_rate():
    """2000 studies of 4 runs against clean, 12 metrics each (a family of 48), 3 seeds a side, no true difference:
    the share of studies with any mark is at most 0.05 (and measured), where testing each at p < 0.05 marks most."""
    rng, studies = np.random.default_rng(0), 2000
    marked = raw_marked = 0
    for _ in range(studies):
        rows = study.aggregate(metric_rows(["clean", "eta5", "eta10", "cep-u", "ip"], 3, rng))
        assert rows[1]["test_family"].startswith("Welch's t, Holm over the 48 run-vs-clean comparisons")
        marked += any(r["beyond_noise"] for r in rows)
        raw_marked += any(r[k + "_p"] is not None and r[k + "_p"] < 0.05 for r in rows for k in study.COMPARED)
    print(f"family-wise false-mark rate {marked / studies:.4f}, unadjusted {raw_marked / studies:.4f}")
    assert marked / studies <= 0.05 + 0.01  # 0.01: two standard errors of the estimate at 0.05
    assert raw_marked / studies > 0.5  # the old rule: about 3 in 4 null studies show a mark


def test_a_true_shift_of_3_sd_with_5_seeds_a_side_is_found():
    """Clean and one run, 12 metrics (a family of 12), the run's FID 3 seed-to-seed sds higher: found in a draw whose
    seed spread is exactly 1 sd, and in most random draws (the power is measured: Holm over 12 pays for the family)."""
    rows = metric_rows(["clean", "eta5"], 5, np.random.default_rng(0))
    base = np.array([-1.2, -0.4, 0.1, 0.6, 0.9])
    base = (base - base.mean()) / base.std(ddof=1)
    for i, seed_row in enumerate(rows):
        seed_row["fid"] = base[i % 5] + 3.0 * (seed_row["run"] == "eta5")
    clean, eta5 = study.aggregate(rows)
    assert eta5["fid_diff"] == pytest.approx(3.0) and eta5["fid_ci_low"] > 0 and "fid" in eta5["beyond_noise"]
    assert eta5["fid_p"] == pytest.approx(scipy.stats.ttest_ind(base + 3, base, equal_var=False).pvalue)
    rng, draws = np.random.default_rng(1), 400
    found = sum("fid" in study.aggregate(metric_rows(["clean", "eta5"], 5, rng, shift=3.0))[1]["beyond_noise"]
                .split(",") for _ in range(draws))
    print(f"power at a shift of 3 sd, 5 seeds a side, a family of 12: {found / draws:.3f}")
    assert found / draws > 0.55  # measured 0.665 over 1000 draws


def test_no_test_and_no_mark_without_spread_or_without_2_seeds_a_side():
    assert study.welch([1.0, 1.0, 1.0], [0.998] * 3) == dict(diff=pytest.approx(0.002), ci_low=None, ci_high=None,
                                                              p=None, no_test="no test, no spread on either side")
    assert study.welch([1.0], [0.5, 0.7])["no_test"] == "no test, fewer than 2 seeds a side"
    rows = [dict(dict.fromkeys(study.METRICS), run=run, seed=seed, eta=0.0, sampler="dpm++50", cfg_scale=2.0,
                 num_samples=100, feature_space="x", fid=value, recall=0.5 + 0.01 * seed)
            for run, value in [("clean", 1.0), ("eta5", 0.998)] for seed in range(3)]
    clean, eta5 = study.aggregate(rows)
    assert eta5["beyond_noise"] == "" and eta5["fid_p"] is None and eta5["no_test"] == "fid: no test, no spread on " \
        "either side" and eta5["recall_p"] == pytest.approx(1.0)
    assert "Holm over the 1 run-vs-clean comparisons" in eta5["test_family"]  # recall only: FID has no test


def test_welch_and_holm_match_their_references():
    a, b = [14.0, 14.5, 13.9, 14.2], [10.0, 10.4, 9.8]
    reference = scipy.stats.ttest_ind(a, b, equal_var=False)
    result = study.welch(a, b)
    assert result["p"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(tuple(reference.confidence_interval(0.95)), rel=1e-9)
    assert result["diff"] == pytest.approx(np.mean(a) - np.mean(b)) and result["no_test"] == ""
    assert study.welch([1.0, 1.0], [0.0, 0.5])["p"] is not None  # one side without spread: Welch's t is defined
    # Holm: p sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, kept non-decreasing
    assert study.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert study.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and study.holm([]) == []


def test_a_table_joined_from_others_is_one_family(tmp_path):
    """results_vs_n joins each n's rows: its marks are adjusted over all of its comparisons, and say so."""
    rng = np.random.default_rng(0)
    rows = [dict(r, n=n) for n in (5, 10) for r in study.aggregate(metric_rows(["clean", "eta5"], 3, rng))]
    assert "Holm over the 12 run-vs-clean" in rows[1]["test_family"]
    study.write_table(rows, str(tmp_path / "joined"))
    assert "Holm over the 24 run-vs-clean comparisons of this table" in (tmp_path / "joined.md").read_text()
    with open(tmp_path / "joined.csv") as f:
        assert {r["test_family"] for r in csv.DictReader(f)} == {rows[0]["test_family"]}


@pytest.mark.slow
def test_study_digits_sweeps_n_against_the_held_out_images_in_one_classifier_space(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main([f"--out_dir={tmp_path}", "--digits=5,10", "--digits_held_out=10", "--runs=clean",
                       "--samplers=dpm++2", "--cfg_scales=2", "--num_samples=100",
                       "--train_args=--model=DiT-Ti/8 --global_batch_size=8 --num_workers=0 --grid_steps=2 "
                       "--max_steps=2", "--eval_args=--classifier_epochs=4 --diversity_features=pixels "
                       f"--progress=False --device=cpu --cache_dir={tmp_path / 'cache'}"])
    assert [(r["run"], r["n"]) for r in rows] == [("clean", 5), ("clean", 10)]
    for n in (5, 10):
        report = json.loads((tmp_path / f"n{n}" / "clean" / "samples_dpm++2_cfg2.0_n100_metrics.json").read_text())
        assert report["ref"] == str(tmp_path / f"n{n}" / "heldout") and report["num_ref"] == 100
        assert report["config"]["train"] == str(tmp_path / f"n{n}" / "train")  # memorisation: the n-image split
        # one classifier for every n, of the whole training split: the FIDs of different n are comparable
        assert report["classifier_data"] == str(tmp_path / "digits" / "train")
        assert report["feature_space"] == "folder-classifier" and report["diversity_space"] == "pixels"
        assert len(list((tmp_path / f"n{n}" / "train").glob("*/*.png"))) == 10 * n
    assert len(glob.glob(str(tmp_path / "cache" / "folder_classifier_*.pt"))) == 1
    assert "| clean | 5 | 0 | dpm++2 | 2 | 100 |" in (tmp_path / "results_vs_n.md").read_text()
    assert_png(tmp_path / "metrics_vs_n.png")


@pytest.mark.slow
def test_study_reuses_what_exists_and_sweeps_guidance_scales(tiny_study, monkeypatch):
    args, out, _ = tiny_study
    done = [out / "clean" / name for name in ("ckpt.pt", "samples_0000002.png", "samples_dpm++3_cfg2.0_n100.npz",
                                               "samples_dpm++3_cfg2.0_n100_metrics.json")]
    before = [os.path.getmtime(p) for p in done]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main(args + ["--runs=clean", "--cfg_scales=2,4"])
    assert [os.path.getmtime(p) for p in done] == before  # not retrained, resampled or re-evaluated
    assert "ckpt.pt is at step 2, max_steps=2: nothing to train" in (out / "clean" / "log.txt").read_text()
    assert [(r["run"], r["cfg_scale"]) for r in rows] == [("clean", 2.0), ("clean", 4.0)]
    assert np.load(out / "clean" / "samples_dpm++3_cfg4.0_n100.npz")["arr_0"].shape == (100, 16, 16, 3)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


@pytest.mark.slow
def test_study_sweeps_a_checkpoint_with_two_samplers_through_torchrun(tiny_study, monkeypatch):
    args, out, _ = tiny_study
    log = (out / "eta10" / "log.txt").read_text()
    reused = out / "eta10" / "samples_dpm++3_cfg2.0_n100.npz"
    before = os.path.getmtime(reused)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main(args + [f"--ckpt={out}/eta10/ckpt.pt", "--samplers=dpm++3,ddpm4", "--nproc=2"])
    assert (out / "eta10" / "log.txt").read_text() == log and os.path.getmtime(reused) == before  # trains nothing
    assert [(r["run"], r["sampler"], r["eta"]) for r in rows] == [("eta10", "dpm++3", None), ("eta10", "ddpm4", None)]
    assert rows[1]["num_samples"] == 100 and np.isfinite(rows[1]["fid"])


def test_study_runs_name_the_papers_baselines():
    assert study.run_flags("eta5-random") == (5.0, ["--corrupt=0.05", "--corrupt_mode=random"])
    assert study.run_flags("ls") == (0.0, ["--label_smoothing=0.1"]) and study.run_flags("dropout")[0] == 0.0
    assert "--cep_fixed=0.05" in study.run_flags("cep-u-fixed")[1]
    assert study.run_flags("cep-u4.5") == (0.0, ["--cep", "--cep_type=uniform", "--cep_scale=4.5"])
    assert study.run_flags("cep-g2")[1][1:] == ["--cep_type=gaussian", "--cep_scale=2.0"]
    assert study.on_eta_axis({"run": "eta5"}) and not study.on_eta_axis({"run": "eta5-random"})
    train_keys = set(re.findall(r"^(\w+) = ", open(os.path.join(ROOT, "train.py")).read(), re.M))
    flags = {f[2:].split("=")[0] for _, args in study.RUNS.items() for f in args}
    assert flags <= train_keys and flags | {"corrupt", "corrupt_mode"} <= study.OWNED["train.py"]
    for bad in ("eta", "cep-u0", "cep-x2"):
        with pytest.raises(ValueError, match="cep-u-fixed"):
            study.run_flags(bad)


@pytest.mark.slow
def test_study_downstream_stage_adapts_each_run_and_tables_it(tiny_study, monkeypatch):
    args, out, _ = tiny_study
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study.main(args + ["--adapters=controlnet-mask", "--adapt_args=--max_steps=1 --synthetic_scale=0.6",
                       "--downstream_eval_args=--classifier_size=2000 --classifier_epochs=3 --progress=False "
                       f"--device=cpu --cache_dir={out}/cache"])
    with open(out / "downstream.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["eta"], r["sampler"], r["num_samples"]) for r in table] == \
        [("clean", "0.0", "controlnet-mask", "100"), ("eta10", "10.0", "controlnet-mask", "100")]
    for run in ("clean", "eta10"):
        state = torch.load(out / run / "controlnet-mask" / "ckpt.pt", weights_only=True)
        assert state["config"]["init"] == str(out / run / "ckpt.pt") and state["config"]["synthetic_scale"] == 0.6
        assert state["config"]["cep"] is False  # CEP is not carried into the adaptation unless asked
    assert "adapted with" in (out / "downstream.md").read_text()
    assert_png(out / "downstream_vs_eta.png")


@pytest.mark.slow
def test_study_distils_each_run_and_tables_the_students_beside_the_teachers(tiny_study, monkeypatch):
    args, out, _ = tiny_study
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main(args + ["--distill_steps=1,2", "--distill_args=--max_steps 2 --ema_decay 0.95"])
    assert sorted((r["run"], r["sampler"]) for r in rows) == [(run, s) for run in ("clean", "eta10")
                                                              for s in ("dpm++3", "lcm1", "lcm2")]
    assert all(np.isfinite(r["fid"]) and r["num_samples"] == 100 for r in rows)
    state = torch.load(out / "eta10" / "lcm" / "ckpt.pt", weights_only=True)
    assert state["consistency"]["teacher"] == str(out / "eta10" / "ckpt.pt") and state["config"]["corrupt"] == 0.1
    assert os.path.isfile(out / "eta10" / "lcm" / "samples_lcm2_cfg2.0_n100_metrics.json")


@pytest.mark.parametrize("arg, message", [
    ("--distill_steps=4x", "distill_steps"), ("--distill_args=--teacher a.pt", "set teacher"),
    ("--adapters=lora-canny", "lora-canny"), ("--adapt_args=--control canny", "set control"),
    ("--runs=clean,eta150", "eta150"), ("--runs=cep", "'cep'"), ("--samplers=dpm50", "dpm50"),
    ("--train_args=--max_steps 9 --corrupt 0.1", "set corrupt"), ("--sample_args=--cfg_scale 2", "set cfg_scale"),
    ("--eval_args=--reff synthetic", "reff"), ("--ckpt=/nonexistent/ckpt.pt", "not found"),
    ("--seeds=0,0", "seeds='0,0'"), ("--seeds=a", "seeds='a'")])
def test_study_rejects_bad_settings_before_any_work(tmp_path, arg, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        study.main([f"--out_dir={tmp_path}/study", arg])
    assert not os.path.exists(tmp_path / "study")


def test_study_plots_cep_and_ip_as_reference_lines(tmp_path):
    rows = [dict(dict.fromkeys(study.METRICS), run=run, eta=eta, sampler="dpm++50", cfg_scale=scale, num_samples=100,
                 feature_space="synthetic-classifier", fid=10 + eta - scale, is_classifier=5 + scale,
                 is_classifier_std=0.1, precision=0.5, recall=0.4)
            for run, eta in [("clean", 0.0), ("eta5", 5.0), ("eta20", 20.0), ("cep-u", 0.0), ("ip", 0.0)]
            for scale in (1.5, 4.0)]
    study.plot_metrics_vs_eta(study.aggregate(rows), tmp_path / "eta.png")
    study.plot_guidance(study.aggregate(rows), tmp_path / "guidance.png")
    with Image.open(tmp_path / "eta.png") as image:
        assert image.size == (4 * 4 * 80, int(3.2 * 80))  # a panel per measured metric, none for the stds
    assert_png(tmp_path / "guidance.png")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_study_reaches_train_py_which_saves_and_nothing_is_left_running(tmp_path, signum):
    args = [sys.executable, "study.py", f"--out_dir={tmp_path}", "--runs=clean",
            "--train_args=" + " ".join(TINY + ["--max_steps=100000"])]
    with open(tmp_path / "study.out", "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.PIPE, text=True)
    running = []
    try:
        wait_until(lambda: "step 1 |" in read(tmp_path / "clean" / "log.txt"), proc)  # train.py is training
        running += descendants(proc.pid)
        assert running
        proc.send_signal(signum)
        stderr = proc.communicate(timeout=120)[1]
    finally:
        for pid in [proc.pid] + descendants(proc.pid) + running:  # whatever a failure leaves, orphans included
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 128 + signum
    assert stderr.splitlines()[-1] == f"study stopped by {signum.name} (train.py exited with 0); to continue, run " \
        "the same command again: it reuses what exists"
    assert not [pid for pid in running if os.path.exists(f"/proc/{pid}")]  # train.py and whatever it started
    assert "SIGTERM: saved" in read(tmp_path / "clean" / "log.txt") and os.path.isfile(tmp_path / "clean" / "ckpt.pt")


def test_plots_of_one_n_and_one_seed_say_what_was_not_measured_and_label_their_axes_plainly(tmp_path):
    """evaluate.py skipped FID (None), each run has one seed at one n, and precision differs in its 7th digit."""
    rows = [dict(dict.fromkeys(study.METRICS), **dict.fromkeys([k + "_seed_std" for k in study.METRICS]), run=run,
                 n=5.0, eta=eta, sampler="dpm++2", cfg_scale=2.0, num_samples=100, feature_space="x", seeds=1,
                 precision=precision, recall=0.4, class_accuracy=0.9, memorisation_ratio=0.1, avg_l2_top5=3.0)
            for run, eta, precision in [("clean", 0.0, 0.8312150), ("eta5", 5.0, 0.8312151), ("cep-u", 0.0, 0.8312150)]]
    figures = [study.plot_metrics_vs_n(rows, tmp_path / "n.png"), study.plot_metrics_vs_eta(rows, tmp_path / "eta.png"),
               study.plot_guidance(rows, tmp_path / "guidance.png")]
    for fig in figures:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        notes = [title for title, ax in panels.items() if "not measured" in [t.get_text() for t in ax.texts]]
        assert len(notes) == 1 and notes[0].startswith("FID") and not panels[notes[0]].get_yticks().size
        precision = panels.get("precision ↑") or panels["precision against recall"]
        labels = [t.get_text() for t in precision.get_yticklabels()]
        assert precision.yaxis.get_offset_text().get_text() == ""  # no "1e-7+8.31215e-1" above the axis
        assert all(re.fullmatch(r"0\.83121\d+", label) for label in labels), labels
        assert np.ptp(np.diff(precision.get_yticks())) < 1e-12  # evenly spaced, and so are their grid lines
    rows = [dict(r, n=n) for n in (5.0, 10.0, 20.0, 130.0) for r in rows]
    ax = study.plot_metrics_vs_n(rows, tmp_path / "n.png").axes[1]
    assert list(ax.get_xticks()) == [0, 1, 2, 3] and [t.get_text() for t in ax.get_xticklabels()] == \
        ["5", "10", "20", "130"]  # evenly spaced n, labelled with their values


def test_replot_redraws_the_docs_plots_from_result_csvs_with_classifier_features_named(tmp_path):
    """--replot: a results folder of a few per-seed rows (precision at one scale only) redrawn into an assets
    folder; a Frechet distance in the classifier's features is labelled so, not FID."""
    tables = {
        "study_reduced.csv": "run,eta_percent,seed,cfg_scale,num_samples,sampler,feature_space,fd_classifier,recall\n"
                             "clean,0,0,2,500,dpm++50,synthetic-classifier,20.1,0.56\n"
                             "eta5,5,0,2,500,dpm++50,synthetic-classifier,22.3,0.55\n"
                             "cep-u,0,0,2,500,dpm++50,synthetic-classifier,20.9,0.65\n",
        "study_guidance.csv": "run,seed,cfg_scale,num_samples,sampler,feature_space,fd_classifier,is_classifier,"
                              "precision,recall\n"
                              "clean,0,1,500,dpm++50,synthetic-classifier,24.6,3.2,,0.34\n"
                              "clean,0,2,500,dpm++50,synthetic-classifier,20.1,4.0,0.094,0.56\n",
        "downstream_table2_cpu.csv": "pretraining,seed,adapter,control,cfg_scale,num_samples,sampler,feature_space,"
                                     "fd_classifier\n"
                                     "clean,0,none,,4,256,dpm++25,synthetic-classifier,17.7\n"
                                     "clean,0,controlnet,canny,4,256,dpm++25,synthetic-classifier,15.2\n"
                                     "eta5,0,controlnet,canny,4,256,dpm++25,synthetic-classifier,14.9\n",
        "study_digits.csv": "images_per_class,run,seed,cfg_scale,num_samples,sampler,feature_space,fd_classifier\n"
                            "20,clean,0,2,500,dpm++10,folder-classifier,16\n"
                            "20,clean,1,2,500,dpm++10,folder-classifier,18\n"
                            "20,cep-u4.5,0,2,500,dpm++10,folder-classifier,12\n"
                            "20,cep-u4.5,1,2,500,dpm++10,folder-classifier,13\n"
                            "129.7,clean,0,2,500,dpm++10,folder-classifier,8\n"
                            "129.7,clean,1,2,500,dpm++10,folder-classifier,10\n"}
    for name, text in tables.items():
        (tmp_path / name).write_text(text)
    written = study.redraw(str(tmp_path), str(tmp_path / "assets"))
    assert sorted(os.listdir(tmp_path / "assets")) == ["digits_vs_n.png", "downstream_vs_eta.png",
                                                       "study_guidance.png", "study_metrics_vs_eta.png"]
    digits = study.read_results(str(tmp_path / "study_digits.csv"))
    by_n = [dict(r, n=n) for n in (20.0, 129.7) for r in study.aggregate([r for r in digits if r["n"] == n])]
    assert [(r["n"], r["run"], r["fid"], r["seeds"]) for r in by_n] == \
        [(20.0, "clean", 17.0, 2), (20.0, "cep-u4.5", 12.5, 2), (129.7, "clean", 9.0, 2)]
    ax = study.plot_metrics_vs_n(by_n, tmp_path / "n.png").axes[0]
    assert ax.get_title() == "FD (classifier features) ↓" and [t.get_text() for t in ax.get_xticklabels()] == \
        ["20", "129.7"]
    for png in written:
        assert_png(png)
    rows = study.aggregate(study.read_results(str(tmp_path / "study_reduced.csv")))
    assert [(r["run"], r["eta"], r["fid"], r["precision"]) for r in rows] == \
        [("clean", 0.0, 20.1, None), ("eta5", 5.0, 22.3, None), ("cep-u", 0.0, 20.9, None)]
    guidance = study.aggregate(study.read_results(str(tmp_path / "study_guidance.csv")))
    fig = study.plot_guidance(guidance, tmp_path / "guidance.png")
    labels = [ax.get_ylabel() for ax in fig.axes] + [ax.get_title() for ax in fig.axes]
    labels += [ax.get_title() for ax in study.plot_metrics_vs_eta(rows, tmp_path / "eta.png").axes]
    assert "FD (classifier features) ↓" in labels and not [label for label in labels if "FID" in label]
    assert [list(line.get_xdata()) for line in fig.axes[1].lines] == [[0.56]]  # scale 2's pair is drawn
    assert "precision and recall not both measured:\nclean at cfg 1" in [t.get_text() for t in fig.axes[1].texts]
