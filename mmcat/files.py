"""Files on disk: atomic writes of files and directories (with fsync), and reading JSON with a one-line error.

What other programs read or a resumed run relies on (shards, pack state records, dataset files, the run's
``config.yaml`` / ``metrics.json`` / data-order files, checkpoints, ``best/``, synthetic tables) is written under a
temporary name in the same directory, flushed to disk, then renamed to its final name: a reader, or a run resumed
after a crash or ``kill -9``, sees the old version or the new one, never a part. The rename is made durable by an
fsync of the parent directory.

Replacing a *directory* that exists (``best/`` at every improvement, a checkpoint saved again after a resume) needs
more than ``rename``, which refuses a non-empty target. On Linux (glibc >= 2.28) the two directories are swapped
in one step with ``renameat2(RENAME_EXCHANGE)``, so the final name never disappears, and the old contents (now under
the temporary name) are deleted. Where that call is missing or refused (other systems, older glibc, file systems
without RENAME_EXCHANGE such as some network file systems) the old directory is renamed away first and the new one
renamed in: then there is a short moment without the final name.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Type, Union

PathLike = Union[str, os.PathLike]
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NOT_SUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV}


def temp_path(path: PathLike) -> Path:
    """The temporary name a file is written under before it is renamed to ``path``: ``.NAME.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` (str: as UTF-8) to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    publish_file(tmp, path)


def publish_file(tmp: PathLike, path: PathLike) -> None:
    """Give the finished (closed) file ``tmp`` its final name ``path``: fsync, rename, fsync the directory. For
    writers that stream into ``tmp`` themselves (tar shards); everyone else calls :func:`write_atomic`."""
    _fsync_path(Path(tmp))
    os.replace(tmp, path)
    _fsync_path(Path(path).parent)


def publish_dir(tmp: PathLike, path: PathLike) -> None:
    """Give the fully written directory ``tmp`` its final name ``path``, replacing any directory there.

    Every file and folder under ``tmp`` is fsynced first. An existing ``path`` is swapped with ``tmp`` atomically
    where the OS allows it (``path`` is never absent), otherwise moved to ``PATH.old`` just before; either way the old
    contents are deleted afterwards."""
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    if not path.exists():
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # now holds the old contents
    else:
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    _fsync_path(path.parent)


def fresh_dir(path: PathLike) -> Path:
    """An empty directory at ``path`` (what an interrupted earlier attempt left there is removed)."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def read_json(path: PathLike, error: Type[Exception], missing_ok: bool = False) -> Optional[Any]:
    """The parsed JSON file ``path``; None for a missing file when ``missing_ok``. Anything unreadable (missing,
    permissions, not JSON) raises ``error`` with one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"cannot read {path}: no such file") from None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise error(f"cannot read {path}: {why}") from None


# ------------------------------------------------------------------------------------------------- internals
def _fsync_path(path: Path) -> None:
    """fsync a file or a directory by name (a directory's fsync makes the renames inside it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            _fsync_path(Path(folder, name))
        _fsync_path(Path(folder))


@lru_cache(maxsize=1)
def libc() -> Optional[ctypes.CDLL]:
    """The C library's symbols (errno kept for ``ctypes.get_errno``), or None. ``dlopen(NULL)``: the process's own
    symbols, libc's among them. Not ``ctypes.util.find_library("c")``, which runs ``ldconfig -p`` in a child process
    at every call: a stray process in the trainer and in every loader worker."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@lru_cache(maxsize=1)
def _renameat2() -> Optional[Callable[..., int]]:
    """libc's renameat2 (glibc >= 2.28), or None."""
    lib = libc() if hasattr(os, "uname") and os.uname().sysname == "Linux" else None
    fn = getattr(lib, "renameat2", None) if lib is not None else None
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the OS or the file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NOT_SUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))
