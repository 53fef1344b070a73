"""study.py: runs, tables, plots, seeds and marks, the digits export, downstream and distillation stages."""
import csv
import glob
import json
import os
import re

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import scipy.special
import scipy.stats
import torch
from conftest import ROOT, TINY, train
from PIL import Image

import study

STUDY_EVAL = ("--train=synthetic --synthetic_train_size=64 --synthetic_ref_size=100 --classifier_size=200 "
              "--classifier_epochs=1 --progress=False --device=cpu")


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
                              *[c for k in study.METRICS for c in (k, k + "_seed_std")], "beyond_noise"]
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
    assert "| eta5 | 5 | dpm++50 | 2 | 100 | 14.13 ± 0.32 * |" in markdown and "| cep-u | 0 | dpm++50 | 2 | 100 | 9 |" in \
        markdown


@pytest.mark.slow
def test_study_digits_sweeps_n_against_the_held_out_images_in_one_classifier_space(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = study.main([f"--out_dir={tmp_path}", "--digits=5,10", "--digits_held_out=10", "--runs=clean",
                       "--samplers=dpm++2", "--cfg_scales=2", "--num_samples=100",
                       "--train_args=--model=DiT-Ti/8 --global_batch_size=8 --num_workers=0 --grid_steps=2 "
                       "--max_steps=2", "--eval_args=--classifier_epochs=1 --diversity_features=pixels "
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
    with Image.open(tmp_path / "metrics_vs_n.png") as image:
        assert image.format == "PNG"


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
                       "--downstream_eval_args=--classifier_size=200 --classifier_epochs=1 --progress=False "
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
    with Image.open(out / "downstream_vs_eta.png") as image:
        assert image.format == "PNG"


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
    with Image.open(tmp_path / "guidance.png") as image:
        assert image.format == "PNG"
