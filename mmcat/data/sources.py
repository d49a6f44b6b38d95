"""Where the shards of a split are, how many samples they hold, and what the labels are.

``data.root`` is one or more comma-separated entries; each entry is either a packed directory
(``<dir>/<split>/*.tar`` with ``sizes.json``, ``labels.json`` and ``manifest.json`` from ``mmcat pack``) or a shard
pattern with braces or globs (``/d/{split}/shard-{000000..000009}.tar``; ``{split}`` is replaced by the split name),
which is how shards written by other tools (img2dataset, ``webdataset.ShardWriter``) are read.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import braceexpand

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data-configuration problem with a one-line message that says what to change."""


@dataclass
class ShardSource:
    """The shards of one ``data.root`` entry for one split."""

    entry: str
    shards: List[str]  # absolute paths, sorted
    sizes: Dict[str, int]  # shard path -> samples (empty when unknown)
    weight: float = 1.0


def root_entries(data_cfg: Any) -> List[str]:
    entries = [e.strip() for e in str(data_cfg.root).split(",") if e.strip()]
    if not entries:
        raise DataError("data.root is empty: give a packed directory or a shard pattern")
    return entries


def _is_pattern(entry: str) -> bool:
    return any(c in entry for c in "{*?[") or entry.endswith(".tar")


def _expand(entry: str, split: str) -> List[str]:
    if not _is_pattern(entry):
        split_dir = Path(entry) / split
        if not Path(entry).is_dir():
            raise DataError(f"data.root entry '{entry}' is not a directory or a shard pattern")
        if not split_dir.is_dir():
            raise DataError(f"no '{split}' split in {entry} (expected {split_dir}/*.tar)")
        shards = sorted(str(p.resolve()) for p in split_dir.glob("*.tar"))
    else:
        shards = []
        for pat in braceexpand.braceexpand(entry.replace("{split}", split)):
            matches = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
            shards.extend(os.path.abspath(m) for m in matches)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"shard not found: {missing[0]} (from data.root entry '{entry}')")
    if not shards:
        raise DataError(f"no shards for split '{split}' in data.root entry '{entry}'")
    return shards


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _known_sizes(shards: Sequence[str]) -> Dict[str, int]:
    """Sample counts from ``sizes.json`` next to the shards (open_clip format) or img2dataset ``*_stats.json``."""
    sizes: Dict[str, int] = {}
    for folder in sorted({os.path.dirname(s) for s in shards}):
        table = _read_json(Path(folder) / "sizes.json") or {}
        for name, n in table.items():
            sizes[os.path.join(folder, name)] = int(n)
    for shard in shards:
        if shard not in sizes:  # img2dataset writes 00000.tar + 00000_stats.json {"successes": n}
            stats = _read_json(Path(shard[: -len(".tar")] + "_stats.json"))
            if stats and "successes" in stats:
                sizes[shard] = int(stats["successes"])
    return {s: sizes[s] for s in shards if s in sizes}


def count_tar_samples(shard: str) -> int:
    """Count samples (distinct keys) by reading tar headers only; used when no size table exists."""
    keys = set()
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            if member.isreg() and not os.path.basename(member.name).startswith("__"):
                keys.add(member.name.split(".", 1)[0])
    return len(keys)


def shard_sources(data_cfg: Any, split: str, count_missing: bool = True) -> List[ShardSource]:
    entries = root_entries(data_cfg)
    weights = list(data_cfg.weights) if data_cfg.weights is not None else None
    if weights is not None and len(weights) != len(entries):
        raise DataError(f"data.weights has {len(weights)} values but data.root has {len(entries)} entries")
    sources = []
    for i, entry in enumerate(entries):
        shards = _expand(entry, split)
        sizes = _known_sizes(shards)
        unknown = [s for s in shards if s not in sizes]
        if unknown and count_missing:
            log.info("no sizes.json for %d shard(s) of %s: counting samples from tar headers", len(unknown), entry)
            for s in unknown:
                sizes[s] = count_tar_samples(s)
        sources.append(ShardSource(entry, shards, sizes, float(weights[i]) if weights else 1.0))
    return sources


def all_shards(sources: Sequence[ShardSource]) -> List[str]:
    return [s for src in sources for s in src.shards]


def total_samples(sources: Sequence[ShardSource]) -> int:
    return sum(sum(src.sizes.get(s, 0) for s in src.shards) for src in sources)


def split_sizes(data_cfg: Any, split: str) -> int:
    """Number of samples in ``split`` over all roots (sizes.json, else tar headers)."""
    return total_samples(shard_sources(data_cfg, split))


# ------------------------------------------------------------------------------------------------------ labels
def _label_dirs(data_cfg: Any) -> List[Path]:
    """Directories where labels.json / manifest.json may live for each root entry."""
    dirs = []
    for entry in root_entries(data_cfg):
        if _is_pattern(entry):
            prefix = re.split(r"[{*?\[]", entry, maxsplit=1)[0]  # the fixed part before any pattern
            base = Path(prefix) if prefix.endswith("/") else Path(prefix).parent
            dirs += [base, base.parent]
        else:
            dirs.append(Path(entry))
    return dirs


def read_labels(data_cfg: Any) -> List[str]:
    """The ordered label list (index = class id) from ``data.labels_file`` or ``<root>/labels.json``."""
    candidates = [Path(data_cfg.labels_file)] if data_cfg.labels_file else [d / "labels.json" for d in _label_dirs(data_cfg)]
    for path in candidates:
        labels = _read_json(path)
        if labels is not None:
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
                raise DataError(f"{path} must hold a non-empty JSON list of label names")
            return labels
    where = ", ".join(str(p) for p in candidates)
    raise DataError(f"no labels file found (looked for {where}); set data.labels_file=/path/to/labels.json")


def read_manifest(data_cfg: Any) -> Optional[Dict[str, Any]]:
    for d in _label_dirs(data_cfg)[:1]:
        return _read_json(d / "manifest.json")
    return None


def label_counts(data_cfg: Any, split: str) -> List[int]:
    """Samples per class in ``split`` (for class weights): manifest.json, else a scan of the shards' labels."""
    labels = read_labels(data_cfg)
    manifest = read_manifest(data_cfg) if len(root_entries(data_cfg)) == 1 else None
    info = ((manifest or {}).get("splits") or manifest or {}).get(split) if manifest else None
    counts = info.get("label_counts") if isinstance(info, dict) else None
    if isinstance(counts, list) and len(counts) == len(labels):
        return [int(c) for c in counts]
    if isinstance(counts, dict):
        index = {name: i for i, name in enumerate(labels)}
        out = [0] * len(labels)
        for k, v in counts.items():
            i = index.get(k, int(k) if str(k).isdigit() else None)
            if i is None or not 0 <= i < len(labels):
                raise DataError(f"manifest.json label_counts names unknown label '{k}'")
            out[i] = int(v)
        return out
    log.info("no label counts in manifest.json for split '%s': scanning shard labels", split)
    return _scan_label_counts(data_cfg, split, labels)


def _scan_label_counts(data_cfg: Any, split: str, labels: List[str]) -> List[int]:
    from mmcat.data.samples import LabelReader  # local: keeps this module free of decode dependencies

    reader = LabelReader(data_cfg.label_key, labels)
    counts = [0] * len(labels)
    for shard in all_shards(shard_sources(data_cfg, split, count_missing=False)):
        members: Dict[str, Dict[str, bytes]] = {}
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if m.isreg() and ext in ("cls", "json"):
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for sample in members.values():
            try:
                counts[reader(sample)] += 1
            except (ValueError, KeyError):
                pass  # bad labels are counted as bad samples by the loader, not here
    return counts


def train_shard_sizes(data_cfg: Any) -> Dict[str, Optional[int]]:
    """Every train shard with its sample count (None when unknown): what the train stream is made of."""
    return {shard: src.sizes.get(shard) for src in shard_sources(data_cfg, data_cfg.train_split) for shard in src.shards}
