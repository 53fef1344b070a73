"""corrupt.py: symmetric / asymmetric labels, swapped / rewritten captions, random mode, and in training; the class
lists of config/classes/ as subsets."""
import json
import os
import re

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import scipy.special
import scipy.stats
import torch
from conftest import ROOT, make_caption_folder, make_folder, train

import corrupt
import data


def test_symmetric_corruption_is_exact_and_never_keeps_the_label():
    labels = np.random.default_rng(0).integers(0, 7, 1000)
    for eta in (0.0, 0.025, 0.05, 0.2, 0.999):
        new, record = corrupt.corrupt_labels(labels, eta, seed=1)
        changed = np.flatnonzero(new != labels)
        assert len(changed) == round(eta * 1000) and changed.tolist() == record["indices"]
        assert record["original"] == labels[changed].tolist() and record["new"] == new[changed].tolist()


def test_new_labels_follow_the_class_prior():
    prior = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    labels = np.random.default_rng(0).choice(5, size=200_000, p=prior)
    new, record = corrupt.corrupt_labels(labels, 0.2, seed=0)
    counts = np.bincount(labels, minlength=5).astype(float)
    for y in range(5):  # from class y, the new label follows the prior without y
        moved = np.array(record["new"])[np.array(record["original"]) == y]
        expected = counts.copy()
        expected[y] = 0
        expected *= len(moved) / expected.sum()
        observed = np.bincount(moved, minlength=5)
        assert observed[y] == 0
        keep = expected > 0
        assert scipy.stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3


def test_asymmetric_corruption_stays_in_the_subset():
    labels = np.arange(1000) % 10
    new, record = corrupt.corrupt_labels(labels, 0.1, seed=0, subset=[1, 4, 7])
    assert len(record["indices"]) == 100
    assert set(record["original"]) <= {1, 4, 7} and set(record["new"]) <= {1, 4, 7}
    assert all(o != n for o, n in zip(record["original"], record["new"]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        corrupt.corrupt_labels(labels, 0.1, seed=0, subset=[3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        corrupt.corrupt_labels(labels, 0.1, seed=0, subset=[])
    with pytest.raises(ValueError, match="eligible"):
        corrupt.corrupt_labels(labels, 0.5, seed=0, subset=[1, 4])


@pytest.mark.parametrize("eta", [-0.1, 1.0, 1.5])
def test_eta_outside_unit_interval_is_an_error(eta):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        corrupt.corrupt_labels(np.arange(10), eta, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        corrupt.swap_captions([str(i) for i in range(10)], eta, seed=0)


def test_corruption_record_depends_on_the_seed_only():
    labels = np.arange(5000) % 10
    a, b, c = (corrupt.corrupt_labels(labels, 0.05, seed=s)[1] for s in (3, 3, 4))
    assert a == b and a != c


def test_random_mode_flips_at_rate_eta():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (200_000,))
    new = corrupt.corrupt_batch(labels, 0.075, torch.ones(10))
    assert (new != labels).float().mean().item() == pytest.approx(0.075, abs=0.003)
    again = corrupt.corrupt_batch(labels, 0.075, torch.ones(10))
    assert not torch.equal(new, again)  # a fresh draw every call


def test_caption_swap_and_rewrite_counts():
    captions = [f"caption {i % 50}" for i in range(1000)]  # duplicates: swapping two equal ones would not count
    for eta in (0.05, 0.073, 0.2):
        new, record = corrupt.swap_captions(captions, eta, seed=0)
        wrong = [i for i in range(1000) if new[i] != captions[i]]
        assert len(wrong) == round(eta * 1000) and wrong == record["indices"]
        assert sorted(new) == sorted(captions)  # a permutation of the captions: nothing invented
    rewrites = {i: f"rewritten {i}" for i in range(0, 1000, 3)}
    new, record = corrupt.rewrite_captions(captions, 0.1, seed=0, rewrites=rewrites)
    assert sum(a != b for a, b in zip(new, captions)) == 100
    assert all(new[i] == rewrites[i] for i in record["indices"])
    with pytest.raises(ValueError, match="rewrites"):
        corrupt.rewrite_captions(captions, 0.5, seed=0, rewrites=rewrites)


@pytest.mark.slow
def test_asymmetric_corruption_in_training_reads_a_subset_file(tmp_path):
    (tmp_path / "subset.txt").write_text("circle\nstar 1\n")  # class names (folder names) or indices
    train(tmp_path / "run", "--corrupt=0.1", "--corrupt_type=asym", f"--corrupt_subset={tmp_path}/subset.txt",
          "--max_steps=1")
    record = json.loads((tmp_path / "run" / "corruption.json").read_text())
    subset = {data.SyntheticShapes.classes.index(n) for n in ("circle", "star")} | {1}
    assert set(record["subset"]) == subset
    assert len(record["indices"]) == round(0.1 * 64) and set(record["original"]) | set(record["new"]) <= subset
    result = train(tmp_path / "bad", "--corrupt=0.1", "--corrupt_type=asym", "--corrupt_subset=circle,blob",
                   check=False)
    assert result.returncode != 0 and "'blob' is neither a class index nor a class name" in result.stderr


@pytest.mark.slow
def test_the_audit_record_of_a_class_folder_names_the_files_whose_labels_changed(tmp_path):
    make_folder(tmp_path / "images", sizes=[(20, 16)] * 5)
    (tmp_path / "subset.txt").write_text("# the classes that may change\nn01  # one\nn02\n")
    train(tmp_path / "run", f"--data_path={tmp_path}/images", "--corrupt=0.4", "--corrupt_type=asym",
          f"--corrupt_subset={tmp_path}/subset.txt", "--max_steps=1", "--grid_steps=2")
    record = json.loads((tmp_path / "run" / "corruption.json").read_text())
    paths = data.ImageFolder(str(tmp_path / "images"), 16).paths
    assert len(record["files"]) == 4 and record["files"] == [paths[i] for i in record["indices"]]
    assert all(f"/{['n01', 'n02'][old]}/" in path for path, old in zip(record["files"], record["original"]))


@pytest.mark.slow
def test_caption_swap_and_rewrite_are_exact_in_training(tmp_path):
    captions = [f"caption {i}, ä" for i in range(30)]
    make_caption_folder(tmp_path / "folder", captions)
    args = [f"--data_path={tmp_path / 'folder'}", "--model=LDM-S", "--text_encoder=small", "--max_steps=1",
            "--grid_steps=2", "--image_size=8"]
    train(tmp_path / "swap", *args, "--corrupt=0.1", "--corrupt_type=swap")
    record = json.loads((tmp_path / "swap" / "corruption.json").read_text(encoding="utf-8"))
    assert len(record["indices"]) == round(0.1 * 30) == 3  # odd: one 3-cycle
    assert record["original"] == [captions[i] for i in record["indices"]]
    assert all(o != n for o, n in zip(record["original"], record["new"])) and sorted(record["new"]) == sorted(record["original"])
    _, direct = corrupt.swap_captions(captions, 0.1, seed=0)
    assert record["indices"] == direct["indices"] and record["new"] == direct["new"]
    state = torch.load(tmp_path / "swap" / "ckpt.pt", weights_only=True)
    assert state["corruption"]["count"] == 3 and state["corruption"]["type"] == "swap"
    assert "text encoder: small, trained" in (tmp_path / "swap" / "log.txt").read_text()
    (tmp_path / "rewrites.json").write_text(json.dumps({str(i): f"rewritten {i}" for i in range(0, 30, 2)}))
    train(tmp_path / "rewrite", *args, "--corrupt=0.2", "--corrupt_type=rewrite",
          f"--corrupt_rewrites={tmp_path / 'rewrites.json'}")
    record = json.loads((tmp_path / "rewrite" / "corruption.json").read_text(encoding="utf-8"))
    assert len(record["indices"]) == 6 and record["new"] == [f"rewritten {i}" for i in record["indices"]]


CLASSES = os.path.join(ROOT, "config", "classes")
OVERLAP, IN100 = os.path.join(CLASSES, "in1k_cifar100_overlap.txt"), os.path.join(CLASSES, "imagenet100_cmc.txt")


def entries(path):
    """(wnid, IN-1K index) per line; '#' starts a comment, and each line's comment begins with the index."""
    rows = []
    with open(path) as f:
        for line in f:
            body, _, comment = line.partition("#")
            if body.strip():
                rows.append((body.strip(), int(comment.split()[0])))
    return rows


def in1k_stand_in():
    """IN-1K's class folder names as far as the two files know them (by the indices they give), the rest made up."""
    classes = [f"x{i}" for i in range(1000)]
    for wnid, index in entries(OVERLAP) + entries(IN100):
        classes[index] = wnid
    return classes


@pytest.mark.parametrize("path, count", [(OVERLAP, 159), (IN100, 100)])
def test_class_lists_hold_unique_wordnet_ids(path, count):
    rows = entries(path)
    wnids, indices = zip(*rows)
    assert len(rows) == count and len(set(wnids)) == count and len(set(indices)) == count
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids) and all(0 <= i < 1000 for i in indices)
    with open(path) as f:
        assert f.readline().startswith("# ")  # the header says what the list is and how it was made


def test_the_two_lists_agree_on_class_indices():
    """IN-1K's index of a class is its wnid's rank among the 1000 sorted wnids: both files must say the same."""
    overlap, in100 = dict(entries(OVERLAP)), dict(entries(IN100))
    shared = overlap.keys() & in100.keys()
    assert len(shared) >= 10 and all(overlap[w] == in100[w] for w in shared)
    both = sorted({**overlap, **in100}.items())
    assert [i for _, i in both] == sorted(i for _, i in both)  # sorted wnids, increasing indices


def test_overlap_is_in_class_index_order_and_names_its_cifar_classes():
    with open(OVERLAP) as f:
        lines = [line for line in f if not line.startswith("#")]
    assert all("<- " in line for line in lines)
    assert [w for w, _ in entries(OVERLAP)] == sorted(w for w, _ in entries(OVERLAP))


@pytest.mark.parametrize("path", [OVERLAP, IN100])
def test_read_subset_reads_the_files_as_they_are(path):
    assert corrupt.read_subset(path, in1k_stand_in()) == [i for _, i in entries(path)]


def test_asymmetric_corruption_stays_within_the_overlap():
    subset = [i for _, i in entries(OVERLAP)]
    labels = np.arange(20_000) % 1000
    new, record = corrupt.corrupt_labels(labels, 0.05, seed=0, subset=subset)
    changed = np.flatnonzero(new != labels)
    assert len(changed) == 1000 and set(record["original"]) <= set(subset) and set(record["new"]) <= set(subset)
