"""http(s) image URLs: downloaded by ``mmcat pack`` ahead of the in-order processing, with the standard library.

Where downloads run, and why: in a thread pool of the pack process (the parent, or the one process of a
``--workers 1`` run), never in the worker processes. Downloading is waiting, not computing, so threads are the right
tool and the worker count stays a CPU knob; the parent hands each downloaded body to the worker that decodes it, in
table order, so the shards are byte-identical for any ``--workers``/``--download-threads``. One process downloading
also makes the per-host limit exact: at most ``download_max_per_host`` requests to one host (``host:port`` as
written in the URL) are open at any moment in one pack run. Job-array slices are separate runs: N slices running at
once may open N times that many.

Each attempt has a deadline (``download_timeout`` seconds for connecting, the response and the whole body, checked
between reads; no single network wait is longer either). Timeouts, refused/reset connections, HTTP 408, 429 and
5xx are retried up to ``download_retries`` times with exponential backoff (1 s, 2 s, 4 s ... at most 30 s;
a ``Retry-After`` up to 30 s is honoured); a 404 or any other answer that will not change is not. The body is read
up to ``max_image_bytes``: a larger Content-Length fails before the body is read, a longer body (chunked, or a
missing or wrong length) stops being read one byte past the cap. A failure becomes ``image_download_failed`` with a
short detail (``HTTP 404``, ``timeout after 10 s``, ``too large: more than N bytes``, ``connection refused``);
the row is then degraded like any unusable photo (kept with its text, rejected without).
"""
from __future__ import annotations

import errno
import http.client
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Deque, Dict, Iterable, Iterator, Optional, Tuple

from mmcat import __version__

DOWNLOAD_FAILED = "image_download_failed"
USER_AGENT = f"mmcat/{__version__} (image download)"
_URL = re.compile(r"^https?://", re.IGNORECASE)
_BACKOFF_FIRST, _BACKOFF_MAX = 1.0, 30.0  # seconds
_READ_BLOCK = 1 << 16
# characters a URL may keep as they are: reserved ones and '%' (an existing escape); spaces and non-ASCII
# characters, common in catalog exports, are percent-encoded (UTF-8) as a browser would
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"


def is_url(path: Optional[str]) -> bool:
    """An image cell that is an http(s) URL (kept as is by the plan, never joined to images_root)."""
    return bool(path) and _URL.match(path) is not None


@dataclass(frozen=True)
class DownloadSettings:
    """What the downloader needs (picklable, from PackConfig). None of it changes the bytes of a photo that
    downloads, so none of it is in the resume settings: an interrupted run can be resumed with a longer timeout or
    more retries after a network problem."""

    timeout: float
    retries: int
    max_per_host: int
    threads: int
    max_bytes: int

    @classmethod
    def from_config(cls, cfg) -> "DownloadSettings":
        return cls(float(cfg.download_timeout), int(cfg.download_retries), int(cfg.download_max_per_host),
                   int(cfg.download_threads), int(cfg.max_image_bytes))


@dataclass(frozen=True)
class Fetched:
    """The body of a downloaded photo, or why there is none (the ``image_download_failed`` detail). A plain
    dataclass rather than an exception, so it crosses to a worker process by pickle without losing fields."""

    data: bytes = b""
    error: Optional[str] = None


class _Failed(Exception):
    def __init__(self, detail: str, retry: bool, wait: Optional[float] = None):
        super().__init__(detail)
        self.detail, self.retry, self.wait = detail, retry, wait


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_url(newurl):
            raise _Failed(f"redirect to a non-http(s) URL (HTTP {code})", retry=False)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def quote_url(url: str) -> str:
    """Percent-encode what may not appear in a request line (spaces, non-ASCII); IDNA for a non-ASCII host."""
    parts = urllib.parse.urlsplit(url.strip())
    if not parts.netloc.isascii():
        try:  # label by label; ASCII labels (and a ':port') pass through unchanged
            parts = parts._replace(netloc=parts.netloc.encode("idna").decode("ascii"))
        except UnicodeError:
            raise ValueError(f"host {parts.netloc!r} cannot be encoded") from None
    return urllib.parse.urlunsplit(parts._replace(path=urllib.parse.quote(parts.path, safe=_URL_SAFE),
                                                  query=urllib.parse.quote(parts.query, safe=_URL_SAFE)))


class Downloader:
    """Downloads one URL at a time per calling thread; shared by the threads of one pack run (per-host limit)."""

    def __init__(self, settings: DownloadSettings, stop: Optional[threading.Event] = None):
        self.s = settings
        self.stop = stop or threading.Event()  # set: no new attempt, no more waiting between attempts
        self._opener = urllib.request.build_opener(_HttpOnlyRedirects)  # keeps the environment's proxy settings
        self._hosts: Dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def fetch(self, url: str) -> Fetched:
        """The body of ``url``, or the reason it could not be had after the allowed attempts."""
        attempts = self.s.retries + 1
        for attempt in range(attempts):
            try:
                return Fetched(self._attempt(url))
            except _Failed as exc:
                failure = exc
            if not failure.retry or attempt + 1 == attempts:
                break
            delay = min(_BACKOFF_FIRST * 2 ** attempt, _BACKOFF_MAX)
            if failure.wait is not None:
                delay = min(max(delay, failure.wait), _BACKOFF_MAX)
            if self.stop.wait(delay):
                break
        tried = attempt + 1
        return Fetched(error=failure.detail + (f" (after {tried} attempts)" if tried > 1 else ""))

    def _slot(self, url: str) -> threading.BoundedSemaphore:
        """The semaphore of the URL's ``host:port`` (ValueError for a malformed port)."""
        parts = urllib.parse.urlsplit(url)
        host = f"{(parts.hostname or '').lower()}:{parts.port or (443 if parts.scheme.lower() == 'https' else 80)}"
        with self._lock:
            if host not in self._hosts:
                self._hosts[host] = threading.BoundedSemaphore(self.s.max_per_host)
            return self._hosts[host]

    def _attempt(self, url: str) -> bytes:
        try:
            # no Accept header: the server's default format (asking for image/* can bring AVIF, which OpenCV
            # may not decode)
            request = urllib.request.Request(quote_url(url), headers={"User-Agent": USER_AGENT})
            slot = self._slot(url)
        except ValueError as exc:  # not a URL urllib can request (bad port, bad IPv6 literal, ...)
            raise _Failed(f"bad URL ({exc})", retry=False) from None
        with slot:
            if self.stop.is_set():
                raise _Failed("stopped", retry=False)
            deadline = time.monotonic() + self.s.timeout
            try:
                with self._opener.open(request, timeout=self.s.timeout) as response:
                    return self._read_body(response, deadline)
            except _Failed:
                raise
            except Exception as exc:  # noqa: BLE001 -- every network error is a recorded failure, never a crash
                raise self._classify(exc) from None

    def _read_body(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        cap = self.s.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > cap:  # fail before reading a byte of the body
            raise _Failed(f"too large: more than {cap} bytes (Content-Length {int(declared)})", retry=False)
        chunks, size = [], 0
        while True:
            # read1: returns what one network read brings, so a server trickling bytes meets the deadline below
            block = response.read1(min(_READ_BLOCK, cap + 1 - size))
            if not block:
                return b"".join(chunks)
            chunks.append(block)
            size += len(block)
            if size > cap:
                raise _Failed(f"too large: more than {cap} bytes", retry=False)
            if time.monotonic() > deadline:
                raise TimeoutError

    def _classify(self, exc: BaseException) -> _Failed:
        """A network exception -> the recorded detail, and whether another attempt can succeed."""
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()
            retry_after = exc.headers.get("Retry-After", "") if exc.headers else ""
            wait = float(retry_after) if retry_after.strip().isdigit() else None
            return _Failed(f"HTTP {exc.code}", retry=exc.code in (408, 429) or exc.code >= 500, wait=wait)
        if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
            exc = exc.reason  # urllib wraps connect errors; a timeout while waiting for the answer comes bare
        if isinstance(exc, _Failed):
            return exc
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return _Failed(f"timeout after {self.s.timeout:g} s", retry=True)
        if isinstance(exc, ConnectionRefusedError):
            return _Failed("connection refused", retry=True)
        if isinstance(exc, http.client.RemoteDisconnected):
            return _Failed("connection closed by the server without an answer", retry=True)
        if isinstance(exc, (ConnectionError, http.client.IncompleteRead)):
            return _Failed(f"connection broken ({type(exc).__name__})", retry=True)
        if isinstance(exc, socket.gaierror):  # a name that does not resolve stays so; a DNS hiccup may pass
            return _Failed(f"host not found ({exc.strerror})", retry=exc.errno == socket.EAI_AGAIN)
        if isinstance(exc, ssl.SSLError):
            return _Failed(f"TLS error ({getattr(exc, 'reason', None) or type(exc).__name__})", retry=False)
        if isinstance(exc, http.client.HTTPException):
            return _Failed(f"bad HTTP answer ({type(exc).__name__})", retry=False)
        if isinstance(exc, OSError):  # network unreachable, ...
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            return _Failed(f"connection error ({name})", retry=True)
        if isinstance(exc, (ValueError, urllib.error.URLError)):
            return _Failed(f"bad URL ({exc})", retry=False)
        return _Failed(f"{type(exc).__name__}: {exc}", retry=False)


class Prefetch:
    """``(task, Fetched or None)`` for ``tasks`` in their order, the URL tasks downloaded by a thread pool up to
    ``window`` tasks ahead of the one handed out (None: a local path, read by the worker as before).

    ``gate``: the consumer is a ``Pool.imap`` that drains this iterator as fast as it can; with a gate, at most
    ``window`` tasks are handed out and not yet :meth:`consumed`, so downloaded bodies never pile up in the pool's
    queue (memory stays about 2 x window bodies). The window must be at least the imap chunk size, or the pool
    would wait for a chunk the gate never completes. Use as a context manager: leaving it stops the downloads
    (running attempts end at their deadline) and unblocks a waiting gate, so the pool can be shut down.
    """

    def __init__(self, tasks: Iterable, settings: DownloadSettings, window: int, gate: bool = False,
                 any_url: Optional[bool] = None):
        # any_url: whether some task is a URL, when the caller knows it without making every task (a lazy plan of
        # millions of rows); else the tasks are listed to find out
        if any_url is None:
            tasks = list(tasks)
            any_url = any(is_url(t.image_path) for t in tasks)
        self.tasks = tasks
        self.window = max(1, window)
        self.any_url = any_url
        self._stop = threading.Event()
        self._gate = threading.Semaphore(self.window) if gate and self.any_url else None
        self._pool: Optional[ThreadPoolExecutor] = None
        if self.any_url:
            self._pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="mmcat-download")
            self._downloader = Downloader(settings, self._stop)

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def consumed(self) -> None:
        """One handed-out task's result has been used (call once per result when ``gate`` is on)."""
        if self._gate is not None:
            self._gate.release()

    def __iter__(self) -> Iterator[Tuple[object, Optional[Fetched]]]:
        pending: Deque[Tuple[object, Optional[Future]]] = deque()
        source = iter(self.tasks)
        self._top_up(pending, source)
        while pending:
            if not self._pass_gate():
                return
            task, future = pending.popleft()
            self._top_up(pending, source)
            try:
                fetched = future.result() if future is not None else None
            except CancelledError:  # only after __exit__: nobody is waiting for the rest
                return
            yield task, fetched

    def _top_up(self, pending: deque, source: Iterator) -> None:
        while len(pending) < self.window:
            task = next(source, None)
            if task is None:
                return
            url = task.image_path if is_url(task.image_path) else None
            try:
                pending.append((task, self._pool.submit(self._downloader.fetch, url) if url else None))
            except RuntimeError:  # the pool was shut down by __exit__ (the pool's thread may still be here)
                return

    def _pass_gate(self) -> bool:
        if self._gate is None:
            return not self._stop.is_set()
        while not self._gate.acquire(timeout=0.1):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

