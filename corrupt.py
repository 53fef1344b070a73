"""
Corruption of the conditions of a pre-training set (Chen et al. 2024, "Slight corruption in pre-training data
makes better diffusion models"). eta is the fraction of the whole dataset whose condition ends up wrong.

`corrupt_conditions` is the entry point. Fixed mode (the paper's): decided once, from the seed alone, before
training, so every rank and every resume agrees whatever the world size. Random mode (paper App. E.4):
`corrupt_batch` flips each label of a batch with probability eta, afresh at every step.

Imports nothing from the project: copy this file into another project as it is.
"""
import hashlib
import json
import os

import numpy as np
import torch


def _count(eta, n):
    if not 0 <= eta < 1:
        raise ValueError(f"corruption ratio eta={eta} must be in [0, 1)")
    return round(eta * n)


def corrupt_labels(labels, eta, seed, subset=None):
    """Give exactly round(eta*N) samples a wrong label, drawn from the empirical class prior with the true label
    excluded. Symmetric over all classes by default; with `subset` (class indices), asymmetric: only samples of
    those classes are picked, and each moves to another class of the subset."""
    labels = np.asarray(labels, dtype=np.int64)
    prior = np.bincount(labels).astype(np.float64)
    if subset is not None:
        subset = np.unique(np.asarray(subset, dtype=np.int64))
        if len(subset) < 2:
            raise ValueError(f"the asymmetric subset must hold at least 2 classes, got {subset.tolist()}")
        allowed = np.zeros_like(prior)
        allowed[subset[subset < len(prior)]] = 1
        prior *= allowed
    eligible = np.flatnonzero(prior[labels] > 0)
    k = _count(eta, len(labels))
    if k > len(eligible):
        raise ValueError(f"eta={eta} asks for {k} corrupted labels but only {len(eligible)} samples are eligible")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(eligible, size=k, replace=False))
    new = labels.copy()
    for y in np.unique(labels[indices]):  # one draw per true class, from the prior without that class
        picked = indices[labels[indices] == y]
        p = prior.copy()
        p[y] = 0
        if p.sum() == 0:
            raise ValueError(f"class {y} has no other class with samples to move to")
        new[picked] = rng.choice(len(p), size=len(picked), p=p / p.sum())
    return new, dict(indices=indices.tolist(), original=labels[indices].tolist(), new=new[indices].tolist())


def corrupt_batch(labels, eta, prior):
    """Random mode: each label is replaced, with probability eta, by a draw from `prior` (a tensor of class
    frequencies) without its true class. Uses the global torch RNG, which train.py seeds at every step."""
    flip = torch.rand(labels.shape, device=labels.device) < eta
    p = prior.expand(len(labels), -1).scatter(1, labels[:, None], 0)
    return torch.where(flip, torch.multinomial(p, 1).squeeze(1), labels)


def swap_captions(captions, eta, seed):
    """Exchange captions between random pairs until exactly round(eta*N) captions are wrong. A pair with identical
    captions is skipped (the swap would change nothing); an odd count is reached with one 3-cycle."""
    captions = list(captions)
    k = _count(eta, len(captions))
    order = np.random.default_rng(seed).permutation(len(captions)).tolist()
    new, indices = list(captions), []
    if k % 2:
        a, b, c = order[:3]
        if len({captions[a], captions[b], captions[c]}) < 3:
            raise ValueError("an odd number of wrong captions needs three distinct captions to rotate")
        new[a], new[b], new[c] = captions[c], captions[a], captions[b]
        indices, order = [a, b, c], order[3:]
    for a, b in zip(order[0::2], order[1::2]):
        if len(indices) >= k:
            break
        if captions[a] != captions[b]:
            new[a], new[b] = captions[b], captions[a]
            indices += [a, b]
    if len(indices) < k:
        raise ValueError(f"only {len(indices)} of {k} captions could be swapped: too few distinct captions")
    indices.sort()
    return new, dict(indices=indices, original=[captions[i] for i in indices], new=[new[i] for i in indices])


def rewrite_captions(captions, eta, seed, rewrites):
    """Replace exactly round(eta*N) captions by the user's rewritten ones (`rewrites`: index -> caption, e.g. from
    an LLM as in the paper), chosen at random among the indices that have a rewrite differing from the original."""
    captions = list(captions)
    k = _count(eta, len(captions))
    eligible = sorted(i for i, c in rewrites.items() if 0 <= i < len(captions) and c != captions[i])
    if k > len(eligible):
        raise ValueError(f"eta={eta} asks for {k} rewritten captions but only {len(eligible)} rewrites differ from "
                         "the originals")
    indices = np.sort(np.random.default_rng(seed).choice(eligible, size=k, replace=False)).tolist()
    new = list(captions)
    for i in indices:
        new[i] = rewrites[i]
    return new, dict(indices=indices, original=[captions[i] for i in indices], new=[new[i] for i in indices])


def read_subset(spec, classes):
    """Class indices from '1,5,9' or from a file of indices or class names (comma or whitespace separated; a # starts
    a comment that runs to the end of its line)."""
    if os.path.isfile(spec):
        with open(spec) as f:
            spec = " ".join(line.split("#")[0] for line in f)
    index = {name: i for i, name in enumerate(classes)}
    try:
        return [int(n) if n.lstrip("-").isdigit() else index[n] for n in spec.replace(",", " ").split()]
    except KeyError as e:
        raise ValueError(f"corrupt_subset: {e.args[0]!r} is neither a class index nor a class name") from None


def read_rewrites(path):
    """The user's rewritten captions (e.g. by an LLM, as in the paper): a JSON file {"index": "caption", ...}."""
    with open(path, encoding="utf-8") as f:
        rewrites = json.load(f)
    try:
        return {int(k): str(v) for k, v in rewrites.items()}
    except (AttributeError, ValueError):
        raise ValueError(f"corrupt_rewrites {path!r} must be a JSON object {{\"index\": \"rewritten caption\", ...}}") \
            from None


def check_corruption(eta, kind, mode):
    _count(eta, 0)
    if kind not in ("sym", "asym", "swap", "rewrite") or mode not in ("fixed", "random"):
        raise ValueError(f"corruption type {kind!r} / mode {mode!r}: the types are sym, asym (class labels), swap, "
                         "rewrite (captions); the modes fixed and random")
    if mode == "random" and kind != "sym":
        raise ValueError("random mode flips labels symmetrically: use it with type sym")


def corrupt_conditions(conditions, eta, kind="sym", mode="fixed", seed=0, subset="", rewrites="", classes=()):
    """Class labels (kind sym, or asym within `subset`, see read_subset) or captions (swap, or rewrite from the JSON
    file `rewrites`) -> (training conditions, summary, record). The summary (eta, type, mode, count, a digest of the
    changes) goes into a checkpoint; the record adds each changed index, old and new condition, for the audit file."""
    check_corruption(eta, kind, mode)
    summary = dict(eta=eta, type=kind, mode=mode, count=0)
    if eta == 0 or mode == "random":
        return conditions, summary, None
    if kind == "swap":
        new, record = swap_captions(conditions, eta, seed)
    elif kind == "rewrite":
        new, record = rewrite_captions(conditions, eta, seed, read_rewrites(rewrites))
    else:
        summary["subset"] = read_subset(subset, classes) if kind == "asym" else None
        new, record = corrupt_labels(conditions, eta, seed, summary["subset"])
    changes = json.dumps([record["indices"], record["new"]]).encode()
    summary.update(count=len(record["indices"]), digest=hashlib.sha256(changes).hexdigest()[:16])
    return new, summary, dict(summary, **record)
