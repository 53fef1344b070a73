"""sample.py: guided sampling, grids, .npz files, compiled sampling, adapted models' samples."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ENV, ROOT, adapt, make_folder, randomize, read, run, tiny_dit, train, wait_until
from PIL import Image

import data
import evaluate
import pipeline
from pipeline import load_model, sample, sample_npz


def test_npz_format_and_reproducibility(tmp_path):
    model = randomize(tiny_dit()).eval()
    kwargs = dict(conditions=[i % 5 for i in range(13)], batch_size=4, seed=1, cfg_scale=2.0, num_steps=3)
    sample_npz(model, str(tmp_path / "a.npz"), **kwargs)
    sample_npz(model, str(tmp_path / "b.npz"), **kwargs)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (13, 8, 8, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].tolist() == [i % 5 for i in range(13)]
    assert np.array_equal(a["arr_0"], b["arr_0"])
    sample_npz(model, str(tmp_path / "c.npz"), **dict(kwargs, seed=2))
    assert not np.array_equal(a["arr_0"], np.load(tmp_path / "c.npz")["arr_0"])


def test_guided_sampling_is_one_forward_a_step_on_both_halves():
    model = randomize(tiny_dit()).eval()
    batches = []
    model.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    sample(model, torch.tensor([0, 1, 2]), cfg_scale=4.0, num_steps=5)
    assert batches == [6] * 5


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_samples():
    """sample(compile=True) runs the guided denoiser step as one Inductor graph (on GPU a CUDA graph): the same seeds
    give the same images as eager, to float32 rounding, and one graph serves every step."""
    model = randomize(tiny_dit()).eval()
    y = torch.tensor([0, 1, 2])
    eager = sample(model, y, cfg_scale=4.0, num_steps=4, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = sample(model, y, cfg_scale=4.0, num_steps=4, generator=torch.Generator().manual_seed(0),
                          compile=True)
    assert eager.abs().max() > 0.1  # not the zeros of an untrained DiT
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)  # outputs ~1: float32 rounding


@pytest.mark.slow
def test_sample_script_rejects_a_bad_dtype(tmp_path):
    r = run([sys.executable, "sample.py", "--dtype=float16", f"--ckpt={tmp_path}/none.pt"], check=False)
    assert r.returncode != 0 and "dtype must be float32 or bfloat16, got 'float16'" in r.stderr


@pytest.mark.slow
def test_sample_script_grid_and_torchrun_npz(tmp_path):
    out = tmp_path / "run"
    train(out, "--max_steps=2")
    run([sys.executable, "sample.py", f"--ckpt={out}/ckpt.pt", "--num_steps=3", f"--out={tmp_path}/grid.png",
         "--grid_classes=3", "--grid_per_class=2"])
    assert Image.open(tmp_path / "grid.png").size == (2 * 65 + 1, 3 * 65 + 1)
    args = ["sample.py", f"--ckpt={out}/ckpt.pt", "--num_steps=2", "--num_samples=10", "--batch_size=4"]
    run([sys.executable] + args + [f"--out={tmp_path}/one.npz"])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + args
        + [f"--out={tmp_path}/two.npz"])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert one["arr_1"].tolist() == [i % 10 for i in range(10)]
    # compiled: the same images, but for a rare rounding to the next uint8 value (Inductor fuses differently)
    run([sys.executable, "sample.py", f"--ckpt={out}/ckpt.pt", "--num_steps=2", "--num_samples=8", "--batch_size=4",
         "--compile", f"--out={tmp_path}/compiled.npz"])
    compiled = np.load(tmp_path / "compiled.npz")["arr_0"]
    assert np.abs(compiled.astype(int) - one["arr_0"][:8]).max() <= 1


@pytest.mark.slow
def test_an_adapted_model_samples_for_the_controls_of_held_out_images(tmp_path):
    train(tmp_path / "pre", "--max_steps=1")
    adapt(tmp_path / "mask", "--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=controlnet", "--control=mask",
          "--synthetic_scale=0.6", "--max_steps=1")
    args = [sys.executable, "sample.py", f"--ckpt={tmp_path}/mask/ckpt.pt", "--num_steps=2"]
    run(args + [f"--out={tmp_path}/grid.png", "--grid_classes=3", "--grid_per_class=2"])
    assert Image.open(tmp_path / "grid.png").size == (3 * 65 + 1, 3 * 65 + 1)  # a row: the control, 2 samples
    run(args + [f"--out={tmp_path}/held.npz", "--num_samples=6", "--batch_size=4"])
    # the held-out split is evaluate.py's "synthetic" reference of synthetic_ref_size=6: the same images
    assert np.load(tmp_path / "held.npz")["arr_1"].tolist() == data.SyntheticShapes(6, 16, seed=1).labels.tolist()
    images = evaluate.synthetic_images(6, 1, 16, scale=0.6)
    assert np.array_equal(next(iter(images.batches(6))), data.SyntheticShapes(6, 16, 1, scale=0.6).images_uint8())
    model, info = load_model(str(tmp_path / "mask" / "ckpt.pt"))
    randomize(model.adapter, std=0.05)  # as if trained longer: no zero layer left, the control steers the samples
    with torch.no_grad():
        y, hint = torch.tensor([1, 2]), torch.rand(2, 3, 16, 16)
        x = [sample(model, y, num_steps=2, size=16, hint=h, generator=torch.Generator().manual_seed(0))
             for h in (hint, 1 - hint)]
    assert not torch.equal(*x)
    result = run(args + [f"--out={tmp_path}/p.png", f"--control={tmp_path}/nope"], check=False)
    assert "a control folder goes with --data_path" in result.stderr
    make_folder(tmp_path / "val")
    result = run(args + [f"--out={tmp_path}/p.png", f"--control={tmp_path}/nope", f"--data_path={tmp_path}/val"],
                 check=False)
    assert f"control folder '{tmp_path}/nope' does not exist" in result.stderr


@pytest.mark.slow
def test_a_text_to_image_model_adapts_and_samples_for_held_out_captions(tmp_path):
    text_args = ["--model=LDM-S", "--text_encoder=small", "--image_size=8", "--learn_sigma=False"]
    train(tmp_path / "pre", *text_args, "--max_steps=1")
    adapt(tmp_path / "t2i", "--init", str(tmp_path / "pre" / "ckpt.pt"), "--adapter=t2i", "--max_steps=1")
    run([sys.executable, "sample.py", f"--ckpt={tmp_path}/t2i/ckpt.pt", "--num_steps=2", "--num_samples=3",
         f"--out={tmp_path}/held.npz"])
    assert read(tmp_path / "held_prompts.txt").splitlines() == data.SyntheticShapes(3, 8, seed=1).captions


@pytest.mark.slow
def test_a_sample_run_killed_half_way_continues_to_the_same_npz(tmp_path):
    train(tmp_path / "run", "--max_steps=1")
    args = [sys.executable, "sample.py", f"--ckpt={tmp_path}/run/ckpt.pt", "--num_steps=10", "--num_samples=60",
            "--batch_size=2"]
    run(args + [f"--out={tmp_path}/straight.npz"])
    parts = tmp_path / "killed.npz.parts"
    proc = subprocess.Popen(args + [f"--out={tmp_path}/killed.npz"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_until(lambda: (parts / "000003.npy").exists(), proc)
    proc.kill()
    proc.wait()
    done = [name for name in os.listdir(parts) if name.endswith(".npy")]
    assert 4 <= len(done) < 30 and not (tmp_path / "killed.npz").exists()
    result = run(args + [f"--out={tmp_path}/killed.npz", "--seed=1"], check=False)
    assert result.returncode != 0 and "holds the batches of a sampling run with other settings" in result.stderr
    run(args + [f"--out={tmp_path}/killed.npz"])  # the same command: only the missing batches
    straight, killed = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "killed.npz")
    assert np.array_equal(straight["arr_0"], killed["arr_0"]) and np.array_equal(straight["arr_1"], killed["arr_1"])
    assert not parts.exists()


def test_circle_noise_walks_a_great_circle_of_standard_normal_draws():
    noise = pipeline.circle_noise(3, 8, (2, 4, 4), torch.Generator().manual_seed(0)).view(3, 8, 2, 4, 4)
    z1, z2 = noise[:, 0], noise[:, 2]  # theta 0 and pi / 2
    torch.testing.assert_close(noise[:, 4], -z1)  # theta pi: the other side of the circle
    torch.testing.assert_close(noise[:, 1], (z1 + z2) / 2 ** 0.5)
    assert not torch.allclose(noise[0], noise[1])  # a circle of its own for each row
    big = pipeline.circle_noise(2, 16, (64, 64), torch.Generator().manual_seed(1))
    assert abs(big.std().item() - 1) < 0.02 and abs(big.mean().item()) < 0.02
    steps = (noise[:, 1:] - noise[:, :-1]).flatten(2).norm(dim=2)
    assert (steps < (noise[:, 4] - noise[:, 0]).flatten(1).norm(dim=1)[:, None]).all()  # neighbours are close


@pytest.mark.slow
def test_a_circular_walk_grid_samples_its_rows_from_circle_noise(tmp_path):
    train(tmp_path / "run", "--max_steps=1")
    args = [sys.executable, "sample.py", f"--ckpt={tmp_path}/run/ckpt.pt", "--num_steps=2", "--grid_classes=2",
            "--grid_per_class=6", "--walk"]
    run(args)
    assert Image.open(tmp_path / "run" / "samples_dpm++2_cfg4.0_walk.png").size == (6 * 65 + 1, 2 * 65 + 1)
    result = run(args + ["--sampler=ddpm"], check=False)
    assert result.returncode != 0 and "walk=True draws a grid with a deterministic sampler" in result.stderr
