"""An input table -> label map, split assignment, packing order, up-front rejections and the packing tasks.

Everything decidable from the table alone (ids, labels, duplicates) is decided here, for the whole table, before
any photo is opened: that keeps the label map and the splits identical in every job-array slice and makes the
list of tasks -- and therefore the shard contents -- a pure function of (table, settings).

The plan is columnar, so a 10-million-row table plans in bounded memory: ids, labels and hashes live in pyarrow
and numpy arrays, and a :class:`Task` (text, photo path, attributes) is made only for a row this run packs, when
the packer gets to it (:meth:`Plan.tasks`).
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mmcat.errors import ConfigError
from mmcat.hashing import stable_hash
from mmcat.pack.attributes import raw_cell, typed_values
from mmcat.pack.split import assign_split_rows, hash_ids
from mmcat.pack.download import is_url

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


TASK_BLOCK = 4096  # rows turned into tasks at a time


@dataclass
class Plan:
    labels: List[str]
    order: Dict[str, Any]  # split -> numpy int64 table row indices (0-based) in packing order, whole table
    rejected: List[dict] = field(default_factory=list)  # failures.jsonl records decided from the table
    table: Any = None  # the input's pyarrow.Table: text/photo cells of the rows this run packs
    columns: dict = field(default_factory=dict)  # id/image/text/label/attributes column names
    images_root: Path = Path(".")
    label_index: Any = None  # numpy int32 per table row: index into labels, -1 for a rejected row
    kinds: Optional[Dict[str, str]] = None  # attribute kinds, set by the packer before tasks are made

    def owned(self, split: str, slice_index: int = 0, num_slices: int = 1):
        """The rows of ``split`` that slice ``slice_index`` of ``num_slices`` packs (table rows ``i`` with
        ``i % num_slices == slice_index``), in packing order."""
        rows = self.order[split]
        return rows if num_slices == 1 else rows[rows % num_slices == slice_index]

    def tasks(self, split: str, rows) -> Iterator[Task]:
        """One :class:`Task` per row of ``rows`` (table row indices), in that order, made a block at a time."""
        c = self.columns
        attributes = list(c.get("attributes") or [])
        for start in range(0, len(rows), TASK_BLOCK):
            block = rows[start:start + TASK_BLOCK]
            cells = {name: take(self.table.column(name), block)
                     for name in dict.fromkeys([c["id"], c["image"], *c["text"], *attributes])}
            for n, i in enumerate(block.tolist()):
                id_ = (cells[c["id"]][n] or "").strip()
                index = int(self.label_index[i])
                attrs = {a: raw_cell(cells[a][n] or "") for a in attributes} if attributes else None
                if attrs is not None and self.kinds:
                    attrs = typed_values(attrs, self.kinds)
                yield Task(row=i + 1, id=id_, key=safe_key(id_), split=split, label=self.labels[index],
                           label_index=index, texts={t: normalize_text(cells[t][n] or "") for t in c["text"]},
                           image_path=image_path(self.images_root, cells[c["image"]][n] or ""), attributes=attrs)

    def has_urls(self) -> bool:
        """Whether some photo cell is an http(s) URL (pack then starts its downloader), without making tasks."""
        import pyarrow.compute as pc

        urls = pc.match_substring_regex(self.table.column(self.columns["image"]), r"^\s*https?://", ignore_case=True)
        return bool(pc.any(urls).as_py())

    def cells(self, column: str, rows) -> Iterator[Optional[str]]:
        """The stripped cells (None when empty) of ``column`` in ``rows``, a block at a time."""
        for start in range(0, len(rows), 1 << 16):
            for v in take(self.table.column(column), rows[start:start + (1 << 16)]):
                yield raw_cell(v or "")


def take(column, rows) -> list:
    """The Python values of ``column`` (a pyarrow ChunkedArray) at ``rows`` (numpy indices), in that order, taken
    chunk by chunk: ``ChunkedArray.take`` would first join every chunk into one copy of the whole column."""
    import numpy as np

    chunks = column.chunks
    if len(chunks) == 1:
        return chunks[0].take(rows).to_pylist()
    rows = np.asarray(rows, np.int64)
    starts = np.cumsum([0] + [len(c) for c in chunks])
    which = np.searchsorted(starts, rows, side="right") - 1
    out: list = [None] * len(rows)
    for c in np.unique(which).tolist():
        at = np.flatnonzero(which == c)
        for pos, value in zip(at.tolist(), chunks[c].take(rows[at] - starts[c]).to_pylist()):
            out[pos] = value
    return out


def image_path(images_root: Path, cell: str) -> Optional[str]:
    """Where a row's photo is: a URL as is, a path under ``images_root`` (an absolute path wins), None if empty."""
    rel = cell.strip()
    if is_url(rel):  # pack downloads it (mmcat.pack.download)
        return rel
    return str(images_root / rel) if rel else None


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


def build_plan(source, cfg) -> Plan:
    """The plan of ``source`` (an :class:`mmcat.pack.tables.InputTable`) with ``cfg``'s label whitelist, splits and
    seed. Rows named in ``source.problems`` (e.g. a CSV row with another field count than the header) are
    rejected."""
    table, columns = source.table, source.columns
    whitelist = read_label_whitelist(cfg.labels) if cfg.labels else None
    ids = _Ids(table.column(columns["id"]), cfg.seed)
    raw_labels, label_codes = _label_codes(table.column(columns["label"]))
    kept, rejected = _screen(ids, raw_labels, label_codes, set(whitelist) if whitelist else None, source.problems)
    if not len(kept):
        reasons = Counter(f["reason"] for f in rejected)
        raise ConfigError(f"no usable data rows: all {table.num_rows} rows rejected "
                          f"({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})")

    import numpy as np

    codes = label_codes[kept]
    labels = whitelist or sorted({raw_labels[k] for k in np.unique(codes).tolist()})
    position = {label: n for n, label in enumerate(labels)}
    to_index = np.array([position.get(x, -1) for x in raw_labels] or [0], np.int32)
    label_index = np.full(table.num_rows, -1, np.int32)
    label_index[kept] = to_index[codes]
    order = assign_split_rows(kept, codes, ids.split_hash, ids.order_hash, ids.id_of, cfg.splits)
    return Plan(labels=list(labels), order=order, rejected=rejected, table=table, columns=columns,
                images_root=source.images_root, label_index=label_index)


class _Ids:
    """The stripped ids of a table column (pyarrow), whether each is its own sample key, and their split/order
    hashes (numpy, one per row)."""

    def __init__(self, column, seed: int):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        chunks, split_hash, order_hash = [], [], []
        for chunk in column.chunks:
            raw = chunk.to_pylist()
            values = [(v or "").strip() for v in raw]
            same = chunk.null_count == 0 and all(a is b for a, b in zip(values, raw))  # strip() returns the same str
            chunks.append(chunk.cast(pa.string()) if same else pa.array(values, pa.string()))
            split_hash.append(hash_ids(values, seed, "split"))
            order_hash.append(hash_ids(values, seed, "order"))
        self.values = pa.chunked_array(chunks, pa.string())
        empty = np.zeros(0, np.uint64)
        self.split_hash = np.concatenate(split_hash) if split_hash else empty
        self.order_hash = np.concatenate(order_hash) if order_hash else empty
        # an id made of A-Za-z0-9_- (at most 80) that does not end like a hash suffix is its own key (safe_key)
        own = pc.and_(pc.match_substring_regex(self.values, r"^[A-Za-z0-9_-]{0,80}$"),
                      pc.invert(pc.match_substring_regex(self.values, r"_[0-9a-f]{8}$")))
        self.own_key = np.asarray(own.to_numpy(zero_copy_only=False), bool)

    def id_of(self, row: int) -> str:
        return self.values[int(row)].as_py()

    def at(self, rows) -> List[str]:
        return take(self.values, rows)


def _label_codes(column) -> Tuple[List[str], Any]:
    """(the distinct stripped labels, a numpy code per row into that list)."""
    import numpy as np
    import pyarrow.compute as pc

    column = pc.fill_null(column, "")
    distinct = pc.unique(column)
    stripped = [v.strip() for v in distinct.to_pylist()]
    names = list(dict.fromkeys(stripped))
    position = {name: n for n, name in enumerate(names)}
    remap = np.array([position[v] for v in stripped] or [0], np.int32)
    return names, remap[pc.index_in(column, value_set=distinct).to_numpy()]


def _screen(ids: _Ids, labels: List[str], codes, allowed: Optional[set], problems: Dict[int, str]):
    """(numpy indices of the rows to pack, failures.jsonl records of the others): rows are rejected for what the
    table alone shows -- a broken CSV row, no id or label, a label outside the whitelist, a repeated id or sample
    key. Each row gets the first reason that applies, in that order; the repeated-id/key checks count only rows
    that passed the earlier checks (the row-by-row rule this replaces)."""
    import numpy as np
    import pyarrow.compute as pc

    n = len(ids.split_hash)
    problem = np.zeros(n, bool)
    problem[list(problems)] = True
    id_missing = ~problem & np.asarray(pc.equal(ids.values, "").to_numpy(zero_copy_only=False), bool)
    label_empty = np.array([not x for x in labels] or [False])[codes]
    label_missing = ~problem & ~id_missing & label_empty
    unknown = np.zeros(n, bool)
    if allowed is not None:
        unknown = ~problem & ~id_missing & ~label_missing & \
            ~np.array([x in allowed for x in labels] or [False])[codes]
    candidate = ~(problem | id_missing | label_missing | unknown)
    rejects: List[Tuple[int, str, dict]] = []  # (row index, reason, extra fields)
    for i in np.flatnonzero(problem):  # a str: a CSV row of another field count; a layout's (reason, detail) pair
        why = problems[int(i)]
        reason, detail = why if isinstance(why, tuple) else ("csv_field_count", why)
        rejects.append((int(i), reason, {"detail": detail}))
    rejects += [(int(i), "id_missing", {}) for i in np.flatnonzero(id_missing)]
    rejects += [(int(i), "label_missing", {}) for i in np.flatnonzero(label_missing)]
    rejects += [(int(i), "label_unknown", {"label": labels[codes[i]]}) for i in np.flatnonzero(unknown)]
    keep = candidate.copy()
    _repeated_own_keys(ids, np.flatnonzero(candidate & ids.own_key), keep, rejects)
    _repeated_other_keys(ids, np.flatnonzero(candidate & ~ids.own_key), keep, rejects)
    rejects.sort(key=lambda r: r[0])
    id_text = dict(zip([r[0] for r in rejects], ids.at([r[0] for r in rejects]))) if rejects else {}
    rejected = [{"row": i + 1, "id": id_text[i], "reason": reason, "kind": "rejected", **extra}
                for i, reason, extra in rejects]
    return np.flatnonzero(keep), rejected


def _repeated_own_keys(ids: _Ids, rows, keep, rejects: list) -> None:
    """Rows whose id is its own key: a key repeats exactly when the id does (duplicate_id, first_row = the
    first of these rows with that id). Equal ids have equal split hashes: rows are sorted by hash (a numpy sort,
    no table of every id) and only runs of equal hashes are compared by id."""
    import numpy as np

    if not len(rows):
        return
    by_hash = rows[np.argsort(ids.split_hash[rows], kind="stable")]  # equal hashes together, in row order
    h = ids.split_hash[by_hash]
    same = np.flatnonzero(h[1:] == h[:-1])
    if not len(same):
        return
    starts = same[np.concatenate([[True], np.diff(same) > 1])]  # a run of equal hashes begins at each start
    for start in starts.tolist():
        end = start + 1
        while end < len(h) and h[end] == h[start]:
            end += 1
        group = by_hash[start:end]
        first: Dict[str, int] = {}
        for i, id_ in zip(group.tolist(), ids.at(group)):
            if id_ in first:
                keep[i] = False
                rejects.append((i, "duplicate_id", {"first_row": first[id_] + 1}))
            else:
                first[id_] = i


def _repeated_other_keys(ids: _Ids, rows, keep, rejects: list) -> None:
    """Rows whose id gets a hashed key (:func:`safe_key`), row by row: a repeated id, or another id with the
    same key (key_collision). Such keys never equal an own-key id, so these rows are checked among themselves."""
    first_row: Dict[str, int] = {}
    key_owner: Dict[str, str] = {}  # sample key -> the id that has it
    for i, id_ in zip(rows.tolist(), ids.at(rows) if len(rows) else []):
        key = safe_key(id_)
        if id_ in first_row:
            keep[i] = False
            rejects.append((i, "duplicate_id", {"first_row": first_row[id_]}))
        elif key in key_owner:
            keep[i] = False
            other = key_owner[key]
            rejects.append((i, "key_collision", {"other_id": other, "first_row": first_row[other], "key": key}))
        else:
            first_row[id_] = i + 1
            key_owner[key] = id_
