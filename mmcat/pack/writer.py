"""Write samples, in a fixed order, into shards that rotate by sample count and bytes; record resume state.

Each shard is written to ``.NAME.tmp`` with ``webdataset.TarWriter`` (fixed mtime -> reproducible bytes), fsynced
and renamed; only then is its state record (``.pack-state/.../NAME.json``: sample count, bytes, the range of task
positions it covers, label counts and the failures inside that range) written, atomically. The record is the
shard's "done" marker: on ``--resume`` the writer restarts right after the last recorded position, so a shard
renamed but not yet recorded is simply rewritten (same name, same bytes) and every row lands exactly once.

Any OSError while writing (disk full, quota, read-only file system, ``--out`` under a regular file ...) becomes an
``OutputError``: one line naming the file, suggesting ``--resume`` (the finished shards stay valid).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from mmcat.errors import OutputError
from mmcat.files import publish_file, temp_path, write_atomic
from mmcat.pack.attributes import AttributeStats
from mmcat.pack.worker import Result

TAR_MTIME = 946684800  # 2000-01-01: fixed so the same input gives byte-identical shards
_BLOCK, _RECORD = 512, 10240  # tar block and record sizes (tarfile.BLOCKSIZE / RECORDSIZE)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sample_tar_bytes(key: str, members: Dict[str, bytes]) -> int:
    """Bytes a sample adds to a USTAR tar: one header block per member plus its data padded to blocks."""
    return sum(_BLOCK + _round_up(len(v), _BLOCK) for v in members.values())


@contextmanager
def writing(path: Optional[Path]) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into an OutputError (exit code 2 from the CLI)."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or path  # mkdir/open name the failing path; write/fsync (ENOSPC, EFBIG) do not
        raise OutputError(f"cannot write {where}: {exc.strerror or type(exc).__name__} -- free space or fix "
                          "permissions (or choose another --out), then run the same command with --resume "
                          "to keep the finished shards") from None


def write_json_atomic(path: Path, obj, lines: bool = False) -> None:
    if lines:
        text = "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n" for x in obj)
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    with writing(path):
        write_atomic(path, text)


class SplitWriter:
    """Shards of one split (for one slice). Feed results with ``add(pos, key, result)`` in position order."""

    def __init__(self, shard_dir: Path, state_dir: Path, name: Callable[[int], str], labels: List[str],
                 max_samples: int, max_bytes: float, next_index: int = 0, next_pos: int = 0,
                 attribute_kinds: Optional[Dict[str, str]] = None):
        self.attribute_kinds = attribute_kinds  # set for the split attributes.json is fit on
        self.shard_dir, self.state_dir, self.name, self.labels = shard_dir, state_dir, name, labels
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.index, self.start = next_index, next_pos
        self.records: List[dict] = []
        self._tar = None  # webdataset.TarWriter of the open shard
        self._file = None
        self._tmp: Optional[Path] = None  # the .tmp file of the open shard
        self._reset_counters()
        for folder in (shard_dir, state_dir):
            with writing(folder):
                folder.mkdir(parents=True, exist_ok=True)

    def _reset_counters(self) -> None:
        self.samples, self.bytes = 0, 0
        self.label_counts = [0] * len(self.labels)
        self.failures: List[dict] = []
        self.notes: Dict[str, int] = {}
        self.attribute_stats = AttributeStats(self.attribute_kinds) if self.attribute_kinds is not None else None

    def _open(self) -> None:
        from webdataset import TarWriter  # imported on first use: it pulls in torch (~1.5 s), config errors stay fast

        self._tmp = temp_path(self.shard_dir / self.name(self.index))
        with self._shard_io():
            self._file = open(self._tmp, "wb")
            self._tar = TarWriter(self._file, encoder=False, mtime=TAR_MTIME)

    @contextmanager
    def _shard_io(self) -> Iterator[None]:
        try:
            with writing(self._tmp):
                yield
        except OutputError:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """Drop the shard being written after a write error; ``--resume`` deletes its .tmp file. Closing here (and
        ignoring the same error again) keeps tarfile from retrying the write from a finalizer at exit."""
        for handle in (self._tar, self._file):
            try:
                if handle is not None:
                    handle.close()
            except (OSError, ValueError):
                pass
        self._tar, self._file = None, None

    def add(self, pos: int, key: str, result: Result) -> None:
        if result.members is not None:
            size = sample_tar_bytes(key, result.members)
            full = self.samples >= self.max_samples
            too_big = _round_up(self.bytes + size + 2 * _BLOCK, _RECORD) > self.max_bytes
            if self.samples and (full or too_big):
                self._close(end=pos)
            if self._tar is None:
                self._open()
            with self._shard_io():
                self._tar.write({"__key__": key, **result.members})
            self.samples += 1
            self.bytes += size
            self.label_counts[result.label_index] += 1
            if self.attribute_stats is not None:
                self.attribute_stats.add(result.attributes or {})
        if result.failure is not None:
            self.failures.append(result.failure)
        for note in result.notes:
            self.notes[note] = self.notes.get(note, 0) + 1

    def _close(self, end: int) -> None:
        name = self.name(self.index) if self._tar is not None else None
        size = 0
        if self._tar is not None:
            final = self.shard_dir / name
            with self._shard_io():
                self._tar.close()  # writes the end-of-archive blocks; the file is ours to close
                self._file.close()
                publish_file(self._tmp, final)
            size = final.stat().st_size
        record = {"index": self.index, "name": name, "samples": self.samples, "bytes": size, "start": self.start,
                  "end": end, "label_counts": dict(zip(self.labels, self.label_counts)),
                  "failures": self.failures, "notes": self.notes}
        if self.attribute_stats is not None:  # per shard, so a resumed run or pack-merge refits exactly
            record["attribute_stats"] = self.attribute_stats.to_json()
        # a failures-only tail (no sample after the last shard) gets a record without a shard
        write_json_atomic(self.state_dir / f"{self.index:06d}.json", record)
        self.records.append(record)
        self._tar, self._file = None, None
        self.index += 1
        self.start = end
        self._reset_counters()

    def finish(self, end: int) -> None:
        if self._tar is not None or self.failures or self.notes or self.start < end:
            self._close(end)


def load_records(state_dir: Path, shard_dir: Path) -> List[dict]:
    """Contiguous valid state records of a split; anything after the first gap or mismatch is discarded."""
    records: List[dict] = []
    if not state_dir.is_dir():
        return records
    expected_start = 0
    for n in range(len(list(state_dir.glob("*.json")))):
        path = state_dir / f"{n:06d}.json"
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            break
        shard = shard_dir / rec["name"] if rec.get("name") else None
        if rec.get("start") != expected_start or (shard is not None and (not shard.is_file() or shard.stat().st_size != rec["bytes"])):
            break
        records.append(rec)
        expected_start = rec["end"]
    for stale in state_dir.glob("*.json"):  # records past the valid prefix describe work we will redo
        if int(stale.stem) >= len(records):
            stale.unlink()
    return records
