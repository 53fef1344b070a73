"""
Self-contained FID, sFID, Inception Score and improved precision/recall.

The network is the FID variant of Inception-v3: the PyTorch port of the 2015-12-05 TensorFlow graph
(classify_image_graph_def.pb) that pytorch-fid, torch-fidelity and, through TensorFlow, the ADM evaluator
(guided-diffusion evaluations/evaluator.py, the definition behind DiT's and most diffusion papers' numbers) use.
Parameter names and shapes equal pt_inception-2015-12-05-6726825d.pth, so that file loads strictly.

Where the three references differ, and what we do:
- Resize to 299x299. ADM feeds uint8 images to the TF graph, which resizes with TF1 bilinear
  (align_corners=False, *no* half-pixel centres) and normalises (x - 128) / 128. torch-fidelity reproduces that
  exactly. pytorch-fid scales to [0, 1] and uses torch bilinear (half-pixel centres), then 2x - 1, i.e.
  (x - 127.5) / 127.5. The default here is pytorch-fid's (resize="pytorch-fid"); resize="tf1" gives the
  ADM / torch-fidelity input. For 299x299 inputs both are the identity; otherwise FID moves slightly.
- Logits. The TF graph's softmax/logits/MatMul, which ADM uses for IS, is pool_3 @ W without the bias add;
  torch-fidelity calls it "logits_unbiased" and uses it for IS too. Our "logits" are these (fc.bias is loaded
  but unused). pytorch-fid has no IS.
- IS splits. ADM cuts the samples into chunks of 5000 (10 splits at the standard 50K); torch-fidelity and the
  original improved-gan code use 10 equal splits. Both are identical at N = 50000 only. inception_score defaults
  to 10 equal splits; split_size=5000 gives ADM's rule exactly, and evaluate.py uses it (the paper's numbers).
- sFID features: ADM's "mixed_6/conv" = the ReLU output of the 1x1 branch of Mixed_6d (17x17), first 7 channels,
  flattened in TF's NHWC order (17*17*7 = 2023). The order matters only to reuse ADM's precomputed mu_s/sigma_s.
- Precision/recall: ADM computes distances in fp16 (fp32 fallback); we use fp32 throughout.

Imports only torch, numpy, scipy (and tqdm); copy this file alone into another project.
"""
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    def tqdm(x, **kwargs):
        return x

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_SPACE = "inception-2015-12-05"

# -----------------------------------------------------------------------------
# the network


class BasicConv2d(nn.Module):
    """conv (no bias) + BN(eps=0.001) + ReLU. Inference only: BN always uses its running statistics, folded into
    the conv, so each layer is one pass over the activations (train() changes nothing)."""

    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def folded(self):
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        return self.conv.weight * scale.view(-1, 1, 1, 1), self.bn.bias - self.bn.running_mean * scale

    def forward(self, x):
        w, b = self.folded()
        return F.relu(F.conv2d(x, w, b, self.conv.stride, self.conv.padding), inplace=True)


def _fused_1x1(x, layers):
    # the 1x1 convs of a block that read the same input, as one conv (one pass over x); outputs before the ReLU
    wb = [layer.folded() for layer in layers]
    z = F.conv2d(x, torch.cat([w for w, _ in wb]), torch.cat([b for _, b in wb]))
    return z.split([w.shape[0] for w, _ in wb], dim=1)


def _pool_branch(z):
    # TF's 3x3 average pool ignores the zero padding in its denominator (torchvision's does not). The graph pools
    # and then applies the 1x1 conv; both are linear per pixel (the pool's weights sum to 1, so the bias passes
    # through), so we pool the conv's few output channels instead of its many input channels: same result.
    return F.relu(F.avg_pool2d(z, kernel_size=3, stride=1, padding=1, count_include_pad=False))


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1, b5, bd, bp = _fused_1x1(x, [self.branch1x1, self.branch5x5_1, self.branch3x3dbl_1, self.branch_pool])
        return torch.cat([
            F.relu(b1),
            self.branch5x5_2(F.relu(b5)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(F.relu(bd))),
            _pool_branch(bp),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x, return_1x1=False):
        b1, b7, bd, bp = _fused_1x1(x, [self.branch1x1, self.branch7x7_1, self.branch7x7dbl_1, self.branch_pool])
        b1 = F.relu(b1)
        b7 = self.branch7x7_3(self.branch7x7_2(F.relu(b7)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(F.relu(bd)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        out = torch.cat([b1, b7, bd, _pool_branch(bp)], 1)
        return (out, b1) if return_1x1 else out


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3, b7 = _fused_1x1(x, [self.branch3x3_1, self.branch7x7x3_1])
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(F.relu(b7))))
        return torch.cat([self.branch3x3_2(F.relu(b3)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        if self.pool == "avg":
            b1, b3, bd, bp = _fused_1x1(x, [self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1, self.branch_pool])
            bp = _pool_branch(bp)
        else:
            # the 2015 graph's last block (mixed_10) max-pools here, every other Inception averages; a max does not
            # commute with the conv, so this one pools its input
            b1, b3, bd = _fused_1x1(x, [self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1])
            bp = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        b3, bd = F.relu(b3), self.branch3x3dbl_2(F.relu(bd))
        return torch.cat([
            F.relu(b1),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
            bp,
        ], 1)


def _resize_tf1(x, size):
    # TF1 tf.image.resize_bilinear(align_corners=False): source coordinate = dst * in/out (no half-pixel shift),
    # computed in float32 like the TF kernel
    for dim in (2, 3):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (src - lo).to(x.dtype)
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        w = w.view(-1, 1) if dim == 2 else w
        x = a + (b - a) * w
    return x


class InceptionV3(nn.Module):
    """FID Inception-v3. forward(images) -> dict(pool [N,2048], spatial [N,2023], logits [N,1008]).

    images: uint8 NCHW (0..255) or float NCHW in [0, 1], any size.
    """

    def __init__(self, resize="pytorch-fid"):
        super().__init__()
        assert resize in ("pytorch-fid", "tf1"), resize
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, x):
        if self.resize == "tf1":
            x = x.float() if x.dtype == torch.uint8 else x.float() * 255
            return (_resize_tf1(x, 299) - 128) / 128
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1

    def forward(self, x):
        # channels_last: oneDNN (CPU) and cuDNN run these convs faster in NHWC; results are the same to round-off
        x = self.preprocess(x).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x, b1x1 = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)), return_1x1=True)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean(dim=(2, 3))
        spatial = b1x1[:, :7].permute(0, 2, 3, 1).flatten(1)  # NHWC order, as ADM reshapes the TF tensor
        logits = pool @ self.fc.weight.t()  # no bias: the graph's softmax/logits/MatMul (see top)
        return {"pool": pool, "spatial": spatial, "logits": logits}


def _missing_weights_error(tried):
    dest = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)
    return FileNotFoundError(
        f"Inception weights {FID_WEIGHTS_NAME} not found (looked in: {', '.join(tried)}). Download {FID_WEIGHTS_URL} "
        f"and put it at {dest} (the torch hub cache), or pass its path explicitly (weights=...).")


def load_inception(weights=None, device=None, resize="pytorch-fid", download=True):
    """The FID Inception in eval mode. weights: a path; else the torch hub cache; else a download (if online)."""
    tried = []
    if weights is not None:
        if not os.path.isfile(weights):
            raise _missing_weights_error([weights])
        path = weights
    else:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)
        tried.append(path)
        if not os.path.isfile(path):
            if not download:
                raise _missing_weights_error(tried)
            try:  # downloads into exactly that path (no hash check: pytorch-fid publishes none)
                torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True, map_location="cpu")
            except Exception as e:
                tried.append(f"{FID_WEIGHTS_URL} ({type(e).__name__}: {e})")
                raise _missing_weights_error(tried) from e
    model = InceptionV3(resize=resize)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(device or default_device())


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -----------------------------------------------------------------------------
# features


def _batches(images, batch_size):
    # an array / tensor is cut into batches; anything else is taken as an iterable of batches already
    if isinstance(images, (np.ndarray, torch.Tensor)):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


def _to_nchw(batch):
    # uint8 batches are NHWC (the .npz sample format); float batches are NCHW in [0, 1] (the torch convention)
    if isinstance(batch, np.ndarray):
        batch = np.ascontiguousarray(batch) if batch.flags.writeable else batch.copy()  # torch wants writable
    x = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
    if x.dtype == torch.uint8:
        assert x.ndim == 4 and x.shape[-1] == 3, f"uint8 images must be NHWC with 3 channels, got {tuple(x.shape)}"
        return x.permute(0, 3, 1, 2)
    assert x.ndim == 4 and x.shape[1] == 3, f"float images must be NCHW with 3 channels, got {tuple(x.shape)}"
    return x


@torch.inference_mode()
def compute_features(images, model, batch_size=50, device=None, progress=True, total=None, keys=None):
    """Run `model` over images (see _to_nchw for the formats); returns {key: float32 numpy [N, D]}."""
    device = device or next(model.parameters()).device
    if total is None and hasattr(images, "__len__"):
        total = -(-len(images) // batch_size) if isinstance(images, (np.ndarray, torch.Tensor)) else len(images)
    out = {}
    for batch in tqdm(_batches(images, batch_size), total=total, disable=not progress, desc="features"):
        x = _to_nchw(batch).to(device, non_blocking=True)
        # TF32 convs (on by default for cuDNN) would move features by ~1e-3 relative: keep full fp32
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            feats = model(x)
        for k, v in feats.items():
            if keys is None or k in keys:
                out.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


# -----------------------------------------------------------------------------
# metrics


def statistics(features):
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="sqrtm"):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)).

    method="sqrtm": exactly pytorch-fid / ADM / TTUR (scipy's Schur sqrtm of the non-symmetric product, a ridge
    when it is singular, tiny imaginary parts dropped); the reference definition, ~10 s at 2048-d.
    method="eigh": Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix, so two eigendecompositions
    with negative round-off clipped: the same number to ~1e-10 relative when the covariances are full rank, ~5x
    faster, and exact (no ridge) when they are singular."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape, "statistics of different dimensions"
    diff = mu1 - mu2
    if method == "eigh":  # in torch (float64), so that it follows torch's thread settings like the rest
        s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
        w, v = torch.linalg.eigh(s1)
        root1 = (v * w.clamp(min=0).sqrt()) @ v.T
        tr_covmean = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum().item()
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    assert method == "sqrtm", method
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # singular product (e.g. fewer samples than dimensions): the usual fix is a small ridge on both
        warnings.warn(f"fid: singular product; adding {eps} to the diagonal of the covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # round-off gives tiny imaginary parts; large ones mean the statistics are broken
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10, split_size=None):
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))); see the top of the file for the split rule."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_p = logits.log_softmax(dim=1)
    n = len(log_p)
    splits = min(splits, n)  # no empty splits when there are fewer samples than splits
    if split_size is not None:
        bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
    else:
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    scores = []
    for a, b in bounds:
        lp = log_p[a:b]
        log_py = torch.logsumexp(lp, dim=0) - np.log(b - a)  # log of the split's marginal p(y)
        kl = (lp.exp() * (lp - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def unmeasurable(n, n_ref=None, dims=None, splits=10, split_size=None, k=3):
    """{metric: why} for the metrics that n samples and n_ref reference images (None: statistics only) are too few
    to measure: FID needs as many of each as feature dimensions (dims, e.g. {"fid": 2048, "sfid": 2023}; fewer leave
    the covariance singular, and the number means nothing), IS 2 samples a split (the IS of one sample is 1, whatever
    it is), precision and recall more than k of each."""
    fewest, counts = min(n, n_ref or n), f"{n} samples" + ("" if n_ref is None else f" and {n_ref} reference images")
    why = {m: f"{counts}, fewer than the {d} feature dimensions: each set needs as many"
           for m, d in (dims or {}).items() if fewest < d}
    splits = -(-n // split_size) if split_size else splits
    if n < 2 * splits:
        why["is"] = f"{n} samples in {splits} splits: each split needs 2 at least"
    if fewest <= k:
        why["precision"] = why["recall"] = f"{counts}: k={k} needs more than {k} of each"
    return why


def _chunks(x, size):
    return [(i, x[i:i + size]) for i in range(0, len(x), size)]


@torch.no_grad()
def nearest_distances(query, ref, k, batch_size=None, device=None, progress=False):
    """The k smallest Euclidean distances from each query row to the ref rows, ascending: [Nq, k].
    Blocks of batch_size x batch_size; memory never grows with Nq * Nref."""
    device = device or default_device()
    batch_size = batch_size or (10000 if device.type == "cuda" else 2048)
    query, ref = torch.as_tensor(np.asarray(query, np.float32)), torch.as_tensor(np.asarray(ref, np.float32))
    ref_blocks = [r.to(device) for _, r in _chunks(ref, batch_size)]
    out = []
    for _, q in tqdm(_chunks(query, batch_size), disable=not progress, desc="knn"):
        q = q.to(device)
        best = torch.full((len(q), 0), float("inf"), device=device)
        for r in ref_blocks:
            d = torch.cat([best, torch.cdist(q, r)], dim=1)
            best = d.topk(min(k, d.shape[1]), dim=1, largest=False).values  # sorted ascending
        out.append(best.cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def _inside_any_ball(query, centres, radii, batch_size, device):
    # fraction of query rows within radii[j] of some centre j (Kynkaanniemi et al.: <=)
    centre_blocks = [(c.to(device), radii[i:i + batch_size].to(device)) for i, c in _chunks(centres, batch_size)]
    inside = []
    for _, q in _chunks(query, batch_size):
        q = q.to(device)
        hit = torch.zeros(len(q), dtype=torch.bool, device=device)
        for c, r in centre_blocks:
            hit |= (torch.cdist(q, c) <= r[None, :]).any(dim=1)
        inside.append(hit.cpu())
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=3, batch_size=None, device=None, progress=False):
    """Improved precision and recall (Kynkaanniemi et al. 2019), as the ADM evaluator computes them.
    The manifold of a set is the union of balls around its points with radius = distance to the k-th nearest
    other point of the set. precision = share of fake inside the real manifold, recall = real inside fake."""
    device = device or default_device()
    batch_size = batch_size or (10000 if device.type == "cuda" else 2048)
    real = torch.as_tensor(np.asarray(real, np.float32))
    fake = torch.as_tensor(np.asarray(fake, np.float32))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} real and fake samples, "
                         f"got {len(real)} and {len(fake)}")
    # k + 1 because each point is its own nearest neighbour at distance 0
    r_real = torch.from_numpy(nearest_distances(real, real, k + 1, batch_size, device, progress)[:, k])
    r_fake = torch.from_numpy(nearest_distances(fake, fake, k + 1, batch_size, device, progress)[:, k])
    precision = _inside_any_ball(fake, real, r_real, batch_size, device)
    recall = _inside_any_ball(real, fake, r_fake, batch_size, device)
    return precision, recall
