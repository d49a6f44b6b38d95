"""Read the product table (CSV/TSV, JSON Lines, Parquet) into rows of strings.

Every value becomes a ``str`` (missing/null -> ""), so later stages see one type whatever the format. A table that
cannot be read, lacks a required column or has no data rows is a one-line ``ConfigError`` naming the file and the
column. A CSV row whose field count differs from the header's (an unquoted comma shifts every later column, the
label included) is not guessed at: it is returned as a problem and rejected as ``csv_field_count``.

:func:`read_table` reads a whole table (packing needs every row for its splits); :class:`TableStream` reads one
incrementally, in bounded memory (``mmcat predict``).
"""
from __future__ import annotations

import csv
import json
import math
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

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


def _jsonl_objects(path: Path) -> Iterator[Tuple[Optional[Dict[str, Any]], Optional[str]]]:
    """(object, None) per non-blank line of a JSON Lines file, or (None, why) for a line that is no JSON object."""
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield None, f"line {n} is not valid JSON ({exc.msg})"
                continue
            yield (obj, None) if isinstance(obj, dict) else (None, f"line {n} is not a JSON object")


def _read_jsonl(path: Path) -> Table:
    rows = []
    for obj, why in _jsonl_objects(path):
        if why is not None:
            raise ConfigError(f"input {path}: {why}")
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


# ------------------------------------------------------------------------------------------- streaming reader
JSONL_PEEK = 1000  # a JSON Lines table's columns: the keys of its first lines (a row may leave out a null key)
Row = Tuple[Dict[str, str], Optional[str]]  # (wanted columns as strings, why the row cannot be used, or None)


def _unreadable(path: Path, fmt: str, exc: Exception) -> ConfigError:
    """The one-line error of :func:`read_table` for a file that stops being readable (here: mid-stream)."""
    if isinstance(exc, UnicodeDecodeError):
        return ConfigError(f"input {path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ConfigError(f"input {path}: unreadable {fmt} file ({type(exc).__name__}: {first})")


class TableStream:
    """A product table read incrementally, for inputs of any size (``mmcat predict``); :func:`read_table` reads a
    whole table, which packing needs for its splits.

    The header is checked when the stream is made (file, columns, at least one data row: one-line
    ``ConfigError``, as :func:`read_table`); iterating opens the file afresh each time (so every decode worker can
    read it) and yields one :data:`Row` per data row, in file order, holding only the ``wanted`` columns, values
    normalised as :func:`read_table` does. A row that cannot be read as the header says (a CSV row with another
    field count, a JSON Lines line that is not an object) is yielded with its problem instead of being guessed at
    or ending the run; empty lines are skipped."""

    def __init__(self, path: str | Path, fmt: str, required: Sequence[str], optional: Sequence[str] = (),
                 hints: Optional[Dict[str, str]] = None, chunk_rows: int = 1024) -> None:
        self.path, self.chunk_rows = Path(path), int(chunk_rows)
        self.fmt = detect_format(self.path, fmt)
        if not self.path.is_file():
            raise ConfigError(f"input {self.path}: file not found")
        if self.path.stat().st_size == 0:
            raise ConfigError(f"input {self.path}: empty file, no data rows")
        self.columns, self.num_rows = self._guarded(self._header)
        for col in required:
            if col not in self.columns:
                hint = f"{hints[col]}; " if hints and col in hints else ""
                raise ConfigError(f"input {self.path}: missing column '{col}' "
                                  f"({hint}columns: {', '.join(map(str, self.columns)) or 'none'})")
        self.wanted = list(dict.fromkeys([*required, *(c for c in optional if c in self.columns)]))
        if next(iter(self), None) is None:
            raise ConfigError(f"input {self.path}: no data rows")

    def __iter__(self) -> Iterator[Row]:
        rows = {"csv": self._csv_rows, "jsonl": self._jsonl_rows, "parquet": self._parquet_rows}[self.fmt]()
        while True:
            row = self._guarded(lambda: next(rows, None))
            if row is None:
                return
            yield row

    def _guarded(self, read):
        try:
            return read()
        except ConfigError:
            raise
        except Exception as exc:  # csv.Error, UnicodeDecodeError, pyarrow.ArrowInvalid, OSError, ...
            raise _unreadable(self.path, self.fmt, exc) from None

    def _values(self, record: Dict[str, Any]) -> Dict[str, str]:
        return {k: _as_str(record.get(k)) for k in self.wanted}

    # ---------------------------------------------------------------------------------------------- formats
    def _header(self) -> Tuple[List[str], Optional[int]]:
        if self.fmt == "csv":
            with self._open_csv() as (reader, _):
                header = next(reader, None)
            if not header:
                raise ConfigError(f"input {self.path}: empty table (no header row, no data rows)")
            return header, None
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(self.path)
            return list(meta.schema_arrow.names), meta.metadata.num_rows
        columns: List[str] = []
        for record, _ in islice(self._jsonl_records(), JSONL_PEEK):  # union of keys in first-seen order
            columns.extend(k for k in (record or {}) if k not in columns)
        return columns, None

    @contextmanager
    def _open_csv(self) -> Iterator[Tuple[Any, Any]]:
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            yield csv.reader(f, delimiter=delimiter), f

    def _csv_rows(self) -> Iterator[Row]:
        with self._open_csv() as (reader, _):
            header = next(reader, [])
            for fields in reader:
                if not fields:  # a blank line, as csv.DictReader skips it
                    continue
                problem = None
                if len(fields) != len(header):  # an unquoted comma shifts every later column, the label included
                    problem = f"line {reader.line_num}: {len(fields)} fields, the header has {len(header)}"
                yield self._values(dict(zip(header, fields))), problem

    def _jsonl_records(self) -> Iterator[Tuple[Optional[Dict[str, Any]], Optional[str]]]:
        return _jsonl_objects(self.path)

    def _jsonl_rows(self) -> Iterator[Row]:
        for record, problem in self._jsonl_records():
            yield self._values(record or {}), problem

    def _parquet_rows(self) -> Iterator[Row]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(self.path)
        for batch in table.iter_batches(batch_size=self.chunk_rows, columns=self.wanted):
            for record in batch.to_pylist():
                yield self._values(record), None
