"""The training loader's shard reader: webdataset's ``tarfile_samples``, with a fast path for plain tar headers.

webdataset reads every 512-byte member header through Python's ``tarfile`` (``TarInfo.frombuf``: every field
decoded, pax and GNU extensions looked for), about 0.07 ms a member. With four members a sample (jpg, txt, cls,
json) that was ~30 % of a loader worker's time at 224 px. mmcat's shards, like most, hold only plain ustar headers
of regular files, and those need three fields: name, size, type. ``tar_members`` reads such headers directly and
hands the rest of the shard, from the first header it does not take, to webdataset's own ``tar_file_iterator``:
pax or GNU long names, links, folders, a bad checksum, a truncated member, a compressed or piped shard. So member
names, the members skipped, the errors raised and the handler's say over them stay webdataset's; opening
(``url_opener``) and grouping into samples (``group_by_keys``) are webdataset's own functions.
"""
from __future__ import annotations

import re
from typing import Any, BinaryIO, Callable, Dict, Iterator, Optional

from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix, tar_file_iterator, url_opener

BLOCK = 512
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta
_REGULAR = (b"0", b"\x00")
_USTAR = (b"ustar\x0000", b"ustar  \x00")  # POSIX and GNU magic + version
_ZERO_BLOCK = bytes(BLOCK)


def tarfile_samples(url: str, handler: Callable[[Exception], bool],
                    select_files: Optional[Callable[[str], bool]] = None) -> Iterator[Dict[str, Any]]:
    """What ``webdataset.tarfile_samples(iter([{"url": url}]), handler=..., select_files=...)`` yields."""
    return group_by_keys(_expand(url_opener(iter([{"url": url}]), handler=handler), handler, select_files),
                         handler=handler)


def _expand(streams: Iterator[Dict[str, Any]], handler: Callable[[Exception], bool],
            select_files: Optional[Callable[[str], bool]]) -> Iterator[Dict[str, Any]]:
    """webdataset's ``tar_file_expander`` (same markers and error handling) over :func:`tar_members`."""
    for source in streams:
        try:
            for sample in tar_members(source["stream"], handler, select_files):
                sample["__url__"] = source["url"]
                if source.get("local_path") is not None:
                    sample["__local_path__"] = source["local_path"]
                yield sample
            yield {}  # end-of-shard marker: samples of two shards never merge
        except Exception as exn:
            exn.args = exn.args + (source.get("stream"), source.get("url"))
            if not handler(exn):
                break
        finally:
            source["stream"].close()


def tar_members(stream: BinaryIO, handler: Callable[[Exception], bool] = lambda exn: False,
                select_files: Optional[Callable[[str], bool]] = None) -> Iterator[Dict[str, Any]]:
    """``{"fname", "data"}`` of each selected regular member, as webdataset's ``tar_file_iterator`` yields them.

    Plain headers are read here until the end-of-archive block. At any other header the stream goes back to where
    it started and webdataset's reader takes the whole shard, its first members (already yielded) left out: tarfile's
    verdicts depend on where in the shard a header sits (a damaged first header is an error, a later one ends the
    shard quietly), so it must see the shard from its start. ``select_files`` may then be asked twice for a name."""
    yielded = 0
    seekable = bool(getattr(stream, "seekable", lambda: False)())
    if seekable:
        start = stream.tell()
        for member in _plain_members(stream, select_files):
            if member is None:
                return  # the end-of-archive block, where tarfile stops too
            yielded += 1
            yield member
        stream.seek(start)
    for i, member in enumerate(tar_file_iterator(stream, handler=handler, select_files=select_files)):
        if i >= yielded:
            yield member


def _plain_members(stream: BinaryIO, select_files: Optional[Callable[[str], bool]]) -> Iterator[Optional[dict]]:
    """The selected members behind plain headers, then None at an all-zero block; stops at anything else."""
    while True:
        header = stream.read(BLOCK)
        if header == _ZERO_BLOCK:
            yield None
            return
        parsed = _plain_header(header)
        if parsed is None:
            return
        name, size = parsed
        padded = -(-size // BLOCK) * BLOCK
        if not _wanted(name, select_files):
            stream.seek(padded, 1)
            continue
        data = stream.read(size)
        if len(data) < size:
            return  # truncated: tarfile raises its own error for it
        stream.seek(padded - size, 1)
        yield {"fname": name, "data": data}


def _plain_header(header: bytes) -> Optional[tuple]:
    """(name, size) of a plain ustar header of a regular file with a short name and a valid checksum, else None."""
    if len(header) < BLOCK or header[156:157] not in _REGULAR or header[257:265] not in _USTAR:
        return None
    if header[345:346] != b"\x00" or header[124] & 0x80:  # a name prefix or a base-256 size: tarfile's job
        return None
    try:
        checksum = int(header[148:156].rstrip(b"\x00 ") or b"x", 8)
        size = int(header[124:136].rstrip(b"\x00 ") or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):
        return None  # signed-checksum tars and damaged headers: tarfile decides
    name = header[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
    if not name or name.endswith("/"):
        return None  # tarfile turns a regular type with a trailing slash into a folder
    return name, size


def _wanted(name: str, select_files: Optional[Callable[[str], bool]]) -> bool:
    """webdataset's member filters, in its order: metadata members, skip_meta, then select_files."""
    if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
        return False
    if _SKIP_META.match(name):
        return False
    return select_files is None or bool(select_files(name))
