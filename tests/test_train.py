"""train.py: exact resume, old checkpoints, presets, bad settings, NaN, SIGKILL / SIGTERM, damaged checkpoints, a
full disk, torchrun."""
import glob
import json
import os
import re
import resource
import runpy
import signal
import time

import pytest
import torch
from conftest import (
    ROOT, children, leftovers, logged_losses, rank_pid, read, run, script_errors, train, train_args, wait_until
)

import corrupt
import data
from pipeline import load_model


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_takes_this_runs_lr_not_the_checkpoints(tmp_path):
    train(tmp_path, "--max_steps=2")
    before = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    train(tmp_path, "--max_steps=4", "--resume", "--lr=0")
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert after["step"] == 4 and after["opt"]["param_groups"][0]["lr"] == 0
    assert all(torch.equal(before[k], after["model"][k]) for k in before)  # lr 0: two steps that change nothing


@pytest.mark.slow
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
    errors = script_errors("train.py", [train_args(out / str(i), *args)[1:] for i, (args, _) in enumerate(BAD_CONFIGS)])
    return [(error, os.path.exists(out / str(i) / "log.txt")) for i, error in enumerate(errors)]


@pytest.mark.slow
def test_presets_set_only_their_scripts_keys_and_the_papers_values(tmp_path):
    """config/*.py as `train.py config/X.py` (adapt.py for the adaptation's) reads them: every key known, then
    check_config's first failure (our --max_steps=0) proves the file was applied. The values the paper fixes are
    checked against it."""
    presets = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))
    adapting = [p for p in presets if os.path.basename(p).startswith("controlnet")]
    training = [p for p in presets if p not in adapting]
    for script, files in [("train.py", training), ("adapt.py", adapting)]:
        errors = script_errors(script, [[script, p, f"--out_dir={tmp_path}", "--max_steps=0"] for p in files])
        assert errors == ["ValueError: max_steps must be > 0, got 0"] * len(files)
    assert len(training) >= 3 and len(adapting) >= 1
    scope = lambda name: runpy.run_path(os.path.join(ROOT, "config", name))
    dit, ldm, cc3m = scope("dit_xl2_in256.py"), scope("ldm4_in256.py"), scope("ldm4_cc3m.py")
    assert (dit["model"], dit["schedule"], dit["global_batch_size"], dit["lr"], dit["ema_decay"]) == \
        ("DiT-XL/2", "linear", 256, 1e-4, 0.9999) and dit["learn_sigma"] and dit["grid_cfg_scale"] == 1.75
    assert (ldm["model"], ldm["schedule"], ldm["global_batch_size"], ldm["learn_sigma"]) == \
        ("LDM-4", "scaled_linear", 512, False) and ldm["grid_cfg_scale"] == 2.0
    assert cc3m["text_encoder"] == "bert" and cc3m["schedule"] == "scaled_linear" and cc3m["grid_cfg_scale"] == 3.0
    assert (ldm["max_steps"], cc3m["max_steps"]) == (178_000, 396_000)  # the paper's Table 3
    assert not any(k in p for p in (dit, ldm, cc3m) for k in ("corrupt", "cep"))  # a preset is neither
    canny = scope("controlnet_canny.py")  # diffusers' train_controlnet.py defaults: 4 per GPU on 8, 5e-6, 1e-2, 1.0
    assert (canny["global_batch_size"], canny["lr"], canny["weight_decay"], canny["grad_clip"], canny["flip"]) == \
        (32, 5e-6, 1e-2, 1.0, False)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=[" ".join(args) for args, _ in BAD_CONFIGS])
def test_bad_config_and_missing_files_fail_before_work(case, bad_config_errors):
    error, logged = bad_config_errors[case]
    assert BAD_CONFIGS[case][1] in error and not logged, error


@pytest.mark.slow
def test_global_batch_not_divisible_by_the_processes_under_torchrun(tmp_path):
    result = train(tmp_path, "--global_batch_size=7", torchrun=2, check=False)
    assert result.returncode != 0 and "global_batch_size=7 is not divisible by the 2 processes" in result.stderr
    assert not os.path.exists(tmp_path / "log.txt")


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = train(tmp_path, "--max_steps=5", "--ckpt_every=1", "--lr=1e30", check=False)  # weights blow up at once
    assert result.returncode != 0 and "NaN or infinite between steps 1 and 2" in result.stderr
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.jsonl", "log.txt", "loss.png"]  # no temporary file, no grid


@pytest.mark.slow
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


@pytest.mark.slow
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
    argvs = [train_args(tmp_path / name, "--resume", "--max_steps=3", *args)[1:] for name, args in cases]
    errors = script_errors("train.py", argvs)
    for (name, _), error in zip(cases[:3], errors):
        assert error.startswith(f"ValueError: checkpoint '{tmp_path / name / 'ckpt.pt'}' is damaged (truncated?) or "
                                "not a checkpoint of this project (") and "ckpt.pt.*.tmp: never a good one" in error
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


@pytest.mark.slow
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
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not leftovers(tmp_path / "ckpt.pt")


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, start_train):
    train(tmp_path, "--max_steps=2")
    tmp = tmp_path / "ckpt.pt.tmp"
    os.mkfifo(tmp)  # torch.save blocks writing into it: the kill lands mid-write, every time
    proc = start_train(tmp_path, "--max_steps=4", "--resume", fixed_tmp=True)
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
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
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


@pytest.mark.slow
def test_ctrl_c_saves_says_how_to_resume_and_the_run_continues_exactly_with_its_time(tmp_path, start_train):
    args = ["--log_every=1", "--num_workers=1"]
    proc = start_train(tmp_path / "run", *args, "--max_steps=100000")
    wait_until(lambda: "step 3 |" in read(tmp_path / "run" / "log.txt"), proc)
    for pid in [proc.pid] + children(proc.pid):  # a terminal's Ctrl-C reaches every foreground process
        os.kill(pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 0, read(f"{tmp_path / 'run'}.out")[-3000:]
    log = read(tmp_path / "run" / "log.txt")
    stop = int(re.search(r"Ctrl-C: saved \S+ at step (\d+) and stopped; continue with the same command and --resume",
                         log)[1])
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert saved["step"] == stop and saved["elapsed"] > 0
    assert "Traceback" not in read(f"{tmp_path / 'run'}.out")
    train(tmp_path / "run", *args, f"--max_steps={stop + 3}", "--resume")
    train(tmp_path / "straight", *args, f"--max_steps={stop + 3}")
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "straight")
    log = read(tmp_path / "run" / "log.txt")
    assert f"resumed from {tmp_path / 'run' / 'ckpt.pt'} at step {stop}" in log
    elapsed = {int(s): float(e) for s, e in re.findall(r"step (\d+) \|.* elapsed (\d+)s", log)}
    assert elapsed[stop + 1] >= int(saved["elapsed"])  # the time counts on from the checkpoint's
    records = [json.loads(line) for line in read(tmp_path / "run" / "log.jsonl").splitlines()]
    assert [r["step"] for r in records] == list(range(1, stop + 4)) and os.path.isfile(tmp_path / "run" / "loss.png")


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_brings_the_others_down(tmp_path, start_train):
    proc = start_train(tmp_path, "--max_steps=100000", torchrun=2)
    wait_until(lambda: "step 2 |" in read(tmp_path / "log.txt"), proc)
    start = time.time()
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0 and time.time() - start < 60
