"""Read the product table (CSV/TSV, JSON Lines, Parquet) into rows of strings.

Every value becomes a ``str`` (missing/null -> ""), so later stages see one type whatever the format. A table that
cannot be read, lacks a required column or has no data rows is a one-line ``ConfigError`` naming the file and the
column. A CSV row whose field count differs from the header's (an unquoted comma shifts every later column, the
label included) is not guessed at: it is returned as a problem and rejected as ``csv_field_count``.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from mmcat.errors import ConfigError

EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    try:
        return EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise ConfigError(f"input {path}: cannot tell the format from the extension; pass --format csv|jsonl|parquet") from None


def _as_str(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():  # parquet ints that went through a float column
        return str(int(value))
    return str(value)


Problems = Dict[int, str]  # row index (0 = first data row) -> why the row cannot be used as read
Table = Tuple[List[str], List[Dict[str, Any]], Problems]  # (columns, rows, problems)


def _read_csv(path: Path) -> Table:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows: List[Dict[str, Any]] = []
    problems: Problems = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            # DictReader files extra fields under the key None and fills missing ones with None
            extra, missing = len(row.get(None) or ()), sum(v is None for k, v in row.items() if k is not None)
            if extra or missing:
                n = len(reader.fieldnames) + extra - missing
                problems[len(rows)] = f"line {reader.line_num}: {n} fields, the header has {len(reader.fieldnames)}"
            rows.append(row)
        columns = list(reader.fieldnames or [])
    if not columns:
        raise ConfigError(f"input {path}: empty table (no header row, no data rows)")
    return columns, rows, problems


def _read_jsonl(path: Path) -> Table:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"input {path}: line {n} is not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"input {path}: line {n} is not a JSON object")
            rows.append(obj)
    columns: List[str] = []
    for r in rows:  # union of keys in first-seen order
        columns.extend(k for k in r if k not in columns)
    return columns, rows, {}


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return list(table.column_names), table.to_pylist(), {}


def read_table(path: str | Path, fmt: str, required: Sequence[str]) -> Tuple[List[Dict[str, str]], Problems]:
    """(rows as dicts of strings with every column in ``required``, problem rows); ConfigError otherwise."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if not path.is_file():
        raise ConfigError(f"input {path}: file not found")
    if path.stat().st_size == 0:
        raise ConfigError(f"input {path}: empty file, no data rows")
    reader = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
    try:
        columns, raw, problems = reader(path)
    except ConfigError:
        raise
    except UnicodeDecodeError as exc:
        raise ConfigError(f"input {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # csv.Error, pyarrow.ArrowInvalid, OSError, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"input {path}: unreadable {fmt} file ({type(exc).__name__}: {first})") from None
    if not raw:
        raise ConfigError(f"input {path}: no data rows")
    for col in required:
        if col not in columns:
            raise ConfigError(f"input {path}: missing column '{col}' (columns: {', '.join(map(str, columns)) or 'none'})")
    return [{k: _as_str(r.get(k)) for k in required} for r in raw], problems
