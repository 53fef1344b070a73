"""
Evaluate generated samples against a reference set: FID, sFID, IS, precision and recall (fid.py), TopP&R, and the
paper's diversity / memorisation metrics (metrics.py); for text-to-image samples, the CLIP score. Definitions,
feature spaces and references of every metric: docs/metrics.md. main() delegates, one function per metric family:
feature_space_metrics (FID, sFID, IS, precision/recall), diversity_and_memorisation (TopP&R, RMD, memorisation,
sample entropy), clip_score_metrics.

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
always names each space: numbers from different spaces are not comparable. A classifier that cannot tell its
classes apart is refused before any metric (our rule, at MIN_CLASSIFIER_ACCURACY below: right on half its held-out
images at least, and beating chance by a binomial test at p < 0.001); the report gives its held-out accuracy, how
many images measured it, and chance.

A reference's statistics, made once (as pytorch-fid's --save-stats), in ADM's reference-batch layout: mu, sigma,
mu_s, sigma_s over every image, and arr_0, 10K of the images (--save_ref_images) for precision/recall; later
evaluations read the stored statistics, and the images' features only for precision/recall:

  python evaluate.py --ref imagenet/val --save_ref ref_in256.npz --save_ref_crop 256   # ADM's centre crop first
  python evaluate.py --samples out/samples.npz --ref ref_in256.npz

CLIP score, when the samples have prompts (sample.py writes them beside the .npz, <name>_prompts.txt, one per line;
or --prompts; read as sample.py reads prompts, data.read_prompts): 100 * max(cos(CLIP image embedding, CLIP text
embedding), 0), averaged over the samples. That is torchmetrics' convention, clamped at 0 per sample (Hessel et al.'s
CLIPScore is 2.5 * max(cos, 0)); the CLIP is ViT-L/14 (torchmetrics' default) unless --clip_model says otherwise,
from ~/.cache/clip or a local file:

  python evaluate.py --samples out/samples.npz --ref coco_val2014_256.npz --clip_model ViT-L-14.pt
"""
import hashlib
import json
import os
import sys
import time
import zipfile

import numpy as np
import scipy.stats
import torch

import fid
import metrics
from configurator import atomic_write, read_cache
from data import prompts_path, read_prompts
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
save_ref = ""                 # a path: write the statistics of --ref there (a reference .npz, ADM's layout) and stop
save_ref_images = 10000       # the images it keeps for precision/recall (arr_0), evenly spread over --ref: ADM's 10K;
                              # 0: statistics only, as pytorch-fid's --save-stats
save_ref_crop = 0             # --save_ref of a folder of images of many sizes: ADM's centre crop of each to this size
                              # first (data.center_crop_arr; 256 for ImageNet at 256x256); 0: the images as they are
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


def open_images(path, limit=0, what="images", crop=0):
    """The images of an .npz (arr_0, labels arr_1) or a folder (labels from class subfolders); a folder's images are
    first centre-cropped to crop x crop, ADM's way, when crop is set."""
    if os.path.isdir(path):
        return _folder_images(path, limit, crop)
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


def _folder_images(path, limit, crop=0):
    from data import center_crop_arr, load_image

    def read(f):
        if crop:
            return center_crop_arr(load_image(f), crop)
        return np.asarray(load_image(f))
    files, labels, _ = folder_files(path, limit)
    first = read(files[0])

    def batches(bs):
        for i in range(0, len(files), bs):
            arrs = [read(f) for f in files[i:i + bs]]
            bad = [f for f, a in zip(files[i:i + bs], arrs) if a.shape != first.shape]
            if bad:
                raise ValueError(f"{bad[0]} is {arrs[files.index(bad[0]) - i].shape[:2]}, {files[0]} is "
                                 f"{first.shape[:2]}: all images of a folder must have one size (--save_ref_crop "
                                 "crops a reference folder's images to one)")
            yield np.stack(arrs)
    key = f"{os.path.abspath(path)}:" + hashlib.sha1("\n".join(file_key(f) for f in files).encode()).hexdigest()
    if crop:
        key += f":crop{crop}"
    return Images(len(files), batches, labels, key, first.shape[0])


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
    if space.name == fid.FEATURE_SPACE:  # so that, given as --ref, the file says how its statistics were made
        d["resize"] = np.array(space.model.resize)
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
    stats = {k: stored[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "num_images", "resize") if k in stored}
    return {**d, **stats, "stored": True}, f"stored statistics, image features {how}", path


def statistics_provenance(r, spec):
    """(how the reference statistics were made, over how many images or None when the file does not say)."""
    if "num_images" in r:  # written by --save_ref
        how = f"stored in {spec} by evaluate.py --save_ref, over {int(r['num_images'])} reference images"
        if r.get("stored"):
            how += f"; its {len(r['features'])} images give precision/recall"
        return how, int(r["num_images"])
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


# -----------------------------------------------------------------------------
# the classifier space: its classifier, and whether it tells the classes apart

# Ours: numbers in the classifier space mean something only where its classifier tells the classes apart. On its
# held-out images it must be right half the time at least (an absolute floor), and right more often than a classifier
# blind to the image (chance: 1 / classes, or the share of its commonest training class when larger) by a margin that
# a one-sided binomial test on the held-out count confirms at p < 0.001.
MIN_CLASSIFIER_ACCURACY = 0.5
CHANCE_P_VALUE = 1e-3


def classifier_source(resolution, cache):
    """(the classifier's path, what it learns, a function giving its training images, labels and class count) of the
    classifier space; a class folder is checked here, before any work: it has class subfolders, 10 images of each
    class at least, and the class names of every class folder given (samples, ref, train)."""
    from data import SyntheticShapes
    source = classifier_data
    if classifier_data == "auto":
        source = "synthetic"
        if os.path.isdir(train):
            source = train
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


def correct_needed(num_val, chance):
    """The fewest held-out images of num_val the classifier must get right to pass our rule; None: no count can."""
    counts = np.arange(num_val + 1)
    passes = (counts >= MIN_CLASSIFIER_ACCURACY * num_val) & (scipy.stats.binom.sf(counts - 1, num_val, chance)
                                                               < CHANCE_P_VALUE)
    if not passes.any():
        return None
    return int(counts[passes][0])


def classifier_refusal(space, path):
    """Why the classifier space must not be used, in one line that says what to do; None when it may."""
    if space.num_val is None:
        return (f"the classifier {path} does not record how many held-out images measured its accuracy (an older "
                "evaluate.py cached it): delete it, and it is trained again")
    correct = round(space.val_accuracy * space.num_val)
    needed = correct_needed(space.num_val, space.chance)
    if needed is not None and correct >= needed:
        return None
    bar = f"{needed} of them right"
    if needed is None:
        bar = f"more than {space.num_val} held-out images (no count of so few can show it beats chance)"
    more = "--classifier_size"
    if space.source != "synthetic":
        more = f"more images in {space.source}"
    kept = ""
    if classifier_path:
        kept = f" (--classifier_path {path} is loaded as it is: delete it, or name another, to train anew)"
    return (f"the classifier space cannot tell the classes apart, so its FID, precision and recall would be noise: "
            f"its classifier ({space.source}) is right on {correct} of its {space.num_val} held-out images "
            f"({space.val_accuracy:.0%}; chance {space.chance:.0%}), and evaluate.py needs {bar} (at least "
            f"{MIN_CLASSIFIER_ACCURACY:.0%}, and beating chance at p < {CHANCE_P_VALUE:g} by a binomial test). Train "
            f"it on more images ({more}), for more epochs (--classifier_epochs, now {classifier_epochs}), or use "
            f"--features inception{kept}")


# -----------------------------------------------------------------------------
# settings and networks, checked and loaded before any work


def check_settings():
    """One clear line for a bad setting, before any work; the feature space's kind: inception or classifier."""
    if not samples and not save_ref:
        raise ValueError("--samples is required: an .npz (arr_0 uint8 NHWC, optional arr_1 labels) or a folder "
                         "(or --save_ref, to write the statistics of --ref)")
    space_kind = features
    if features == "auto":
        space_kind = "classifier" if ref == "synthetic" else "inception"
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
    if train and os.path.isfile(train) and not {"arr_0", "features"} & set(_npz_keys(train)):
        raise ValueError(f"train {train!r}: memorisation metrics need images or features, not just statistics")
    if save_ref:
        check_save_ref()
    return space_kind


def check_save_ref():
    if samples:
        raise ValueError("--save_ref writes the statistics of --ref and evaluates no samples: drop --samples")
    if save_ref_images < 0 or save_ref_crop < 0:
        raise ValueError("--save_ref_images and --save_ref_crop must be >= 0")
    if os.path.isdir(ref):
        return
    if not os.path.isfile(ref):
        raise ValueError(f"--save_ref needs --ref, a folder or an .npz of the reference images; got {ref!r}")
    if "mu" in _npz_keys(ref):
        raise ValueError(f"--ref {ref!r} holds statistics already: --save_ref computes them from images")
    if save_ref_crop:
        raise ValueError(f"--save_ref_crop crops the images of a folder; --ref {ref!r} is an .npz")


def check_sample_count(space_kind, num_samples):
    if space_kind == "inception" and is_split_size and num_samples < is_split_size:
        raise ValueError(f"{num_samples} samples are fewer than one Inception Score chunk (is_split_size="
                         f"{is_split_size}, ADM's rule, the paper's): generate more, or pass --is_split_size 0 for "
                         f"{is_splits} equal splits (torch-fidelity's rule)")


def stored_resize(spec):
    """The resize that made the Inception statistics stored in the file spec: recorded there (by this script), TF1's
    for ADM's reference batch (images beside statistics), or None (images, or a file that does not say)."""
    if not os.path.isfile(spec):
        return None
    with np.load(spec) as z:
        if "resize" in z.files:
            return str(z["resize"])
        if {"arr_0", "mu"} <= set(z.files):
            return "tf1"
    return None


def inception_resize():
    """--resize; under auto, the resize of the reference's stored statistics, else pytorch-fid's."""
    if resize != "auto":
        return resize
    return stored_resize(ref) or "pytorch-fid"


def open_feature_space(space_kind, resolution, dev, cache):
    """The space of FID and its family: the Inception, or the classifier (trained and cached on a miss), refused here,
    before any metric, when it cannot tell its classes apart."""
    if space_kind == "inception":
        return InceptionSpace(inception_weights, inception_resize(), dev, progress)
    path, source, training_set = classifier_source(resolution, cache)
    space = ClassifierSpace(path, dev, lambda: metrics.train_classifier(
        path, *training_set(), classifier_epochs, classifier_seed, dev, source))
    refusal = classifier_refusal(space, path)
    if refusal is not None:
        raise ValueError(refusal)
    return space


def open_diversity_space(space_kind, resolution, dev):
    """(the kind of the space of RMD and memorisation, that space; None where the feature space stands in or there is
    none): the paper's CLIP, pixels, or the classifier standing in on the built-in dataset."""
    kind = diversity_features
    if kind == "auto" and space_kind == "classifier":
        kind = "classifier"
    elif kind == "auto":
        kind = "clip" if os.path.isfile(clip_path(diversity_clip) or "") else "none"
    if kind == "clip":
        return kind, ClipSpace(diversity_clip, dev)
    if kind == "pixels":
        return kind, PixelSpace(resolution)
    return kind, None


def load_entropy_vq(dev):
    if not entropy_vq:
        return None
    vq = load_first_stage(entropy_vq).eval().to(dev)
    if not isinstance(vq, VQModel):
        raise ValueError(f"--entropy_vq {entropy_vq!r} is a {type(vq).__name__}: sample entropy needs the VQ-f4 "
                         "first stage (a VQModel: its codebook)")
    return vq


def read_sample_prompts(num_samples):
    """(the samples' prompts, their file): --prompts, else data.prompts_path beside the samples when it exists (None,
    none), read as sample.py reads prompts (data.read_prompts); fewer than the samples is an error."""
    path = prompts or prompts_path(samples.rstrip("/"))
    if not prompts and not os.path.isfile(path):
        return None, path
    found = read_prompts(path)
    if len(found) < num_samples:
        raise ValueError(f"prompts {path!r}: {num_samples} samples need as many prompts, it holds {len(found)}")
    return found[:num_samples], path

# -----------------------------------------------------------------------------
# the metric families


def feature_space_metrics(space, s, r, labels, dev):
    """FID, sFID, IS, precision and recall in the feature space (Inception's; in the classifier space standing in,
    no sFID, its IS formula as "IS (classifier)", is_classifier, and the class accuracy of labelled samples), each
    measured only where the images are enough: (results, skipped)."""
    inception = space.name == fid.FEATURE_SPACE
    is_key = "is" if inception else "is_classifier"
    chunk = is_split_size if inception else 0  # IS (classifier): equal splits
    num_samples = len(s["pool"])
    num_ref_images = len(r["features"]) if "features" in r else None
    # FID and sFID compare with the reference's statistics: stored ones count whatever number of images the file
    # holds (ADM's are over its whole reference set); what is computed from images needs enough of them
    num_ref_statistics_images = None if r.get("stored") else num_ref_images
    dims = {m: s[f].shape[1] for m, f in (("fid", "pool"), ("sfid", "spatial")) if f in s}
    skipped = fid.unmeasurable(num_samples, num_ref_statistics_images, dims, is_splits, chunk or None, pr_k)
    skipped = {m: why for m, why in skipped.items() if m in dims}
    for m, why in fid.unmeasurable(num_samples, num_ref_images, {}, is_splits, chunk or None, pr_k).items():
        skipped[is_key if m == "is" else m] = why
    res = {"fid": None, "sfid": None, "is": None, "is_std": None, is_key: None, is_key + "_std": None,
           "precision": None, "recall": None}
    if "fid" not in skipped:
        res["fid"] = fid.frechet_distance(*fid.statistics(s["pool"]), r["mu"], r["sigma"], method=fd_method)
    if "spatial" in s and "mu_s" in r and "sfid" not in skipped:
        res["sfid"] = fid.frechet_distance(*fid.statistics(s["spatial"]), r["mu_s"], r["sigma_s"], method=fd_method)
    # the IS formula on the space's own classifier: Inception's, or in the classifier space an analogue under its
    # own name ("IS (classifier)", at most the 10 classes), so that nobody takes one for the other
    if is_key not in skipped:
        res[is_key], res[is_key + "_std"] = fid.inception_score(s["logits"], is_splits, chunk or None)
    res["is_splits"] = f"chunks of {chunk} (ADM)" if chunk else f"{is_splits} equal splits"
    if "features" not in r:
        skipped["precision"] = "the reference has statistics but no features"
    elif "precision" not in skipped:
        res["precision"], res["recall"] = fid.precision_recall(r["features"], s["pool"], pr_k, device=dev)
    if not inception and labels is not None:
        res["class_accuracy"] = float((s["logits"].argmax(1) == labels).mean())
    return res, skipped


def topological_precision_recall(space, s, r, dev):
    """TopP&R in the feature space, against the reference's image features: (results, skipped)."""
    res = {"toppr_precision": None, "toppr_recall": None, "toppr_f1": None}
    if "features" not in r:
        return res, {"toppr_f1": "the reference has statistics but no features"}
    need = 5 * min(s["pool"].shape[1], 32) + 2
    if min(len(r["features"]), len(s["pool"])) < need:
        return res, {"toppr_f1": f"TopP&R needs {need} samples and reference images in {space.name}"}
    res["toppr_precision"], res["toppr_recall"], res["toppr_f1"] = metrics.top_pr(r["features"], s["pool"], device=dev)
    return res, {}


def relative_mahalanobis_metrics(g, labels, report_path):
    """The top-1% RMD of the samples under their own labels: (results, skipped, the per-sample RMD for its histogram,
    drawn after the report is written)."""
    if labels is None:
        return {}, {"rmd_top1": "the samples have no class labels (arr_1 or class folders)"}, None
    if np.bincount(labels).max() < 2:  # every within-class deviation 0: no covariance to invert
        return {}, {"rmd_top1": f"{len(g)} samples: RMD needs 2 of a class at least"}, None
    rmd = metrics.relative_mahalanobis(g, labels)
    return {"rmd_top1": metrics.top_mean(rmd), "rmd_plot": os.path.splitext(report_path)[0] + "_rmd.png"}, {}, rmd


def memorisation_metrics(g, dspace, resolution, cache, dev):
    """The memorisation ratio and the mean L2 to the 5 nearest training images: (results, skipped)."""
    if not train:
        return {}, {"memorisation_ratio": "no --train (the training images)"}
    t, train_cache, _ = reference(train, dspace, batch_size, cache, resolution, synthetic_train_size,
                                  synthetic_train_seed, "train")
    return {"train_cache": train_cache, **memorisation(g, t["features"], memorisation_threshold, dev)}, {}


def sample_entropy_metrics(vq, s_images, dev):
    """The sample entropy of the samples' VQ latents over its codebook: (results, skipped)."""
    if vq is None:
        return {}, {"sample_entropy": "no --entropy_vq (the VQ-f4 first stage whose codebook it is measured over)"}
    codebook = vq.quantize.embedding.weight
    tau = entropy_tau or metrics.codebook_tau(codebook)
    latents = (vq.encode(torch.from_numpy(b).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1)
               for b in s_images.batches(batch_size))
    return {"entropy_tau": tau, "sample_entropy": metrics.sample_entropy(latents, codebook, tau),
            "entropy_vq": os.path.abspath(entropy_vq)}, {}


def diversity_and_memorisation(space, dkind, dspace, s, r, s_images, vq, dev, cache, report_path):
    """TopP&R (in the feature space), the top-1% RMD and memorisation (in the diversity space), the sample entropy
    (in the VQ's latents): (results, skipped, the per-sample RMD or None)."""
    res, skipped = topological_precision_recall(space, s, r, dev)
    res["diversity_space"] = None
    rmd = None
    if dkind == "none":
        why = "--diversity_features none"
        if diversity_features != "none":
            why = (f"no CLIP {diversity_clip} weights on this machine ({clip_path(diversity_clip)}): put them there, "
                   "or pass --diversity_features clip to have them downloaded")
        skipped["rmd_top1"] = skipped["memorisation_ratio"] = why
    else:
        res["diversity_space"], res["diversity_space_detail"] = dspace.name, dspace.description
        g = s["pool"] if dspace is space else dspace.extract(s_images, batch_size)["pool"]
        found, why, rmd = relative_mahalanobis_metrics(g, s_images.labels, report_path)
        res.update(found)
        skipped.update(why)
        found, why = memorisation_metrics(g, dspace, s_images.resolution, cache, dev)
        res.update(found)
        skipped.update(why)
    found, why = sample_entropy_metrics(vq, s_images, dev)
    res.update(found)
    skipped.update(why)
    return res, skipped, rmd


def clip_score_metrics(s_images, sample_prompts, prompts_file, clip, dev):
    """The CLIP score of text-to-image samples with their prompts; nothing without prompts."""
    if sample_prompts is None:
        return {}
    model, preprocess = clip
    return {"clip_score": metrics.clip_score(s_images, sample_prompts, model, preprocess, batch_size, dev),
            "clip_model": clip_model, "prompts": os.path.abspath(prompts_file)}

# -----------------------------------------------------------------------------
# the report


def report_header(space, r, ref_cache, ref_path, num_samples):
    """What was measured against what: spaces, files, counts, and where the reference's statistics came from."""
    ref_statistics, num_ref_statistics = statistics_provenance(r, os.path.abspath(ref))
    res = {"feature_space": space.name, "feature_space_detail": space.description,
           "samples": os.path.abspath(samples), "ref": ref if ref == "synthetic" else os.path.abspath(ref),
           "num_samples": num_samples, "num_ref": None, "ref_statistics": ref_statistics,
           "num_ref_statistics": num_ref_statistics, "ref_cache": ref_cache, "ref_cache_path": ref_path}
    if "features" in r:
        res["num_ref"] = int(len(r["features"]))
    if isinstance(space, ClassifierSpace):
        res.update(classifier_data=space.source, classifier_val_accuracy=space.val_accuracy,
                   classifier_val_images=space.num_val, classifier_chance=space.chance)
    return res


def reference_warnings(space, num_ref_statistics):
    warnings = []
    if num_ref_statistics is not None and num_ref_statistics < 50000:
        if space.name == fid.FEATURE_SPACE:
            warnings.append(f"FID against {num_ref_statistics} < 50000 reference images is biased upward: the paper's "
                            "reference is the 50K ImageNet validation images (or ADM's stored statistics)")
        else:
            warnings.append(f"the Frechet distance in {space.name} features against {num_ref_statistics} reference "
                            "images is biased upward, by less the more images: compare numbers of equal sample and "
                            "reference sizes")
    made_with = stored_resize(ref)
    if space.name == fid.FEATURE_SPACE and made_with is not None and made_with != space.model.resize:
        how = f"the statistics stored in {ref} were made with --resize {made_with}"
        if "resize" not in _npz_keys(ref):
            how = "ADM made the stored statistics with TF1's resize (--resize tf1)"
        warnings.append(f"{how}; the samples went through --resize {space.model.resize}, so FID and sFID mix two "
                        "pipelines")
    return warnings


def write_report(res, path, rmd, diversity_space):
    print(f"{'metric':<22}{'value':>12}   ({res['feature_space']}; RMD, memorisation: {res['diversity_space']})")
    for k in ("fid", "sfid", "is", "is_classifier", "precision", "recall", "toppr_f1", "class_accuracy",
              "memorisation_ratio", "avg_l2_top5", "rmd_top1", "sample_entropy", "clip_score"):
        if k not in res:
            continue
        value = "-" if res[k] is None else f"{res[k]:.4f}"
        why = ""
        if k in res["skipped"]:
            why = f"   not measured: {res['skipped'][k]}"
        print(f"{k:<22}{value:>12}{why}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    with atomic_write(path, "w") as f:  # study.py reuses it: never half-written
        json.dump(res, f, indent=2)
    if rmd is not None:
        metrics.plot_histogram(rmd, res["rmd_plot"], f"RMD ({diversity_space})")
    print(f"wrote {path}")

# -----------------------------------------------------------------------------
# the two commands: evaluate samples, or write a reference's statistics


def evaluate_samples(space_kind, dev, cache, config):
    s_images = open_images(samples, max_samples, "samples")
    check_sample_count(space_kind, len(s_images))
    sample_prompts, prompts_file = read_sample_prompts(len(s_images))
    # every network loads before any work, so that a missing file stops the run at once
    dkind, own_space = open_diversity_space(space_kind, s_images.resolution, dev)
    vq = load_entropy_vq(dev)
    clip = None
    if sample_prompts is not None:
        model, preprocess = load_clip(clip_model)
        clip = model.to(dev), preprocess
    space = open_feature_space(space_kind, s_images.resolution, dev, cache)
    print(f"feature space: {space.description}")

    t0 = time.time()
    r, ref_cache, ref_path = reference(ref, space, batch_size, cache, s_images.resolution, synthetic_ref_size,
                                       synthetic_ref_seed, "ref", synthetic_ref_scale)
    print(f"reference: {ref_cache} ({ref_path})")
    s = space.extract(s_images, batch_size)
    report_path = out or os.path.splitext(samples.rstrip("/"))[0] + "_metrics.json"
    res = report_header(space, r, ref_cache, ref_path, len(s["pool"]))
    found, skipped = feature_space_metrics(space, s, r, s_images.labels, dev)
    res.update(found)
    found, why, rmd = diversity_and_memorisation(space, dkind, own_space or space, s, r, s_images, vq, dev, cache,
                                                 report_path)
    res.update(found)
    skipped.update(why)
    res.update(clip_score_metrics(s_images, sample_prompts, prompts_file, clip, dev))
    res["skipped"], res["warnings"] = skipped, reference_warnings(space, res["num_ref_statistics"])
    res["seconds"] = round(time.time() - t0, 1)
    res["config"] = config
    write_report(res, report_path, rmd, res["diversity_space"])
    return res


def save_reference(space, images):
    """--save_ref: the statistics of every reference image in the feature space, in ADM's reference-batch layout
    (mu, sigma, mu_s, sigma_s; arr_0: save_ref_images of the images, evenly spread, for precision and recall), with
    what a later evaluation reads back (ours): the feature space, its resize, the number of images. Written whole."""
    keep = np.unique(np.linspace(0, len(images) - 1, min(save_ref_images, len(images))).round().astype(np.int64))
    kept = []

    def batches(bs):  # the kept images are taken on the way through: the reference is read once
        start = 0
        for b in images.batches(bs):
            kept.append(b[keep[(keep >= start) & (keep < start + len(b))] - start])
            start += len(b)
            yield b
    f = space.extract(Images(len(images), batches, None, images.key, images.resolution), batch_size)
    d = {"feature_space": np.array(space.name), "num_images": np.array(len(images))}
    if len(keep):
        d["arr_0"] = np.concatenate(kept)
    d["mu"], d["sigma"] = fid.statistics(f["pool"])
    if "spatial" in f:
        d["mu_s"], d["sigma_s"] = fid.statistics(f["spatial"])
    if space.name == fid.FEATURE_SPACE:
        d["resize"] = np.array(space.model.resize)
    os.makedirs(os.path.dirname(os.path.abspath(save_ref)), exist_ok=True)
    with atomic_write(save_ref) as out_file:
        np.savez(out_file, **d)
    print(f"wrote {save_ref}: the {space.name} statistics of {len(images)} images of {ref}, and {len(keep)} of them")
    return {"save_ref": os.path.abspath(save_ref), "num_images": len(images), "num_kept": len(keep),
            "feature_space": space.name, "feature_space_detail": space.description}


def main(argv=None):
    from configurator import configure
    globals().update(_DEFAULTS)  # main() may run more than once in a process (tests): start from the defaults
    config = configure(globals(), sys.argv[1:] if argv is None else argv)
    space_kind = check_settings()
    dev = torch.device(device) if device else fid.default_device()
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "cep-eval")
    if save_ref:
        images = open_images(ref, what="ref", crop=save_ref_crop)
        space = open_feature_space(space_kind, images.resolution, dev, cache)
        print(f"feature space: {space.description}")
        return save_reference(space, images)
    return evaluate_samples(space_kind, dev, cache, config)


if __name__ == "__main__":
    main()
