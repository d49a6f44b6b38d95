"""Table rows -> validated packing tasks, label map, split assignment and up-front rejections.

Everything decidable from the table alone (ids, labels, duplicates, text) is decided here, for the whole table,
before any photo is opened: that keeps the label map and the splits identical in every job-array slice and makes
the list of tasks -- and therefore the shard contents -- a pure function of (table, settings).
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmcat.errors import ConfigError
from mmcat.hashing import stable_hash
from mmcat.pack.attributes import raw_cell
from mmcat.pack.download import is_url
from mmcat.pack.split import assign_splits

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SUFFIXED = re.compile(r"_[0-9a-f]{8}$")  # the shape of a hash suffix
_SPACE = re.compile(r"\s+")


@dataclass
class Task:
    """One row to pack: everything a worker needs, nothing it must look up."""

    row: int  # 1 = first data row of the table
    id: str
    key: str
    split: str
    label: str
    label_index: int
    texts: Dict[str, Optional[str]]  # text column -> normalized text, None when empty
    image_path: Optional[str]
    # attribute column -> value: the stripped cell (None when empty) from build_plan; typed (a float for a numeric
    # column) by the packer once the kinds are known. None: packed without --attribute-columns
    attributes: Optional[Dict[str, Any]] = None


@dataclass
class Plan:
    labels: List[str]
    tasks: Dict[str, List[Task]]  # split -> tasks in packing order
    rejected: List[dict] = field(default_factory=list)  # failures.jsonl records decided from the table


def safe_key(id_: str) -> str:
    """A WebDataset ``__key__``: no dots (webdataset's reader splits the key from the extension at the first dot
    of the file name), no slashes (folders), at most 89 characters.

    An id made only of ``A-Za-z0-9_-``, at most 80 characters long and not ending like a hash suffix
    (``_`` + 8 hex digits) is its own key. Every other id gets ``<sanitized, cut to 80>_<8 hex digits of a hash of
    the raw id>``. The two forms cannot meet (only the second ends like a suffix), so two ids share a key only if
    their sanitized forms and their 32-bit hashes both collide; ``build_plan`` rejects that rare case
    (``key_collision``) instead of writing two samples under one key.
    """
    clean = _UNSAFE.sub("_", id_)[:80]
    if clean == id_ and not _SUFFIXED.search(id_):
        return clean
    return f"{clean}_{stable_hash(0, 'key', id_) & 0xFFFFFFFF:08x}"  # the suffix keeps "a.b" and "a_b" apart


def normalize_text(value: str) -> Optional[str]:
    text = _SPACE.sub(" ", unicodedata.normalize("NFC", value)).strip()
    return text or None


def read_label_whitelist(path: str) -> List[str]:
    """labels.json (a list) or a text file with one label per line."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--labels {p}: cannot read ({type(exc).__name__})") from None
    if p.suffix.lower() == ".json":
        try:
            labels = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--labels {p}: invalid JSON ({exc.msg})") from None
        if not isinstance(labels, list):
            raise ConfigError(f"--labels {p}: expected a JSON list of labels")
        labels = [str(x).strip() for x in labels]
    else:
        labels = [line.strip() for line in raw.splitlines()]
    labels = [x for x in labels if x]
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"--labels {p}: needs at least one label and no duplicates")
    return labels


def build_plan(rows: Sequence[Dict[str, str]], cfg, images_root: Path, problems: Optional[Dict[int, str]] = None) -> Plan:
    """``problems``: row index -> detail, for rows the table reader could not split into the header's columns."""
    whitelist = read_label_whitelist(cfg.labels) if cfg.labels else None
    kept, rejected = _screen_rows(rows, cfg, set(whitelist) if whitelist else None, problems or {})
    if not kept:
        reasons = Counter(f["reason"] for f in rejected)
        raise ConfigError(f"no usable data rows: all {len(rows)} rows rejected "
                          f"({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})")

    labels = whitelist or sorted({rows[i][cfg.label_column].strip() for i in kept})
    index = {label: n for n, label in enumerate(labels)}
    by_id = {rows[i][cfg.id_column].strip(): i for i in kept}
    assignment = assign_splits([(rows[i][cfg.id_column].strip(), rows[i][cfg.label_column].strip()) for i in kept],
                               cfg.splits, cfg.seed)
    tasks: Dict[str, List[Task]] = {}
    for split, ids in assignment.items():
        tasks[split] = []
        for id_ in ids:
            i = by_id[id_]
            r = rows[i]
            label = r[cfg.label_column].strip()
            rel = r[cfg.image_column].strip()
            tasks[split].append(Task(
                row=i + 1, id=id_, key=safe_key(id_), split=split, label=label, label_index=index[label],
                texts={c: normalize_text(r[c]) for c in cfg.text_columns},
                # a URL is kept as is (downloaded by pack); an absolute rel wins over the root
                image_path=(rel if is_url(rel) else str(images_root / rel)) if rel else None,
                attributes={c: raw_cell(r[c]) for c in cfg.attribute_columns} if cfg.attribute_columns else None,
            ))
    return Plan(labels=list(labels), tasks=tasks, rejected=rejected)


def _screen_rows(rows: Sequence[Dict[str, str]], cfg, allowed: Optional[set],
                 problems: Dict[int, str]) -> Tuple[List[int], List[dict]]:
    """(indices of the rows to pack, failures.jsonl records of the others): rows are rejected for what the table
    alone shows -- a broken CSV row, no id or label, a label outside the whitelist, a repeated id or sample key."""
    rejected: List[dict] = []
    first_row: Dict[str, int] = {}
    key_owner: Dict[str, str] = {}  # sample key -> the id that has it
    kept: List[int] = []

    def reject(row: int, id_: str, reason: str, **extra) -> None:
        rejected.append({"row": row, "id": id_, "reason": reason, "kind": "rejected", **extra})

    for i, r in enumerate(rows):
        row = i + 1
        id_ = r[cfg.id_column].strip()
        label = r[cfg.label_column].strip()
        key = safe_key(id_)
        if i in problems:
            reject(row, id_, "csv_field_count", detail=problems[i])
        elif not id_:
            reject(row, id_, "id_missing")
        elif not label:
            reject(row, id_, "label_missing")
        elif allowed is not None and label not in allowed:
            reject(row, id_, "label_unknown", label=label)
        elif id_ in first_row:
            reject(row, id_, "duplicate_id", first_row=first_row[id_])
        elif key in key_owner:
            reject(row, id_, "key_collision", other_id=key_owner[key], first_row=first_row[key_owner[key]], key=key)
        else:
            first_row[id_] = row
            key_owner[key] = id_
            kept.append(i)
    return kept, rejected
