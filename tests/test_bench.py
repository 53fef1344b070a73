"""bench.py: FLOP counts and the benchmark's tables."""
import csv
import re
import sys

import pytest
import torch
from conftest import TINY_UNET, tiny_dit

from model import UNet
from vae import AutoencoderKL


@pytest.mark.slow
def test_forward_flops_match_the_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import bench
    three_levels = {**TINY_UNET, "channel_mult": (1, 2, 3), "attention_resolutions": (1, 4)}
    for model, size in [(tiny_dit(), 8), (UNet(in_channels=4, **TINY_UNET), 16), (UNet(in_channels=3, **three_levels), 16)]:
        x, t, y = torch.randn(2, model.in_channels, size, size), torch.tensor([1, 999]), torch.tensor([0, 1])
        # the math backend: FlopCounterMode does not count the CPU flash-attention kernel
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
            loss = model(x, t, y).square().mean()
        assert forward.get_total_flops() == 2 * bench.forward_flops(model, size)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as backward:
            loss.backward()
        # a training step as 3 forwards: the backward is 2, less the input gradient of the first layer
        assert 1.9 < backward.get_total_flops() / forward.get_total_flops() <= 2


@pytest.mark.slow
def test_bench_table_rows_with_and_without_diffusers(tmp_path, monkeypatch, capsys):
    import bench
    args = ["--models=DiT-Ti/8,LDM-S", "--batch_size=2", "--sample_batch_size=1", "--sample_steps=2", "--steps=1",
            "--warmup=0", "--dtypes=float32", "--fid_images=1", f"--csv={tmp_path}/bench.csv"]
    table = bench.main(args)
    out = capsys.readouterr().out
    sample = "sample, dpm++ 2 steps, cfg 4.0"
    assert [row[:2] for row in table] == [
        ["train", "DiT-Ti/8"], ["train", "DiT-Ti/8 (diffusers)"], [sample, "DiT-Ti/8"], ["train", "LDM-S"],
        [sample, "LDM-S"], ["FID Inception features", "Inception-v3 (fid.py)"],
        ["FID Inception features", "Inception-v3 (pytorch-fid)"]], out
    assert all(float(row[6]) > 0 for row in table)
    assert "| train | DiT-Ti/8 (diffusers) | 32x32x4 | 2 | no | float32 |" in out
    assert "ours and diffusers' outputs differ by 0.0e+00" in out and "as fast as diffusers'" in out
    with open(tmp_path / "bench.csv", newline="") as f:
        assert list(csv.reader(f)) == [["task", "model", "input", "batch", "compile", "dtype", "images/s", "TFLOP/s",
                                        "MFU"]] + [list(map(str, row)) for row in table]
    # without diffusers (its import fails): the same table less its row, and a message that says so
    monkeypatch.setitem(sys.modules, "diffusers", None)
    table = bench.main(args[:-2] + ["--fid_images=0"])
    assert [row[:2] for row in table] == [["train", "DiT-Ti/8"], [sample, "DiT-Ti/8"], ["train", "LDM-S"],
                                          [sample, "LDM-S"]]
    assert "diffusers is not installed: the diffusers row of DiT-Ti/8 is skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_speedups_rows_before_and_after(tmp_path, monkeypatch, capsys):
    """The GPU suite on CPU, on tiny models (and a tiny first stage): every row and note, the CSV and markdown beside
    it, and the batch halved when the eager step runs out of memory. torch.compile runs with the aot_eager backend here, to take seconds (the
    Inductor samples are checked in test_compiled_sampling_gives_the_eager_samples): the compiled path then computes
    the eager arithmetic exactly."""
    import bench
    real_compile, real_step = torch.compile, bench.train_step
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(bench, "AutoencoderKL", lambda: AutoencoderKL(block_out_channels=(32, 32), norm_num_groups=8))

    def train_step(*args):  # a GPU that holds batches of 2 at most
        step = real_step(*args)
        if args[-1] <= 2:
            return step
        def out_of_memory():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return out_of_memory
    monkeypatch.setattr(bench, "train_step", train_step)
    csv_path = tmp_path / "gpu" / "speedups.csv"
    table = bench.main(["--suite=speedups", "--sample_models=DiT-Ti/8", "--graph_models=DiT-Ti/8",
                        "--mfu_model=DiT-Ti/8", "--mfu_batch_size=8", "--batch_size=2", "--sample_batch_size=2",
                        "--sample_steps=2", "--steps=1", "--warmup=0", f"--csv={csv_path}"])
    out = capsys.readouterr().out
    sample = "sample, dpm++ 2 steps, cfg 4.0, AutoencoderKL decode"
    attention = "attention ({}), forward and backward, 3 heads of 64"  # 64: a power of two, nothing to pad
    assert [[row[i] for i in (0, 3, 4, 5)] for row in table] == [
        [sample, 2, "no", "bfloat16"], [sample, 2, "no", "float32"], [sample, 2, "no", "bfloat16"],
        [sample, 2, "default", "bfloat16"],
        ["train", 2, "no", "bfloat16"], ["train", 2, "default", "bfloat16"],  # batch_size: eager, CUDA graphs
        ["train", 2, "no", "bfloat16"], ["train", 2, "default", "bfloat16"],  # the MFU rows, halved twice
        [attention.format("flash_attention"), 8, "no", "bfloat16"], [attention.format("math"), 8, "no", "bfloat16"]], out
    assert all(float(row[6]) > 0 for row in table)
    assert re.search(r"compiled \S+x as fast as eager; from the same seeds, images that differ by 0\.0e\+00", out)
    assert re.search(r"where bfloat16 and float32 eager differ by [1-9]", out)  # bf16 does round
    assert re.search(r"DiT-Ti/8: 50K images take \d+ minutes eager at batch 2 and \d+ compiled at batch 2", out)
    assert "DiT-Ti/8, training at batch 2 (8 did not fit): compiled" in out
    with open(csv_path, newline="") as f:
        assert list(csv.reader(f))[1:] == [list(map(str, row)) for row in table]
    assert (tmp_path / "gpu" / "speedups.md").read_text() == out


def test_bench_attention_kernels_and_padded_head_dim(monkeypatch):
    """DiT-XL/2's heads of 72 padded to 128 with zeros give the unpadded attention exactly; every kernel agrees."""
    import bench
    for name, value in {"mfu_model": "DiT-XL/8", "mfu_batch_size": 2, "steps": 1, "warmup": 0}.items():
        monkeypatch.setattr(bench, name, value)
    rows, notes = bench.attention_rows()
    assert [r["task"].split(",")[0] for r in rows] == [
        "attention (flash_attention)", "attention (math)", "attention (flash_attention", "attention (math"]
    assert all(r["task"].endswith("16 heads of 72") and r["input"] == "16 tokens" for r in rows)
    differences = {n.split(" differs")[0]: float(n.split(" by ")[1].split()[0]) for n in notes}
    assert differences["attention (flash_attention, head dim padded to 128)"] == 0
    assert 0 < differences["attention (math)"] < 1e-2 and differences["attention (math, head dim padded to 128)"] < 1e-2
