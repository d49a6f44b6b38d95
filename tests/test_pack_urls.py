"""mmcat pack with http(s) image URLs, against a real HTTP server the tests start on 127.0.0.1.

The server logs every request (path, Host, User-Agent), counts the requests in flight per host and the bytes it
managed to send before a client hung up, so the tests check what the downloader *did*: which URLs were retried,
that reading stopped at the byte cap, that no host ever had more than --download-max-per-host requests open, and
that --resume asked for no URL of a finished shard. Samples are read back with plain webdataset and joined to the
table by id.
"""
from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np
import pytest
import webdataset as wds

from conftest import kill_pack_after, pack_config

COLUMNS = ["id", "image", "title", "description", "category"]
BIG = 64 << 20  # what the oversized responses would send if the client read them to the end


# ------------------------------------------------------------------------------------------------ the server
class Server:
    """ThreadingHTTPServer on 127.0.0.1 with a route per path: ``routes[path](handler, call_number)``."""

    def __init__(self) -> None:
        self.routes: Dict[str, Callable] = {}
        self.lock = threading.Lock()
        self.log: List[tuple] = []  # (path, host, user agent), in arrival order
        self.calls: Counter = Counter()  # path -> requests
        self.inflight: Counter = Counter()  # host -> requests open now
        self.max_inflight: Counter = Counter()  # host -> most requests open at once
        self.max_total = 0
        self.sent: Dict[str, int] = {}  # path -> body bytes written before the client went away
        self.hold_after: Optional[int] = None  # serve this many requests, hold later ones until `release` is set
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()
            self.calls.clear()
            self.max_inflight.clear()
            self.max_total = 0

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = urllib.parse.unquote(self.path)
                host = self.headers.get("Host", "").rsplit(":", 1)[0]
                with server.lock:
                    server.log.append((path, host, self.headers.get("User-Agent")))
                    server.calls[path] += 1
                    n = server.calls[path]
                    server.inflight[host] += 1
                    server.max_inflight[host] = max(server.max_inflight[host], server.inflight[host])
                    server.max_total = max(server.max_total, sum(server.inflight.values()))
                    hold = server.hold_after is not None and len(server.log) > server.hold_after
                self.host, self.open = host, True
                try:
                    if hold:
                        server.release.wait(120)
                    server.routes.get(path, status(404))(self, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    self.answering()

            def answering(self) -> None:
                """The request stops counting as in flight just before its answer is sent: the client cannot
                start its next request to this host earlier, so overlaps seen here are the client's own."""
                with server.lock:
                    if self.open:
                        server.inflight[self.host] -= 1
                        self.open = False

        return Handler


def ok(data: bytes, delay: float = 0.0, content_type: str = "image/jpeg") -> Callable:
    def route(h: BaseHTTPRequestHandler, n: int) -> None:
        time.sleep(delay)
        h.answering()
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return route


def status(code: int) -> Callable:
    def route(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def fail_first(times: int, then: Callable, code: int = 500) -> Callable:
    return lambda h, n: status(code)(h, n) if n <= times else then(h, n)


def redirect(location: str) -> Callable:
    def route(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def trickle(every: float) -> Callable:
    """A 200 that promises 100 kB and sends one byte every ``every`` seconds (each read returns in time), then hangs
    up after 40 bytes (so a client without an overall deadline fails here with another detail, not by hanging)."""
    def route(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(40):
            h.wfile.write(b"\xff")
            h.wfile.flush()
            time.sleep(every)
    return route


def stream(server: Server, path: str, headers: Dict[str, str], chunked: bool = False) -> Callable:
    """A 200 whose body is BIG bytes, written 64 KiB at a time; records how much went out before a hang-up."""
    def route(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        block, sent = b"\0" * 65536, 0
        try:
            while sent < BIG:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                sent += len(block)
            if chunked:
                h.wfile.write(b"0\r\n\r\n")
        finally:
            server.sent[path] = sent
    return route


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # a proxy from the environment must not get these
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = Server()
    yield s
    s.close()


# ------------------------------------------------------------------------------------------------ helpers
def _photo(seed: int) -> bytes:
    """A smooth 96x72 JPEG, clearly different for each seed (so a swapped photo cannot pass a pixel check)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:72, 0:96].astype(np.float32)
    a, b, c = rng.uniform(0.02, 0.12, 3)
    img = np.dstack([127 + 120 * np.sin(a * x + k + c * y) for k in rng.uniform(0, 6.28, 3)]).astype(np.uint8)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _write_table(path: Path, rows: List[Dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def _row(id_: str, image: str, label: str = "a", text: bool = True) -> Dict[str, str]:
    return {"id": id_, "image": image, "title": f"title of {id_}" if text else "",
            "description": f"description of {id_}" if text else "", "category": label}


def _samples(out: Path) -> Dict[str, dict]:
    """id -> sample, every split, read with plain webdataset."""
    manifest = json.loads((out / "manifest.json").read_text())
    got = {}
    for split, info in manifest["splits"].items():
        urls = [str(out / split / s["name"]) for s in info["shards"]]
        for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if urls else []:
            got[json.loads(sample["json"])["id"]] = sample
    return got


def _failures(out: Path) -> Dict[str, dict]:
    return {f["id"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}


def _shard_bytes(out: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _pixels(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(np.float32)


# ------------------------------------------------------------------------------------------------ tests
def test_urls_are_downloaded_and_each_failure_is_recorded_with_its_reason(server: Server, tmp_path: Path):
    from mmcat.pack import pack

    photos = {n: _photo(n) for n in range(6)}
    (tmp_path / "images").mkdir()
    for n in (0, 1):  # the same bytes as served, packed from disk: the URL rows must give the same samples
        (tmp_path / "images" / f"g{n}.jpg").write_bytes(photos[n])
    for n in range(4):
        server.routes[f"/img/g{n}.jpg"] = ok(photos[n])
    server.routes["/img/photo ä 1.jpg"] = ok(photos[4])  # the table holds the raw space and umlaut
    server.routes["/flaky.jpg"] = fail_first(1, ok(photos[5]))
    server.routes["/always500.jpg"] = status(500)
    server.routes["/busy.jpg"] = fail_first(1, ok(photos[3]), code=429)
    server.routes["/moved.jpg"] = redirect("/img/g2.jpg")
    server.routes["/to-ftp.jpg"] = redirect("ftp://127.0.0.1/x.jpg")
    server.routes["/trickle.jpg"] = trickle(0.2)
    server.routes["/slow.jpg"] = ok(photos[0], delay=3.0)
    server.routes["/page.jpg"] = ok(b"<html><body>not a photo</body></html>", content_type="text/html")
    server.routes["/big-declared.jpg"] = stream(server, "/big-declared.jpg", {"Content-Length": str(BIG)})
    server.routes["/big-chunked.jpg"] = stream(server, "/big-chunked.jpg", {"Transfer-Encoding": "chunked"},
                                               chunked=True)
    server.routes["/big-lying.jpg"] = stream(server, "/big-lying.jpg", {"Content-Length": "lots"})
    rows = [_row(f"u_good{n}", server.url(f"/img/g{n}.jpg"), "ab"[n % 2]) for n in range(4)] + [
        _row("l_good0", "images/g0.jpg"), _row("l_good1", "images/g1.jpg", "b"),
        _row("u_space", server.url("/img/photo ä 1.jpg")),
        _row("u_flaky", server.url("/flaky.jpg"), "b"),
        _row("u_404", server.url("/missing.jpg")),
        _row("u_404_notext", server.url("/missing2.jpg"), text=False),
        _row("u_500", server.url("/always500.jpg"), "b"),
        _row("u_busy", server.url("/busy.jpg")),
        _row("u_moved", server.url("/moved.jpg"), "b"),
        _row("u_to_ftp", server.url("/to-ftp.jpg")),
        _row("u_trickle", server.url("/trickle.jpg"), "b"),
        _row("u_slow", server.url("/slow.jpg")),
        _row("u_declared", server.url("/big-declared.jpg"), "b"),
        _row("u_chunked", server.url("/big-chunked.jpg")),
        _row("u_lying", server.url("/big-lying.jpg"), "b"),
        _row("u_refused", f"http://127.0.0.1:{_closed_port()}/x.jpg"),
        _row("u_html", server.url("/page.jpg"), "b"),
        _row("l_missing", "images/nope.jpg"),
    ]
    table = _write_table(tmp_path / "products.csv", rows)
    cap = 300_000
    start = time.monotonic()
    manifest = pack(pack_config(table, tmp_path / "out", image_size=48, splits={"train": 1.0}, max_image_bytes=cap,
                                download_timeout=1.0, download_retries=1, download_threads=8,
                                download_max_per_host=4))
    took = time.monotonic() - start
    samples, failures = _samples(tmp_path / "out"), _failures(tmp_path / "out")

    with_jpg = {"u_good0", "u_good1", "u_good2", "u_good3", "l_good0", "l_good1", "u_space", "u_flaky", "u_busy",
                "u_moved"}
    assert {i for i, s in samples.items() if "jpg" in s} == with_jpg
    assert set(samples) == {r["id"] for r in rows} - {"u_404_notext"}  # degraded rows keep their text
    for n in (0, 1):  # downloaded and local copies of one photo give the same sample image, byte for byte
        assert samples[f"u_good{n}"]["jpg"] == samples[f"l_good{n}"]["jpg"]
    for id_, n in [("u_good0", 0), ("u_good1", 1), ("u_good2", 2), ("u_good3", 3), ("u_space", 4), ("u_flaky", 5),
                   ("u_busy", 3), ("u_moved", 2)]:
        got = _pixels(samples[id_]["jpg"])
        want = cv2.resize(_pixels(photos[n]), (got.shape[1], got.shape[0]), interpolation=cv2.INTER_AREA)
        others = [np.abs(got - cv2.resize(_pixels(photos[m]), got.shape[1::-1])).mean() for m in photos if m != n]
        assert np.abs(got - want).mean() < 4 < min(others), id_

    def what(id_: str) -> tuple:
        f = failures[id_]
        return f["reason"], f["kind"], f.get("detail")

    assert what("u_404") == ("image_download_failed", "degraded", "HTTP 404")
    assert what("u_404_notext") == ("no_usable_modality", "rejected", "HTTP 404")
    assert failures["u_404_notext"]["image_error"] == "image_download_failed"
    assert what("u_500") == ("image_download_failed", "degraded", "HTTP 500 (after 2 attempts)")
    assert what("u_slow") == ("image_download_failed", "degraded", "timeout after 1 s (after 2 attempts)")
    # the deadline covers the whole body, not each read
    assert what("u_trickle") == ("image_download_failed", "degraded", "timeout after 1 s (after 2 attempts)")
    assert what("u_to_ftp") == ("image_download_failed", "degraded", "redirect to a non-http(s) URL (HTTP 302)")
    assert what("u_declared") == ("image_download_failed", "degraded",
                                  f"too large: more than {cap} bytes (Content-Length {BIG})")
    assert what("u_chunked") == ("image_download_failed", "degraded", f"too large: more than {cap} bytes")
    assert what("u_lying") == ("image_download_failed", "degraded", f"too large: more than {cap} bytes")
    assert what("u_refused") == ("image_download_failed", "degraded", "connection refused (after 2 attempts)")
    assert what("u_html")[:2] == ("image_undecodable", "degraded")
    assert what("l_missing")[:2] == ("image_missing", "degraded")
    assert set(failures) == {"u_404", "u_404_notext", "u_500", "u_slow", "u_declared", "u_chunked", "u_lying",
                             "u_refused", "u_html", "l_missing", "u_trickle", "u_to_ftp"}
    assert json.loads(samples["u_404"]["json"])["image_error"] == "image_download_failed"
    assert manifest["failures"]["rejected"] == 1

    # retried: 5xx and timeouts; not retried: 404, too large; reading stopped soon after the cap
    assert server.calls["/missing.jpg"] == 1 and server.calls["/flaky.jpg"] == 2 and server.calls["/busy.jpg"] == 2
    assert server.calls["/trickle.jpg"] == 2 and server.calls["/to-ftp.jpg"] == 1
    assert server.calls["/always500.jpg"] == 2 and server.calls["/slow.jpg"] == 2
    for path in ("/big-declared.jpg", "/big-chunked.jpg", "/big-lying.jpg"):
        assert server.calls[path] == 1, path
        assert server.sent[path] < BIG // 4, (path, server.sent[path])  # socket buffers, not the whole body
    assert server.calls["/img/g0.jpg"] == 1 and server.calls["/img/g2.jpg"] == 2  # once more through /moved.jpg
    assert {ua for _, _, ua in server.log} == {f"mmcat/{__import__('mmcat').__version__} (image download)"}
    assert took < 20, took  # failures wait in parallel, not one after another


def test_per_host_limit_holds_and_output_is_the_same_for_any_worker_count(server: Server, tmp_path: Path):
    from mmcat.pack import pack

    rows = []
    for n in range(24):  # two host names for one server: the limit is per host, not global
        server.routes[f"/p{n}.jpg"] = ok(_photo(100 + n), delay=0.25)
        rows.append(_row(f"p{n:02d}", server.url(f"/p{n}.jpg", "127.0.0.1" if n % 2 else "localhost"), "ab"[n % 3 % 2]))
    table = _write_table(tmp_path / "products.csv", rows)
    common = dict(image_size=48, max_samples_per_shard=5, download_threads=8, download_timeout=10.0)

    pack(pack_config(table, tmp_path / "w1", workers=1, download_max_per_host=2, **common))
    # several downloads at once with one worker process, never more than 2 per host
    assert dict(server.max_inflight) == {"127.0.0.1": 2, "localhost": 2} and server.max_total == 4
    assert len(server.log) == 24

    server.reset_log()
    pack(pack_config(table, tmp_path / "w2", workers=2, download_max_per_host=1, **common))
    assert dict(server.max_inflight) == {"127.0.0.1": 1, "localhost": 1} and server.max_total == 2
    w1, w2 = _shard_bytes(tmp_path / "w1"), _shard_bytes(tmp_path / "w2")
    assert len(w1) >= 4 and w1 == w2
    assert {i for i, s in _samples(tmp_path / "w2").items() if "jpg" in s} == {r["id"] for r in rows}


def test_resume_does_not_download_the_finished_shards_again(server: Server, tmp_path: Path):
    from mmcat.pack import pack

    rows = []
    for n in range(30):
        server.routes[f"/r{n}.jpg"] = ok(_photo(200 + n))
        rows.append(_row(f"r{n:02d}", server.url(f"/r{n}.jpg"), "ab"[n % 2]))
    table = _write_table(tmp_path / "products.csv", rows)
    reference = tmp_path / "ref"
    pack(pack_config(table, reference, image_size=48, max_samples_per_shard=2, splits={"train": 1.0}))

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmcat", "pack", str(table), "--out", str(out), "--image-size", "48",
           "--max-samples-per-shard", "2", "--splits", "train=1.0", "--download-threads", "2",
           "--download-timeout", "60"]
    server.reset_log()
    server.hold_after = 12  # the interrupted run gets 12 photos, then waits on the server until it is killed
    state = kill_pack_after(cmd, out, shards=3)
    records = [json.loads(p.read_text()) for p in sorted(state.glob("*.json"))]
    done_ids = {json.loads(s["json"])["id"] for s in wds.DataPipeline(
        wds.SimpleShardList([str(out / "train" / r["name"]) for r in records]), wds.tarfile_to_samples())}
    done_paths = {urllib.parse.urlsplit(r["image"]).path for r in rows if r["id"] in done_ids}
    assert len(done_ids) >= 6 and done_paths <= {p for p, _, _ in server.log}

    server.hold_after = None
    server.release.set()
    server.reset_log()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    asked = {p for p, _, _ in server.log}
    assert not asked & done_paths  # the finished shards' photos were not downloaded again
    assert asked == {urllib.parse.urlsplit(r["image"]).path for r in rows} - done_paths
    assert _shard_bytes(out) == _shard_bytes(reference)


def test_download_settings_are_checked(tmp_path: Path):
    from mmcat.config import ConfigError
    from mmcat.pack import pack

    table = _write_table(tmp_path / "products.csv", [_row("x", "http://127.0.0.1:9/x.jpg")])
    for key, value in [("download_timeout", 0.0), ("download_retries", -1), ("download_threads", 0),
                       ("download_max_per_host", 0)]:
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            pack(pack_config(table, tmp_path / "out", **{key: value}))
