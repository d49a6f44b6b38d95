"""Stable hashes: the same integer for the same values in every process, on every machine, in every Python.

Python's ``hash(str)`` is salted per process, so anything that must agree across ranks, loader workers, job-array
slices and runs (split assignment, sample order, sample keys, data order, augmentation seeds) hashes with BLAKE2b
(64 bits) instead. One digest, two encodings of the values, both frozen: changing either would move users' packed
splits and sample keys (``stable_hash``) or change the data order and augmentations of a resumed run
(``stable_seed``).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable


def _digest64(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def stable_hash(*parts: Any) -> int:
    """An unsigned 64-bit hash of ``str(part)`` joined by NUL, e.g. ``stable_hash(seed, "split", product_id)``
    (``mmcat pack``: split assignment, sample order inside a split, key suffixes)."""
    return int.from_bytes(_digest64("\0".join(str(p) for p in parts)), "big")


def stable_hashes(values: Iterable[str], *prefix: Any):
    """``stable_hash(*prefix, v)`` of every ``v``, as a numpy uint64 array: the prefix is hashed once and the
    digests land in one buffer, with no Python int per value (planning a catalog of millions of ids)."""
    import numpy as np

    start = hashlib.blake2b("".join(f"{p}\0" for p in prefix).encode(), digest_size=8).copy

    def digest(value: str) -> bytes:
        h = start()
        h.update(value.encode())
        return h.digest()

    return np.frombuffer(b"".join(map(digest, values)), ">u8").astype(np.uint64)


def stable_seed(*parts: Any) -> int:
    """A non-negative 63-bit seed for ``random.Random``, ``torch.manual_seed`` and the like, from ints and strings,
    e.g. ``stable_seed(seed, epoch, "shards")`` (the training loader and the training step)."""
    return int.from_bytes(_digest64(repr(parts)), "little") >> 1
