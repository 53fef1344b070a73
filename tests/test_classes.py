"""config/classes/: the IN-1K/CIFAR-100 overlap and CMC's ImageNet-100 parse, and corrupt.py reads them as subsets."""
import os
import re

import numpy as np
import pytest
from conftest import ROOT

import corrupt

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
