"""Stratified, seed-deterministic train/val/test assignment and the order of samples inside each split.

Both depend only on (id, label, seed) of the *whole* table, never on which process or job-array slice packs a
row, so N slices merged give exactly the splits of one run. Per label, ids are ranked by a keyed hash and the
first ``round(n * fraction)`` (largest-remainder rounding, so counts always add up to n) go to the first split,
and so on. Inside a split, samples are ordered by another keyed hash: shards are label-mixed even when the
input table is sorted by category, and adding rows later does not reshuffle the existing ones' relative order.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

from mmcat.errors import ConfigError
from mmcat.hashing import stable_hash, stable_hashes


def parse_splits(spec: str) -> Dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> {"train": 0.8, ...} (validated)."""
    out: Dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--splits: '{part}' is not name=fraction") from None
    return check_splits(out)


def check_splits(splits: Mapping[str, float]) -> Dict[str, float]:
    splits = {str(k): float(v) for k, v in splits.items()}
    if not splits:
        raise ConfigError("config key 'splits': no splits given")
    for name, frac in splits.items():
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"config key 'splits': split name '{name}' must be letters, digits, '-' or '_'")
        if not 0.0 <= frac <= 1.0 or math.isnan(frac):
            raise ConfigError(f"config key 'splits.{name}': fraction {frac} is not within [0, 1]")
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"config key 'splits': fractions sum to {total:g}, not 1")
    return splits


def allocate(n: int, fractions: Sequence[float]) -> List[int]:
    """Split n into integer counts proportional to fractions (largest remainder; ties go to the earlier split)."""
    exact = [n * f for f in fractions]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_splits(items: Sequence[Tuple[str, str]], splits: Mapping[str, float], seed: int) -> Dict[str, List[str]]:
    """items = (id, label) pairs with unique ids -> {split: [ids in packing order]}."""
    by_label: Dict[str, List[str]] = {}
    for id_, label in items:
        by_label.setdefault(label, []).append(id_)
    names = list(splits)
    out: Dict[str, List[str]] = {name: [] for name in names}
    for label in sorted(by_label):
        ids = sorted(by_label[label], key=lambda i: (stable_hash(seed, "split", i), i))
        start = 0
        for name, count in zip(names, allocate(len(ids), [splits[n] for n in names])):
            out[name].extend(ids[start:start + count])
            start += count
    for name in names:
        out[name].sort(key=lambda i: (stable_hash(seed, "order", i), i))
    return out


def hash_ids(ids: Sequence[str], seed: int, purpose: str):
    """``stable_hash(seed, purpose, id)`` of every id, as a numpy uint64 array."""
    return stable_hashes(ids, seed, purpose)


def _ties_by_id(rows, hashes, id_of: Callable[[int], str], groups=None):
    """``rows`` sorted by hash (within ``groups``): reorder the runs of equal hashes by id, as the (hash, id) sort
    key of :func:`assign_splits` does. Such runs need two ids with the same 64-bit hash: they are checked, not
    expected."""
    import numpy as np

    h = hashes[rows]
    same = h[1:] == h[:-1]
    if groups is not None:
        same &= groups[1:] == groups[:-1]
    for start in np.flatnonzero(same & ~np.concatenate([[False], same[:-1]])):
        end = start + 1
        while end < len(same) and same[end]:
            end += 1
        rows[start:end + 1] = sorted(rows[start:end + 1].tolist(), key=id_of)
    return rows


def assign_split_rows(rows, label_codes, split_hash, order_hash, id_of: Callable[[int], str],
                      splits: Mapping[str, float]) -> Dict[str, "object"]:
    """:func:`assign_splits` on columns: ``rows`` (numpy int64 row numbers with unique ids), ``label_codes`` (one
    per row, equal for equal labels), ``split_hash``/``order_hash`` (:func:`hash_ids`, indexed by row number) ->
    {split: numpy array of row numbers in packing order}. The same assignment and order as :func:`assign_splits`
    for the rows' (id, label) pairs, without a Python object per row."""
    import numpy as np

    names = list(splits)
    by_label = np.lexsort((split_hash[rows], label_codes))  # per label, by split hash
    ordered = _ties_by_id(rows[by_label], split_hash, id_of, groups=label_codes[by_label])
    codes = label_codes[by_label]
    which = np.empty(len(ordered), np.int64)  # split number of each row of `ordered`
    bounds = np.flatnonzero(np.diff(codes)) + 1
    for start, end in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(codes)]])):
        counts = allocate(int(end - start), [splits[n] for n in names])
        which[start:end] = np.repeat(np.arange(len(names)), counts)
    out = {}
    for k, name in enumerate(names):
        members = ordered[which == k]
        members = members[np.argsort(order_hash[members], kind="stable")]
        out[name] = _ties_by_id(members, order_hash, id_of)
    return out


def split_warnings(labels: Sequence[str], splits: Mapping[str, dict], fractions: Mapping[str, float]) -> List[str]:
    """What a user should know about the packed splits (``splits``: manifest ``splits``): an empty split (the
    stratified allocation rounds each label's share down to nothing when labels have few rows), or a split that
    lacks some labels other splits have (their per-class metrics there would be undefined)."""
    present = {label for info in splits.values() for label, n in info["label_counts"].items() if n}
    out: List[str] = []
    for name, info in splits.items():
        frac = float(fractions.get(name, 1.0))
        if frac == 0.0:
            continue  # asked to be empty
        if info["samples"] == 0:
            out.append(f"split '{name}' is empty: no label has enough rows for a {frac:g} share (the split is "
                       "stratified per label); add rows or change --splits")
            continue
        absent = [label for label in labels if label in present and not info["label_counts"].get(label, 0)]
        if absent:
            shown = ", ".join(repr(a) for a in absent[:5]) + (", ..." if len(absent) > 5 else "")
            out.append(f"split '{name}' has no samples of {len(absent)} of {len(labels)} labels ({shown})")
    return out
