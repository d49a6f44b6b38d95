"""Table rows -> validated packing tasks, label map, split assignment and up-front rejections.

Everything decidable from the table alone (ids, labels, duplicates, text) is decided here, for the whole table,
before any photo is opened: that keeps the label map and the splits identical in every job-array slice and makes
the list of tasks -- and therefore the shard contents -- a pure function of (table, settings).
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mmcat.config import ConfigError
from mmcat.pack.split import assign_splits, keyed_hash

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
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


@dataclass
class Plan:
    labels: List[str]
    tasks: Dict[str, List[Task]]  # split -> tasks in packing order
    rejected: List[dict] = field(default_factory=list)  # failures.jsonl records decided from the table


def safe_key(id_: str) -> str:
    """A WebDataset ``__key__``: no dots (they start the extension), no slashes; unique per id."""
    clean = _UNSAFE.sub("_", id_)[:80]
    if clean == id_:
        return clean
    return f"{clean}_{keyed_hash(0, 'key', id_) & 0xFFFFFFFF:08x}"  # the suffix keeps "a.b" and "a_b" apart


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


def build_plan(rows: Sequence[Dict[str, str]], cfg, images_root: Path) -> Plan:
    whitelist = read_label_whitelist(cfg.labels) if cfg.labels else None
    allowed = set(whitelist) if whitelist else None
    rejected: List[dict] = []
    first_row: Dict[str, int] = {}
    kept: List[int] = []

    def reject(row: int, id_: str, reason: str, **extra) -> None:
        rejected.append({"row": row, "id": id_, "reason": reason, "kind": "rejected", **extra})

    for i, r in enumerate(rows):
        row = i + 1
        id_ = r[cfg.id_column].strip()
        label = r[cfg.label_column].strip()
        if not id_:
            reject(row, id_, "id_missing")
        elif not label:
            reject(row, id_, "label_missing")
        elif allowed is not None and label not in allowed:
            reject(row, id_, "label_unknown", label=label)
        elif id_ in first_row:
            reject(row, id_, "duplicate_id", first_row=first_row[id_])
        else:
            first_row[id_] = row
            kept.append(i)

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
                image_path=str(images_root / rel) if rel else None,  # an absolute rel wins over the root
            ))
    return Plan(labels=list(labels), tasks=tasks, rejected=rejected)
