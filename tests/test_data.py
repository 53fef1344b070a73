"""data.py: built-in shapes, class folders, bad images, image modes, caption sets, control folders, the batch
sampler."""
import multiprocessing
import os
import re

import numpy as np
import pytest
import torch
from conftest import make_caption_folder, make_controls, make_folder, train
from PIL import Image

import data
import evaluate


def test_synthetic_dataset_is_deterministic_and_varied():
    a, b = data.SyntheticShapes(50, 32, seed=3), data.SyntheticShapes(50, 32, seed=3)
    images = a.images_uint8()
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, b.images_uint8()) and a.captions == b.captions
    assert not np.array_equal(images, data.SyntheticShapes(50, 32, seed=4).images_uint8())
    assert len(a.classes) >= 10 and set(a.labels.tolist()) == set(range(10))
    same_class = images[a.labels == 0]
    assert len({im.tobytes() for im in same_class}) == len(same_class)  # variety within a class
    angles = np.degrees([p["angle"] for p in a.params])  # rotated, upright within 15 degrees
    assert np.abs(angles).max() <= 15 and angles.std() > 5
    x, y = a[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and y == a.labels[0]
    assert a.classes[a.labels[7]] in a.captions[7] and a.params[7]["fg"] in a.captions[7]
    assert data.SyntheticShapes(4, 64, seed=0).images_uint8().shape == (4, 64, 64, 3)  # any resolution


def test_synthetic_classes_are_visible():
    """The class shows in the image: 5-NN on four rotation- and position-invariant shape moments of the foreground
    mask recognises the class of held-out images."""
    ds = data.SyntheticShapes(600, 32, seed=0)
    def moments(im):
        mask = np.abs(im.astype(np.float32) - im[0, 0]).sum(-1) > 60  # a corner pixel shows the background
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
        mu20, mu02, mu11 = ((xs - cx) ** 2).mean(), ((ys - cy) ** 2).mean(), ((xs - cx) * (ys - cy)).mean()
        radius = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max() + 0.5
        return [(mu20 + mu02) / len(xs), ((mu20 - mu02) ** 2 + 4 * mu11 ** 2) / (mu20 + mu02) ** 2,
                mask[int(round(cy)), int(round(cx))], len(xs) / radius ** 2]
    f = np.array([moments(im) for im in ds.images_uint8()])
    f = (f - f.mean(0)) / f.std(0)
    nearest = np.argsort(((f[400:, None] - f[None, :400]) ** 2).sum(-1), axis=1)[:, :5]
    votes = np.array([np.bincount(ds.labels[:400][row], minlength=10).argmax() for row in nearest])
    assert (votes == ds.labels[400:]).mean() > 0.8


def test_image_folder_classes_crop_and_flip(tmp_path):
    make_folder(tmp_path)
    ds = data.ImageFolder(str(tmp_path), 16)
    assert ds.classes == ["n01", "n02"] and ds.labels.tolist() == [0, 0, 1, 1]
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0
    # the ADM centre crop: short side to 16, then the centre
    im = Image.new("RGB", (40, 20))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    crop = data.center_crop_arr(im, 10)
    assert crop.shape == (10, 10, 3) and crop[:, :5, 0].mean() > 200 and crop[:, 5:, 0].mean() < 50
    # horizontal flip: about half the time
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3))).save(tmp_path / "n01" / "0.jpg")
    firsts = [data.ImageFolder(str(tmp_path), 16)[0][0][0, 0, 0].item() < 0 for _ in range(40)]
    assert 5 < sum(firsts) < 35


def test_bad_image_files_are_named_or_skipped_and_counted(tmp_path):
    make_folder(tmp_path)
    good = (tmp_path / "n01" / "0.jpg").read_bytes()
    (tmp_path / "n01" / "0.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (tmp_path / "n02" / "0.jpg").write_bytes(b"")  # empty
    (tmp_path / "n02" / "1.png").write_bytes(b"not an image at all")
    ds = data.ImageFolder(str(tmp_path), 16)
    for i, path in [(0, "n01/0.jpg"), (2, "n02/0.jpg"), (3, "n02/1.png")]:
        with pytest.raises(RuntimeError, match=re.escape(str(tmp_path / path)) + ".*skip_bad_images=True"):
            ds[i]
    skipping = data.ImageFolder(str(tmp_path), 16, flip=False, skipped=multiprocessing.Value("q", 0))
    x, y = skipping[2]  # 2, 3 and (wrapping round) 0 cannot be read: 1 stands in, with its label
    assert torch.equal(x, skipping[1][0]) and y == 0 and skipping.skipped.value == 3


@pytest.mark.slow
def test_skipped_images_are_counted_in_the_log_across_loader_workers(tmp_path):
    make_folder(tmp_path / "images", sizes=[(20, 20)] * 8)
    for bad in ("n01/3.png", "n02/5.png"):
        (tmp_path / "images" / bad).write_bytes(b"")
    result = train(tmp_path / "run", f"--data_path={tmp_path}/images", "--skip_bad_images", "--num_workers=1",
                   "--max_steps=2")  # an epoch of 16 images: each bad one read once, or twice when prefetched
    last = (tmp_path / "run" / "log.txt").read_text().splitlines()[-2]
    assert last.startswith("step 2 |") and re.search(r"\| [234] unreadable images skipped$", last), last
    assert all(f"skipped: cannot read image {tmp_path}/images/{bad}" in result.stderr for bad in ("n01/3.png", "n02/5.png"))


@pytest.mark.slow
def test_a_bad_image_read_in_a_loader_worker_ends_the_run_in_one_line(tmp_path):
    make_folder(tmp_path / "images", sizes=[(20, 20)] * 8)
    (tmp_path / "images" / "n02" / "5.png").write_bytes(b"")
    result = train(tmp_path / "run", f"--data_path={tmp_path}/images", "--num_workers=1", "--max_steps=2", check=False)
    last = result.stderr.splitlines()[-1]  # under the progress bar, not buried in the worker's traceback
    assert result.returncode == 1 and "Traceback" not in result.stderr and \
        last.startswith(f"error: cannot read image {tmp_path}/images/n02/5.png: ") and \
        last.endswith("Remove or replace this file. Or train on without it: skip_bad_images=True. (DEBUG=1 shows the "
                      "traceback)")


def test_control_folder_pairs_each_image_with_its_control_cropped_and_flipped_with_it(tmp_path):
    make_folder(tmp_path / "images", sizes=[(24, 20), (20, 20)])
    Image.fromarray(np.tile(np.arange(24, dtype=np.uint8)[None, :, None] * 10, (20, 1, 3))).save(
        tmp_path / "images" / "n01" / "0.jpg", quality=100)  # a ramp: a flip shows
    make_controls(tmp_path / "images", tmp_path / "controls")
    ds = data.ImageFolder(str(tmp_path / "images"), 16, controls=str(tmp_path / "controls"))
    flips = 0
    for _ in range(20):
        x, y, c = ds[0]
        assert y == 0 and c.shape == x.shape == (3, 16, 16)
        assert (x + c).abs().max() < 0.1  # the inverted image, cropped and flipped as the image was
        flips += x[0, 0, 0] > 0
    assert 2 < flips < 18
    shapes = data.SyntheticShapes(4, 16, 0, masks=True)
    x, y, mask = shapes[0]
    assert torch.equal(x, shapes.__class__(4, 16, 0)[0][0]) and set(mask.unique().tolist()) >= {-1.0, 1.0}
    inside = mask[0] > 0.9  # the shape's pixels have the shape's colour, the background's the background's
    assert x[:, inside].std(dim=1).max() < 0.1 and x[:, mask[0] < -0.9].std(dim=1).max() < 0.1
    small = data.SyntheticShapes(4, 16, 0, masks=True, scale=0.6)  # the downstream task: the same draws, smaller
    assert small.labels.tolist() == shapes.labels.tolist() and (small[0][2] > 0).sum() < 0.6 * (mask > 0).sum()


def test_control_folder_errors_name_the_image_before_any_work(tmp_path):
    make_folder(tmp_path / "images")
    make_controls(tmp_path / "images", tmp_path / "controls")
    os.remove(tmp_path / "controls" / "n02" / "1.png")
    with pytest.raises(FileNotFoundError, match=re.escape(f"image '{tmp_path}/images/n02/1.png' has no control image: "
                                                          f"expected {tmp_path}/controls/n02/1.png")):
        data.ImageFolder(str(tmp_path / "images"), 16, controls=str(tmp_path / "controls"))
    make_controls(tmp_path / "images", tmp_path / "small", resize=(32, 32))
    with pytest.raises(ValueError, match=re.escape("small/n01/0.png' is 32x32 but its image") + ".*is 40x30"):
        data.ImageFolder(str(tmp_path / "images"), 16, controls=str(tmp_path / "small"))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.ImageFolder(str(tmp_path / "nope"), 16)
    os.makedirs(tmp_path / "empty_class")
    with pytest.raises(FileNotFoundError, match="empty_class"):
        data.ImageFolder(str(tmp_path), 16)


def test_16_and_32_bit_palette_alpha_and_cmyk_images_read_as_8_bit_rgb(tmp_path):
    """Real files of each mode, through ImageFolder and evaluate.py's folder reader: PIL's convert("RGB") would make
    16-bit mid grey white (it clips at 255); integers are scaled from their full range, floats from [0, 1]."""
    rows = lambda values, dtype: Image.fromarray(np.array([values] * 4, dtype))  # 4x4, every row the same
    grey = {"i16.png": (rows([0, 32768, 65535, 25700], np.uint16), [0, 128, 255, 100]),
            "i32.tif": (rows([0, 2 ** 31 - 1, -5, 2 ** 30], np.int32), [0, 255, 0, 128]),
            "f32.tif": (rows([0, 0.5, 1, 2], np.float32), [0, 128, 255, 255])}
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0, 1, 2, 3])
    palette.putdata([0, 1, 2, 3] * 4)
    palette.info["transparency"] = 2  # a transparent entry: its colour, alpha dropped
    colour = {"p.png": (palette, [(10, 20, 30), (200, 100, 50), (0, 255, 0), (1, 2, 3)]),
              "la.png": (Image.new("LA", (4, 4), (100, 0)), [(100, 100, 100)] * 4),
              "rgba.png": (Image.new("RGBA", (4, 4), (1, 2, 3, 0)), [(1, 2, 3)] * 4),
              "cmyk.tif": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), [(255, 0, 0)] * 4)}
    expected = {**{k: [(v, v, v) for v in values] for k, (_, values) in grey.items()},
                **{k: values for k, (_, values) in colour.items()}}
    os.makedirs(tmp_path / "set" / "c")
    for name, (image, _) in {**grey, **colour}.items():
        image.save(tmp_path / "set" / "c" / name)
        with Image.open(tmp_path / "set" / "c" / name) as reread:
            assert reread.mode == image.mode, name  # the file holds the mode under test
    assert Image.open(tmp_path / "set" / "c" / "i16.png").mode == "I;16"
    ds = data.ImageFolder(str(tmp_path / "set"), 4, flip=False)
    images = evaluate.open_images(str(tmp_path / "set"))
    read = np.concatenate(list(images.batches(8)))  # the files in sorted order, as ImageFolder lists them
    for i, path in enumerate(ds.paths):
        want = np.array(expected[os.path.basename(path)], np.uint8)
        np.testing.assert_array_equal(np.asarray(data.load_image(path))[0], want, err_msg=path)
        np.testing.assert_array_equal(read[i][0], want, err_msg=path)
        np.testing.assert_allclose(((ds[i][0][:, 0] + 1) * 127.5).T.numpy(), want, atol=1e-4, err_msg=path)


def test_caption_folder_and_manifests_read_non_ascii_and_fail_clearly(tmp_path):
    captions = ["un café crème — 日本語の猫 🙂", "a red circle", 'he said "hi", twice', "Zürich, naïve"]
    make_caption_folder(tmp_path / "folder", captions)
    ds = data.ImageCaptions(str(tmp_path / "folder"), 8)
    assert ds.captions == captions and len(ds) == 4 and ds.labels is None
    x, caption = ds[0]
    assert x.shape == (3, 8, 8) and -1 <= x.min() and x.max() <= 1 and caption == captions[0]
    files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "folder").rglob("*.[jp][pn]g"))
    (tmp_path / "m.tsv").write_text("caption\timage\n" + "".join(f"{c}\t{f}\n" for c, f in zip(captions, files)),
                                    encoding="utf-8")
    with open(tmp_path / "m.csv", "w", encoding="utf-8", newline="") as f:  # open_clip's column names
        csv_writer = __import__("csv").writer(f)
        csv_writer.writerows([["filepath", "title"]] + [[p, c] for p, c in zip(files, captions)])
    for manifest in ("m.tsv", "m.csv"):
        ds = data.ImageCaptions(str(tmp_path / manifest), 8)
        assert ds.captions == captions and torch.equal(ds[3][0], data.ImageCaptions(str(tmp_path / "folder"), 8)[3][0])
    # a missing caption file, a caption file that is not UTF-8, a manifest row whose image is missing
    missing = tmp_path / "folder" / "00000" / "000000002.txt"
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.ImageCaptions(str(tmp_path / "folder"), 8)
    missing.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{missing}.*not UTF-8"):
        data.ImageCaptions(str(tmp_path / "folder"), 8)
    (tmp_path / "bad.tsv").write_text("image\tcaption\nnope.png\ta cat\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        data.ImageCaptions(str(tmp_path / "bad.tsv"), 8)
    (tmp_path / "bad.csv").write_text("path,text\nx.png,a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match="caption column"):
        data.ImageCaptions(str(tmp_path / "bad.csv"), 8)


def test_step_batches_split_ranks_and_resume():
    ranks = [list(zip(range(24), data.StepBatches(100, 8, r, 2, seed=0, start_step=0))) for r in (0, 1)]
    epoch = [i for r in ranks for step, batch in r if step < 12 for i in batch]
    assert all(len(b) == 4 for r in ranks for _, b in r)
    assert len(epoch) == len(set(epoch)) == 96  # the ranks see different data, and no image twice in an epoch
    assert ranks[0][12][1] != ranks[0][0][1]  # a new permutation each epoch
    resumed = next(iter(data.StepBatches(100, 8, 1, 2, seed=0, start_step=17)))
    assert resumed == ranks[1][17][1]
