"""
Datasets: the built-in synthetic shapes (the embedded default: no downloads), ImageNet-style folders, image-caption
sets, and latents cached on disk by this file's script (torchrun shares the shards out), the fast path:

  python data.py --data_path=imagenet/train --image_size=256 --vae=sd-vae-ft-ema --out=latents/in256
  python data.py --data_path=cc3m --captions --image_size=256 --vae=ldm-vq-f4 --out=latents/cc3m

Every dataset returns (image or latent, label), an image a float tensor [3, H, W] in [-1, 1], and exposes `labels`
(np.int64 [N]) and `classes`; train.py replaces `labels` with the corrupted ones before training. Image-caption sets
return (image, caption) and expose `captions`; CaptionPairs serves any of them to text-conditional training.
"""
import csv
import io
import json
import math
import os
import sys
import uuid

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def to_tensor(arr):
    """uint8 HWC -> float CHW in [-1, 1]"""
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1  # a writable copy


# -----------------------------------------------------------------------------
# The built-in synthetic dataset

COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
          "cyan": (40, 210, 220), "blue": (40, 70, 220), "purple": (140, 50, 190), "pink": (250, 140, 190),
          "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (120, 70, 30)}


def _polygon(radii, n):
    """n vertices (or 2n for a star-like alternating pair of radii), angles from the top, unit circle scale."""
    radii = list(radii) * (n if len(radii) == 1 else 1)
    return [(r * math.sin(2 * math.pi * k / len(radii)), -r * math.cos(2 * math.pi * k / len(radii)))
            for k, r in enumerate(radii)]


SHAPES = {  # unit-size outlines; None = drawn from circles
    "circle": None, "ring": None, "crescent": None,
    "square": [(x * 0.8, y * 0.8) for x, y in [(-1, -1), (1, -1), (1, 1), (-1, 1)]],
    "triangle": _polygon([1.0], 3),
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "hexagon": _polygon([1.0], 6),
    "star": _polygon([1.0, 0.42] * 5, 10),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "arrow": [(0, -1), (0.8, -0.1), (0.3, -0.1), (0.3, 1), (-0.3, 1), (-0.3, -0.1), (-0.8, -0.1)],
}


def article(word):
    return "an" if word[0] in "aeiou" else "a"


# Upright within +-15 degrees: with any rotation a small model must learn every orientation of every shape, and the
# CPU default's few minutes draw blobs instead (the README gives the numbers)
MAX_ROTATION = math.radians(15)


class SyntheticShapes(torch.utils.data.Dataset):
    """Coloured shapes on coloured backgrounds, drawn with PIL, deterministic from the seed. The class is the shape
    (10 classes); colour, background, size, position and rotation (up to 15 degrees) vary
    within a class, and each image has a caption that describes it. Parameters are drawn once; images are drawn on
    access. With masks=True an item is (image, label, mask): the exact segmentation colour map of the image (the
    shape white, the background black), a control for adaptation (control.py). `scale` sizes the shapes: 0.6 makes
    the smaller shapes of the downstream task of docs/downstream.md."""

    classes = list(SHAPES)

    def __init__(self, size=10000, resolution=32, seed=0, masks=False, scale=1.0):
        self.resolution, self.masks = resolution, masks
        rng = np.random.default_rng(seed)
        names = list(COLORS)
        lum = {n: np.dot(COLORS[n], (0.299, 0.587, 0.114)) for n in names}
        self.labels = rng.permutation(np.arange(size) % len(self.classes)).astype(np.int64)
        self.params, self.captions = [], []
        for label in self.labels:
            fg = names[rng.integers(len(names))]
            bg = rng.choice([n for n in names if abs(lum[n] - lum[fg]) > 60])  # contrast, so the shape shows
            # large and near the centre: enough variety for precision and recall to mean something, little enough
            # for the 10-minute CPU default to learn the shapes (anywhere at 0.2-0.4, it draws only blobs)
            radius = rng.uniform(0.28, 0.42) * scale  # fraction of the image side
            cx, cy = rng.uniform(0.4, 0.6, size=2)
            self.params.append(dict(shape=self.classes[label], fg=fg, bg=bg, radius=radius, cx=cx, cy=cy,
                                    angle=rng.uniform(-1, 1) * MAX_ROTATION, jitter=rng.integers(-20, 21, size=6)))
            size_word = ""
            if radius < 0.33:
                size_word = "small "
            elif radius > 0.37:
                size_word = "large "
            third = lambda c: min(int((c - 0.4) / 0.2 * 3), 2)  # which third of the centre's range
            where = ["top", "middle", "bottom"][third(cy)] + " " + ["left", "centre", "right"][third(cx)]
            self.captions.append(f"{article(size_word + fg)} {size_word}{fg} {self.classes[label]} on {article(bg)} "
                                 f"{bg} background, {where}")

    def __len__(self):
        return len(self.labels)

    def render(self, i, mask=False):
        """uint8 [H, W, 3]; drawn at 4x and downsampled, for anti-aliased edges. mask: the same drawing in white on
        black (a boundary pixel is grey by the share of it the shape covers)."""
        p, S = self.params[i], self.resolution * 4
        fg = tuple(int(c) for c in np.clip(np.add(COLORS[p["fg"]], p["jitter"][:3]), 0, 255))
        bg = tuple(int(c) for c in np.clip(np.add(COLORS[p["bg"]], p["jitter"][3:]), 0, 255))
        fg, bg = ((255, 255, 255), (0, 0, 0)) if mask else (fg, bg)
        img = Image.new("RGB", (S, S), bg)
        draw = ImageDraw.Draw(img)
        cx, cy, r = p["cx"] * S, p["cy"] * S, p["radius"] * S
        def disc(x, y, radius, colour):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        if p["shape"] == "circle":
            disc(cx, cy, r, fg)
        elif p["shape"] == "ring":
            disc(cx, cy, r, fg)
            disc(cx, cy, 0.55 * r, bg)
        elif p["shape"] == "crescent":
            disc(cx, cy, r, fg)
            disc(cx + 0.5 * r * math.cos(p["angle"]), cy + 0.5 * r * math.sin(p["angle"]), 0.85 * r, bg)
        else:
            c, s = math.cos(p["angle"]), math.sin(p["angle"])
            draw.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in SHAPES[p["shape"]]], fill=fg)
        return np.asarray(img.resize((self.resolution, self.resolution), Image.BOX))

    def images_uint8(self):
        return np.stack([self.render(i) for i in range(len(self))])

    def __getitem__(self, i):
        # no random flip: the captions say left and right
        item = to_tensor(self.render(i)), int(self.labels[i])
        return item + (to_tensor(self.render(i, mask=True)),) if self.masks else item


# -----------------------------------------------------------------------------
# ImageNet-style folders


def control_paths(root, paths, controls):
    """The control image (edges, a segmentation map...) of each image of `paths`: the file of the same path relative
    to `root` (a folder, or a manifest's folder) under `controls`, of any image type. Each must exist and have its
    image's size (it is cropped and flipped with it): checked here, from the headers, before any training."""
    if not os.path.isdir(controls):
        raise FileNotFoundError(f"control folder {controls!r} does not exist (it mirrors data_path's layout: "
                                "the control of data_path/a/b.jpg is controls/a/b.png, or another image type)")
    root = root if os.path.isdir(root) else os.path.dirname(root)
    found = {os.path.splitext(os.path.relpath(os.path.join(d, f), controls))[0]: os.path.join(d, f)
             for d, _, fs in os.walk(controls, followlinks=True) for f in fs if f.lower().endswith(IMG_EXTENSIONS)}
    out = []
    for path in paths:
        stem = os.path.splitext(os.path.relpath(path, root))[0]
        if stem not in found:
            raise FileNotFoundError(f"image {path!r} has no control image: expected {os.path.join(controls, stem)}"
                                    ".png (or .jpg, ...) in the control folder, which mirrors data_path's layout")
        with Image.open(path) as image, Image.open(found[stem]) as control:
            if image.size != control.size:
                raise ValueError(f"control image {found[stem]!r} is {control.size[0]}x{control.size[1]} but its image "
                                 f"{path!r} is {image.size[0]}x{image.size[1]}: a control must have its image's size "
                                 "(it is cropped and flipped with it); make it from the image at full size")
        out.append(found[stem])
    return out


def center_crop_arr(image, size):
    """ADM's centre crop (as DiT uses it): halve with a box filter while the image is at least twice the target,
    then a bicubic resize of the short side to `size`, then a centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path):
    """An RGB PIL image; any failure to decode names the file."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)  # converting forces the full decode, so truncated files fail here
    except Exception as e:
        raise RuntimeError(f"cannot read image {path}: {e}. Remove or replace this file.") from e


def to_rgb(image):
    """8-bit RGB from any mode. PIL's convert("RGB") clips 16- and 32-bit greyscale at 255 (mid grey would train as
    white): 16-bit (I;16*, and I from a PNG) is scaled by 255/65535, 32-bit integers (I) by 255/(2^31 - 1) with
    negatives at 0, floats (F) from [0, 1] (ours: the file does not say). Alpha is dropped, as torchvision's, ADM's
    and pytorch-fid's loaders drop it; palettes and CMYK are PIL's conversions."""
    if image.mode.startswith("I") or image.mode == "F":
        full = 2 ** 31 - 1
        if image.mode == "F":
            full = 1.0
        elif image.mode != "I" or image.format == "PNG":
            full = 65535
        grey = np.clip(np.asarray(image, dtype=np.float64) / full * 255, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:  # PIL warns unless the palette goes through RGBA
        image = image.convert("RGBA")
    return image.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>, classes in sorted order (as torchvision's ImageFolder), ADM centre crop, and a random
    horizontal flip. An image that cannot be read is an error naming it or, given a `skipped` counter (a
    multiprocessing.Value, shared by the DataLoader's forked workers), counted there and replaced by the next image
    of the folder: the batch keeps its size, the data order its determinism. Files are not checked up front: a
    header check of ImageNet's 1.28M files would take minutes on every rank and still miss truncated JPEGs."""

    def __init__(self, root, resolution, flip=True, skipped=None, controls=""):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data_path {root!r} is not a folder; it should hold one subfolder per class")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{root!r} has no class subfolders (expected root/<class>/<image>)")
        self.paths, labels = [], []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder, followlinks=True)
                           for f in fs if f.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise FileNotFoundError(f"class folder {folder!r} has no images ({', '.join(IMG_EXTENSIONS)})")
            self.paths += files
            labels += [label] * len(files)
        self.labels = np.array(labels, dtype=np.int64)
        self.resolution, self.flip, self.skipped = resolution, flip, skipped
        self.controls = control_paths(root, self.paths, controls) if controls else None  # then items are triples

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = load_image(self.paths[i])
        except RuntimeError as e:
            if self.skipped is None:
                raise RuntimeError(f"{e} Or train on without it: skip_bad_images=True.") from e.__cause__
            with self.skipped.get_lock():
                self.skipped.value += 1
            print(f"skipped: {e}", file=sys.stderr)
            return self[(i + 1) % len(self)]
        arr = center_crop_arr(image, self.resolution)
        flip = self.flip and torch.rand(()) < 0.5
        item = to_tensor(arr[:, ::-1] if flip else arr), int(self.labels[i])
        if self.controls is None:
            return item
        control = center_crop_arr(load_image(self.controls[i]), self.resolution)
        return item + (to_tensor(control[:, ::-1] if flip else control),)


# -----------------------------------------------------------------------------
# Image-caption sets


def read_utf8(path, what):
    """The text of a file that must be UTF-8 (a byte-order mark is dropped); anything else is an error naming it."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}): "
                         "save it as UTF-8") from None


def read_prompts(path):
    """Prompts from a text file, one per line, or a COCO-style captions JSON ({"annotations": [{"caption": ...}]}, in
    the file's order); whitespace is normalised and empty prompts are dropped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} not found (one prompt per line, or a COCO captions JSON)")
    try:
        with open(path, encoding="utf-8-sig") as f:
            if not path.endswith(".json"):
                prompts = f.read().split("\n")
            else:
                try:
                    prompts = [a["caption"] for a in json.load(f)["annotations"]]
                except (KeyError, TypeError):
                    raise ValueError(f"prompts {path!r} is not a COCO captions JSON: it needs "
                                     '{"annotations": [{"caption": ...}, ...]}') from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path!r} is not UTF-8 ({e.reason} at byte {e.start}): save it as UTF-8") \
            from None
    prompts = [p for p in (" ".join(p.split()) for p in prompts) if p]
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompts")
    return prompts


def prompts_path(npz):
    """Where the prompts of a text-to-image .npz are, one per line (evaluate.py reads them from there)."""
    return os.path.splitext(npz)[0] + "_prompts.txt"


class ImageCaptions(torch.utils.data.Dataset):
    """(image, caption) pairs from a folder of images, each with a same-named .txt caption beside it (what img2dataset
    writes for CC3M), searched recursively, in sorted order; or from a .tsv or .csv manifest whose header names an
    image column (`image`, or open_clip's `filepath`) and a caption column (`caption`, or `title`), image paths
    relative to its folder. Every caption is read here: a missing or non-UTF-8 one fails before any training. ADM
    centre crop and no flip: captions may say left and right."""

    classes, labels = [], None  # captions, not classes

    def __init__(self, root, resolution, controls=""):
        self.resolution = resolution
        if os.path.isdir(root):
            self.paths = sorted(os.path.join(dirpath, f) for dirpath, _, fs in os.walk(root, followlinks=True)
                                for f in fs if f.lower().endswith(IMG_EXTENSIONS))
            if not self.paths:
                raise FileNotFoundError(f"{root!r} has no images ({', '.join(IMG_EXTENSIONS)})")
            texts = [os.path.splitext(p)[0] + ".txt" for p in self.paths]
            missing = [t for t in texts if not os.path.isfile(t)]
            if missing:
                raise FileNotFoundError(f"{len(missing)} images of {root!r} have no caption file, e.g. {missing[0]!r}: "
                                        "each image needs its caption in a same-named .txt beside it")
            self.captions = [read_utf8(t, "caption file").strip() for t in texts]
        elif os.path.isfile(root) and root.lower().endswith((".tsv", ".csv")):
            tsv = root.lower().endswith(".tsv")  # TSV has no quoting: a caption may hold a quote character
            rows = list(csv.reader(io.StringIO(read_utf8(root, "manifest")), delimiter="\t" if tsv else ",",
                                   quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL))
            header = rows[0] if rows else []
            image_col = next((header.index(k) for k in ("image", "filepath") if k in header), None)
            caption_col = next((header.index(k) for k in ("caption", "title") if k in header), None)
            if image_col is None or caption_col is None or len(rows) < 2:
                raise ValueError(f"manifest {root!r}: needs a header row naming an image column (image or filepath) "
                                 f"and a caption column (caption or title), then one row per image; header: {header}")
            short = next((i for i, row in enumerate(rows[1:], 2) if len(row) <= max(image_col, caption_col)), None)
            if short:
                raise ValueError(f"manifest {root!r}, line {short}: fewer columns than the header {header}")
            self.paths = [os.path.join(os.path.dirname(root), row[image_col]) for row in rows[1:]]
            self.captions = [row[caption_col].strip() for row in rows[1:]]
            missing = [p for p in self.paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"manifest {root!r}: {len(missing)} images are missing, e.g. {missing[0]!r}")
        else:
            raise FileNotFoundError(f"caption data {root!r} is neither a folder of images with same-named .txt "
                                    "captions nor a .tsv/.csv manifest")
        self.controls = control_paths(root, self.paths, controls) if controls else None  # then items are triples

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        item = to_tensor(center_crop_arr(load_image(self.paths[i]), self.resolution)), self.captions[i]
        if self.controls is None:
            return item
        return item + (to_tensor(center_crop_arr(load_image(self.controls[i]), self.resolution)),)


class CaptionPairs(torch.utils.data.Dataset):
    """(image or latent, caption tokens) from any dataset with `captions`; `tokenize` (captions -> LongTensor [n, L])
    runs in the loader's workers. `captions` is a copy of the dataset's."""

    def __init__(self, dataset, tokenize):
        self.dataset, self.tokenize, self.captions = dataset, tokenize, list(dataset.captions)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]  # (image, caption) or (image, caption, control)
        return (item[0], self.tokenize([self.captions[i]])[0], *item[2:])


# -----------------------------------------------------------------------------
# Cached latents


def shard_path(root, k):
    return os.path.join(root, f"shard_{k:05d}.npy")


def writer_tmp(path):
    """A temporary name beside path of this writer's own: two extractions into one folder never write one file."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:16]}.tmp"


def shard_offset(path, shape):
    """The byte offset of the data in a complete float32 shard of this shape, or None if missing or incomplete."""
    try:
        arr = np.load(path, mmap_mode="r")  # reads the header; a truncated file fails here
    except (OSError, ValueError):
        return None
    return arr.offset if (arr.shape, arr.dtype, arr.flags.c_contiguous) == (tuple(shape), np.float32, True) else None


class LatentDataset(torch.utils.data.Dataset):
    """Latents written by `python data.py` (extract_latents). Returns (latent [C, h, w] float32, label), or caption in
    a cache of ImageCaptions: the latent of the image or, with probability 0.5 where the cache has flips, of its
    horizontal flip, as ImageFolder flips pixels. Reads single latents straight from the shard files, so processes on
    one machine share the page cache."""

    def __init__(self, root):
        path = os.path.join(root, "meta.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"latents: {path!r} not found; write the cache: python data.py --out={root} ...")
        with open(path) as f:
            self.meta = json.load(f)
        # labels and captions move out of meta: train.py replaces self.labels with corrupted ones
        self.root, self.classes, self.captions = root, self.meta["classes"], self.meta.pop("captions")
        labels = self.meta.pop("labels")  # None in a cache of ImageCaptions
        self.labels = None if labels is None else np.array(labels, dtype=np.int64)
        self.resolution, self.shard_size = self.meta["image_size"], self.meta["shard_size"]
        self.views = 2 if self.meta["flip"] else 1
        self.offsets = []
        self.n = len(self.captions if labels is None else labels)
        for k in range(math.ceil(self.n / self.shard_size)):
            n = min(self.shard_size, self.n - k * self.shard_size)
            self.offsets.append(shard_offset(shard_path(root, k), [n, self.views, *self.meta["latent_shape"]]))
            if self.offsets[-1] is None:
                raise FileNotFoundError(f"latents: {shard_path(root, k)!r} is missing or incomplete; rerun the "
                                        f"extraction (python data.py --out={root} ...) to finish the cache")

    def __len__(self):
        return self.n

    def latent(self, i, flipped=False):
        k, j = divmod(i, self.shard_size)
        size = math.prod(self.meta["latent_shape"])
        x = np.fromfile(shard_path(self.root, k), dtype=np.float32, count=size,
                        offset=self.offsets[k] + (j * self.views + flipped) * size * 4)
        return torch.from_numpy(x).view(self.meta["latent_shape"])

    def __getitem__(self, i):
        condition = self.captions[i] if self.labels is None else int(self.labels[i])
        return self.latent(i, self.views == 2 and bool(torch.rand(()) < 0.5)), condition


@torch.no_grad()
def extract_latents(dataset, vae, vae_path, out, flip, shard_size, batch_size, num_workers, device, rank=0,
                    world_size=1):
    """Encode `dataset` (unflipped images) with `vae` (loaded from vae_path) into out/shard_XXXXX.npy, float32
    [n, 2, C, h, w]: the latent of each image and of its horizontal flip ([n, 1, C, h, w] with flip=False), and
    out/meta.json (labels, classes, captions, the VAE). Latents are the posterior mean times the VAE's scale (our
    choice; DiT's train.py draws a posterior sample): deterministic, so the cache equals encoding on the fly.
    Shard k is encoded by rank k % world_size. Files are written to a .tmp of their writer's own (writer_tmp) and
    renamed, and complete shards are skipped: a rerun, with any number of ranks, finishes an interrupted extraction."""
    n, C, h = len(dataset), vae.latent_channels, dataset.resolution // vae.factor
    meta = dict(image_size=dataset.resolution, latent_shape=[C, h, h], flip=flip, shard_size=shard_size,
                vae=os.path.abspath(vae_path), scale=vae.scale, classes=list(dataset.classes),
                labels=None if dataset.labels is None else dataset.labels.tolist(),
                captions=getattr(dataset, "captions", None))
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            diff = [k for k in meta if old.get(k) != meta[k]]
            raise ValueError(f"{out!r} holds a cache with other settings ({', '.join(diff)} differ); use a new --out")
    elif rank == 0:
        tmp = writer_tmp(meta_path)
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, meta_path)
    shards = range(rank, math.ceil(n / shard_size), world_size)
    sizes = {k: min(shard_size, n - k * shard_size) for k in shards}
    todo = [k for k in shards if shard_offset(shard_path(out, k), [sizes[k], 1 + flip, C, h, h]) is None]
    batches = [list(range(start, min(start + batch_size, k * shard_size + sizes[k])))
               for k in todo for start in range(k * shard_size, k * shard_size + sizes[k], batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         pin_memory=device.startswith("cuda"))
    progress = tqdm(total=sum(sizes[k] for k in todo), disable=rank != 0, unit="img",
                    desc=f"rank 0 of {world_size}: {len(todo)} of {len(shards)} shards to encode")
    pending, parts = iter(todo), []
    k = next(pending, None)
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        z = vae.encode(torch.cat([x, x.flip(3)]) if flip else x).cpu()
        parts.append(torch.stack(z.chunk(1 + flip), dim=1).numpy())
        progress.update(len(x))
        if sum(len(p) for p in parts) == sizes[k]:
            path = shard_path(out, k)
            tmp = writer_tmp(path)
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate(parts))
            os.replace(tmp, path)
            parts, k = [], next(pending, None)
    progress.close()
    return len(todo), len(shards)


# -----------------------------------------------------------------------------
# Distributed batches


class StepBatches(torch.utils.data.Sampler):
    """The indices of this rank's share of every global batch, from `start_step` up to `end_step` (None: forever).
    Epoch e is the permutation seeded by (seed, e): the order depends on the step alone, so a resume picks up the
    same batches."""

    def __init__(self, n, global_batch, rank, world_size, seed, start_step, end_step=None):
        self.n, self.global_batch, self.rank, self.seed, self.start_step = n, global_batch, rank, seed, start_step
        self.end_step = end_step
        self.local = global_batch // world_size
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {n} images, fewer than global_batch_size={global_batch}")

    def __iter__(self):
        step, epoch, perm = self.start_step, -1, None
        while self.end_step is None or step < self.end_step:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            start = (step % self.steps_per_epoch) * self.global_batch + self.rank * self.local
            yield perm[start:start + self.local].tolist()
            step += 1


if __name__ == "__main__":
    # latent pre-extraction: then train.py --latents=L trains on what train.py --vae=V encodes on the fly
    data_path = ""        # "": the built-in synthetic shapes; else an ImageNet-style folder root/<class>/<image>
    captions = False      # data_path is an image-caption set (ImageCaptions: images with .txt beside, or a manifest)
    image_size = 32       # ImageNet for DiT / LDM-4: 256
    synthetic_size = 20000
    seed = 0              # of the synthetic shapes
    vae = ""              # a folder with diffusers VAE weights and config.json, e.g. stabilityai/sd-vae-ft-ema's files
    out = ""              # the cache folder, for train.py --latents
    shard_size = 1024     # images per file: the unit of resuming
    batch_size = 64
    num_workers = 4
    from configurator import configure
    from vae import load_first_stage
    configure(globals(), sys.argv[1:])
    if not vae or not out:
        raise ValueError("--vae and --out are required: python data.py --vae=VAE_FOLDER --out=CACHE [--data_path=...]")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    first_stage = load_first_stage(vae).to(device).eval()
    if image_size % first_stage.factor:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling {first_stage.factor}")
    # captioned images are not flipped (captions say left and right); class folders are, as ImageFolder does
    if captions:
        dataset = ImageCaptions(data_path, image_size)
    elif data_path:
        dataset = ImageFolder(data_path, image_size, flip=False)
    else:
        dataset = SyntheticShapes(synthetic_size, image_size, seed)
    flip = bool(data_path) and not captions
    written, total = extract_latents(dataset, first_stage, vae, out, flip, shard_size, batch_size, num_workers, device,
                                     rank, world_size)
    print(f"rank {rank}: encoded {written} shards, {total - written} were already complete; cache: {out}")
