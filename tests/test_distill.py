"""distill.py: consistency distillation of a frozen teacher: the teacher untouched, exact resume, a Stable Diffusion
folder as the teacher, the model's settings taken from --teacher, errors before any work."""
import json
import os
import sys

import pytest
import torch
from conftest import DISTILL, ROOT, distill, logged_losses, run, script_args, script_errors, sd_pipeline, train
from PIL import Image

from pipeline import load_model, sample

pytestmark = pytest.mark.slow


def test_distillation_freezes_the_teacher_trains_the_student_and_resumes_exactly(tmp_path):
    train(tmp_path / "pre", "--max_steps=2")
    teacher = str(tmp_path / "pre" / "ckpt.pt")
    lcm = ["--teacher", teacher, "--cep", "--ip=0.1", "--ema_decay=0.95", "--w_min=1", "--w_max=3"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    # in one process, as `python distill.py` runs it, to look at the teacher in memory after the last step
    code = ("import runpy, sys, torch\nsys.argv = sys.argv[1:]\ng = runpy.run_path('distill.py', run_name='__main__')\n"
            "ema = torch.load(g['teacher'], weights_only=True)['ema']\n"
            "teacher = g['teacher_net'].state_dict()\n"
            "print('teacher unchanged:', teacher.keys() == ema.keys() and all(torch.equal(teacher[k], v) "
            "for k, v in ema.items()), all(not p.requires_grad for p in g['teacher_net'].parameters()))")
    argv = script_args("distill.py", straight, DISTILL, *lcm, "--max_steps=4", "--ckpt_every=2")[1:]
    assert "teacher unchanged: True True" in run([sys.executable, "-c", code, *argv]).stdout
    distill(halves, *lcm, "--max_steps=2")
    distill(halves, *lcm, "--max_steps=4", "--resume")
    assert logged_losses(straight) == logged_losses(halves) and len(logged_losses(halves)) == 4
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, halves))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    pre = torch.load(teacher, weights_only=True)["ema"]
    assert set(a["model"]) - set(pre) == {"w_embedder.cond_proj.weight"} and a["model"]["w_embedder.cond_proj.weight"].any()
    assert not all(torch.equal(a["model"][k], v) for k, v in pre.items())  # the student learnt
    assert a["consistency"] == dict(teacher=teacher, w_min=1.0, w_max=3.0, skip_interval=20)
    assert a["model_args"]["guidance_embed"] and a["model_args"]["class_dropout_prob"] == 0.0
    assert a["model_args"]["name"] == "DiT-Ti/8"  # the teacher's, not repeated on the command line
    log = (straight / "log.txt").read_text()
    assert "distilling" in log and "CEP: uniform" in log and "IP: 0.1" in log and "w 3.0, 4 LCM steps" in log
    model, info = load_model(str(halves / "ckpt.pt"))
    y = torch.tensor([0, 3])
    for n in (1, 2):
        x = sample(model, y, sampler="lcm", num_steps=n, generator=torch.Generator().manual_seed(0), size=16,
                   prediction=info["prediction"], skip_interval=info["consistency"]["skip_interval"])
        assert x.shape == (2, 3, 16, 16) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="sampler=lcm"):
        sample(model, y, size=16)
    run([sys.executable, "sample.py", f"--ckpt={halves / 'ckpt.pt'}", "--sampler=lcm", "--num_steps=2",
         "--grid_classes=2", "--grid_per_class=2"])
    assert os.path.isfile(halves / "samples_lcm2_w3.0.png")  # named by the student's input w, not the cfg scale


def test_a_stable_diffusion_folder_is_a_teacher_and_its_student_samples_with_lcm(tmp_path):
    """LCM-v1.5's setting in miniature: a Stable Diffusion folder distilled on captions (swapped, and CEP); the
    folder gives the model, VAE, text encoder, schedule and resolution."""
    sd_pipeline(tmp_path / "sd")
    distill(tmp_path / "lcm", "--teacher", str(tmp_path / "sd"), "--max_steps=2", "--w_min=1", "--w_max=3",
            "--corrupt=0.25", "--corrupt_type=swap", "--cep")
    state = torch.load(tmp_path / "lcm" / "ckpt.pt", weights_only=True)
    args, teacher = state["model_args"], load_model(str(tmp_path / "sd"))[1]["model_args"]
    assert args == dict(teacher, class_dropout_prob=0.0, guidance_embed=True) and args["text_pad"] == 49407
    assert (state["config"]["model"], state["config"]["image_size"], state["config"]["text_encoder"], state["schedule"],
            state["first_stage"]) == ("SD-1.5", 16, "clip", "sd", dict(vae=str(tmp_path / "sd" / "vae"), scale=0.18215))
    assert len(json.loads((tmp_path / "lcm" / "corruption.json").read_text())["indices"]) == 16
    log = (tmp_path / "lcm" / "log.txt").read_text()
    assert "distilling" in log and "4 LCM steps" in log
    (tmp_path / "prompts.txt").write_text("a large blue star on a red background\n")
    run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'lcm' / 'ckpt.pt'}", "--sampler=lcm", "--num_steps=2",
         "--grid_per_class=2", f"--prompts={tmp_path / 'prompts.txt'}", f"--out={tmp_path / 'grid.png'}"])
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 16
    sd_pipeline(tmp_path / "lcm_sd", lcm=True)
    (tmp_path / "empty").mkdir()
    for folder, message in [("lcm_sd", "is not a pre-trained checkpoint of train.py (it is adapted, or a student)"),
                            ("empty", "or of a diffusers pipeline folder (model_index.json)")]:
        result = distill(tmp_path / f"run_{folder}", "--teacher", str(tmp_path / folder), check=False)
        assert result.returncode != 0 and message in result.stderr and not (tmp_path / f"run_{folder}").exists()


def test_distillation_errors_come_before_any_work(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    teacher = ["--teacher", str(tmp_path / "pre" / "ckpt.pt")]
    cases = [(["--w_min=3", "--w_max=2"], "the guidance range needs 0 <= w_min <= w_max"),
             (["--w_min=-1"], "the guidance range"), (["--skip_interval=30"], "does not divide the 1000 timesteps"),
             (["--teacher", str(tmp_path / "nope.pt")], "no such checkpoint"),
             (["--out_dir", str(tmp_path / "pre")], "would be overwritten by this run's checkpoints"),
             (["--model=DiT-Ti/4"], "model: distill.py takes this from the teacher (--teacher)"),
             (["--corrupt=0.1", "--corrupt_type=swap"], "does not fit the teacher's conditions"),
             (["--ip=-0.1"], "ip must be >= 0"),
             (["--init", str(tmp_path / "pre" / "ckpt.pt")], "unknown config key 'init'")]
    argvs = [["distill.py", f"--out_dir={tmp_path / str(i)}", *teacher, *args] for i, (args, _) in enumerate(cases)]
    for i, (error, (args, message)) in enumerate(zip(script_errors("distill.py", argvs), cases)):
        assert message in error and not os.path.exists(tmp_path / str(i) / "log.txt"), (args, error)
    result = run(["python", "train.py", "--teacher", "x.pt"], check=False, cwd=ROOT)
    assert result.returncode != 0 and "--teacher is distill.py's now" in result.stderr
