"""Read the product table (CSV/TSV, JSON Lines, Parquet, each optionally ``.gz``) as string columns.

Every value becomes a ``str`` (numbers such as ``00123`` or ``1280`` are never parsed; a missing/null cell -> "")
so later stages see one type whatever the format. A table that cannot be read, lacks a required column or has no
data rows is a one-line ``ConfigError`` naming the file and the column. A CSV row whose field count differs from the
header's (an unquoted comma shifts every later column, the label included) is not guessed at: it is returned as a
problem and rejected as ``csv_field_count``.

:func:`read_table` reads a whole table for packing with pyarrow, streamed in record batches and column-pruned:
packing needs every row's id and label (splits, label map) but a job-array slice needs the text and photo path of
its own rows only, so those columns are read only for the rows a slice owns. :class:`TableStream` reads a table
row by row in bounded memory (``mmcat predict``).
"""
from __future__ import annotations

import atexit
import csv
import gzip
import io
import json
import math
import os
import shutil
import tempfile
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from mmcat.errors import ConfigError

EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
BATCH_BYTES = 2 << 20  # CSV block (a row must fit in one): bigger blocks leave more freed memory behind
BATCH_ROWS = 65536  # JSON Lines / Parquet rows per record batch


def _suffix(path: Path) -> str:
    """The table extension, looking through a ``.gz`` (``products.csv.gz`` -> ``.csv``)."""
    name = path.name.lower()
    return Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    try:
        return EXTENSIONS[_suffix(path)]
    except KeyError:
        raise ConfigError(f"input {path}: cannot tell the format from the extension; pass --format csv|jsonl|parquet") from None


def _as_str(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():  # parquet ints that went through a float column
        return str(int(value))
    return str(value)


# row index (0 = first data row) -> why the row cannot be used as read: a CSV field-count detail (rejected as
# csv_field_count), or a layout's (reason, detail) for a row rejected for what the plan cannot see (no label in
# Rakuten's Y file, a bad ABO JSON line)
Problem = Union[str, Tuple[str, str]]
Problems = Dict[int, Problem]


@dataclass
class InputTable:
    """What ``mmcat pack`` plans from, whatever the input layout (the generic table, or a public layout reader):
    ``table`` holds string columns (nulls allowed: "not read" or missing), one row per data row in input order;
    ``problems`` marks the rows that cannot be used as read; ``files`` are hashed into the manifest settings;
    ``columns`` names the columns to use: ``{"id", "image", "label": str, "text", "attributes": [str]}``."""

    table: Any  # pyarrow.Table
    problems: Problems
    images_root: Path
    files: List[Path]
    layout: str  # "table" for the generic path
    columns: dict = field(default_factory=dict)


@contextmanager
def parquet_file(path: Path):
    """A ``pyarrow.parquet.ParquetFile`` of ``path``, also of a ``.gz`` one."""
    import pyarrow.parquet as pq

    if not path.name.lower().endswith(".gz"):
        with pq.ParquetFile(path) as f:
            yield f
        return
    with tempfile.TemporaryFile() as tmp:  # Parquet needs a seekable file: decompress to disk, not to memory
        with gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.seek(0)
        with pq.ParquetFile(tmp) as f:
            yield f


def _open_text(path: Path, newline: Optional[str] = None):
    """A text file, or the text inside a ``.gz`` file (UTF-8, a leading BOM dropped)."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _jsonl_objects(path: Path) -> Iterator[Tuple[Optional[Dict[str, Any]], Optional[str]]]:
    """(object, None) per non-blank line of a JSON Lines file, or (None, why) for a line that is no JSON object."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield None, f"line {n} is not valid JSON ({exc.msg})"
                continue
            yield (obj, None) if isinstance(obj, dict) else (None, f"line {n} is not a JSON object")


# --------------------------------------------------------------------------------- whole table, with pyarrow
def _string_array(arr):
    """A pyarrow array as strings, values as :func:`_as_str` writes them (null stays null)."""
    import pyarrow as pa

    t = arr.type
    if pa.types.is_string(t):
        return arr
    view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if pa.types.is_large_string(t) or view(t) or pa.types.is_integer(t) or \
            (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)):
        return arr.cast(pa.string())
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    # floats, booleans, dates, nested ...: exactly as the row-by-row reader writes them
    return pa.array([None if v is None else _as_str(v) for v in arr.to_pylist()], pa.string())


def _filled(arr):
    import pyarrow.compute as pc

    return pc.fill_null(arr, "") if arr.null_count else arr


class _Batches:
    """A table read as record batches of string columns, each with the 0-based data-row index of its rows.
    CSV rows with another field count than the header are not in the batches: they land in ``bad``
    (row index -> (detail, {column: value as split})) and their index is skipped."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.bad: Dict[int, Tuple[str, Dict[str, str]]] = {}
        self.bad_order: List[int] = []  # the keys of ``bad`` as found (file order), for rows read as they come

    # -- columns
    def columns(self) -> Optional[List[str]]:
        """The header's columns (None for JSON Lines: its columns are the keys its lines have, known once read)."""
        if self.fmt == "csv":
            return self._csv_header()
        if self.fmt == "parquet":
            with self._parquet() as f:
                return list(f.schema_arrow.names)
        return None

    # -- batches: Iterator[(pyarrow.Table of str columns, numpy int64 data-row indices)]
    def batches(self, wanted: Sequence[str]):
        yield from {"csv": self._csv, "jsonl": self._jsonl, "parquet": self._parquet_batches}[self.fmt](list(wanted))

    # CSV --------------------------------------------------------------------------------------------------------
    def _delimiter(self) -> str:
        return "\t" if _suffix(self.path) == ".tsv" else ","

    def _csv_reader(self, wanted: Optional[List[str]], on_bad: Callable):
        import pyarrow as pa
        import pyarrow.csv as pcsv

        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in wanted or []},
                                      include_columns=wanted or [], strings_can_be_null=False)
        # serial: invalid rows reach the handler in file order with their record number (the header is record 1)
        return pcsv.open_csv(self.path, read_options=pcsv.ReadOptions(use_threads=False, block_size=BATCH_BYTES),
                             memory_pool=_reading_pool(),
                             parse_options=pcsv.ParseOptions(delimiter=self._delimiter(), newlines_in_values=True,
                                                             invalid_row_handler=on_bad),
                             convert_options=convert)

    def _csv_header(self) -> List[str]:
        import pyarrow as pa

        try:
            with self._csv_reader(None, lambda row: "skip") as reader:
                return list(reader.schema.names)
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                raise ConfigError(f"input {self.path}: empty table (no header row, no data rows)") from None
            raise

    def _csv(self, wanted: List[str]):
        import pyarrow as pa

        header = self._csv_header()
        found: List[int] = []

        def on_bad(row) -> str:
            index = row.number - 2  # record number -> data-row index
            found.append(index)
            if index not in self.bad:
                fields = next(csv.reader(io.StringIO(row.text, newline=""), delimiter=self._delimiter()), [])
                values = dict(zip(header, fields))
                self.bad[index] = (f"{row.actual_columns} fields, the header has {row.expected_columns}: "
                                   f"{row.text[:80]}", values)
                self.bad_order.append(index)
            return "skip"

        start = 0  # data-row index of the next good row (before skipping bad ones)
        with self._csv_reader(wanted, on_bad) as reader:
            for batch in reader:
                idx = _good_indices(start, batch.num_rows, found)
                yield pa.Table.from_batches([batch]), idx
                start = int(idx[-1]) + 1 if len(idx) else start
                found[:] = [b for b in found if b >= start]  # only bad rows still ahead matter

    # JSON Lines -------------------------------------------------------------------------------------------------
    def _jsonl(self, wanted: List[str]):
        """Parsed line by line (``json``): a value's string is exactly what the row-by-row reader gives, whatever
        mix of types a column has; a line that is no JSON object is a ConfigError naming it, as before."""
        import numpy as np
        import pyarrow as pa

        self.keys: Dict[str, None] = {}
        values: Dict[str, List[Optional[str]]] = {c: [] for c in wanted}
        start = n = 0
        for record, why in _jsonl_objects(self.path):
            if why is not None:
                raise ConfigError(f"input {self.path}: {why}")
            self.keys.update(dict.fromkeys(record))  # union of keys in first-seen order
            for c, column in values.items():
                value = record.get(c)
                column.append(None if value is None else _as_str(value))
            n += 1
            if n - start == BATCH_ROWS:
                yield pa.table({c: pa.array(v, pa.string()) for c, v in values.items()}), np.arange(start, n)
                values = {c: [] for c in wanted}
                start = n
        if n > start:
            yield pa.table({c: pa.array(v, pa.string()) for c, v in values.items()}), np.arange(start, n)

    # Parquet ----------------------------------------------------------------------------------------------------
    def _parquet(self):
        return parquet_file(self.path)

    def _parquet_batches(self, wanted: List[str]):
        import numpy as np
        import pyarrow as pa

        start = 0
        with self._parquet() as f:
            for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                table = pa.table({c: _string_array(batch.column(c)) for c in wanted})
                yield table, np.arange(start, start + batch.num_rows)
                start += batch.num_rows


def _reading_pool():
    """jemalloc where pyarrow has it: the CSV reader frees a parse buffer per block while the columns it keeps
    grow, and jemalloc reuses those holes better than the default pool (about 20 % less peak memory at 1M
    rows); the default pool elsewhere."""
    import pyarrow as pa

    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:
        return None


def _good_indices(start: int, count: int, bad: List[int]):
    """The data-row indices of ``count`` good rows read from ``start`` on, skipping the ``bad`` indices."""
    import numpy as np

    skip = sorted(b for b in bad if b >= start)  # (the handler saw them in file order; sorted to be sure)
    out = np.empty(count, np.int64)
    i, pos = 0, start
    for b in skip:  # bad rows are rare: fill the runs between them
        if i == count:
            break
        run = min(b - pos, count - i)
        if run > 0:
            out[i:i + run] = np.arange(pos, pos + run)
            i += run
            pos += run
        if pos == b:
            pos += 1
    if i < count:
        out[i:] = np.arange(pos, pos + count - i)
    return out


def read_table(path: str | Path, fmt: str, required: Sequence[str], *, row_columns: Sequence[str] = (),
               slice_index: int = 0, num_slices: int = 1) -> Tuple[Any, Problems]:
    """(a pyarrow.Table of string columns, problem rows); ConfigError otherwise.

    ``required`` columns are read for every row; ``row_columns`` (checked to exist too) only for the rows
    ``slice_index::num_slices`` (0-based data rows), null elsewhere -- a job-array slice holds its own rows' text
    and photo paths only. Values read are strings, "" for a missing cell; a problem row (a CSV row with another
    field count than the header) keeps the values as split, in its place."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if not path.is_file():
        raise ConfigError(f"input {path}: file not found")
    if path.stat().st_size == 0:
        raise ConfigError(f"input {path}: empty file, no data rows")
    batches = _Batches(path, fmt)
    try:
        return _read(batches, list(dict.fromkeys(required)),
                     [c for c in dict.fromkeys(row_columns) if c not in required], slice_index, num_slices)
    except ConfigError:
        raise
    except UnicodeDecodeError as exc:
        raise ConfigError(f"input {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # pyarrow.ArrowInvalid, OSError, gzip.BadGzipFile, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        if "invalid UTF8" in first:
            raise ConfigError(f"input {path}: not UTF-8 text ({first})") from None
        raise ConfigError(f"input {path}: unreadable {fmt} file ({type(exc).__name__}: {first})") from None


def _read(batches: _Batches, required: List[str], row_columns: List[str], slice_index: int, num_slices: int):
    columns = batches.columns()
    if columns is not None and any(c not in columns for c in required + row_columns):
        # a missing column is named without reading the whole table (a table without rows says so first)
        peek = next(iter(batches.batches(columns[:1])), None)
        if not batches.bad and (peek is None or peek[0].num_rows == 0):
            raise ConfigError(f"input {batches.path}: no data rows")
        _check_columns(batches.path, columns, required + row_columns)
    one_pass = num_slices == 1 or not row_columns
    wanted = required + row_columns if one_pass else required
    spilled = row_columns if one_pass else []  # the whole table's text and photo paths: to disk as read
    kept = [c for c in wanted if c not in spilled]
    pieces = []
    with _Spill(spilled) as spill:
        for piece in _in_row_order(batches.batches(wanted), batches, wanted):
            pieces.append(piece.select(kept))
            spill.write(piece.select(spilled))
        if not sum(p.num_rows for p in pieces):
            raise ConfigError(f"input {batches.path}: no data rows")
        if columns is None:
            _check_columns(batches.path, list(batches.keys), required + row_columns)
        table = _joined(pieces, kept, spill.read())
    del pieces
    if not one_pass:  # the second pass: this slice's rows of the big columns, null in the others' rows
        table = _add_owned_columns(table, batches, row_columns, slice_index, num_slices)
    return table, {i: detail for i, (detail, _) in sorted(batches.bad.items())}


def _joined(pieces: List[Any], kept: List[str], spilled):
    """One table of the in-memory pieces' ``kept`` columns and the memory-mapped ``spilled`` ones (or None),
    columns in the order read."""
    import pyarrow as pa

    schema = pa.schema([(c, pa.string()) for c in kept])
    table = pa.concat_tables(pieces) if pieces else schema.empty_table()
    for name in spilled.column_names if spilled is not None else []:
        table = table.append_column(name, spilled.column(name))
    return table


class _Spill:
    """String columns written, batch by batch as they are read, to a temporary Arrow IPC file and read back
    memory-mapped (zero-copy): a 10M-row table's text and photo paths (~3 GB) are then not resident while the
    table is planned; packing touches the pages of the rows it makes tasks of, and the kernel may evict them.

    The file goes to the temporary folder (``TMPDIR``, else /tmp): the reader does not know the output folder
    (``plan_input`` runs without one), and TMPDIR is where a user already points big scratch files. It is
    unlinked as soon as it is mapped, so nothing is left behind, even by a killed run; its disk space comes
    back when the last column of the table is garbage-collected (at the latest when the process exits).
    With no columns (a table read without row columns) it does nothing and :meth:`read` gives None."""

    def __init__(self, columns: List[str]):
        self.columns, self.name, self.writer, self.sink = columns, None, None, None

    def __enter__(self) -> "_Spill":
        if self.columns:
            import pyarrow as pa
            import pyarrow.ipc as ipc

            try:
                fd, self.name = tempfile.mkstemp(prefix="mmcat-rows-", suffix=".arrow")
                os.close(fd)
                self.sink = pa.OSFile(self.name, "wb")
                self.writer = ipc.new_file(self.sink, pa.schema([(c, pa.string()) for c in self.columns]))
            except OSError as exc:
                self.__exit__()
                raise self._no_room(exc) from None
        return self

    def write(self, table) -> None:
        if self.writer is not None and table.num_rows:
            try:
                self.writer.write_table(table)
            except OSError as exc:  # a full disk
                raise self._no_room(exc) from None

    def _no_room(self, exc: OSError) -> ConfigError:
        """Where the copy goes and how to move it, in one line."""
        where = self.name or tempfile.gettempdir()
        return ConfigError(f"cannot write the temporary copy of the text and photo columns to {where} ({exc}); "
                           f"set TMPDIR to a folder with room for about the size of the table")

    def read(self):
        """The columns written, memory-mapped from the file (which is then unlinked); None without columns."""
        if self.writer is None:
            return None
        import pyarrow as pa
        import pyarrow.ipc as ipc

        self._close()
        table = ipc.open_file(pa.memory_map(self.name, "r")).read_all()  # buffers point into the mapping
        self._unlink()
        return table

    def _close(self) -> None:
        writer, sink, self.writer, self.sink = self.writer, self.sink, None, None
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()

    def _unlink(self) -> None:
        if self.name is None:
            return
        try:
            os.unlink(self.name)  # POSIX: the mapping keeps the data until the table is collected
        except OSError:  # Windows cannot unlink a mapped file: at exit then
            atexit.register(lambda name=self.name: Path(name).unlink(missing_ok=True))
        self.name = None

    def __exit__(self, *exc) -> None:
        try:
            self._close()
        finally:
            self._unlink()


def _check_columns(path: Path, columns: List[str], needed: List[str]) -> None:
    for col in needed:
        if col not in columns:
            raise ConfigError(f"input {path}: missing column '{col}' (columns: {', '.join(map(str, columns)) or 'none'})")


def _add_owned_columns(table, batches: _Batches, row_columns: List[str], slice_index: int, num_slices: int):
    """``row_columns`` read again, keeping the rows ``slice_index::num_slices`` only; null in every other row (a
    problem row included). Written row run by row run to a :class:`_Spill`, so they are memory-mapped too."""
    import numpy as np
    import pyarrow as pa

    def nulls(count: int):
        return pa.table({c: pa.nulls(count, pa.string()) for c in row_columns})

    pos = 0  # the next data row to write
    with _Spill(row_columns) as spill:
        for part, idx in batches.batches(row_columns):
            if not len(idx):
                continue
            end = int(idx[-1]) + 1
            keep = np.flatnonzero(idx % num_slices == slice_index)
            where = np.full(end - pos, -1, np.int64)  # data row -> its row in this batch, -1: null there
            where[idx[keep] - pos] = keep
            take = pa.array(where, mask=where < 0)
            spill.write(pa.table({c: _filled(part.column(c)).take(take) for c in row_columns}))
            pos = end
        spill.write(nulls(table.num_rows - pos))  # bad rows after the last good one
        owned = spill.read()
    for col in row_columns:
        table = table.append_column(col, owned.column(col))
    return table


def _in_row_order(batches: Iterator[Tuple[Any, Any]], source: _Batches, wanted: List[str]) -> Iterator[Any]:
    """The good rows' batches with the bad rows (``source.bad``, found while reading) put back in their places,
    as they are read: one row per data row, in order."""
    import pyarrow as pa

    bad = source.bad

    def bad_rows(rows: List[int]):
        return pa.table({c: pa.array([bad[i][1].get(c) or "" for i in rows], pa.string()) for c in wanted})

    schema = pa.schema([(c, pa.string()) for c in wanted])
    pending: deque = deque()
    seen = 0  # bad rows already in pending (the handler adds them in file order)
    for table, idx in batches:
        if len(bad) > seen:
            pending = deque(sorted([*pending, *source.bad_order[seen:]]))
            seen = len(bad)
        if not len(idx):
            continue
        table = pa.table({c: _filled(table.column(c)) for c in wanted}, schema=schema)
        pos = 0
        while pending and pending[0] < idx[-1]:  # a bad row inside (or before) this batch
            cut = int((idx < pending[0]).sum())
            if cut > pos:
                yield table.slice(pos, cut - pos)
                pos = cut
            run = [pending.popleft()]
            while pending and pending[0] == run[-1] + 1:
                run.append(pending.popleft())
            yield bad_rows(run)
        yield table.slice(pos)
    if len(bad) > seen:
        pending = deque(sorted([*pending, *source.bad_order[seen:]]))
    if pending:
        yield bad_rows(list(pending))


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
            with parquet_file(self.path) as meta:
                return list(meta.schema_arrow.names), meta.metadata.num_rows
        columns: List[str] = []
        for record, _ in islice(self._jsonl_records(), JSONL_PEEK):  # union of keys in first-seen order
            columns.extend(k for k in (record or {}) if k not in columns)
        return columns, None

    @contextmanager
    def _open_csv(self) -> Iterator[Tuple[Any, Any]]:
        delimiter = "\t" if _suffix(self.path) == ".tsv" else ","
        with _open_text(self.path, newline="") as f:
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
        with parquet_file(self.path) as table:
            for batch in table.iter_batches(batch_size=self.chunk_rows, columns=self.wanted):
                for record in batch.to_pylist():
                    yield self._values(record), None
