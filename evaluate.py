"""
Evaluate generated samples against a reference set: FID, sFID, IS, precision and recall (fid.py), TopP&R, and the
paper's diversity / memorisation metrics (diversity.py); for text-to-image samples, the CLIP score. Definitions,
feature spaces and references of every metric: docs/metrics.md.

  python evaluate.py --samples out/samples.npz --ref VIRTUAL_imagenet256_labeled.npz   # Inception features
  python evaluate.py --samples out/samples.npz --train synthetic   # built-in dataset, classifier features

--samples: an .npz (arr_0 uint8 NHWC images, optional arr_1 class labels; what sample.py writes) or a folder.
--ref: an .npz of images, a folder of images, a statistics .npz (mu, sigma and optionally mu_s, sigma_s, features:
what this script caches, or pytorch-fid statistics), ADM's reference batch (images and the statistics of its whole
reference set: the stored statistics give FID/sFID, the images precision/recall, and --resize defaults to tf1, ADM's
pipeline), or "synthetic" (a fresh draw of the built-in dataset). The paper's reference is the 50K ImageNet validation
images (a folder or an .npz); FID against fewer than 50K reference images is biased upward, and the report warns.
Reference and training features are cached in cache_dir, keyed by the file (path, size, mtime) and the feature
space, and reused.

Feature spaces: "inception" (the FID Inception, pt_inception-2015-12-05; every metric) or "classifier" (a small
CNN trained and cached, for machines without the Inception weights and for small datasets: FID, precision, recall
and the class accuracy of samples in its penultimate features, and "IS (classifier)", is_classifier: the Inception
Score's formula on its softmax over its classes, not the Inception IS; no sFID). Its classifier learns the built-in
dataset, or a class folder's training split (--train, or --classifier_data; held in memory, cached by its content;
10% of it held out for the accuracy in the report), never the reference ("--ref digits/heldout --train digits/train
--features classifier"). The top-1% RMD and the memorisation metrics are in the paper's CLIP ViT-B/16 image
features (--diversity_features); in the classifier space its features stand in; on small datasets, pixels. The report
always names each space: numbers from different spaces are not comparable.

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

import fid
import metrics
from configurator import atomic_write, read_cache
from metrics import ClassifierSpace, ClipSpace, InceptionSpace, PixelSpace, clip_path, file_key, folder_files
from text import load_clip
from vae import VQModel, load_first_stage

# -----------------------------------------------------------------------------
samples = ""                  # .npz or folder of generated images
ref = "synthetic"             # .npz of images | folder | statistics .npz | "synthetic"
train = ""                    # training images for memorisation/diversity metrics: same formats, or "synthetic"
features = "auto"             # inception | classifier | auto (classifier when ref is "synthetic", else inception)
classifier_data = "auto"      # what the classifier space's classifier learns: synthetic (the built-in dataset) | a
                              # class folder: the training split, never the reference | auto: --train when a folder
inception_weights = ""        # "": torch hub cache, downloaded when online
resize = "auto"               # pytorch-fid | tf1 (the ADM evaluator's / torch-fidelity's resize; see fid.py) | auto:
                              # tf1 against an ADM reference batch (its statistics were made so), else pytorch-fid
batch_size = 50
max_samples = 0               # 0: all samples
is_split_size = 5000          # Inception Score over chunks of this many samples: ADM's rule, the paper's numbers
is_splits = 10                # is_split_size=0: this many equal splits instead (torch-fidelity's; the same at 50K);
                              # IS (classifier) always uses these (it has no published counterpart to match)
fd_method = "sqrtm"           # sqrtm: pytorch-fid's algorithm exactly | eigh: the same number, ~5x faster (fid.py)
pr_k = 3                      # Kynkaanniemi et al.
memorisation_threshold = 0.12 # the paper: nearest training image closer than this in L2-normalised features
diversity_features = "auto"   # RMD and memorisation: clip (diversity_clip's image features, the paper's) | pixels
                              # (the images themselves: where a copy of a small dataset's image is a copy) | none |
                              # auto: the classifier's in the classifier space, else clip when its weights are here
diversity_clip = "ViT-B/16"   # the paper's CLIP for them: a clip model name (in ~/.cache/clip) or a checkpoint file
entropy_vq = ""               # sample entropy: the VQ-f4 first stage (a folder for vae.load_first_stage); "": none
entropy_tau = 0.0             # its softmax temperature; 0: the codebook's mean squared nearest-code distance (ours)
prompts = ""                  # text-to-image: the samples' prompts, one per line; "": <samples>_prompts.txt, if any
clip_model = "ViT-L/14"       # CLIP score: a CLIP checkpoint file, or a clip model name (in ~/.cache/clip)
synthetic_ref_size = 10000    # "synthetic" reference: a draw the model never saw (train.py trains on seed 0)
synthetic_ref_seed = 1
synthetic_ref_scale = 1.0     # the shapes' size, times (data.SyntheticShapes): 0.6 for docs/downstream.md's task
synthetic_train_size = 20000  # "synthetic" training set: train.py's defaults
synthetic_train_seed = 0
classifier_size = 8000        # the classifier's own training draw of the built-in dataset (classifier_data synthetic)
classifier_seed = 2
classifier_epochs = 6
classifier_path = ""          # "": cache_dir/synthetic_classifier_<settings>.pt, folder_classifier_<content>_<...>.pt
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
    return Images(n, limited, labels, f"{file_key(path)}:{n}", shape[1])


def _folder_images(path, limit):
    from data import load_image
    files, labels, _ = folder_files(path, limit)
    first = np.asarray(load_image(files[0]))

    def batches(bs):
        for i in range(0, len(files), bs):
            arrs = [np.asarray(load_image(f)) for f in files[i:i + bs]]
            bad = [f for f, a in zip(files[i:i + bs], arrs) if a.shape != first.shape]
            if bad:
                raise ValueError(f"{bad[0]} is {arrs[files.index(bad[0]) - i].shape[:2]}, {files[0]} is "
                                 f"{first.shape[:2]}: all images of a folder must have one size")
            yield np.stack(arrs)
    key = hashlib.sha1("\n".join(file_key(f) for f in files).encode()).hexdigest()
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


# -----------------------------------------------------------------------------
# reference / training features, cached


def cached_features(images, space, bs, cache):
    """{pool, mu, sigma[, mu_s, sigma_s], labels} for a reference or training set; (dict, 'hit' | 'miss')."""
    key = hashlib.sha1(f"{images.key}|{space.key}".encode()).hexdigest()[:20]
    path = os.path.join(cache, f"features-{key}.npz")
    cached = read_cache(path, lambda p: dict(np.load(p)))
    if cached is not None:
        return cached, "hit", path
    f = space.extract(images, bs)
    d = {"features": f["pool"]}
    d["mu"], d["sigma"] = fid.statistics(f["pool"])
    if "spatial" in f:
        d["mu_s"], d["sigma_s"] = fid.statistics(f["spatial"])
    if images.labels is not None:
        d["labels"] = images.labels
    d["feature_space"] = np.array(space.name)
    os.makedirs(cache, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **d)
    return d, "miss", path


def _npz_keys(path):
    with np.load(path) as z:
        return list(z.keys())


def stored_statistics(spec, space, what):
    """The statistics an .npz stores (mu, sigma[, mu_s, sigma_s][, features]), checked against the feature space."""
    with np.load(spec) as z:
        d = {k: z[k] for k in z.keys() if k not in ("arr_0", "arr_1")}
    if "sigma" not in d:
        raise ValueError(f"{what} {spec!r} has mu but no sigma: a statistics file needs both")
    recorded = str(d.get("feature_space", fid.FEATURE_SPACE))  # pytorch-fid / ADM files: Inception
    if recorded != space.name:
        raise ValueError(f"{what} {spec!r} holds {recorded} statistics but the feature space is "
                         f"{space.name}; set --features accordingly")
    for mu, dim in space.dims.items():
        sigma = "sigma" + mu[2:]
        if mu in d and (d[mu].shape != (dim,) or d.get(sigma, np.empty(0)).shape != (dim, dim)):
            raise ValueError(f"{what} {spec!r}: {mu} {d[mu].shape} / {sigma} {d.get(sigma, np.empty(0)).shape} do not "
                             f"fit the {dim}-d {mu} features of {space.name}; they belong to another network or layer: "
                             "recompute them from the reference images with this script")
    return d


def reference(spec, space, bs, cache, resolution, synthetic_size, synthetic_seed, what, synthetic_scale=1.0):
    """(features/statistics, how they were made, path) of a reference or training set given as in the docstring at
    the top. An ADM reference batch gives its stored statistics (over its whole reference set) for FID/sFID, and
    the features of its images (10K of them) for precision/recall: `stored` marks them."""
    if spec == "synthetic":
        return cached_features(synthetic_images(synthetic_size, synthetic_seed, resolution, synthetic_scale), space,
                               bs, cache)
    keys = _npz_keys(spec) if os.path.isfile(spec) else []
    if "mu" not in keys:
        if keys and "arr_0" not in keys:
            raise ValueError(f"{what} {spec!r} has neither images (arr_0) nor statistics (mu, sigma)")
        return cached_features(open_images(spec, what=what), space, bs, cache)
    stored = stored_statistics(spec, space, what)
    if "arr_0" not in keys:
        return stored, "statistics file", spec
    d, how, path = cached_features(open_images(spec, what=what), space, bs, cache)
    stats = {k: stored[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in stored}
    return {**d, **stats, "stored": True}, f"stored statistics, image features {how}", path


def statistics_provenance(r, spec):
    """(how the reference statistics were made, over how many images or None when the file does not say)."""
    if r.get("stored"):
        return (f"stored in {spec} (ADM's reference batch: mu, sigma, mu_s, sigma_s over its whole reference set "
                "by ADM's TensorFlow pipeline; the file does not record how many images); its "
                f"{len(r['features'])} images give precision/recall", None)
    if "features" in r:
        return f"computed by this script from {len(r['features'])} reference images", len(r["features"])
    return f"stored in {spec} (mu, sigma); the file does not record how many images", None

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


# -----------------------------------------------------------------------------


def classifier_source(resolution, cache):
    """(the classifier's path, what it learns, a function giving its training images, labels and class count) of the
    classifier space; a class folder is checked here, before any work: it has class subfolders, 10 images of each
    class at least, and the class names of every class folder given (samples, ref, train)."""
    from data import SyntheticShapes
    source = classifier_data if classifier_data != "auto" else train if os.path.isdir(train) else "synthetic"
    if source == "synthetic":
        classes = SyntheticShapes.classes
        name = (f"synthetic_classifier_r{resolution}_n{classifier_size}_s{classifier_seed}_e{classifier_epochs}"
                f"_{synthetic_digest(resolution)}.pt")

        def training_set():
            ds = SyntheticShapes(size=classifier_size, resolution=resolution, seed=classifier_seed)
            return ds.images_uint8(), ds.labels, len(ds.classes)
    else:
        source = os.path.abspath(source)
        name, classes, training_set = metrics.class_folder_classifier(source, classifier_seed, classifier_epochs)
    for what, spec in (("samples", samples), ("ref", ref), ("train", train)):
        theirs = folder_files(spec)[2] if os.path.isdir(spec) else None
        if theirs is not None and theirs != classes:
            raise ValueError(f"{what} {spec!r} has the classes {theirs}, the classifier's ({source}) are {classes}: "
                             "give the training split of the same classes as --train or --classifier_data")
    return classifier_path or os.path.join(cache, name), source, training_set


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
    if diversity_features not in ("auto", "clip", "pixels", "none"):
        raise ValueError(f"--diversity_features must be auto, clip, pixels or none, got {diversity_features!r}")
    if resize not in ("auto", "pytorch-fid", "tf1"):
        raise ValueError(f"--resize must be auto, pytorch-fid or tf1, got {resize!r}")

    s_images = open_images(samples, max_samples, "samples")
    if space_kind == "inception" and is_split_size and len(s_images) < is_split_size:
        raise ValueError(f"{len(s_images)} samples are fewer than one Inception Score chunk (is_split_size="
                         f"{is_split_size}, ADM's rule, the paper's): generate more, or pass --is_split_size 0 for "
                         f"{is_splits} equal splits (torch-fidelity's rule)")
    # the space of RMD and memorisation: the paper's CLIP, or the classifier standing in on the built-in dataset;
    # CLIP and the VQ load first, so that a missing file stops the run before any work
    skipped, warnings = {}, []
    dkind = diversity_features
    if dkind == "auto" and space_kind == "classifier":
        dkind = "classifier"
    elif dkind == "auto":
        dkind = "clip" if os.path.isfile(clip_path(diversity_clip) or "") else "none"
    own_space = ClipSpace(diversity_clip, dev) if dkind == "clip" else \
        PixelSpace(s_images.resolution) if dkind == "pixels" else None
    vq = load_first_stage(entropy_vq).eval().to(dev) if entropy_vq else None
    if vq is not None and not isinstance(vq, VQModel):
        raise ValueError(f"--entropy_vq {entropy_vq!r} is a {type(vq).__name__}: sample entropy needs the VQ-f4 "
                         "first stage (a VQModel: its codebook)")
    adm_batch = os.path.isfile(ref) and {"arr_0", "mu"} <= set(_npz_keys(ref))
    if space_kind == "inception":
        space = InceptionSpace(inception_weights, resize if resize != "auto" else "tf1" if adm_batch else "pytorch-fid",
                               dev, progress)
    else:
        path, source, training_set = classifier_source(s_images.resolution, cache)
        space = ClassifierSpace(path, dev, lambda: metrics.train_classifier(
            path, *training_set(), classifier_epochs, classifier_seed, dev, source))
    print(f"feature space: {space.description}")
    dspace = own_space or space

    t0 = time.time()
    r, ref_cache, ref_path = reference(ref, space, batch_size, cache, s_images.resolution, synthetic_ref_size,
                                       synthetic_ref_seed, "ref", synthetic_ref_scale)
    print(f"reference: {ref_cache} ({ref_path})")
    s = space.extract(s_images, batch_size)
    ref_statistics, num_ref_statistics = statistics_provenance(r, os.path.abspath(ref))
    res = {"feature_space": space.name, "feature_space_detail": space.description,
           "samples": os.path.abspath(samples), "ref": ref if ref == "synthetic" else os.path.abspath(ref),
           "num_samples": len(s["pool"]), "num_ref": int(len(r["features"])) if "features" in r else None,
           "ref_statistics": ref_statistics, "num_ref_statistics": num_ref_statistics,
           "ref_cache": ref_cache, "ref_cache_path": ref_path}
    is_key = "is" if space.name == fid.FEATURE_SPACE else "is_classifier"
    chunk = is_split_size if space.name == fid.FEATURE_SPACE else 0  # IS (classifier): equal splits
    dims = {m: s[f].shape[1] for m, f in (("fid", "pool"), ("sfid", "spatial")) if f in s}
    skipped.update({is_key if m == "is" else m: why for m, why in fid.unmeasurable(
        len(s["pool"]), res["num_ref"], dims, is_splits, chunk or None, pr_k).items()})
    if num_ref_statistics is not None and num_ref_statistics < 50000:
        warnings.append(f"FID against {num_ref_statistics} < 50000 reference images is biased upward: the paper's "
                        "reference is the 50K ImageNet validation images (or ADM's stored statistics)")
    if r.get("stored") and space.name == fid.FEATURE_SPACE and space.model.resize != "tf1":
        warnings.append("ADM made the stored statistics with TF1's resize (--resize tf1); the samples went through "
                        f"--resize {space.model.resize}, so FID and sFID mix two pipelines")
    res["fid"] = None if "fid" in skipped else \
        fid.frechet_distance(*fid.statistics(s["pool"]), r["mu"], r["sigma"], method=fd_method)
    res["sfid"] = (fid.frechet_distance(*fid.statistics(s["spatial"]), r["mu_s"], r["sigma_s"], method=fd_method)
                   if "spatial" in s and "mu_s" in r and "sfid" not in skipped else None)
    # the IS formula on the space's own classifier: Inception's, or in the classifier space an analogue under its
    # own name ("IS (classifier)", at most the 10 classes), so that nobody takes one for the other
    res["is"] = res["is_std"] = None
    res[is_key], res[is_key + "_std"] = (None, None) if is_key in skipped else \
        fid.inception_score(s["logits"], is_splits, chunk or None)
    res["is_splits"] = f"chunks of {chunk} (ADM)" if chunk else f"{is_splits} equal splits"
    res["precision"] = res["recall"] = res["toppr_precision"] = res["toppr_recall"] = res["toppr_f1"] = None
    if "features" not in r:
        skipped["precision"] = skipped["toppr_f1"] = "the reference has statistics but no features"
    elif "precision" not in skipped:
        res["precision"], res["recall"] = fid.precision_recall(r["features"], s["pool"], pr_k, device=dev)
        need = 5 * min(s["pool"].shape[1], 32) + 2
        if min(len(r["features"]), len(s["pool"])) >= need:
            res["toppr_precision"], res["toppr_recall"], res["toppr_f1"] = metrics.top_pr(r["features"], s["pool"],
                                                                                          device=dev)
        else:
            skipped["toppr_f1"] = f"TopP&R needs {need} samples and reference images in {space.name}"
    if isinstance(space, ClassifierSpace):
        res["classifier_data"], res["classifier_val_accuracy"] = space.source, space.val_accuracy
        if s_images.labels is not None:
            res["class_accuracy"] = float((s["logits"].argmax(1) == s_images.labels).mean())

    path = out or os.path.splitext(samples.rstrip("/"))[0] + "_metrics.json"
    res["diversity_space"] = None if dkind == "none" else dspace.name
    if dkind == "none":
        skipped["rmd_top1"] = skipped["memorisation_ratio"] = "--diversity_features none" if diversity_features == \
            "none" else (f"no CLIP {diversity_clip} weights on this machine ({clip_path(diversity_clip)}): put them "
                         "there, or pass --diversity_features clip to have them downloaded")
    else:
        res["diversity_space_detail"] = dspace.description
        g = s["pool"] if dspace is space else dspace.extract(s_images, batch_size)["pool"]
        if s_images.labels is None:
            skipped["rmd_top1"] = "the samples have no class labels (arr_1 or class folders)"
        elif np.bincount(s_images.labels).max() < 2:  # every within-class deviation 0: no covariance to invert
            skipped["rmd_top1"] = f"{len(g)} samples: RMD needs 2 of a class at least"
        else:
            rmd = metrics.relative_mahalanobis(g, s_images.labels)  # its histogram is drawn after the report
            res["rmd_top1"], res["rmd_plot"] = metrics.top_mean(rmd), os.path.splitext(path)[0] + "_rmd.png"
        if train:
            t, res["train_cache"], _ = reference(train, dspace, batch_size, cache, s_images.resolution,
                                                 synthetic_train_size, synthetic_train_seed, "train")
            if "features" not in t:
                raise ValueError(f"train {train!r}: memorisation metrics need features, not just statistics")
            res.update(memorisation(g, t["features"], memorisation_threshold, dev))
        else:
            skipped["memorisation_ratio"] = "no --train (the training images)"
    if vq is None:
        skipped["sample_entropy"] = "no --entropy_vq (the VQ-f4 first stage whose codebook it is measured over)"
    else:
        codebook = vq.quantize.embedding.weight
        res["entropy_tau"] = entropy_tau or metrics.codebook_tau(codebook)
        latents = (vq.encode(torch.from_numpy(b).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1)
                   for b in s_images.batches(batch_size))
        res["sample_entropy"], res["entropy_vq"] = metrics.sample_entropy(latents, codebook, res["entropy_tau"]), \
            os.path.abspath(entropy_vq)
    prompts_file = prompts or os.path.splitext(samples.rstrip("/"))[0] + "_prompts.txt"  # sample.prompts_path
    if prompts or os.path.isfile(prompts_file):
        with open(prompts_file, encoding="utf-8") as f:
            sample_prompts = f.read().split("\n")[:len(s_images)]
        if len(sample_prompts) < len(s_images) or "" in sample_prompts:
            raise ValueError(f"prompts {prompts_file!r}: {len(s_images)} samples need as many non-empty lines")
        model, preprocess = load_clip(clip_model)
        res["clip_score"] = metrics.clip_score(s_images, sample_prompts, model.to(dev), preprocess, batch_size, dev)
        res["clip_model"], res["prompts"] = clip_model, os.path.abspath(prompts_file)
    res["skipped"], res["warnings"] = skipped, warnings
    res["seconds"] = round(time.time() - t0, 1)
    res["config"] = config

    print(f"{'metric':<22}{'value':>12}   ({space.name}; RMD, memorisation: {res['diversity_space']})")
    for k in ("fid", "sfid", "is", "is_classifier", "precision", "recall", "toppr_f1", "class_accuracy",
              "memorisation_ratio", "avg_l2_top5", "rmd_top1", "sample_entropy", "clip_score"):
        if k in res:
            print(f"{k:<22}{'-' if res[k] is None else f'{res[k]:.4f}':>12}"
                  + (f"   not measured: {skipped[k]}" if k in skipped else ""))
    for w in warnings:
        print(f"warning: {w}")
    with atomic_write(path, "w") as f:  # study.py reuses it: never half-written
        json.dump(res, f, indent=2)
    if "rmd_plot" in res:
        metrics.plot_histogram(rmd, res["rmd_plot"], f"RMD ({dspace.name})")
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
