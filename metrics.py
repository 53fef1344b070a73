"""
The feature spaces of evaluate.py and the metrics beyond fid.py:
- feature spaces: the FID Inception (fid.py), a small classifier of the built-in dataset or of a class folder
  (trained here, cached), CLIP's image embeddings (the paper's ViT-B/16 for RMD and memorisation);
- the CLIP score of text-to-image samples;
- the paper's diversity metrics (Chen et al. 2024, App. B.7): the top-1% relative Mahalanobis distance (Eq. 38-40)
  per sample with its histogram, and the sample entropy (Eq. 41) of VQ latents over the codebook;
- TopP&R (Kim et al., NeurIPS 2023): topological precision, recall and their F1, as the authors' code computes them.
Definitions, feature spaces and our choices: docs/metrics.md. The metric functions take arrays and use only torch
and numpy; the spaces load their networks through fid.py, text.py and data.py.
"""
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid
from configurator import atomic_write, read_cache


def file_key(path):
    """Identifies a file's content for the caches: path, size, mtime."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"

def folder_files(path, limit=0):
    """(the image files of a folder, sorted; labels and class names from its class subfolders, root/<class>/<image>,
    sorted as data.ImageFolder's, when every image has one, else None and None), without reading an image."""
    from data import IMG_EXTENSIONS
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path, followlinks=True) for f in fs
                   if f.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"folder {path!r} has no images ({', '.join(IMG_EXTENSIONS)})")
    files = files[:limit] if limit else files
    rel = [os.path.relpath(f, path).split(os.sep) for f in files]
    if not all(len(r) > 1 for r in rel):
        return files, None, None
    classes = sorted({r[0] for r in rel})
    return files, np.array([classes.index(r[0]) for r in rel], dtype=np.int64), classes


def content_digest(files, root):
    """sha1 of a folder's images (paths relative to root, and bytes): what a copy or a touch of the folder keeps and
    a changed, added or removed image changes."""
    h = hashlib.sha1()
    for f in files:
        h.update(os.path.relpath(f, root).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.sha1(fh.read()).digest())
    return h.hexdigest()[:16]


def class_folder_classifier(source, seed, epochs):
    """The classifier of a class folder: (its cache file's name, from the folder's content and the settings; its class
    names; a function giving its images in an order from the seed, their labels and the class count). The folder is
    checked here, before any work: class subfolders, 10 images of each class at least."""
    files, labels, classes = folder_files(source)
    if classes is None:
        raise ValueError(f"classifier_data {source!r} has images outside class subfolders: the classifier learns "
                         "its labels from root/<class>/<image>")
    counts = np.bincount(labels, minlength=len(classes))
    if counts.min() < 10:
        raise ValueError(f"classifier_data {source!r}: class {classes[counts.argmin()]!r} has {counts.min()} images; "
                         "the classifier needs 10 of each class at least (a tenth are held out to measure it)")

    def training_set():  # in an order from the seed: train_classifier holds out the first tenth
        from data import load_image
        order = np.random.default_rng(seed).permutation(len(files))
        images = [np.asarray(load_image(files[i])) for i in order]
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"classifier_data {source!r}: images of {len({im.shape for im in images})} sizes; the "
                             "classifier needs them all of one size")
        return np.stack(images), labels[order], len(classes)
    return f"folder_classifier_{content_digest(files, source)}_s{seed}_e{epochs}.pt", classes, training_set


# -----------------------------------------------------------------------------
# feature spaces


class InceptionSpace:
    dims = {"mu": 2048, "mu_s": 2023}  # the widths of its statistics: pool_3, and sFID's mixed_6/conv

    def __init__(self, weights, resize, dev, progress=True):
        self.model, self.progress = fid.load_inception(weights or None, dev, resize), progress
        path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", fid.FID_WEIGHTS_NAME)
        self.name = fid.FEATURE_SPACE
        self.description = f"{fid.FEATURE_SPACE} pool_3 (2048-d), resize={resize}, weights={os.path.abspath(path)}"
        self.key = f"inception:{resize}:{file_key(path)}"

    def extract(self, images, bs):
        return fid.compute_features(images.batches(bs), self.model, progress=self.progress)


class SmallCNN(nn.Module):
    """The classifier of the "classifier" feature space (its 96-d penultimate layer), of the built-in dataset or a
    class folder. On the built-in dataset at the default settings it reaches ~99% held-out accuracy at 32x32 in ~1-2
    minutes of CPU."""

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


def train_classifier(path, x, y, num_classes, epochs, seed, dev, source):
    """Train SmallCNN at the resolution of x (uint8 NHWC images, labels y, in random order) and save it: the first
    tenth of x is held out to measure its accuracy, the rest trains it. source names what x is (synthetic, or the
    class folder), saved with it and shown in every report that uses it."""
    torch.manual_seed(seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    n_val = max(len(x) // 10, 1)
    (xv, yv), (xt, yt) = (x[:n_val], y[:n_val]), (x[n_val:], y[n_val:])
    model = SmallCNN(num_classes, x.shape[1]).to(dev)
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
    # the accuracy of a classifier blind to the image: it answers the commonest class of its training images
    chance = max(1 / num_classes, torch.bincount(yt, minlength=num_classes).max().item() / max(len(yt), 1))
    print(f"trained the classifier on {source} in {time.time() - t0:.0f}s: accuracy {acc:.3f} on {n_val} of its images "
          "held out")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:  # whole or not at all: a later run loads it
        torch.save({"model": model.state_dict(), "resolution": x.shape[1], "num_classes": num_classes,
                    "val_accuracy": acc, "num_val": n_val, "chance": chance, "epochs": epochs, "seed": seed,
                    "source": source}, f)


class ClassifierSpace:
    """SmallCNN's penultimate features, from the checkpoint at path; on a cache miss train() makes it first."""

    def __init__(self, path, dev, train=None):
        if read_cache(path, lambda p: torch.load(p, weights_only=True)) is None:  # trained once, then cached
            train()
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model = SmallCNN(ck["num_classes"], ck["resolution"])
        self.model.load_state_dict(ck["model"])
        self.model.eval().to(dev)
        self.dev, self.val_accuracy = dev, ck["val_accuracy"]
        # how many held-out images measured that accuracy (None: a classifier cached before it was recorded), and the
        # accuracy of answering without looking (before it was recorded: one class in num_classes)
        self.num_val = ck.get("num_val")
        self.chance = ck.get("chance", 1 / ck["num_classes"])
        self.source = ck.get("source", "synthetic")  # classifiers cached before class folders: the built-in dataset
        self.name = "synthetic-classifier" if self.source == "synthetic" else "folder-classifier"
        self.dims = {"mu": self.model.head.in_features}
        self.description = (f"{self.name} penultimate ({self.model.head.in_features}-d), trained on {self.source}, "
                            f"{os.path.abspath(path)}, held-out accuracy {ck['val_accuracy']:.3f}")
        self.key = f"classifier:{file_key(path)}"

    @torch.inference_mode()
    def extract(self, images, bs):
        feats, logits = [], []
        for b in images.batches(bs):
            h, lg = self.model(torch.from_numpy(np.ascontiguousarray(b)).to(self.dev))
            feats.append(h.float().cpu().numpy())
            logits.append(lg.float().cpu().numpy())
        return {"pool": np.concatenate(feats), "logits": np.concatenate(logits)}


class PixelSpace:
    """The images' own pixels, flattened: memorisation on a small dataset, where a sample that copies a training image
    is at distance ~0 and a fresh one is not (ours; the paper measures in CLIP's features, docs/metrics.md)."""
    name = "pixels"

    def __init__(self, resolution):
        self.dims = {"mu": 3 * resolution ** 2}
        self.description = self.key = f"pixels ({resolution}x{resolution}x3, flattened)"

    def extract(self, images, bs):
        return {"pool": np.concatenate([b.reshape(len(b), -1).astype(np.float32) for b in images.batches(bs)])}


def clip_path(name):
    """Where load_clip finds the CLIP `name` (a file, or a clip model name in ~/.cache/clip); None if neither."""
    import clip
    if os.path.isfile(name):
        return name
    urls = clip.clip._MODELS
    return os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(urls[name])) if name in urls else None


class ClipSpace:
    """CLIP's image embeddings (encode_image), the paper's space for RMD and memorisation (ViT-B/16)."""

    def __init__(self, name, dev):
        from text import load_clip
        model, self.preprocess = load_clip(name)  # a missing file: one error naming it, before any work
        self.model, self.dev = model.to(dev), dev
        self.name = f"clip-{os.path.basename(name) if os.path.isfile(name) else name}"
        self.dims = {"mu": model.visual.output_dim}
        self.description = f"CLIP {name} image embeddings ({model.visual.output_dim}-d), {clip_path(name)}"
        self.key = f"clip:{file_key(clip_path(name))}"

    def extract(self, images, bs):
        return {"pool": clip_image_features(images.batches(bs), self.model, self.preprocess, self.dev)}


@torch.inference_mode()
def clip_image_features(batches, model, preprocess, device):
    """uint8 NHWC batches -> CLIP's image embeddings (encode_image: the projected class token) [N, D], through
    CLIP's own preprocessing (PIL bicubic resize of the short side, centre crop, normalisation)."""
    feats = []
    for b in batches:
        x = torch.stack([preprocess(Image.fromarray(im)) for im in b]).to(device)
        feats.append(model.encode_image(x).float().cpu().numpy())
    return np.concatenate(feats)


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
# relative Mahalanobis distance


def relative_mahalanobis(features, labels, ridge=1e-6):
    """RMD of each sample, Eq. 38-40: RMD_i = M(x_i, y_i) - M_agn(x_i), M(x, y) = -(x - mu_y)^T S^-1 (x - mu_y) with
    the class means mu_k of these features under their own labels and one shared covariance
    S = 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T, M_agn the same with the mean and covariance (1/N) of all N.
    Large: a sample closer to its own class than to the whole set. Ours: a ridge of `ridge` x the mean variance on
    both covariances, because features can be rank-deficient (dead ReLU units, fewer samples than dimensions)."""
    x = np.asarray(features, np.float64)
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    means = np.zeros((y.max() + 1, x.shape[1]))
    np.add.at(means, y, x)
    means /= np.bincount(y)[:, None]

    def mahalanobis(d):  # d: deviations from their Gaussian's mean, whose covariance is d^T d / N
        cov = d.T @ d / len(d)
        precision = np.linalg.inv(cov + ridge * np.trace(cov) / len(cov) * np.eye(len(cov)))
        return ((d @ precision) * d).sum(1)
    return mahalanobis(x - x.mean(0)) - mahalanobis(x - means[y])


def top_mean(values, fraction=0.01):
    """Mean of the largest `fraction` of the values (at least one): the paper's "top-1%" of a per-sample score."""
    n = max(1, int(round(fraction * len(values))))
    return float(np.sort(values)[-n:].mean())


def plot_histogram(values, path, title, top=0.01):
    """The density of a per-sample score with its top-`top` threshold, as the paper plots RMD; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.hist(values, bins=min(100, max(10, len(values) // 20)), density=True, color="C0")
    ax.axvline(np.quantile(values, 1 - top), color="C3", linestyle="--", label=f"top {100 * top:g}%")
    ax.set(xlabel=title, ylabel="density", title=f"{title}, {len(values)} samples")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# -----------------------------------------------------------------------------
# sample entropy


@torch.no_grad()
def codebook_tau(codebook):
    """Our default temperature for sample_entropy (the paper gives none): the mean over codes of the squared distance
    to the nearest other code, so that a vector midway between two codes splits its mass between them."""
    c = codebook.double()
    d = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(float("inf"))
    return d.min(1).values.pow(2).mean().item()


@torch.no_grad()
def sample_entropy(latent_batches, codebook, tau, chunk=2048):
    """Eq. 41: each latent vector x (the channels at one position of a [B, C, H, W] batch: VQ encoder outputs before
    quantisation) gets p = softmax(-||x - c_k||^2 / tau) over the codes c_k; the mean of -sum_k p_k log p_k (nats)
    over every vector of every image. Squared distances are taken directly, not as |x|^2 - 2xc + |c|^2, whose
    cancellation would swamp a small tau."""
    codebook = codebook.detach().float()
    total, count = 0.0, 0
    for z in latent_batches:
        vectors = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).to(codebook.device)
        for v in vectors.split(chunk):
            d2 = torch.cdist(v, codebook, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
            log_p = (-d2 / tau).log_softmax(1)
            total += -(log_p.exp() * log_p).sum(1).double().sum().item()
            count += len(v)
    return total / count

# -----------------------------------------------------------------------------
# TopP&R


def _blocks(n, size):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _balloon_bandwidth(x, k, block):
    # the authors' balloon estimator: for each point i but the last k, the distance to the k-th nearest of the points
    # after it (i+1, ..., n-1); the bandwidth is the lower median of these
    n, kth = len(x), []
    for a, b in _blocks(n - k, block):
        d = torch.cdist(x[a:b], x)
        d[torch.arange(n, device=x.device)[None] <= torch.arange(a, b, device=x.device)[:, None]] = float("inf")
        kth.append(d.topk(k, dim=1, largest=False).values[:, -1])
    kth = torch.cat(kth).sort().values
    return kth[int(len(kth) * 0.5) - 1].item()


def _cosine_kde(data, at, h, weights, block):
    # (1/n) (pi / 4h)^d sum_j w_j cos(pi/2 |at - data_j| / h) over |at - data_j| <= h; one column per weight vector
    out = []
    for a, b in _blocks(len(at), block):
        d = torch.cdist(at[a:b], data)
        out.append(torch.where(d <= h, torch.cos(torch.pi / 2 * d / h), 0) @ weights)
    return torch.cat(out) * (torch.pi / (4 * h)) ** data.shape[1] / len(data)


def _density_and_band(x, h, alpha, repeats, rng, block):
    # the set's KDE at its own points, and its confidence band: the 1 - alpha quantile of sqrt(n) max |p - p*| over
    # bootstrap resamples p* (a resample's KDE is the KDE with each point weighted by how often it was drawn)
    n = len(x)
    counts = [np.bincount(rng.choice(np.arange(n), size=n, replace=True), minlength=n) for _ in range(repeats)]
    weights = torch.from_numpy(np.stack([np.ones(n)] + counts, 1)).to(x)
    p = _cosine_kde(x, x, h, weights, block)
    theta = (np.sqrt(n) * (p[:, :1] - p[:, 1:]).abs().amax(0)).cpu().numpy()
    return p[:, 0], np.quantile(theta, 1 - alpha) / np.sqrt(n)


@torch.no_grad()
def top_pr(real, fake, alpha=0.1, repeats=10, device=None, block=None):
    """TopP&R (Kim et al. 2023): (precision, recall, F1), as their code (top-pr 0.2.1, compute_top_pr with its
    defaults) computes them: features wider than 32 are projected to 32 dimensions by their fixed random matrix
    (Xavier-normal from seed 99); each set gets a cosine-kernel density estimate with its balloon bandwidth
    (k = 5 x dimension) and a bootstrap confidence band (10 resamples, numpy seed 42, the real set's first); a point
    is significant in a set when that set's density there exceeds its band. Precision: the share of significant fake
    points where the real density exceeds the real band; recall the other way round; F1 their harmonic mean (0 when
    either is under 1e-4). Each set needs more than 5 x dimension + 1 points."""
    device = torch.device(device or "cpu")
    block = block or (2048 if device.type == "cuda" else 1024)
    real, fake = (torch.as_tensor(np.asarray(f, np.float32)) for f in (real, fake))
    if real.shape[1] > 32:
        w = torch.empty(32, real.shape[1]).normal_(0, (2 / (real.shape[1] + 32)) ** 0.5,
                                                    generator=torch.Generator().manual_seed(99))
        real, fake = real @ w.T, fake @ w.T
    real, fake = real.double().to(device), fake.double().to(device)
    k = 5 * real.shape[1]
    if min(len(real), len(fake)) < k + 2:
        raise ValueError(f"TopP&R in {real.shape[1]} dimensions needs at least {k + 2} real and fake samples "
                         f"(its bandwidth is a {k}-th neighbour distance), got {len(real)} and {len(fake)}")
    rng = np.random.RandomState(42)
    h_real, h_fake = _balloon_bandwidth(real, k, block), _balloon_bandwidth(fake, k, block)
    p_real, band_real = _density_and_band(real, h_real, alpha, repeats, rng, block)
    p_fake, band_fake = _density_and_band(fake, h_fake, alpha, repeats, rng, block)
    real_at_fake = _cosine_kde(real, fake, h_real, torch.ones_like(real[:, :1]), block)[:, 0]
    fake_at_real = _cosine_kde(fake, real, h_fake, torch.ones_like(fake[:, :1]), block)[:, 0]
    significant_real, significant_fake = p_real > band_real, p_fake > band_fake
    precision = ((significant_fake & (real_at_fake > band_real)).double().sum() / significant_fake.sum()).item()
    recall = ((significant_real & (fake_at_real > band_fake)).double().sum() / significant_real.sum()).item()
    f1 = 2 / (1 / precision + 1 / recall) if precision > 1e-4 and recall > 1e-4 else 0.0
    return precision, recall, f1


def embedding_shift(clean, perturbed, n=None, squared=True):
    """How far training moved the condition embeddings from the clean ones (Chen et al. 2024, App. E.2: the x axis
    of Fig. 8a, "Cond. Emb. L2 Diff."). For fixed corruption, Eq. 42, with theta* the weights of a clean run:
        (1/N) sum_{i=1}^{N} || c_theta*(y_i^c) - c_theta*(y_i) ||_2^2
    for CEP, Eq. 43, "the L2 norm of sampled noise": sum_{i=1}^{N} || sigma_i ||_2^2, printed without Eq. 42's 1/N;
    the paper calls both an average, so both are averaged here.
    clean, perturbed: [M, ...] arrays or tensors, the embeddings of M samples (a class table's row, or a caption's
    token embeddings, which count as one vector). n: the N to average over when the M rows are only the samples
    whose condition changed (corruption.json's; every other sample adds 0); default M. squared=False averages the
    norm itself: the equations square it, the figure's axis reads "L2" (which of the two it plots is not stated)."""
    clean, perturbed = (torch.as_tensor(e).detach().cpu().double() for e in (clean, perturbed))
    if clean.shape != perturbed.shape:
        raise ValueError(f"clean and perturbed embeddings differ in shape: {tuple(clean.shape)}, "
                         f"{tuple(perturbed.shape)}")
    n = len(clean) if n is None else n
    if n < len(clean) or n == 0:
        raise ValueError(f"n={n}: the average is over N >= {max(len(clean), 1)} samples")
    d2 = (perturbed - clean).flatten(1).pow(2).sum(1)
    return float((d2 if squared else d2.sqrt()).sum() / n)
