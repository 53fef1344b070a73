"""adapt.py: a ControlNet or T2I-Adapter on a frozen pre-trained model: the base bit for bit, exact resume, cached
controls, torchrun, control folders, the model's settings taken from --init, errors before any work."""
import os

import pytest
import torch
from conftest import ROOT, adapt, logged_losses, make_controls, make_folder, run, script_errors, train

pytestmark = pytest.mark.slow


def test_adaptation_keeps_the_base_bit_identical_and_resumes_exactly(tmp_path):
    train(tmp_path / "pre", "--max_steps=2")
    pre = torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=True)["ema"]
    args = ["--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter", "controlnet", "--cep"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    adapt(straight, *args, "--max_steps=4", "--ckpt_every=2")
    adapt(halves, *args, "--max_steps=2")
    adapt(halves, *args, "--max_steps=4", "--resume")
    assert logged_losses(straight) == logged_losses(halves) and len(logged_losses(halves)) == 4
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, halves))
    assert a["model_args"]["adapter"] == dict(kind="controlnet", downsample=1) and a["step"] == 4
    assert a["model_args"]["name"] == "DiT-Ti/8" and a["config"]["image_size"] == 16  # the checkpoint's, not repeated
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        assert all(torch.equal(a[key][f"base.{k}"], v) for k, v in pre.items())  # the frozen model, bit for bit
        assert any(k.startswith("adapter.zero_linears") and v.abs().sum() > 0 for k, v in a[key].items())
    log = (straight / "log.txt").read_text()
    assert "adapting" in log and "control: canny" in log and "CEP: uniform" in log
    assert "config: " in log and "model='DiT-Ti/8'" in log  # the whole config once, the checkpoint's settings too
    assert "resumed from" in (halves / "log.txt").read_text()
    assert os.path.isfile(straight / "samples_0000004.png")


def test_adaptation_on_cached_controls_trains_as_on_controls_made_per_batch(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    args = ["--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=controlnet", "--max_steps=2"]
    for name, cache in [("fresh", []), ("cached", [f"--control_cache={tmp_path}/cache"])]:
        adapt(tmp_path / name, *args, *cache)
    assert len(os.listdir(tmp_path / "cache")) == 1
    a, b = (torch.load(tmp_path / p / "ckpt.pt", weights_only=True) for p in ("fresh", "cached"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # Canny: the same hints, bit for bit
    assert logged_losses(tmp_path / "fresh") == logged_losses(tmp_path / "cached")


def test_adaptation_under_torchrun_with_masks_and_a_t2i_adapter_on_a_folder(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    init = ["--init", str(tmp_path / "pre" / "ckpt.pt")]
    adapt(tmp_path / "ddp", *init, "--adapter=controlnet", "--control=mask", "--max_steps=2",
          f"--control_cache={tmp_path}/cache", torchrun=2)  # rank 0 writes the cache, rank 1 waits and reads it
    state = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert "2 process(es)" in (tmp_path / "ddp" / "log.txt").read_text() and state["step"] == 2
    assert len(os.listdir(tmp_path / "cache")) == 1
    make_folder(tmp_path / "images", sizes=[(20, 16)] * 4)
    make_controls(tmp_path / "images", tmp_path / "controls")
    train(tmp_path / "unet", "--model=LDM-S", "--image_size=8", f"--data_path={tmp_path}/images",
          "--learn_sigma=False", "--max_steps=1")
    adapt(tmp_path / "t2i", "--init", str(tmp_path / "unet" / "ckpt.pt"), "--adapter=t2i",
          f"--data_path={tmp_path}/images", f"--control={tmp_path}/controls", "--max_steps=2")
    log = (tmp_path / "t2i" / "log.txt").read_text()
    assert "control: " + str(tmp_path / "controls") in log and "LDM-S" in log


def test_adaptation_errors_come_before_any_work(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    init = ["--init", str(tmp_path / "pre" / "ckpt.pt")]
    make_folder(tmp_path / "images")
    make_controls(tmp_path / "images", tmp_path / "controls", resize=(8, 8))
    cases = [(["--adapter=t2i"], "the model of '" + str(tmp_path / "pre" / "ckpt.pt") + "' is DiT-Ti/8, which has none"),
             (["--image_size=32"], "image_size: adapt.py takes this from the pre-trained checkpoint (--init)"),
             (["--model=DiT-Ti/4", "--vae=x"], "model, vae: adapt.py takes these from the pre-trained checkpoint"),
             (["--init", str(tmp_path / "nope.pt")], "no such checkpoint"),
             (["--out_dir", str(tmp_path / "pre")], "would be overwritten by this run's checkpoints"),
             ([f"--data_path={tmp_path}/images", f"--control={tmp_path}/controls"], "is 8x8 but its image"),
             (["--control=mask", f"--data_path={tmp_path}/images"], "control=mask"),
             ([f"--control={tmp_path}/controls"], "beside data_path's images")]
    argvs = [["adapt.py", f"--out_dir={tmp_path / str(i)}", *init, *args] for i, (args, _) in enumerate(cases)]
    for i, (error, (args, message)) in enumerate(zip(script_errors("adapt.py", argvs), cases)):
        assert message in error and not os.path.exists(tmp_path / str(i) / "log.txt"), (args, error)
    result = run(["python", "train.py", "--init", "x.pt", "--adapter", "controlnet"], check=False, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.strip() == \
        "error: --init is adapt.py's now: python adapt.py --init ... (train.py pre-trains)"
