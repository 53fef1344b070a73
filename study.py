"""
The paper's study end to end: train each run (clean; eta% of the labels wrong; CEP-U and CEP-G; the IP baseline),
sample it with each sampler at each guidance scale, evaluate the samples, and write a results table and plots.
Orchestrating runs is a concern of its own, hence this file; it does none of the work itself: it launches train.py,
adapt.py, distill.py, sample.py and evaluate.py as subprocesses (through torchrun when nproc > 1) and reads the files
they write.

  python study.py                                                 # the whole study on the built-in dataset
  python study.py --runs clean,eta5,eta20,cep-u --cfg_scales 2 --num_samples 500   # a reduced one (README)
  python study.py --runs clean --cfg_scales 1,1.5,2,3,4           # a guidance sweep of one run
  python study.py --ckpt out/ckpt.pt --cfg_scales 1,2,4           # ... of a checkpoint trained elsewhere
  python study.py --runs clean --samplers dpm++50,ddpm250         # DPM-Solver++ at 50 steps against DDPM at 250
  python study.py --runs clean,eta5,cep-u --adapters controlnet-canny,controlnet-mask \\
      --adapt_args="--synthetic_scale 0.6 --max_steps 1000"       # the downstream stage (docs/downstream.md)
  python study.py --runs clean,eta5,cep-u --distill_steps 1,2,4   # LCM rows: each run distilled (docs/lcm.md)
  python study.py --digits 20,0 --runs clean,cep-u --seeds 0,1,2 --train_args="--model DiT-Ti/4"  # small data

out_dir/<run>/ (<run>-seed<s>/ for seeds other than 0) holds train.py's output and, for each sampler and scale,
samples_<sampler><steps>_cfg<scale>_n<N>.npz and its _metrics.json. Nothing is done twice: a run with a checkpoint
is resumed, and a sample file or a report is made again only when it is missing or older than what it is made from.
Results: out_dir/results.md/.csv (a row per run, sampler and scale: every metric, mean ± seed spread; against clean
the difference with its 95% interval, marked beyond the seed noise by Welch's t, Holm over the table's comparisons),
metrics_vs_eta.png, guidance.png and grids.png. --adapters (the paper's Table 2): each run adapted in
out_dir/<run>/<adapter>-<control>/, sampled for held-out controls, in downstream.md/.csv and downstream_vs_eta.png.
--distill_steps: each run distilled into a consistency student in out_dir/<run>/lcm/, its rows (lcm<steps>) in the
table beside the teacher's. docs/study.md, docs/downstream.md and docs/lcm.md say more.
"""
import contextlib
import csv
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import scipy.special
import torch

from configurator import atomic_write, configure, read_cache, script_settings

# -----------------------------------------------------------------------------
out_dir = "study"
runs = "clean,eta2.5,eta5,eta7.5,eta10,eta20,cep-u,cep-g,ip"  # also: dropout, ls, cep-u-fixed, eta<percent>-random,
                          # cep-u<gamma> and cep-g<gamma> (cep-u4.5: CEP-U at gamma 4.5)
ckpt = ""                 # sweep this checkpoint instead of training runs (the run is named after its folder)
cfg_scales = "4.0"        # guidance scales, comma separated
samplers = "dpm++50"      # <sampler><steps>, comma separated; sampler: dpm++ | ddpm | ddim (sample.py)
num_samples = 1000        # per run, sampler and scale (the paper: 50000)
seeds = "0"               # each run trained and sampled once per seed: <run>/ for seed 0, <run>-seed<s>/ for the others
nproc = 1                 # processes of each train.py and sample.py, through torchrun: the GPUs of a node
train_args = ""           # passed to train.py: "--max_steps 3000", ImageNet's "--latents L --model DiT-XL/2 ..."
sample_args = ""          # passed to sample.py: "--batch_size 256", "--vae sd-vae-ft-ema" for official DiT weights
eval_args = "--train synthetic"  # passed to evaluate.py; ImageNet: "--ref VIRTUAL_imagenet256_labeled.npz"
export_digits = ""        # a folder: write scikit-learn's handwritten digits there as class folders, then stop
digits_per_class = 0      # export_digits: training images per class (0: all that are not held out)
digits_held_out = 50      # export_digits: held-out images per class, never trained on
digits = ""               # the small-data study: n training images per class of the digits, comma separated (0: all,
                          # ~130): out_dir/n<n>/ holds each n's export and runs (digits_study)
adapters = ""             # the downstream stage: <adapter>-<control>, comma separated (controlnet-canny, t2i-mask,
                          # controlnet-/data/in100_sam/train); "": none
adapt_args = ""           # passed to adapt.py after those of train_args it has: "--synthetic_scale 0.6 --lr 1e-4"
downstream_eval_args = ""  # passed to evaluate.py for the adapted models; ImageNet-100: "--ref /data/imagenet100/val"
distill_steps = ""        # the LCM stage: consistency steps to sample each run's student at ("1,2,4"); "": none
distill_args = "--ema_decay 0.95 --lr 2e-4 --skip_interval 200 --max_steps 2000"  # to distill.py after train_args, for
                          # the students: the CPU default's distillation (docs/lcm.md)
replot = ""               # a folder of result CSVs (results/): redraw the docs' plots in assets/ from them, then stop
# -----------------------------------------------------------------------------
_DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
HERE = os.path.dirname(os.path.abspath(__file__))
# the paper's runs besides eta<percent>: CEP with gamma = 1 (its headline setting), IP with lambda = 0.1 (Ning et al.);
# its Tables 6 and 7: dropout 0.1 and label smoothing 0.1 on the class embedding, Fixed CEP-U (on 5% of the samples,
# our choice), and eta<percent>-random, labels flipped afresh at every step
RUNS = {"clean": [], "cep-u": ["--cep", "--cep_type=uniform", "--cep_scale=1.0"],
        "cep-g": ["--cep", "--cep_type=gaussian", "--cep_scale=1.0"], "ip": ["--ip=0.1"],
        "dropout": ["--emb_dropout=0.1"], "ls": ["--label_smoothing=0.1"],
        "cep-u-fixed": ["--cep", "--cep_type=uniform", "--cep_scale=1.0", "--cep_fixed=0.05"]}
# what the study sets per run, sampler and scale: the same key in the pass-through arguments would be ambiguous
OWNED = {"train.py": {"out_dir", "resume", "corrupt", "corrupt_mode", "cep", "cep_type", "cep_scale", "cep_fixed", "ip",
                      "emb_dropout", "label_smoothing", "seed"},
         "adapt.py": {"out_dir", "resume", "init", "adapter", "control", "seed"},
         "distill.py": {"out_dir", "resume", "teacher", "seed", "corrupt", "corrupt_mode", "cep", "cep_type",
                        "cep_scale", "ip"},
         "sample.py": {"ckpt", "sampler", "num_steps", "cfg_scale", "num_samples", "out", "seed"},
         "evaluate.py": {"samples", "out"}}
# evaluate.py's report keys, with the arrow of the better direction; IS (classifier) is not the Inception IS
METRICS = {"fid": "FID ↓", "sfid": "sFID ↓", "is": "IS (Inception) ↑", "is_std": "IS (Inception) std",
           "is_classifier": "IS (classifier) ↑", "is_classifier_std": "IS (classifier) std",
           "precision": "precision ↑", "recall": "recall ↑", "toppr_f1": "TopPR F1 ↑",
           "class_accuracy": "class accuracy ↑",
           "memorisation_ratio": "memorisation ratio ↓", "avg_l2_top5": "L2 to 5 nearest train ↑",
           "rmd_top1": "top-1% RMD ↑", "sample_entropy": "sample entropy ↑"}
# the metrics compared with clean's; the IS split stds are no metrics of their own
COMPARED = [k for k in METRICS if not k.endswith("_std")]
ALPHA = 0.05  # the family-wise error rate of the marks "beyond the seed noise"


def write_digits(out, per_class=0, held_out=50, size=16, seed=0):
    """The UCI handwritten digits that scikit-learn ships (1797 grey 8x8 images, 10 classes; no download) as class
    folders, a real dataset nobody here drew: out/train/<digit>/<index>.png, per_class images of each class (0: all
    but the held-out ones), and out/heldout/<digit>/<index>.png, held_out images of each class that are never in
    train. Upscaled to size px, bilinear (our choice). The split depends on the seed alone, so n = 20 and n = 100
    share their held-out images and the 20 are among the 100."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("export_digits needs scikit-learn (a study-only dependency): pip install scikit-learn") \
            from None
    from PIL import Image
    digits, rng = load_digits(), np.random.default_rng(seed)
    for label in range(10):
        order = rng.permutation(np.flatnonzero(digits.target == label))
        if held_out + max(per_class, 1) > len(order):
            raise ValueError(f"digit {label} has {len(order)} images: {held_out} held out leave fewer than "
                             f"digits_per_class={per_class}")
        for split, chosen in (("heldout", order[:held_out]), ("train", order[held_out:][:per_class or None])):
            folder = os.path.join(out, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in chosen:
                image = Image.fromarray(np.uint8(np.round(digits.images[i] * 255 / 16)), "L")
                image.resize((size, size), Image.BILINEAR).save(os.path.join(folder, f"{i}.png"))


def run_flags(name):
    """(eta in %, train.py flags) of a run of the study, from its name."""
    if name in RUNS:
        return 0.0, RUNS[name]
    cep = re.fullmatch(r"cep-([ug])(\d+(?:\.\d+)?)", name)  # cep-u4.5: CEP-U at gamma 4.5
    if cep and float(cep[2]) > 0:
        return 0.0, ["--cep", f"--cep_type={dict(u='uniform', g='gaussian')[cep[1]]}", f"--cep_scale={float(cep[2])}"]
    eta = re.fullmatch(r"eta(\d+(?:\.\d+)?)(-random)?", name)
    if eta and 0 < float(eta[1]) < 100:
        return float(eta[1]), [f"--corrupt={float(eta[1]) / 100}"] + (["--corrupt_mode=random"] if eta[2] else [])
    raise ValueError(f"run {name!r}: expected clean, eta<percent> (e.g. eta2.5), eta<percent>-random, cep-u<gamma>, "
                     f"or one of {', '.join(r for r in RUNS if r != 'clean')}")


def on_eta_axis(row):  # the fixed-corruption curve; the other runs are reference lines
    return row["run"] == "clean" or re.fullmatch(r"eta[\d.]+", row["run"]) is not None


def passthrough(script, args):
    """The pass-through argument string of a script as a list; keys the study sets itself are an error."""
    argv = shlex.split(args)
    clash = sorted({a[2:].split("=")[0] for a in argv if a.startswith("--")} & OWNED[script])
    if clash:
        raise ValueError(f"{script} arguments {args!r} set {', '.join(clash)}, which the study sets for each run; "
                         f"leave them out (runs, cfg_scales, samplers, num_samples, out_dir are the study's keys)")
    return argv


def settings_of(script, argv):
    """The part of argv (--key=value, --key value, --flag) whose keys are settings of `script`: what train_args and a
    run's flags give to adapt.py and distill.py (the model's own settings they take from the checkpoint)."""
    keys = set(script_settings(os.path.join(HERE, script)))
    kept, i = [], 0
    while i < len(argv):
        given = argv[i:i + 1]
        if "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            given = argv[i:i + 2]
        if argv[i][2:].split("=")[0] in keys:
            kept += given
        i += len(given)
    return kept


def launch(script, *args):
    """Run a script to its end, through torchrun with nproc > 1 (evaluate.py is a single process). A SIGTERM, a
    Ctrl-C (SIGINT) or a SIGHUP to the study is passed on to the script as SIGTERM, on which a training script saves
    its checkpoint and stops; the study waits for it, then exits (128 + the signal) saying how to continue."""
    cmd = [sys.executable]
    if nproc > 1 and script != "evaluate.py":
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [os.path.join(HERE, script), *args]
    print("$ " + shlex.join(cmd), flush=True)
    received, child = [], None

    def pass_on(signum, frame):
        received.append(signum)
        if child is not None:
            child.send_signal(signal.SIGTERM)
        with contextlib.suppress(OSError):  # a SIGHUP's terminal is gone
            print(f"{signal.Signals(signum).name}: passed on to {script}, waiting for it to save and stop", flush=True)
    # SIGHUP too: in a session of its own, the script no longer gets the hangup of a closed terminal
    previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        # a session of its own: a Ctrl-C at the terminal reaches the study alone, and reaches the script once, as the
        # SIGTERM that the training scripts save on
        child = subprocess.Popen(cmd, start_new_session=True)
        if received:  # a signal before the child existed
            child.send_signal(signal.SIGTERM)
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        with contextlib.suppress(OSError):
            print(f"study stopped by {signal.Signals(received[0]).name} ({script} exited with {returncode}); to "
                  "continue, run the same command again: it reuses what exists", file=sys.stderr, flush=True)
        raise SystemExit(128 + received[0])
    if returncode:
        raise RuntimeError(f"{script} failed (its output is above); rerun the study when it is fixed: "
                           "finished work is reused")


def fresh(path, source):
    return os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(source)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sampled_metrics(model_ckpt, folder, sampler, steps, scale, seed, sample_argv, eval_argv):
    """sample.py's samples of a checkpoint in folder and evaluate.py's report on them, each made only when it is
    missing or older than what it is made from: the report's sample count, feature space and METRICS."""
    stem = os.path.join(folder, f"samples_{sampler}{steps}_cfg{scale}_n{num_samples}")
    npz, report = stem + ".npz", stem + "_metrics.json"
    if fresh(npz, model_ckpt):
        print(f"reusing {npz}")
    else:
        launch("sample.py", *sample_argv, f"--ckpt={model_ckpt}", f"--seed={seed}", f"--sampler={sampler}",
               f"--num_steps={steps}", f"--cfg_scale={scale}", f"--num_samples={num_samples}", f"--out={npz}")
    res = read_cache(report, read_json) if fresh(report, npz) else None  # unreadable: evaluated again
    if res is None:
        launch("evaluate.py", *eval_argv, f"--samples={npz}", f"--out={report}")
        res = read_json(report)
    else:
        print(f"reusing {report}")
    return dict(num_samples=res["num_samples"], feature_space=res["feature_space"], **{k: res.get(k) for k in METRICS})


def last_grid(folder):
    """train.py's last sample grid in folder (samples_<step>.png), or None."""
    grids = sorted(glob.glob(os.path.join(folder, "samples_[0-9]*.png")))
    return grids[-1] if grids else None


def aggregate(rows):
    """One row per run, sampler and scale over its seeds: each metric's mean, its seed-to-seed standard deviation
    (<metric>_seed_std, with 2 seeds or more), and against clean's row of the same sampler and scale its difference
    with a 95% interval and a test (welch), marked where beyond the seed noise (mark_beyond_noise)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["run"], r["sampler"], r["cfg_scale"]), []).append(r)
    out = []
    for (run, sampler, scale), group in groups.items():
        row = {k: group[0][k] for k in ("run", "eta", "sampler", "cfg_scale", "num_samples", "feature_space")}
        row["seeds"] = len(group)
        for k in METRICS:
            values = [r[k] for r in group if r[k] is not None]
            row[k] = float(np.mean(values)) if values else None
            row[k + "_seed_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        clean = groups.get(("clean", sampler, scale), []) if run != "clean" else []
        no_test = {}
        for k in COMPARED:
            row.update(dict.fromkeys((k + "_diff", k + "_ci_low", k + "_ci_high", k + "_p")))
            mine, theirs = [r[k] for r in group if r[k] is not None], [r[k] for r in clean if r[k] is not None]
            if not mine or not theirs:
                continue
            comparison = welch(mine, theirs)
            reason = comparison.pop("no_test")
            if reason:
                no_test.setdefault(reason, []).append(k)
            row.update({k + "_" + name: value for name, value in comparison.items()})
        row["no_test"] = "; ".join(f"{','.join(keys)}: {reason}" for reason, keys in no_test.items())
        out.append(row)
    return mark_beyond_noise(out)


def welch(a, b):
    """Two sets of seeds' values of a metric compared: the difference of their means (a - b), its 95% interval and
    the two-sided p of Welch's t-test; no interval and no test ("no_test" says why) with fewer than 2 seeds a side,
    or with no spread on either side, where the t statistic is undefined and any difference would look certain."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    result = dict(diff=float(a.mean() - b.mean()), ci_low=None, ci_high=None, p=None, no_test="")
    if len(a) < 2 or len(b) < 2:
        result["no_test"] = "no test, fewer than 2 seeds a side"
        return result
    # no spread: equal values, up to float rounding, whose variance need not be 0 ([0.998] * 3 has 1e-33)
    if all(np.ptp(x) <= 1e-9 * np.abs(x).max() for x in (a, b)):
        result["no_test"] = "no test, no spread on either side"
        return result
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)  # the variances of the two means
    se = np.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    # Student's t distribution through scipy.special: scipy.stats.t's are 50 times slower, and the tests simulate
    # thousands of studies
    half_width = scipy.special.stdtrit(df, 0.975) * se
    result.update(ci_low=result["diff"] - half_width, ci_high=result["diff"] + half_width,
                  p=float(2 * scipy.special.stdtr(df, -abs(result["diff"]) / se)))
    return result


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values: marking the adjusted p < alpha keeps the chance of any
    false mark in the family at most alpha, whatever the dependence between the tests (a run's metrics move
    together)."""
    adjusted, running = [None] * len(pvalues), 0.0
    for rank, i in enumerate(np.argsort(pvalues, kind="stable")):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def mark_beyond_noise(rows):
    """The rows' marks, over one family: every tested run-vs-clean comparison of the rows (each metric of each run,
    sampler and scale against clean's), Holm-adjusted (<metric>_p_holm); `beyond_noise` lists the metrics whose
    adjusted p < ALPHA, `test_family` names the family. write_table calls it again on what it writes, so each table
    is its own family, also one joined from several (results_vs_n)."""
    tested = [(r, k) for r in rows for k in COMPARED if r.get(k + "_p") is not None]
    for r in rows:
        r.update({k + "_p_holm": None for k in COMPARED})
    for (r, k), adjusted in zip(tested, holm([r[k + "_p"] for r, k in tested])):
        r[k + "_p_holm"] = adjusted
    family = f"Welch's t, Holm over the {len(tested)} run-vs-clean comparisons of this table, marked at p < {ALPHA}"
    for r in rows:
        r["beyond_noise"] = ",".join(k for k in COMPARED if r[k + "_p_holm"] is not None and r[k + "_p_holm"] < ALPHA)
        r["test_family"] = family
    return rows


def write_table(rows, out, sampler_header="sampler"):
    """out.csv with every column, out.md with the metrics that were measured, labelled: mean ± the seed-to-seed
    standard deviation, and * where the difference from clean is beyond the noise; below, the differences from clean
    with their 95% intervals. The rows are one family of tests (mark_beyond_noise). The downstream stage's rows name
    the adapter and control in "sampler"."""
    rows = mark_beyond_noise(rows)
    keys = ["run", "eta", "sampler", "cfg_scale", "num_samples", "feature_space", "seeds"]
    keys[1:1] = ["n"] if "n" in rows[0] else []  # the small-data study's training images per class
    lead = len(keys) - 2
    # the IS split stds stay in the CSV: beside the seed spread a column of them reads as one more metric
    metrics = [k for k in COMPARED if any(r[k] is not None for r in rows)]
    comparisons = [c for k in COMPARED for c in (k + "_diff", k + "_ci_low", k + "_ci_high", k + "_p", k + "_p_holm")]
    with atomic_write(out + ".csv", "w") as f:
        writer = csv.DictWriter(f, keys + [c for k in METRICS for c in (k, k + "_seed_std")] + comparisons
                                + ["beyond_noise", "no_test", "test_family"])
        writer.writeheader()
        writer.writerows(rows)

    def cell(r, k):
        if r[k] is None:
            return ""
        spread = f" ± {r[k + '_seed_std']:.2g}" if r.get(k + "_seed_std") is not None else ""
        return number(r[k]) + spread + (" *" if k in r["beyond_noise"].split(",") else "")
    header = ["run"] + ["n per class"] * (lead == 6) + ["eta %", sampler_header, "cfg", "samples"]
    header = " | ".join(header + [metric_label(k, rows) for k in metrics])
    header = "| " + header + " |\n|" + "---|" * (lead + len(metrics))
    lines = [f"Feature space: {', '.join(sorted({r['feature_space'] for r in rows}))} (numbers from different spaces "
             "are not comparable; IS (classifier) is the IS formula on that space's classifier).",
             f"Seeds per run: {', '.join(sorted({str(r['seeds']) for r in rows}))}; mean ± seed-to-seed std; * "
             f"differs from clean beyond the seed noise: {rows[0]['test_family']} (family-wise). No test, and no "
             "mark, with fewer than 2 seeds a side or no spread on either side.", "", header]
    lines += ["| " + " | ".join([number(r[k]) for k in keys[:lead]] + [cell(r, k) for k in metrics]) + " |"
              for r in rows]
    compared = [r for r in rows if any(r[k + "_diff"] is not None for k in metrics)]
    if compared:
        lines += ["", "Differences from clean (the run's mean minus clean's, same sampler and scale) with their 95% "
                  "Welch intervals (each on its own, not adjusted); * as above.", "", header]
        lines += ["| " + " | ".join([number(r[k]) for k in keys[:lead]] + [difference(r, k) for k in metrics]) + " |"
                  for r in compared]
    with atomic_write(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def number(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def difference(row, key):
    """A table cell: a row's difference from clean in a metric, its interval, and its mark or why it has no test."""
    if row[key + "_diff"] is None:
        return ""
    if row[key + "_p"] is None:
        return f"{row[key + '_diff']:+.3g} (no test)"
    mark = " *" if key in row["beyond_noise"].split(",") else ""
    return f"{row[key + '_diff']:+.3g} ({row[key + '_ci_low']:+.3g} to {row[key + '_ci_high']:+.3g}){mark}"


def plot_metrics_vs_eta(rows, path):
    """A panel per metric: clean and the eta runs against eta (black, error bars: the seed spread), the other runs
    (CEP, IP: trained on clean data) as horizontal lines with their seed spread as a band, a colour per run; a line
    style per sampler and scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [k for k in COMPARED if k == "fid" or any(measured(r[k]) for r in rows)]  # FID's panel says it if not
    series = sorted({(r["sampler"], r["cfg_scale"]) for r in rows})
    colours = {run: f"C{i}" for i, run in enumerate(dict.fromkeys(r["run"] for r in rows if not on_eta_axis(r)))}
    n_rows, cols = -(-len(metrics) // 4), min(len(metrics), 4)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.2 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, metrics):
        for (sampler, scale), ls in zip(series, ["-", "--", ":", "-."] * len(series)):
            mine = [r for r in rows if (r["sampler"], r["cfg_scale"]) == (sampler, scale) and measured(r[key])]
            suffix = "" if len(series) == 1 else f" ({sampler}, cfg {scale:g})"
            points = sorted((r["eta"], r[key], r[key + "_seed_std"] or 0) for r in mine if on_eta_axis(r))
            if points:
                eta, mean, std = zip(*points)
                ax.errorbar(eta, mean, yerr=std, fmt="o", ls=ls, color="k", capsize=3, label="clean and eta" + suffix)
            for r in mine:
                if not on_eta_axis(r):
                    ax.axhline(r[key], color=colours[r["run"]], ls=ls, lw=1.2, label=r["run"] + suffix)
                    if r[key + "_seed_std"]:  # the seed spread as a band
                        ax.axhspan(r[key] - r[key + "_seed_std"], r[key] + r[key + "_seed_std"],
                                   color=colours[r["run"]], alpha=0.12)
        ax.set(xlabel="eta (% of labels wrong)", title=metric_label(key, rows))
        plain_axes(ax, any(measured(r[key]) for r in rows))
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    legend(axes.flat, axes.flat[len(metrics)] if len(metrics) < axes.size else None)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return fig


def plot_metrics_vs_n(rows, path):
    """A panel per metric against n (images per class), a line per run, error bars: the seed spread (runs nudged).
    The n are evenly spaced, in order, labelled with their values (5, 10, 20, 130: a log axis of a few uneven values
    draws uneven grid lines, and one n drew its points at the panel's edges)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = ["fid", "precision", "recall", "class_accuracy", "memorisation_ratio", "avg_l2_top5"]
    runs, ns = list(dict.fromkeys(r["run"] for r in rows)), sorted({r["n"] for r in rows})
    n_rows, cols = -(-len(metrics) // 3), min(len(metrics), 3)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.2 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, metrics):
        for i, run in enumerate(runs):
            points = sorted((ns.index(r["n"]), r[key], r[key + "_seed_std"] or 0) for r in rows
                            if r["run"] == run and measured(r[key]))
            if points:
                x, mean, std = zip(*points)
                nudge = 0.06 * (i - (len(runs) - 1) / 2)
                ax.errorbar([position + nudge for position in x], mean, yerr=std, fmt="o-", color=f"C{i}", capsize=3,
                            label=run)
        ax.set(xlabel="training images per class", title=metric_label(key, rows), xlim=(-0.5, len(ns) - 0.5))
        ax.set_xticks(range(len(ns)), [f"{n:g}" for n in ns])
        plain_axes(ax, any(measured(r[key]) for r in rows))
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    legend(axes.flat)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return fig


def plot_guidance(rows, path):
    """FID against IS and precision against recall, a curve per run and sampler over the guidance scales (each
    point labelled with its scale), as the paper presents its guidance sweeps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    is_key = "is" if any(measured(r["is"]) for r in rows) else "is_classifier"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    curves, missing = list(dict.fromkeys((r["run"], r["sampler"]) for r in rows)), []
    for i, (run, sampler) in enumerate(curves):
        mine = sorted((r for r in rows if (r["run"], r["sampler"]) == (run, sampler)), key=lambda r: r["cfg_scale"])
        label = run if len({c[1] for c in curves}) == 1 else f"{run}, {sampler}"
        for ax, (x, y) in zip(axes, ((is_key, "fid"), ("recall", "precision"))):
            points = [(r[x], r[y], r["cfg_scale"]) for r in mine if measured(r[x]) and measured(r[y])]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i}", label=label)
            for px, py, scale in points:
                ax.annotate(f"{scale:g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
        unpaired = [f"{r['cfg_scale']:g}" for r in mine if not (measured(r["precision"]) and measured(r["recall"]))]
        if unpaired:
            missing.append(f"{label} at cfg {', '.join(unpaired)}")
    fd = metric_label("fid", rows)
    axes[0].set(xlabel=METRICS[is_key], ylabel=fd, title=f"{fd.split(' (')[0].rstrip(' ↓')} against IS (points: "
                "guidance scale)")
    axes[1].set(xlabel=METRICS["recall"], ylabel=METRICS["precision"], title="precision against recall")
    for ax, (x, y) in zip(axes, ((is_key, "fid"), ("recall", "precision"))):
        plain_axes(ax, any(measured(r[x]) and measured(r[y]) for r in rows), axis="both")
        legend([ax])
    if missing and any(measured(r["precision"]) and measured(r["recall"]) for r in rows):
        # a point needs both numbers: the scales left out are named, not silently missing from the curve
        axes[1].text(0.02, 0.02, "precision and recall not both measured:\n" + "\n".join(missing),
                     transform=axes[1].transAxes, fontsize=7, color="0.4", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return fig


def metric_label(key, rows):
    """METRICS' label of a metric, but a Frechet distance in a classifier's features is no FID: a reader would take
    an FID for Inception's and compare it with the paper's."""
    spaces = {str(r["feature_space"]) for r in rows}
    if key == "fid" and spaces and all("classifier" in space for space in spaces):
        return "FD (classifier features) ↓"
    return METRICS[key]


def measured(value):
    """A metric's value that a plot can draw: evaluate.py reports a skipped metric as None."""
    return value is not None and bool(np.isfinite(value))


def plain_axes(ax, drawn, axis="y"):
    """Plain numbers on the axes, neither an offset nor scientific notation (0.8312151, not 1e-7+8.31215e-1 beside
    0 and 1), grid lines at the ticks, which are evenly spaced; and "not measured" in a panel where nothing was."""
    ax.ticklabel_format(axis=axis, useOffset=False, style="plain")
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set(xticks=[], yticks=[])  # an empty axis's 0 to 1 would read as values


def legend(axes, spare=None):
    """The legend of the first panel that has one (an empty legend is a warning and a box), drawn in the spare panel
    where there is one: there it hides no data."""
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if not labels:
            continue
        if spare is None:
            ax.legend(fontsize=7)
        else:
            spare.legend(handles, labels, fontsize=8, loc="upper left")
        return


def plot_grids(grids, path):
    """The runs' sample grids side by side, each with its run's name above."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(grids), figsize=(2.8 * len(grids), 3.6), squeeze=False)
    for ax, (name, png) in zip(axes[0], grids):
        ax.imshow(plt.imread(png), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# the columns of results/ CSVs named otherwise than the study's row keys (results/README.md says what each measured)
CSV_KEYS = {"eta_percent": "eta", "fd_classifier": "fid", "pretraining": "run", "images_per_class": "n"}


def read_results(path):
    """A results/ CSV's per-seed rows as the study's rows: columns renamed by CSV_KEYS, metrics, scales and n as floats,
    an empty cell (a number the run did not report) as None, and eta from the run's name where no column gives it."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{CSV_KEYS.get(k, k): v for k, v in r.items()} for r in csv.DictReader(f)]
    for r in rows:
        for k in [*METRICS, "eta", "cfg_scale", "n"]:
            r[k] = float(r[k]) if r.get(k) else None
        if r["eta"] is None:
            r["eta"] = run_flags(r["run"])[0]
    return rows


def redraw(folder, assets=os.path.join(HERE, "assets")):
    """The docs' plots redrawn from the per-seed rows of folder's CSVs (results/) by the study's own aggregation and
    plot functions, so that a plot in the docs is what the study draws of those rows."""
    down = [dict(r, sampler=f"{r['adapter']}-{r['control']}")  # the study names its downstream rows so
            for r in read_results(os.path.join(folder, "downstream_table2_cpu.csv")) if r["adapter"] == "controlnet"]
    digits_rows = read_results(os.path.join(folder, "study_digits.csv"))
    by_n = [[r for r in digits_rows if r["n"] == n] for n in sorted({r["n"] for r in digits_rows})]
    os.makedirs(assets, exist_ok=True)
    written = [os.path.join(assets, png) for png in ("study_metrics_vs_eta.png", "study_guidance.png",
                                                     "downstream_vs_eta.png", "digits_vs_n.png")]
    plot_metrics_vs_eta(aggregate(read_results(os.path.join(folder, "study_reduced.csv"))), written[0])
    plot_guidance(aggregate(read_results(os.path.join(folder, "study_guidance.csv"))), written[1])
    plot_metrics_vs_eta(aggregate(down), written[2])
    # each n a study of its own, as digits_study aggregates them
    plot_metrics_vs_n([dict(r, n=group[0]["n"]) for group in by_n for r in aggregate(group)], written[3])
    print("wrote " + ", ".join(written))
    return written


def digits_study():
    """The small-data regime: for each n of `digits`, the study trained on n digits per class (out_dir/n<n>/train) and
    evaluated against held-out ones (out_dir/n<n>/heldout, the same for every n) in the space of one classifier of the
    whole training split (out_dir/digits/train), so that different n compare; memorisation against the n-image split.
    Each n's results.md as the study's; all of them in results_vs_n.md/csv and metrics_vs_n.png."""
    global out_dir, train_args, eval_args
    root, base_train, base_eval = out_dir, train_args, eval_args
    ns = [int(n) for n in digits.split(",")] if re.fullmatch(r"\d+(,\d+)*", digits) else []
    if not ns or len(set(ns)) != len(ns):
        raise ValueError(f"digits={digits!r}: distinct numbers of training images per class, comma separated (0: all)")
    full = os.path.join(root, "digits")
    if not os.path.isdir(os.path.join(full, "train")):
        write_digits(full, 0, digits_held_out)
    rows = []
    for n in ns:
        out_dir = os.path.join(root, f"n{n or 'all'}")
        train_dir, held_out = os.path.join(out_dir, "train"), os.path.join(out_dir, "heldout")
        if not os.path.isdir(train_dir):
            write_digits(out_dir, n, digits_held_out)
        train_args = f"{base_train} --data_path {shlex.quote(train_dir)} --image_size 16 --flip False"
        eval_args = (f"{base_eval} --ref {shlex.quote(held_out)} --train {shlex.quote(train_dir)} --features classifier"
                     f" --classifier_data {shlex.quote(os.path.join(full, 'train'))}")
        rows += [dict(r, n=len(glob.glob(os.path.join(train_dir, "*", "*.png"))) / 10) for r in run_study()]
    out_dir = root
    write_table(rows, os.path.join(root, "results_vs_n"))
    plot_metrics_vs_n(rows, os.path.join(root, "metrics_vs_n.png"))
    print(f"wrote {root}/results_vs_n.md, results_vs_n.csv, metrics_vs_n.png")
    return rows


def main(argv=None):
    globals().update(_DEFAULTS)  # main() may run more than once in a process (tests): start from the defaults
    configure(globals(), sys.argv[1:] if argv is None else argv)
    if export_digits:
        write_digits(export_digits, digits_per_class, digits_held_out)
        print(f"wrote {export_digits}/train and {export_digits}/heldout")
        return []
    if replot:
        return redraw(replot)
    return digits_study() if digits else run_study()


def run_study():
    """The study of the settings in this module's globals (main's configuration): its aggregated rows."""
    # every setting is checked here, before the first run starts
    scales = [float(s) for s in cfg_scales.split(",")]
    specs = []
    for spec in samplers.split(","):
        m = re.fullmatch(r"(dpm\+\+|ddpm|ddim)(\d+)", spec)
        if not m:
            raise ValueError(f"samplers: {spec!r} is not <sampler><steps> with sampler dpm++, ddpm or ddim (dpm++50)")
        specs.append((m[1], int(m[2])))
    seed_list = [int(s) for s in seeds.split(",")] if re.fullmatch(r"\d+(,\d+)*", seeds) else []
    if not seed_list or len(set(seed_list)) != len(seed_list) or (ckpt and len(seed_list) > 1):
        raise ValueError(f"seeds={seeds!r}: distinct seeds >= 0, comma separated (one with --ckpt)")
    if num_samples <= 0 or nproc <= 0:
        raise ValueError(f"num_samples and nproc must be > 0, got {num_samples} and {nproc}")
    train_argv = passthrough("train.py", train_args)
    sample_argv, eval_argv = passthrough("sample.py", sample_args), passthrough("evaluate.py", eval_args)
    configure(script_settings(os.path.join(HERE, "sample.py")), sample_argv)  # misspelt keys fail now, not after
    configure(script_settings(os.path.join(HERE, "evaluate.py")), eval_argv)  # the first training run
    if ckpt:
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"ckpt {ckpt!r} not found")
        path = os.path.abspath(ckpt)
        name = os.path.splitext(os.path.basename(path))[0]
        if os.path.basename(path) == "ckpt.pt":
            name = os.path.basename(os.path.dirname(path))
        plan = [(name, path, None, None)]
    else:
        plan = [(name, os.path.join(out_dir, name, "ckpt.pt"), *run_flags(name)) for name in runs.split(",")]

    adapt_argv = settings_of("adapt.py", train_argv) + passthrough("adapt.py", adapt_args)
    configure(script_settings(os.path.join(HERE, "adapt.py")), adapt_argv)
    down_eval_argv = passthrough("evaluate.py", downstream_eval_args)
    configure(script_settings(os.path.join(HERE, "evaluate.py")), down_eval_argv)
    distill_argv = settings_of("distill.py", train_argv) + passthrough("distill.py", distill_args)
    configure(script_settings(os.path.join(HERE, "distill.py")), distill_argv)
    if distill_steps and not re.fullmatch(r"\d+(,\d+)*", distill_steps):
        raise ValueError(f"distill_steps={distill_steps!r}: consistency steps, comma separated (1,2,4)")
    down_specs = [tuple(spec.split("-", 1)) for spec in adapters.split(",")] if adapters else []
    for spec in down_specs:
        if len(spec) != 2 or spec[0] not in ("controlnet", "t2i"):
            raise ValueError(f"adapters: {'-'.join(spec)!r} is not <adapter>-<control> with adapter controlnet or t2i "
                             "(controlnet-canny, t2i-mask)")
    rows, down_rows = [], []
    for (name, ckpt_path, eta, flags), seed in [(p, s) for p in plan for s in seed_list]:
        run_dir = os.path.join(out_dir, name if seed == 0 else f"{name}-seed{seed}")
        ckpt_path = os.path.join(run_dir, "ckpt.pt") if flags is not None else ckpt_path
        os.makedirs(run_dir, exist_ok=True)
        if flags is not None:
            launch("train.py", *train_argv, *flags, f"--seed={seed}", f"--out_dir={run_dir}",
                   *(["--resume"] if os.path.isfile(ckpt_path) else []))
        students = []
        if distill_steps:  # the LCM stage: the run's consistency student, on the run's data and flags
            lcm_ckpt = os.path.join(run_dir, "lcm", "ckpt.pt")
            launch("distill.py", *distill_argv, *settings_of("distill.py", flags or []), f"--teacher={ckpt_path}",
                   f"--seed={seed}", f"--out_dir={os.path.dirname(lcm_ckpt)}",
                   *(["--resume"] if os.path.isfile(lcm_ckpt) else []))
            students = [(lcm_ckpt, os.path.dirname(lcm_ckpt), "lcm", int(steps)) for steps in distill_steps.split(",")]
        for model_ckpt, folder, sampler, steps in [(ckpt_path, run_dir, *spec) for spec in specs] + students:
            rows += [dict(run=name, seed=seed, eta=eta, sampler=f"{sampler}{steps}", cfg_scale=scale,
                          **sampled_metrics(model_ckpt, folder, sampler, steps, scale, seed, sample_argv, eval_argv))
                     for scale in scales]
        for kind, control in down_specs:  # the downstream stage: adapt, sample held-out controls, evaluate
            sampler, steps = specs[0]
            down_dir = os.path.join(run_dir, f"{kind}-{os.path.basename(control.rstrip('/'))}")
            down_ckpt = os.path.join(down_dir, "ckpt.pt")
            launch("adapt.py", *adapt_argv, f"--init={ckpt_path}", f"--adapter={kind}",
                   f"--control={control}", f"--seed={seed}", f"--out_dir={down_dir}",
                   *(["--resume"] if os.path.isfile(down_ckpt) else []))
            synthetic_scale = torch.load(down_ckpt, map_location="cpu", weights_only=True, mmap=True)["config"][
                "synthetic_scale"]  # the held-out images are of the adaptation's task
            held_out_ref = [f"--synthetic_ref_size={num_samples}", f"--synthetic_ref_scale={synthetic_scale}"]
            down_rows += [dict(run=name, seed=seed, eta=eta, sampler=f"{kind}-{control}", cfg_scale=scale,
                               **sampled_metrics(down_ckpt, down_dir, sampler, steps, scale, seed, sample_argv,
                                                 held_out_ref + down_eval_argv))
                          for scale in scales]
    return write_results(rows, down_rows, plan)


def write_results(rows, down_rows, plan):
    """The study's tables (results, downstream) and plots from its rows; returns the aggregated rows."""
    written = [os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.md")]
    rows = aggregate(rows)
    write_table(rows, os.path.join(out_dir, "results"))
    if len({r["eta"] for r in rows if on_eta_axis(r)}) > 1:
        written.append(os.path.join(out_dir, "metrics_vs_eta.png"))
        plot_metrics_vs_eta(rows, written[-1])
    written.append(os.path.join(out_dir, "guidance.png"))
    plot_guidance(rows, written[-1])
    if down_rows:
        down_rows = aggregate(down_rows)
        written += [os.path.join(out_dir, "downstream.csv"), os.path.join(out_dir, "downstream.md")]
        write_table(down_rows, os.path.join(out_dir, "downstream"), "adapted with")
        if len({r["eta"] for r in down_rows if on_eta_axis(r)}) > 1:
            written.append(os.path.join(out_dir, "downstream_vs_eta.png"))
            plot_metrics_vs_eta(down_rows, written[-1])
    grids = [(name, last_grid(os.path.dirname(ckpt_path))) for name, ckpt_path, *_ in plan]
    if any(png for _, png in grids):
        written.append(os.path.join(out_dir, "grids.png"))
        plot_grids([(name, png) for name, png in grids if png], written[-1])
    with open(written[1]) as f:
        print(f.read())
    print("wrote " + ", ".join(written))
    return rows


if __name__ == "__main__":
    main()
