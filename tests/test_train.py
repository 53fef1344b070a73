"""train.py: exact resume, old checkpoints, presets, bad settings, NaN, SIGKILL / SIGTERM, damaged checkpoints, a
full disk, torchrun."""
import glob
import json
import os
import re
import resource
import runpy
import signal
import sys
import time

import pytest
import torch
from conftest import (
    ROOT, children, logged_losses, make_controls, make_folder, rank_pid, read, run, sd_pipeline, train, train_args,
    wait_until
)
from PIL import Image

import corrupt
import data
from sample import load_model, sample


@pytest.mark.parametrize("args", [["--cep", "--corrupt=0.1", "--corrupt_mode=random"],
                                  ["--cep", "--cep_fixed=0.5", "--label_smoothing=0.1", "--schedule=scaled_linear"]])
def test_exact_resume(tmp_path, args):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(straight, "--max_steps=6", "--ckpt_every=3", *args)
    train(halves, "--max_steps=3", *args)
    train(halves, "--max_steps=6", "--resume", *args)
    assert logged_losses(straight) == logged_losses(halves) and len(logged_losses(halves)) == 6
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, halves))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and not any(k.startswith("_orig_mod") for k in a[key])
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["config"]["cep"] is True and isinstance(a["config"], dict)
    assert os.path.isfile(straight / "samples_0000006.png")
    assert load_model(str(halves / "ckpt.pt"))[1]["schedule"] == a["config"]["schedule"]  # sample.py follows it


def test_resume_takes_this_runs_lr_not_the_checkpoints(tmp_path):
    train(tmp_path, "--max_steps=2")
    before = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    train(tmp_path, "--max_steps=4", "--resume", "--lr=0")
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert after["step"] == 4 and after["opt"]["param_groups"][0]["lr"] == 0
    assert all(torch.equal(before[k], after["model"][k]) for k in before)  # lr 0: two steps that change nothing


@pytest.mark.parametrize("name, args", [
    ("dit", []),
    ("text", ["--model=LDM-S", "--text_encoder=small", "--image_size=8", "--corrupt_type=swap"])])
def test_checkpoints_written_before_the_split_load_and_resume(tmp_path, name, args):
    """tests/fixtures: checkpoints of the code before model.py was split (their weights a pattern of their own)."""
    import lzma
    with lzma.open(os.path.join(ROOT, "tests", "fixtures", f"ckpt_pre_split_{name}.pt.xz")) as f:
        (tmp_path / "ckpt.pt").write_bytes(f.read())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, info = load_model(str(tmp_path / "ckpt.pt"))
    loaded = model.state_dict()
    assert info["model_args"] == state["model_args"] and set(state["ema"]) <= set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in state["ema"].items())
    assert len({tuple(v.flatten()[:2].tolist()) for v in state["ema"].values() if v.numel() > 1}) > 10  # not blank
    result = train(tmp_path, *args, "--resume", "--corrupt=0.1", "--max_steps=3", "--grid_steps=2")
    assert "step 3 |" in result.stdout + result.stderr + (tmp_path / "log.txt").read_text()
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 3 and resumed["corruption"] == state["corruption"]


BAD_CONFIGS = [
    (["--resume"], "no checkpoint"), (["--corrupt_tpye=sym"], "unknown config key 'corrupt_tpye'"),
    (["--max_steps=1.5"], "--max_steps=1.5: expected a int"), (["--corrupt=1.0"], "eta=1.0 must be in [0, 1)"),
    (["--cep", "--cep_scale=-1"], "cep_scale (gamma) must be >= 0"), (["--cep", "--cep_type=u"], "cep_type must be"),
    (["--corrupt_mode=random", "--corrupt_type=asym"], "random mode flips labels symmetrically"),
    (["--model=DiT-Q/2"], "model 'DiT-Q/2' is not one of"),
    (["--data_path=/nonexistent"], "data_path '/nonexistent' does not exist"),
    (["--out_dir=/dev/null/run"], "out_dir '/dev/null/run' cannot be written"),
    (["--text_encoder=small"], "cross-attention"), (["--grid_steps=1"], "grid_steps"),
    (["--prediction=x0"], "prediction"), (["--schedule=cosine"], "schedule must be"),
    (["--cep", "--emb_dropout=0.1"], "cep and emb_dropout are alternatives"), (["--cep_fixed=0.1"], "add --cep"),
    (["--model=LDM-S", "--text_encoder=small", "--label_smoothing=0.1"], "label_smoothing mixes class embeddings"),
    (["--compile", "--compile_mode=max"], "compile_mode must be default, reduce-overhead or max-autotune"),
    (["--corrupt=0.1", "--corrupt_type=swap"], "swap and rewrite need a text_encoder"),
    (["--model=LDM-S", "--text_encoder=small", "--corrupt=0.1", "--corrupt_type=rewrite"], "corrupt_rewrites"),
    (["--model=LDM-S", "--text_encoder=clip", "--clip_model=/nonexistent/clip.pt"], "/nonexistent/clip.pt"),
    (["--model=LDM-S", "--text_encoder=small", "--skip_bad_images"], "skip_bad_images=True works on class folders")]


@pytest.fixture(scope="module")
def bad_config_errors(tmp_path_factory):
    """train.py's error under each of BAD_CONFIGS, and whether it logged (began work): the script run by runpy, as
    `python train.py` runs it, in one process (torch imported once, not once a case)."""
    out = tmp_path_factory.mktemp("bad")
    errors = train_errors([train_args(out / str(i), *args)[1:] for i, (args, _) in enumerate(BAD_CONFIGS)])
    return [(error, os.path.exists(out / str(i) / "log.txt")) for i, error in enumerate(errors)]


def train_errors(argvs):
    """The error of train.py under each argv ("no error" if none), all in one process."""
    code = ("import json, runpy, sys\nerrors = []\n"
            "for sys.argv in json.loads(sys.argv[1]):\n"
            "    try:\n        runpy.run_path('train.py', run_name='__main__')\n        errors.append('no error')\n"
            "    except Exception as e:\n        errors.append(f'{type(e).__name__}: {e}')\n"
            "print(json.dumps(errors))")
    return json.loads(run([sys.executable, "-c", code, json.dumps(argvs)]).stdout.splitlines()[-1])


def test_presets_set_only_train_py_keys_and_the_papers_values(tmp_path):
    """config/*.py as `train.py config/X.py` reads them: every key known, then check_config's first failure (our
    --max_steps=0) proves the file was applied. The values the paper fixes are checked against it."""
    presets = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))
    code = ("import json, runpy, sys\nout = []\n"
            "for sys.argv in json.loads(sys.argv[1]):\n"
            "    try:\n        runpy.run_path('train.py', run_name='__main__')\n    except Exception as e:\n"
            "        out.append(str(e))\n"
            "print(json.dumps(out))")
    argvs = [["train.py", p, f"--out_dir={tmp_path}", "--max_steps=0"] for p in presets]
    errors = json.loads(run([sys.executable, "-c", code, json.dumps(argvs)]).stdout.splitlines()[-1])
    assert len(presets) >= 3 and errors == ["max_steps must be > 0, got 0"] * len(presets)
    scope = lambda name: runpy.run_path(os.path.join(ROOT, "config", name))
    dit, ldm, cc3m = scope("dit_xl2_in256.py"), scope("ldm4_in256.py"), scope("ldm4_cc3m.py")
    assert (dit["model"], dit["schedule"], dit["global_batch_size"], dit["lr"], dit["ema_decay"]) == \
        ("DiT-XL/2", "linear", 256, 1e-4, 0.9999) and dit["learn_sigma"] and dit["grid_cfg_scale"] == 1.75
    assert (ldm["model"], ldm["schedule"], ldm["global_batch_size"], ldm["learn_sigma"]) == \
        ("LDM-4", "scaled_linear", 512, False) and ldm["grid_cfg_scale"] == 2.0
    assert cc3m["text_encoder"] == "clip" and cc3m["schedule"] == "scaled_linear" and cc3m["grid_cfg_scale"] == 3.0
    assert not any(k in p for p in (dit, ldm, cc3m) for k in ("corrupt", "cep"))  # a preset is neither
    canny = scope("controlnet_canny.py")  # diffusers' train_controlnet.py defaults: 4 per GPU on 8, 5e-6, 1e-2, 1.0
    assert (canny["global_batch_size"], canny["lr"], canny["weight_decay"], canny["grad_clip"], canny["flip"]) == \
        (32, 5e-6, 1e-2, 1.0, False)


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[" ".join(args) for args, _ in BAD_CONFIGS])
def test_bad_config_and_missing_files_fail_before_work(case, bad_config_errors):
    error, logged = bad_config_errors[case]
    assert BAD_CONFIGS[case][1] in error and not logged, error


def test_global_batch_not_divisible_by_the_processes_under_torchrun(tmp_path):
    result = train(tmp_path, "--global_batch_size=7", torchrun=2, check=False)
    assert result.returncode != 0 and "global_batch_size=7 is not divisible by the 2 processes" in result.stderr
    assert not os.path.exists(tmp_path / "log.txt")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = train(tmp_path, "--max_steps=5", "--ckpt_every=1", "--lr=1e30", check=False)  # weights blow up at once
    assert result.returncode != 0 and "NaN or infinite between steps 1 and 2" in result.stderr
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.txt"]  # no temporary file left, no sample grid


def test_torchrun_design_card_command(tmp_path):
    """`torchrun --nproc_per_node=8 train.py --corrupt 0.05 --cep`, with 2 processes and a tiny config."""
    out = tmp_path / "run"
    result = train(out, "--corrupt", "0.05", "--cep", "--max_steps=4", torchrun=2)
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log and "'eta': 0.05" in log and "CEP: uniform gamma=1.0" in log
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["corrupt"] == 0.05 and state["config"]["cep"] is True
    record = json.loads((out / "corruption.json").read_text())
    assert len(record["indices"]) == round(0.05 * 64) == state["corruption"]["count"]
    # the record is the one every process computes alone, from the seed: the same with one process
    labels = data.SyntheticShapes(64, 16, seed=0).labels
    _, direct = corrupt.corrupt_labels(labels, 0.05, seed=0)
    assert record["indices"] == direct["indices"] and record["new"] == direct["new"]
    assert result.returncode == 0


def test_damaged_foreign_or_other_model_checkpoints_are_named_on_resume_and_in_sample_py(tmp_path):
    train(tmp_path / "good", "--max_steps=2")
    good = (tmp_path / "good" / "ckpt.pt").read_bytes()
    state = torch.load(tmp_path / "good" / "ckpt.pt", weights_only=True)
    files = {"truncated": good[:len(good) // 2], "text": b"not a checkpoint\n", "tmp": good[:4096]}
    for name, content in files.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "ckpt.pt").write_bytes(content)
    os.makedirs(tmp_path / "bare")
    torch.save(state["ema"], tmp_path / "bare" / "ckpt.pt")  # weights only, as an official DiT checkpoint
    cases = [(name, []) for name in files] + [("bare", []), ("good", ["--model=DiT-S/8"])]
    errors = train_errors([train_args(tmp_path / name, "--resume", "--max_steps=3", *args)[1:] for name, args in cases])
    for (name, _), error in zip(cases[:3], errors):
        assert error.startswith(f"ValueError: checkpoint '{tmp_path / name / 'ckpt.pt'}' is damaged (truncated?) or "
                                "not a checkpoint of this project (") and "ckpt.pt.tmp: never a good one" in error
        assert "weights_only" not in error  # torch's advice to load it unsafely: wrong for a damaged file
        with pytest.raises(ValueError, match="is damaged"):
            load_model(str(tmp_path / name / "ckpt.pt"))
    assert errors[3].startswith(f"ValueError: '{tmp_path / 'bare' / 'ckpt.pt'}' holds weights only") and \
        "sample.py can sample it" in errors[3]
    loaded = load_model(str(tmp_path / "bare" / "ckpt.pt"))[0].state_dict()  # it can
    assert all(torch.equal(loaded[k], v) for k, v in state["ema"].items())
    assert "holds another model than this run asks for (model DiT-Ti/8 in the checkpoint, DiT-S/8 in this run)" \
        in errors[4]
    assert (tmp_path / "good" / "ckpt.pt").read_bytes() == good  # nothing was overwritten
    result = train(tmp_path / "truncated", "--resume", check=False)  # as a user sees it: one line
    assert result.returncode == 1 and result.stderr.startswith("error: checkpoint ") and "Traceback" not in \
        result.stderr and len(result.stderr.splitlines()) == 1


def test_a_full_disk_during_a_save_names_the_file_removes_the_partial_one_and_keeps_the_previous(tmp_path):
    train(tmp_path, "--max_steps=2")
    before = (tmp_path / "ckpt.pt").read_bytes()

    def file_size_limit():  # what a full disk does to a write, for real: the write fails (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 4,) * 2)
    result = run(train_args(tmp_path, "--max_steps=4", "--resume"), check=False, preexec_fn=file_size_limit)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == \
        f"error: cannot write {tmp_path / 'ckpt.pt'}: File too large (out of space: a full disk, a quota or a " \
        "file-size limit); the previous ckpt.pt, if any, is kept (DEBUG=1 shows the traceback)"
    assert "Traceback" not in result.stderr and "step 4 |" in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not (tmp_path / "ckpt.pt.tmp").exists()


def test_adaptation_keeps_the_base_bit_identical_and_resumes_exactly(tmp_path):
    train(tmp_path / "pre", "--max_steps=2")
    pre = torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=True)["ema"]
    adapt = ["--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter", "controlnet", "--cep"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(straight, *adapt, "--max_steps=4", "--ckpt_every=2")
    train(halves, *adapt, "--max_steps=2")
    train(halves, *adapt, "--max_steps=4", "--resume")
    assert logged_losses(straight) == logged_losses(halves) and len(logged_losses(halves)) == 4
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, halves))
    assert a["model_args"]["adapter"] == dict(kind="controlnet", downsample=1) and a["step"] == 4
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        assert all(torch.equal(a[key][f"base.{k}"], v) for k, v in pre.items())  # the frozen model, bit for bit
        assert any(k.startswith("adapter.zero_linears") and v.abs().sum() > 0 for k, v in a[key].items())
    log = (straight / "log.txt").read_text()
    assert "adapting" in log and "control: canny" in log and "CEP: uniform" in log
    assert os.path.isfile(straight / "samples_0000004.png")


def test_adaptation_on_cached_controls_trains_as_on_controls_made_per_batch(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    adapt = ["--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=controlnet", "--max_steps=2"]
    for name, cache in [("fresh", []), ("cached", [f"--control_cache={tmp_path}/cache"])]:
        train(tmp_path / name, *adapt, *cache)
    assert len(os.listdir(tmp_path / "cache")) == 1
    a, b = (torch.load(tmp_path / p / "ckpt.pt", weights_only=True) for p in ("fresh", "cached"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # Canny: the same hints, bit for bit
    assert logged_losses(tmp_path / "fresh") == logged_losses(tmp_path / "cached")


def test_adaptation_under_torchrun_with_masks_and_a_t2i_adapter_on_a_folder(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    init = ["--init", str(tmp_path / "pre" / "ckpt.pt")]
    train(tmp_path / "ddp", *init, "--adapter=controlnet", "--control=mask", "--max_steps=2",
          f"--control_cache={tmp_path}/cache", torchrun=2)  # rank 0 writes the cache, rank 1 waits and reads it
    state = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert "2 process(es)" in (tmp_path / "ddp" / "log.txt").read_text() and state["step"] == 2
    assert len(os.listdir(tmp_path / "cache")) == 1
    make_folder(tmp_path / "images", sizes=[(20, 16)] * 4)
    make_controls(tmp_path / "images", tmp_path / "controls")
    unet = ["--model=LDM-S", "--image_size=8", f"--data_path={tmp_path}/images", "--learn_sigma=False"]
    train(tmp_path / "unet", *unet, "--max_steps=1")
    train(tmp_path / "t2i", *unet, "--init", str(tmp_path / "unet" / "ckpt.pt"), "--adapter=t2i",
          f"--control={tmp_path}/controls", "--max_steps=2")
    assert "control: " + str(tmp_path / "controls") in (tmp_path / "t2i" / "log.txt").read_text()


def test_adaptation_errors_come_before_any_work(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    init = ["--init", str(tmp_path / "pre" / "ckpt.pt")]
    make_folder(tmp_path / "images")
    make_controls(tmp_path / "images", tmp_path / "controls", resize=(8, 8))
    for args, message in [
            (["--adapter=t2i"], "the model of '" + str(tmp_path / "pre" / "ckpt.pt") + "' is DiT-Ti/8, which has none"),
            (["--adapter=controlnet", "--image_size=32"], "input_size: 16 in"),
            (["--adapter=controlnet", "--init", str(tmp_path / "nope.pt")], "no such checkpoint"),
            (["--adapter=controlnet", f"--data_path={tmp_path}/images", f"--control={tmp_path}/controls"],
             "is 8x8 but its image"),
            (["--adapter=controlnet", "--control=mask", f"--data_path={tmp_path}/images"], "control=mask"),
            (["--adapter=controlnet", f"--control={tmp_path}/controls"], "beside data_path's images")]:
        result = train(tmp_path / "run", *init, *args, check=False)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
        assert not os.path.exists(tmp_path / "run" / "log.txt")
    result = train(tmp_path / "run", f"--control_cache={tmp_path}/cache", check=False)
    assert result.returncode != 0 and "caches an adaptation's controls: it needs adapter and init" in result.stderr


def test_distillation_freezes_the_teacher_trains_the_student_and_resumes_exactly(tmp_path):
    train(tmp_path / "pre", "--max_steps=2")
    teacher = str(tmp_path / "pre" / "ckpt.pt")
    lcm = ["--teacher", teacher, "--cep", "--ema_decay=0.95", "--w_min=1", "--w_max=3"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    # in one process, as `python train.py` runs it, to look at the teacher in memory after the last step
    code = ("import runpy, sys, torch\nsys.argv = sys.argv[1:]\ng = runpy.run_path('train.py', run_name='__main__')\n"
            "ema = torch.load(g['teacher'], weights_only=True)['ema']\n"
            "teacher = g['teacher_net'].state_dict()\n"
            "print('teacher unchanged:', teacher.keys() == ema.keys() and all(torch.equal(teacher[k], v) "
            "for k, v in ema.items()), all(not p.requires_grad for p in g['teacher_net'].parameters()))")
    result = run([sys.executable, "-c", code, *train_args(straight, *lcm, "--max_steps=4", "--ckpt_every=2")[1:]])
    assert "teacher unchanged: True True" in result.stdout
    train(halves, *lcm, "--max_steps=2")
    train(halves, *lcm, "--max_steps=4", "--resume")
    assert logged_losses(straight) == logged_losses(halves) and len(logged_losses(halves)) == 4
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, halves))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    pre = torch.load(teacher, weights_only=True)["ema"]
    assert set(a["model"]) - set(pre) == {"w_embedder.cond_proj.weight"} and a["model"]["w_embedder.cond_proj.weight"].any()
    assert not all(torch.equal(a["model"][k], v) for k, v in pre.items())  # the student learnt
    assert a["consistency"] == dict(teacher=teacher, w_min=1.0, w_max=3.0, skip_interval=20)
    assert a["model_args"]["guidance_embed"] and a["model_args"]["class_dropout_prob"] == 0.0
    log = (straight / "log.txt").read_text()
    assert "distilling" in log and "CEP: uniform" in log and "4 lcm steps" in log
    model, info = load_model(str(halves / "ckpt.pt"))
    y = torch.tensor([0, 3])
    for n in (1, 2):
        x = sample(model, y, sampler="lcm", num_steps=n, generator=torch.Generator().manual_seed(0), size=16,
                   prediction=info["prediction"], skip_interval=info["consistency"]["skip_interval"])
        assert x.shape == (2, 3, 16, 16) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="sampler=lcm"):
        sample(model, y, size=16)


def test_a_stable_diffusion_folder_is_a_teacher_and_its_student_samples_with_lcm(tmp_path):
    """LCM-v1.5's setting in miniature: a Stable Diffusion folder distilled on captions (swapped, and CEP); the
    folder gives the model, VAE, text encoder, schedule and resolution (TINY's --model and --image_size give way)."""
    sd_pipeline(tmp_path / "sd")
    train(tmp_path / "lcm", "--teacher", str(tmp_path / "sd"), "--max_steps=2", "--w_min=1", "--w_max=3",
          "--corrupt=0.25", "--corrupt_type=swap", "--cep")
    state = torch.load(tmp_path / "lcm" / "ckpt.pt", weights_only=True)
    args, teacher = state["model_args"], load_model(str(tmp_path / "sd"))[1]["model_args"]
    assert args == dict(teacher, class_dropout_prob=0.0, guidance_embed=True) and args["text_pad"] == 49407
    assert (state["config"]["model"], state["config"]["image_size"], state["config"]["text_encoder"], state["schedule"],
            state["first_stage"]) == ("SD-1.5", 16, "clip", "sd", dict(vae=str(tmp_path / "sd" / "vae"), scale=0.18215))
    assert len(json.loads((tmp_path / "lcm" / "corruption.json").read_text())["indices"]) == 16
    log = (tmp_path / "lcm" / "log.txt").read_text()
    assert "distilling" in log and "captions, text encoder: CLIP" in log and "4 lcm steps" in log
    (tmp_path / "prompts.txt").write_text("a large blue star on a red background\n")
    run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'lcm' / 'ckpt.pt'}", "--sampler=lcm", "--num_steps=2",
         "--grid_per_class=2", f"--prompts={tmp_path / 'prompts.txt'}", f"--out={tmp_path / 'grid.png'}"])
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 16
    sd_pipeline(tmp_path / "lcm_sd", lcm=True)
    (tmp_path / "empty").mkdir()
    for folder, message in [("lcm_sd", "is not a pre-trained checkpoint of train.py (it is adapted, or a student)"),
                            ("empty", "or of a diffusers pipeline folder (model_index.json)")]:
        result = train(tmp_path / f"run_{folder}", "--teacher", str(tmp_path / folder), check=False)
        assert result.returncode != 0 and message in result.stderr and not (tmp_path / f"run_{folder}").exists()


def test_distillation_errors_come_before_any_work(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    teacher = ["--teacher", str(tmp_path / "pre" / "ckpt.pt")]
    cases = [(["--w_min=3", "--w_max=2"], "the guidance range needs 0 <= w_min <= w_max"),
             (["--w_min=-1"], "the guidance range"), (["--skip_interval=30"], "does not divide the 1000 timesteps"),
             (["--teacher", str(tmp_path / "nope.pt")], "no such checkpoint"),
             (["--out_dir", str(tmp_path / "pre")], "would be overwritten by this run's checkpoints"),
             (["--model=DiT-Ti/4"], "(model, learn_sigma, prediction) ('DiT-Ti/8', True, 'v'), not ('DiT-Ti/4'"),
             (["--image_size=32"], "input_size: 16 in"),
             (["--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=controlnet"], "two kinds of run")]
    errors = train_errors([train_args(tmp_path / str(i), *teacher, *args)[1:] for i, (args, _) in enumerate(cases)])
    for i, (error, (args, message)) in enumerate(zip(errors, cases)):
        assert message in error and not os.path.exists(tmp_path / str(i) / "log.txt"), (args, error)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, start_train):
    train(tmp_path, "--max_steps=2")
    tmp = tmp_path / "ckpt.pt.tmp"
    os.mkfifo(tmp)  # torch.save blocks writing into it: the kill lands mid-write, every time
    proc = start_train(tmp_path, "--max_steps=4", "--resume")
    with open(os.open(tmp, os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as fifo:
        partial = wait_until(lambda: fifo.read(4096), proc)  # the first bytes of the checkpoint of step 4
        proc.kill()
    assert proc.wait() == -signal.SIGKILL and partial.startswith(b"PK")  # killed inside a zip being written
    tmp.unlink()
    tmp.write_bytes(partial)  # what the kill leaves on a real disk
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    train(tmp_path, "--max_steps=4", "--resume")
    losses = logged_losses(tmp_path)  # steps 1-2; 3-4 of the killed run; 3-4 again, continued from step 2
    assert len(losses) == 6 and losses[2:4] == losses[4:6]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4 and not tmp.exists()


def test_sigterm_under_torchrun_saves_and_stops_every_rank_then_resumes_on_one_process(tmp_path, start_train):
    args = ["--corrupt=0.1", "--log_every=1000", "--max_steps=100000"]
    proc = start_train(tmp_path, *args, "--num_workers=1", torchrun=2)
    wait_until(lambda: re.search(r"\| [1-9]\d*/100000", read(f"{tmp_path}.out")), proc)  # rank 0 made a step
    rank1 = rank_pid(proc, 1)
    for pid in [rank1] + children(rank1):  # one rank only, and its loader's worker (SLURM signals every process)
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, read(f"{tmp_path}.out")[-3000:]  # every rank exited cleanly
    stop = int(re.search(r"SIGTERM: saved \S+ at step (\d+) and stopped", read(tmp_path / "log.txt"))[1])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == stop and stop % 10 == 0  # the ranks agree at a check, every 10 steps when logs are rare
    record = read(tmp_path / "corruption.json")
    train(tmp_path, *args[:2], f"--max_steps={stop + 2}", "--resume")  # 2 processes, then 1: the same global batch
    log = read(tmp_path / "log.txt")
    assert "1 process(es)" in log and f"step {stop + 2} |" in log and read(tmp_path / "corruption.json") == record
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert resumed["step"] == stop + 2 and resumed["corruption"] == state["corruption"]


def test_a_rank_killed_under_torchrun_brings_the_others_down(tmp_path, start_train):
    proc = start_train(tmp_path, "--max_steps=100000", torchrun=2)
    wait_until(lambda: "step 2 |" in read(tmp_path / "log.txt"), proc)
    start = time.time()
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0 and time.time() - start < 60
