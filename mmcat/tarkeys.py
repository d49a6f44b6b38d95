"""The sample keys of a tar shard exactly as webdataset's reader groups them, for counting samples.

Splitting member names by hand gets the rules wrong: ``./p1.jpg`` (key ``./p1``), dotted folders (``v1.2/p2.jpg``:
key ``v1.2/p2``), keys starting with ``__`` (real samples), ``__meta__`` members (skipped), and a key that reappears
after another one (a new sample). So this feeds the member names through webdataset's own
``tar_file_iterator`` (which members count) and ``group_by_keys`` (with its ``base_plus_ext``: key and
extension). ``select_files`` records each name and declines it, so no member data is kept or decoded.
"""
from __future__ import annotations

from pathlib import Path
from typing import List


def tar_sample_keys(path: str | Path) -> List[str]:
    """``__key__`` of every sample ``webdataset.tarfile_samples`` yields from the tar at ``path``, in order."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    names: List[str] = []

    def record(fname: str) -> bool:
        names.append(fname)
        return False  # nothing is extracted: the stream only skips over the member's data

    with open(path, "rb") as f:
        for _ in tar_file_iterator(f, select_files=record):
            pass
    members = ({"fname": name, "data": b"", "__url__": str(path)} for name in names)
    return [sample["__key__"] for sample in group_by_keys(members)]


def count_tar_samples(path: str | Path) -> int:
    """Samples in one tar shard, as webdataset's reader will see them."""
    return len(tar_sample_keys(path))
