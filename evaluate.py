"""
Evaluate generated samples against a reference set: FID, sFID, IS, precision and recall (fid.py), and, when
training images are given, the paper's diversity / memorisation metrics; for text-to-image samples, the CLIP score.

  python evaluate.py --samples out/samples.npz --ref VIRTUAL_imagenet256_labeled.npz   # Inception features
  python evaluate.py --samples out/samples.npz --train synthetic   # built-in dataset, classifier features

--samples: an .npz (arr_0 uint8 NHWC images, optional arr_1 class labels; what sample.py writes) or a folder.
--ref: an .npz of images (the ADM reference batch format), a folder of images, a statistics .npz (mu, sigma and
optionally mu_s, sigma_s, features: what this script caches, or pytorch-fid / ADM statistics), or "synthetic"
(a fresh draw of the built-in dataset). Reference and training features are cached in cache_dir, keyed by the
file (path, size, mtime) and the feature space, and reused.

Feature spaces: "inception" (the FID Inception, pt_inception-2015-12-05; every metric) or "classifier" (a
small CNN trained on the built-in dataset and cached, for machines without the Inception weights: FID, precision,
recall and the class accuracy of samples in its penultimate features, and "IS (classifier)", is_classifier: the
Inception Score's formula on its softmax over the 10 classes (at most 10), not the Inception IS; no sFID). The
report always names the space: numbers from different spaces are not comparable.

CLIP score, when the samples have prompts (sample.py writes them beside the .npz, <name>_prompts.txt, one per line;
or --prompts): 100 * max(cos(CLIP image embedding, CLIP text embedding), 0), averaged over the samples. That is
torchmetrics' convention, clamped at 0 per sample (Hessel et al.'s CLIPScore is 2.5 * max(cos, 0)); the CLIP is
ViT-L/14 (torchmetrics' default) unless --clip_model says otherwise, from ~/.cache/clip or a local file:

  python evaluate.py --samples out/samples.npz --ref coco_val2014_256.npz --clip_model ViT-L-14.pt
"""
import hashlib
import json
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid
from text import load_clip

# -----------------------------------------------------------------------------
samples = ""                  # .npz or folder of generated images
ref = "synthetic"             # .npz of images | folder | statistics .npz | "synthetic"
train = ""                    # training images for memorisation/diversity metrics: same formats, or "synthetic"
features = "auto"             # inception | classifier | auto (classifier when ref is "synthetic", else inception)
inception_weights = ""        # "": torch hub cache, downloaded when online
resize = "pytorch-fid"        # pytorch-fid | tf1 (the ADM evaluator's / torch-fidelity's resize); see fid.py
batch_size = 50
max_samples = 0               # 0: all samples
is_splits = 10                # see fid.py: 10 equal splits; ADM uses chunks of 5000, the same at 50K
is_split_size = 0             # 5000: ADM's rule exactly
fd_method = "sqrtm"           # sqrtm: pytorch-fid's algorithm exactly | eigh: the same number, ~5x faster (fid.py)
pr_k = 3                      # Kynkaanniemi et al.
memorisation_threshold = 0.12 # the paper: nearest training image closer than this in L2-normalised features
prompts = ""                  # text-to-image: the samples' prompts, one per line; "": <samples>_prompts.txt if it exists
clip_model = "ViT-L/14"       # CLIP score: a CLIP checkpoint file, or a clip model name (in ~/.cache/clip)
synthetic_ref_size = 10000    # "synthetic" reference: a draw the model never saw (train.py trains on seed 0)
synthetic_ref_seed = 1
synthetic_ref_scale = 1.0     # the shapes' size, times (data.SyntheticShapes): 0.6 for docs/downstream.md's task
synthetic_train_size = 20000  # "synthetic" training set: train.py's defaults
synthetic_train_seed = 0
classifier_size = 8000        # the classifier's own training draw of the built-in dataset
classifier_seed = 2
classifier_epochs = 6
classifier_path = ""          # "": cache_dir/synthetic_classifier_<settings>.pt
cache_dir = ""                # "": ~/.cache/cep-eval
out = ""                      # the JSON; "": beside the samples, <samples>_metrics.json
device = ""                   # "": cuda when available
progress = True
# -----------------------------------------------------------------------------
_DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

# -----------------------------------------------------------------------------
# reading images


def _npz_array(path, key):
    """(shape, dtype, batches) of one array of an .npz; batches(bs) streams it from the zip: a 50K x 256^2
    reference batch is 10 GB, more than it is worth holding in memory."""
    def open_member(zf):
        f = zf.open(key + ".npy")
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        assert not fortran and not dtype.hasobject, f"{path}:{key} must be a C-ordered numeric array"
        return f, shape, dtype

    with zipfile.ZipFile(path) as zf:
        _, shape, dtype = open_member(zf)
    row = int(np.prod(shape[1:])) * dtype.itemsize

    def batches(bs):
        with zipfile.ZipFile(path) as zf:
            f = open_member(zf)[0]
            for i in range(0, shape[0], bs):
                n = min(bs, shape[0] - i)
                yield np.frombuffer(bytearray(f.read(n * row)), dtype=dtype).reshape(n, *shape[1:])  # writable
    return shape, dtype, batches


class Images:
    """A set of images: len(), .batches(bs) -> uint8 NHWC arrays, .labels (or None), .key (for the cache)."""

    def __init__(self, n, batches, labels, key, resolution):
        self.n, self._batches, self.labels, self.key, self.resolution = n, batches, labels, key, resolution

    def __len__(self):
        return self.n

    def batches(self, bs):
        return _Sized(self._batches(bs), -(-self.n // bs))


class _Sized:
    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self):
        return self.n


def _file_key(path):
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def open_images(path, limit=0, what="images"):
    if os.path.isdir(path):
        return _folder_images(path, limit)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file or folder")
    with np.load(path) as z:
        keys = list(z.keys())
        labels = z["arr_1"] if "arr_1" in keys else None
    if "arr_0" not in keys:
        raise ValueError(f"{what} {path!r} has no arr_0 (uint8 NHWC images); keys: {keys}")
    shape, dtype, batches = _npz_array(path, "arr_0")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{what} {path!r}: arr_0 must be uint8 [N, H, W, 3], got {dtype} {shape}")
    n = min(shape[0], limit) if limit else shape[0]

    def limited(bs):
        seen = 0
        for b in batches(bs):
            if seen >= n:
                break
            yield b[:n - seen]
            seen += len(b)
    if labels is not None:
        labels = np.asarray(labels)[:n].astype(np.int64)
    return Images(n, limited, labels, f"{_file_key(path)}:{n}", shape[1])


def _folder_images(path, limit):
    from data import IMG_EXTENSIONS, load_image
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path, followlinks=True) for f in fs
                   if f.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"folder {path!r} has no images ({', '.join(IMG_EXTENSIONS)})")
    files = files[:limit] if limit else files
    # labels from class subfolders (root/<class>/<image>, sorted, as data.ImageFolder) when every image has one
    rel = [os.path.relpath(f, path).split(os.sep) for f in files]
    labels = None
    if all(len(r) > 1 for r in rel):
        classes = sorted({r[0] for r in rel})
        labels = np.array([classes.index(r[0]) for r in rel], dtype=np.int64)
    first = np.asarray(load_image(files[0]))

    def batches(bs):
        for i in range(0, len(files), bs):
            arrs = [np.asarray(load_image(f)) for f in files[i:i + bs]]
            bad = [f for f, a in zip(files[i:i + bs], arrs) if a.shape != first.shape]
            if bad:
                raise ValueError(f"{bad[0]} is {arrs[files.index(bad[0]) - i].shape[:2]}, {files[0]} is "
                                 f"{first.shape[:2]}: all images of a folder must have one size")
            yield np.stack(arrs)
    key = hashlib.sha1("\n".join(_file_key(f) for f in files).encode()).hexdigest()
    return Images(len(files), batches, labels, f"{os.path.abspath(path)}:{key}", first.shape[0])


def synthetic_images(size, seed, resolution, scale=1.0):
    from data import SyntheticShapes
    ds = SyntheticShapes(size=size, resolution=resolution, seed=seed, scale=scale)

    def batches(bs):
        for i in range(0, len(ds), bs):
            yield np.stack([ds.render(j) for j in range(i, min(i + bs, len(ds)))])
    return Images(len(ds), batches, ds.labels, f"synthetic:{size}:{seed}:{resolution}:{synthetic_digest(resolution)}"
                  + (f":scale{scale}" if scale != 1 else ""), resolution)


def synthetic_digest(resolution):
    """A fingerprint of how data.py draws the built-in dataset, in every cache key of it: a change to the drawing
    must not meet features or a classifier cached from the old one."""
    from data import SyntheticShapes
    ds = SyntheticShapes(size=16, resolution=resolution, seed=0)
    return hashlib.sha1(np.stack([ds.render(i) for i in range(16)]).tobytes()).hexdigest()[:8]

# -----------------------------------------------------------------------------
# feature spaces


class InceptionSpace:
    def __init__(self, weights, resize, dev):
        self.model = fid.load_inception(weights or None, dev, resize)
        path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", fid.FID_WEIGHTS_NAME)
        self.name = fid.FEATURE_SPACE
        self.description = f"{fid.FEATURE_SPACE} pool_3 (2048-d), resize={resize}, weights={os.path.abspath(path)}"
        self.key = f"inception:{resize}:{_file_key(path)}"

    def extract(self, images, bs):
        return fid.compute_features(images.batches(bs), self.model, progress=progress)


class SmallCNN(nn.Module):
    """The built-in dataset's classifier; its 96-d penultimate layer is the "classifier" feature space. At the
    default settings it reaches ~99% held-out accuracy at 32x32 in ~1-2 minutes of CPU."""

    def __init__(self, num_classes=10, resolution=32, width=24):
        super().__init__()
        self.resolution = resolution
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
        w = width
        self.body = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w),
                                  nn.MaxPool2d(2), block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        """x: uint8 NHWC -> (features [N, 4 * width], logits [N, classes])."""
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        h = self.body(x)
        return h, self.head(h)


def train_classifier(path, resolution, size, seed, epochs, dev):
    """Train SmallCNN on a draw of the built-in dataset (a seed the diffusion model never saw) and save it."""
    from data import SyntheticShapes
    torch.manual_seed(seed)
    ds = SyntheticShapes(size=size, resolution=resolution, seed=seed)
    x, y = torch.from_numpy(ds.images_uint8()), torch.from_numpy(ds.labels)
    n_val = max(len(x) // 10, 1)
    (xv, yv), (xt, yt) = (x[:n_val], y[:n_val]), (x[n_val:], y[n_val:])
    model = SmallCNN(len(ds.classes), resolution).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(xt) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1))
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            loss = F.cross_entropy(model(xt[idx].to(dev))[1], yt[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xv.to(dev))[1].argmax(1).cpu() == yv).float().mean().item()
    print(f"trained the synthetic classifier in {time.time() - t0:.0f}s: held-out accuracy {acc:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": model.state_dict(), "resolution": resolution, "num_classes": len(ds.classes),
                "val_accuracy": acc, "size": size, "seed": seed, "epochs": epochs}, path)


class ClassifierSpace:
    name = "synthetic-classifier"

    def __init__(self, path, resolution, dev):
        if not os.path.isfile(path):
            train_classifier(path, resolution, classifier_size, classifier_seed, classifier_epochs, dev)
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model = SmallCNN(ck["num_classes"], ck["resolution"])
        self.model.load_state_dict(ck["model"])
        self.model.eval().to(dev)
        self.dev, self.val_accuracy = dev, ck["val_accuracy"]
        self.description = (f"synthetic-classifier penultimate ({self.model.head.in_features}-d), {os.path.abspath(path)}, "
                            f"held-out accuracy {ck['val_accuracy']:.3f}")
        self.key = f"classifier:{_file_key(path)}"

    @torch.inference_mode()
    def extract(self, images, bs):
        feats, logits = [], []
        for b in images.batches(bs):
            h, lg = self.model(torch.from_numpy(np.ascontiguousarray(b)).to(self.dev))
            feats.append(h.float().cpu().numpy())
            logits.append(lg.float().cpu().numpy())
        return {"pool": np.concatenate(feats), "logits": np.concatenate(logits)}

# -----------------------------------------------------------------------------
# reference / training features, cached


def cached_features(images, space, bs, cache):
    """{pool, mu, sigma[, mu_s, sigma_s], labels} for a reference or training set; (dict, 'hit' | 'miss')."""
    key = hashlib.sha1(f"{images.key}|{space.key}".encode()).hexdigest()[:20]
    path = os.path.join(cache, f"features-{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.keys()}, "hit", path
    f = space.extract(images, bs)
    d = {"features": f["pool"]}
    d["mu"], d["sigma"] = fid.statistics(f["pool"])
    if "spatial" in f:
        d["mu_s"], d["sigma_s"] = fid.statistics(f["spatial"])
    if images.labels is not None:
        d["labels"] = images.labels
    d["feature_space"] = np.array(space.name)
    os.makedirs(cache, exist_ok=True)
    tmp = path + ".tmp.npz"  # written whole, then renamed, so an interrupted run leaves no half-written cache
    np.savez(tmp, **d)
    os.replace(tmp, path)
    return d, "miss", path


def reference(spec, space, bs, cache, resolution, synthetic_size, synthetic_seed, what, synthetic_scale=1.0):
    """Features/statistics of a reference or training set given as in the docstring at the top."""
    if spec == "synthetic":
        return cached_features(synthetic_images(synthetic_size, synthetic_seed, resolution, synthetic_scale), space,
                               bs, cache)
    if os.path.isfile(spec) and not os.path.isdir(spec):
        with np.load(spec) as z:
            keys = list(z.keys())
            if "arr_0" not in keys:  # a statistics file
                if "mu" not in keys or "sigma" not in keys:
                    raise ValueError(f"{what} {spec!r} has neither images (arr_0) nor statistics (mu, sigma)")
                d = {k: z[k] for k in keys}
                recorded = str(d.get("feature_space", fid.FEATURE_SPACE))  # pytorch-fid / ADM files: Inception
                if recorded != space.name:
                    raise ValueError(f"{what} {spec!r} holds {recorded} statistics but the feature space is "
                                     f"{space.name}; set --features accordingly")
                return d, "statistics file", spec
    # ADM reference batches also carry precomputed mu/sigma (TF Inception, TF resize); we recompute them from the
    # images with our pipeline so that samples and reference go through exactly the same feature extractor
    return cached_features(open_images(spec, what=what), space, bs, cache)

# -----------------------------------------------------------------------------
# diversity and memorisation (the paper's section 5)


def _normalise(x):
    x = np.asarray(x, np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def memorisation(sample_feats, train_feats, threshold, dev):
    """Distances in L2-normalised features (the paper's 0.12 threshold is on that scale; the paper does not say
    whether its average top-5 L2 is normalised: ours is, so that it is comparable across feature spaces).
    The 0.12 threshold was set for the paper's feature space; in the 96-d synthetic-classifier space, fresh
    draws of the built-in dataset already score ~0.4, so compare ratios between models, not with the paper."""
    d = fid.nearest_distances(_normalise(sample_feats), _normalise(train_feats), 5, device=dev)
    return {"memorisation_ratio": float((d[:, 0] < threshold).mean()), "avg_l2_top5": float(d.mean())}


def relative_mahalanobis(sample_feats, train_feats, train_labels, top=0.01):
    """Top-1% RMD (Ren et al. 2021): RMD(x) = min_k MD(x; mu_k, S) - MD(x; mu_0, S_0), with class means mu_k and
    the shared within-class covariance S of the training features, and their global mean mu_0 and covariance
    S_0 (MD squared). Min over classes, as Ren et al. (the paper does not say; the label-free choice). The
    metric is the mean RMD of the top 1% of samples: large = samples far from every class, i.e. novel."""
    x, t = np.asarray(sample_feats, np.float64), np.asarray(train_feats, np.float64)
    classes = np.unique(train_labels)
    mus = np.stack([t[train_labels == c].mean(0) for c in classes])
    within = t - mus[np.searchsorted(classes, train_labels)]
    def precision(cov):  # a small ridge: features can be rank-deficient (ReLU zeros, few samples)
        return np.linalg.pinv(cov + 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov)), hermitian=True)
    p, p0 = precision(within.T @ within / len(t)), precision(np.cov(t, rowvar=False))
    xp = x @ p
    md = (xp * x).sum(1)[:, None] - 2 * xp @ mus.T + ((mus @ p) * mus).sum(1)[None]
    d0 = x - t.mean(0)
    rmd = md.min(1) - ((d0 @ p0) * d0).sum(1)
    n = max(1, int(round(top * len(rmd))))
    return float(np.sort(rmd)[-n:].mean())

# -----------------------------------------------------------------------------
# CLIP score


@torch.inference_mode()
def clip_score(images, prompts, model, preprocess, bs, dev):
    """Mean over samples of 100 * max(cos(image embedding, text embedding), 0); images through CLIP's own
    preprocessing (PIL bicubic resize of the short side, centre crop, normalisation), prompts cut to 77 tokens."""
    import clip
    scores, done = [], 0
    for b in images.batches(bs):
        x = torch.stack([preprocess(Image.fromarray(im)) for im in b]).to(dev)
        tokens = clip.tokenize(prompts[done:done + len(b)], truncate=True).to(dev)
        cos = F.cosine_similarity(model.encode_image(x).float(), model.encode_text(tokens).float(), dim=-1)
        scores.append((100 * cos).clamp(min=0).cpu())
        done += len(b)
    return torch.cat(scores).double().mean().item()

# -----------------------------------------------------------------------------


def main(argv=None):
    from configurator import configure
    globals().update(_DEFAULTS)  # main() may run more than once in a process (tests): start from the defaults
    config = configure(globals(), sys.argv[1:] if argv is None else argv)
    if not samples:
        raise ValueError("--samples is required: an .npz (arr_0 uint8 NHWC, optional arr_1 labels) or a folder")
    dev = torch.device(device) if device else fid.default_device()
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cep-eval")
    space_kind = features if features != "auto" else ("classifier" if ref == "synthetic" else "inception")
    if space_kind not in ("inception", "classifier"):
        raise ValueError(f"--features must be inception, classifier or auto, got {features!r}")
    if fd_method not in ("sqrtm", "eigh"):
        raise ValueError(f"--fd_method must be sqrtm or eigh, got {fd_method!r}")
    if is_split_size < 0 or is_splits < 1:
        raise ValueError("is_splits must be >= 1 and is_split_size >= 0")

    s_images = open_images(samples, max_samples, "samples")
    if space_kind == "inception":
        space = InceptionSpace(inception_weights, resize, dev)
    else:
        path = classifier_path or os.path.join(
            cache, f"synthetic_classifier_r{s_images.resolution}_n{classifier_size}_s{classifier_seed}"
                   f"_e{classifier_epochs}_{synthetic_digest(s_images.resolution)}.pt")
        space = ClassifierSpace(path, s_images.resolution, dev)
    print(f"feature space: {space.description}")

    t0 = time.time()
    s = space.extract(s_images, batch_size)
    r, ref_cache, ref_path = reference(ref, space, batch_size, cache, s_images.resolution, synthetic_ref_size,
                                       synthetic_ref_seed, "ref", synthetic_ref_scale)
    print(f"reference: {ref_cache} ({ref_path})")
    res = {"feature_space": space.name, "feature_space_detail": space.description,
           "samples": os.path.abspath(samples), "ref": ref if ref == "synthetic" else os.path.abspath(ref),
           "num_samples": len(s["pool"]), "num_ref": int(len(r["features"])) if "features" in r else None,
           "ref_cache": ref_cache, "ref_cache_path": ref_path}
    mu, sigma = fid.statistics(s["pool"])
    res["fid"] = fid.frechet_distance(mu, sigma, r["mu"], r["sigma"], method=fd_method)
    res["sfid"] = (fid.frechet_distance(*fid.statistics(s["spatial"]), r["mu_s"], r["sigma_s"], method=fd_method)
                   if "spatial" in s and "mu_s" in r else None)
    # the IS formula on the space's own classifier: Inception's, or in the classifier space an analogue under its
    # own name ("IS (classifier)", at most the 10 classes), so that nobody takes one for the other
    res["is"] = res["is_std"] = None
    is_key = "is" if space.name == fid.FEATURE_SPACE else "is_classifier"
    res[is_key], res[is_key + "_std"] = fid.inception_score(s["logits"], is_splits, is_split_size or None)
    res["is_splits"] = f"chunks of {is_split_size}" if is_split_size else f"{is_splits} equal splits"
    res["precision"] = res["recall"] = None
    if "features" in r:
        res["precision"], res["recall"] = fid.precision_recall(r["features"], s["pool"], pr_k, device=dev)
    if isinstance(space, ClassifierSpace):
        res["classifier_val_accuracy"] = space.val_accuracy
        if s_images.labels is not None:
            res["class_accuracy"] = float((s["logits"].argmax(1) == s_images.labels).mean())
    if train:
        t, train_cache, _ = reference(train, space, batch_size, cache, s_images.resolution, synthetic_train_size,
                                      synthetic_train_seed, "train")
        if "features" not in t:
            raise ValueError(f"train {train!r}: memorisation metrics need features, not just statistics")
        res["train_cache"] = train_cache
        res.update(memorisation(s["pool"], t["features"], memorisation_threshold, dev))
        res["rmd_top1"] = relative_mahalanobis(s["pool"], t["features"], t["labels"]) if "labels" in t else None
    prompts_file = prompts or os.path.splitext(samples.rstrip("/"))[0] + "_prompts.txt"  # sample.prompts_path
    if prompts or os.path.isfile(prompts_file):
        with open(prompts_file, encoding="utf-8") as f:
            sample_prompts = f.read().split("\n")[:len(s_images)]
        if len(sample_prompts) < len(s_images) or "" in sample_prompts:
            raise ValueError(f"prompts {prompts_file!r}: {len(s_images)} samples need as many non-empty lines")
        model, preprocess = load_clip(clip_model)
        res["clip_score"] = clip_score(s_images, sample_prompts, model.to(dev), preprocess, batch_size, dev)
        res["clip_model"], res["prompts"] = clip_model, os.path.abspath(prompts_file)
    res["seconds"] = round(time.time() - t0, 1)
    res["config"] = config

    print(f"{'metric':<22}{'value':>12}   ({space.name})")
    for k in ("fid", "sfid", "is", "is_classifier", "precision", "recall", "class_accuracy", "memorisation_ratio",
              "avg_l2_top5", "rmd_top1", "clip_score"):
        if k in res:
            v = res[k]
            print(f"{k:<22}{'-' if v is None else f'{v:.4f}':>12}")
    path = out or os.path.splitext(samples.rstrip("/"))[0] + "_metrics.json"
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
