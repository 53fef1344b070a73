"""
Feature-extraction throughput of fid.py against pytorch-fid (the reference implementation, test-only dependency)
on the same random-weight Inception and the same uint8 images; checks the features agree.

  python bench_fid.py                       # CPU or GPU, whichever torch picks
  python bench_fid.py --n=256 --resolution=256 --batch_size=64 --device=cuda

pytorch-fid's side is its inner loop only (uint8 -> float [0, 1] -> model -> pool features, no file decoding),
which favours it. Runs alternate between the two, and the best and median of `repeats` are reported, because
other processes on a shared machine make single timings noisy.
"""
import sys
import time

import numpy as np
import torch

import fid

n = 64
resolution = 32
batch_size = 32
repeats = 3
device = ""
seed = 0


def main():
    from configurator import configure
    configure(globals(), sys.argv[1:])
    import pytorch_fid.inception as pfi
    dev = torch.device(device) if device else fid.default_device()
    ours = fid.InceptionV3().eval()
    # He-scaled random convs and unit-ish BN statistics keep activations O(1) through the network, like trained
    # weights (tiny weights would push activations into denormals, which are slow on CPU and unrealistic)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ours.state_dict().items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            sd[k] = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
        elif v.is_floating_point():
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = v
    ours.load_state_dict(sd)
    ours.to(dev)
    pfi.load_state_dict_from_url = lambda *a, **k: sd  # no download: the same random weights
    ref = pfi.InceptionV3([3]).eval().to(dev)
    images = np.random.default_rng(seed).integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)

    def run_ours():
        return fid.compute_features(images, ours, batch_size, dev, progress=False, keys=("pool",))["pool"]

    @torch.no_grad()
    def run_ref():  # pytorch-fid's get_activations, minus its DataLoader over files
        out = []
        for i in range(0, n, batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255).to(dev)
            out.append(ref(x)[0].squeeze(3).squeeze(2).cpu().numpy())
        return np.concatenate(out)

    a, b = run_ours(), run_ref()  # warm-up, and the check
    err = np.abs(a - b).max() / np.abs(b).max()
    times = {"fid.py": [], "pytorch-fid": []}
    for _ in range(repeats):
        for name, fn in (("fid.py", run_ours), ("pytorch-fid", run_ref)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    print(f"device={dev} threads={torch.get_num_threads()} n={n} resolution={resolution} batch_size={batch_size} "
          f"torch={torch.__version__}; max relative feature difference {err:.1e}")
    for name, t in times.items():
        print(f"{name:<12} best {n / min(t):7.1f} img/s   median {n / float(np.median(t)):7.1f} img/s")
    return times


if __name__ == "__main__":
    main()
