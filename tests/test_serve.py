"""``mmcat serve``: a real uvicorn process on 127.0.0.1, started from the command line as a user starts it.

Every answer is checked against the Python API (``Classifier.predict`` in this process, same ``best/``): label
exactly, calibrated score within 1e-5. Bad inputs each get their 4xx with a JSON ``detail`` and the server keeps
serving; the upload limit is shown to act while the body is still arriving; SIGTERM stops it cleanly.
The shared server runs with ``--max-image-bytes 2MB`` (the test photos are a few KB) so oversized bodies are cheap.
"""
from __future__ import annotations

import base64
import csv
import json
import select
import signal
import socket
import struct
import subprocess
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import httpx
import pytest

from train_helpers import ROOT, child_env, free_port, mmcat_cmd, run

pytestmark = pytest.mark.slow  # a real server on a trained model

LIMIT = 2_000_000  # the test server's --max-image-bytes
MODES = ("fused", "image_only", "text_only")


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def products(tiny_raw_dataset) -> List[Dict]:
    with open(tiny_raw_dataset / "products.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["photo"] = (tiny_raw_dataset / r["image"]).read_bytes()
    return rows


@pytest.fixture(scope="module")
def clf(baseline_run):
    """The Python API on the same best/, one torch thread like the server (child_env): on 2 busy cores a second
    OpenMP thread makes each small forward ~20x slower."""
    import torch

    from mmcat import Classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Classifier.load(baseline_run / "best", device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(baseline_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    cmd = mmcat_cmd("serve", "--model", str(baseline_run / "best"), "--port", str(port), "--device", "cpu",
                    "--max-image-bytes", "2MB")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, port, log)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"mmcat serve exited {proc.returncode}\n{srv.output()}"
        assert time.monotonic() < deadline, f"mmcat serve not healthy after 120 s\n{srv.output()}"
        try:
            if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    yield srv
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------------ helpers
def form_request(p: Dict, mode: str, **opts) -> Dict:
    """httpx keyword arguments for POST /predict: multipart when there is a photo, urlencoded when text only."""
    data = {"title": p["title"], "description": p["description"]} if mode != "image_only" else {}
    data.update({k: str(v) for k, v in opts.items()})
    files = {"image": (Path(p["image"]).name, p["photo"], "image/jpeg")} if mode != "text_only" else None
    return {"data": data, "files": files}


def api_predict(clf, p: Dict, mode: str, **opts):
    text = {"title": p["title"], "description": p["description"]} if mode != "image_only" else {}
    return clf.predict(image=p["photo"] if mode != "text_only" else None, **text, **opts)


def assert_same(got: Dict, want, where: str = "") -> None:
    assert got["label"] == want.label, where
    assert got["score"] == pytest.approx(want.score, abs=1e-5), where
    assert got["modalities"] == want.modalities, where
    assert got["abstain"] == want.abstain, where
    assert [t["label"] for t in got["top_k"]] == [label for label, _ in want.top_k], where
    assert [t["score"] for t in got["top_k"]] == pytest.approx([s for _, s in want.top_k], abs=1e-5), where


def assert_still_serving(server: Server, products: List[Dict]) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = httpx.post(server.url + "/predict", timeout=30, **form_request(products[0], "fused"))
    assert r.status_code == 200, r.text


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: a side x side grey PNG of zeros, a few hundred KB compressed."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def batch_item(p: Dict, mode: str) -> Dict:
    item: Dict = {"image_b64": b64(p["photo"])} if mode != "text_only" else {}
    if mode != "image_only":
        item.update(title=p["title"], description=p["description"])
    return item


def read_http_response(sock: socket.socket, first: bytes = b"") -> tuple:
    """(status, JSON body) of one HTTP/1.1 response with a Content-Length."""
    buf = first
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed mid-response: {buf!r}"
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    while len(body) < int(headers["content-length"]):
        data = sock.recv(65536)
        assert data, "connection closed mid-body"
        body += data
    return int(lines[0].split()[1]), json.loads(body)


# -------------------------------------------------------------------------------------------------------- tests
def test_concurrent_answers_equal_the_python_api(server, products, clf):
    """200 requests from 8 concurrent clients, fused / image-only / text-only mixed: every one answered 200 with
    the API's label and score, and the server really batched some of them together."""
    # each request its own top_k (and every 5th a min_score): a shared forward must still answer each its own way
    opts = [{"top_k": 1 + i % 4, **({"min_score": 0.3} if i % 5 == 0 else {})} for i in range(200)]
    jobs = [(products[i % len(products)], MODES[i % 3], opts[i]) for i in range(200)]
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=8)) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: client.post(server.url + "/predict", **form_request(*job[:2], **job[2])),
                                jobs))
    assert [r.status_code for r in answers] == [200] * len(jobs), [r.text for r in answers if r.status_code != 200]
    for (p, mode, opts), r in zip(jobs, answers):
        assert_same(r.json(), api_predict(clf, p, mode, **opts), f"{p['id']} {mode} {opts}")
        assert r.json()["warnings"] == []
    metrics = httpx.get(server.url + "/metrics", timeout=10).json()
    sizes = {int(k): v for k, v in metrics["batches"]["histogram"].items()}
    assert max(sizes) > 1, metrics["batches"]  # micro-batching happened
    assert sum(k * v for k, v in sizes.items()) == metrics["items_predicted"] >= 200
    assert metrics["requests"]["by_status"]["200"] >= 200
    assert 0 < metrics["latency_ms"]["p50"] <= metrics["latency_ms"]["p95"]
    assert metrics["queue"] == metrics["arriving"] == 0  # every request left the books when it was answered


def test_batch_endpoint_equals_single_endpoint(server, products):
    picks = [(products[i], MODES[i % 3]) for i in range(7)]
    opts = {"top_k": 2, "min_score": 0.6}
    r = httpx.post(server.url + "/predict/batch", timeout=60,
                   json={"items": [batch_item(p, m) for p, m in picks], **opts})
    assert r.status_code == 200, r.text
    batch = r.json()["predictions"]
    assert len(batch) == len(picks)
    for (p, mode), got in zip(picks, batch):
        single = httpx.post(server.url + "/predict", timeout=30, **form_request(p, mode, **opts))
        assert single.status_code == 200, single.text
        want = single.json()
        assert got["label"] == want["label"] and got["abstain"] == want["abstain"], p["id"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        assert len(got["top_k"]) == 2 and got["modalities"] == want["modalities"] == mode
        assert got["abstain"] == (got["score"] < 0.6) and (got["label"] is None) == got["abstain"]


def test_request_options_match_the_api(server, products, clf):
    """top_k and min_score per request (the batcher runs mixed requests in one forward, then applies each's)."""
    p = products[3]
    for opts in ({"top_k": 1}, {"top_k": 4, "min_score": 0.0}, {"min_score": 1.0}):
        r = httpx.post(server.url + "/predict", timeout=30, **form_request(p, "fused", **opts))
        assert r.status_code == 200, r.text
        assert_same(r.json(), api_predict(clf, p, "fused", **opts), str(opts))


def test_attributes_are_a_json_object(server, products, clf):
    p = products[5]
    attrs = {"brand": p.get("brand") or "Acme", "price": 12.5}
    r = httpx.post(server.url + "/predict", timeout=30,
                   **form_request(p, "fused", attributes=json.dumps(attrs)))
    assert r.status_code == 200, r.text
    assert_same(r.json(), clf.predict(image=p["photo"], title=p["title"], description=p["description"],
                                      attributes=attrs))


def test_labels_health_metrics_docs(server, clf):
    from mmcat import __version__

    assert httpx.get(server.url + "/labels").json() == {"labels": clf.labels}
    health = httpx.get(server.url + "/health").json()
    assert health["model_loaded"] is True and health["version"] == __version__
    assert health["device"] == "cpu" and health["labels"] == len(clf.labels)
    assert health["modalities"] == clf.modalities == ["image", "text"]
    assert httpx.get(server.url + "/docs").status_code == 200
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/predict", "/predict/batch", "/labels", "/health", "/metrics"} <= set(paths)


def _jpg(data: bytes) -> Dict:
    return {"image": ("x.jpg", data, "image/jpeg")}


def _plain(ctype: str, body: bytes) -> Dict:
    return {"content": body, "headers": {"content-type": ctype}}


# name -> (path, expected status, a word the detail must contain, httpx arguments from (photo, text)); built per
# case, so only the case run builds its payload (the bomb takes a second)
BAD = {
    "nothing": ("/predict", 422, "nothing to predict", lambda photo, text: {"data": {"top_k": "2"}}),
    "blank_text_only": ("/predict", 422, "nothing to predict", lambda photo, text: {"data": {"title": "  "}}),
    "not_an_image": ("/predict", 400, "image_undecodable",
                     lambda photo, text: {"data": text, "files": _jpg(b"hello, this is not a photo" * 10)}),
    "truncated": ("/predict", 400, "image_truncated",
                  lambda photo, text: {"data": text, "files": _jpg(photo[: len(photo) // 2])}),
    "bomb": ("/predict", 413, "image_too_large", lambda photo, text: {"data": text, "files": _jpg(bomb_png(12_000))}),
    "oversized": ("/predict", 413, "bytes",
                  lambda photo, text: {"data": text, "files": _jpg(b"\xff" * (LIMIT + 1_500_000))}),
    "json_to_predict": ("/predict", 415, "multipart/form-data", lambda photo, text: {"json": text}),
    "text_plain": ("/predict", 415, "text/plain", lambda photo, text: _plain("text/plain", b"a title")),
    "multipart_to_batch": ("/predict/batch", 415, "application/json",
                           lambda photo, text: {"data": text, "files": _jpg(photo)}),
    "unknown_form_field": ("/predict", 422, "colour", lambda photo, text: {"data": {**text, "colour": "red"}}),
    "two_images": ("/predict", 422, "image",
                   lambda photo, text: {"data": text, "files": [("image", ("a.jpg", photo, "image/jpeg")),
                                                                ("image", ("b.jpg", photo, "image/jpeg"))]}),
    "attributes_not_json": ("/predict", 422, "attributes",
                            lambda photo, text: {"data": {**text, "attributes": "brand=Acme"}}),
    "attributes_a_list": ("/predict", 422, "attributes", lambda photo, text: {"data": {**text, "attributes": "[1]"}}),
    "top_k_zero": ("/predict", 422, "top_k", lambda photo, text: {"data": {**text, "top_k": "0"}}),
    "min_score_above_one": ("/predict", 422, "min_score", lambda photo, text: {"data": {**text, "min_score": "1.5"}}),
    "unknown_item_key": ("/predict/batch", 422, "items[0].img",
                         lambda photo, text: {"json": {"items": [{**text, "img": b64(photo)}]}}),
    "unknown_top_key": ("/predict/batch", 422, "threshold",
                        lambda photo, text: {"json": {"items": [text], "threshold": 0.5}}),
    "no_items": ("/predict/batch", 422, "items", lambda photo, text: {"json": {"items": []}}),
    "bad_base64": ("/predict/batch", 400, "items[1].image_b64",
                   lambda photo, text: {"json": {"items": [text, {**text, "image_b64": "%%%"}]}}),
    "batch_truncated": ("/predict/batch", 400, "items[1]: image not usable: image_truncated",
                        lambda photo, text: {"json": {"items": [text, {**text, "image_b64": b64(photo[:-200])}]}}),
    "batch_nothing": ("/predict/batch", 422, "items[1]: nothing to predict",
                      lambda photo, text: {"json": {"items": [text, {"title": ""}]}}),
    "batch_oversized_image": ("/predict/batch", 413, "items[0]",
                              lambda photo, text: {"json": {"items": [{"image_b64": b64(b"\0" * (LIMIT + 1))}]}}),
    "batch_not_json": ("/predict/batch", 400, "JSON", lambda photo, text: _plain("application/json", b"{items")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server, products, case):
    path, status, word, request = BAD[case]
    p = products[0]
    r = httpx.post(server.url + path, timeout=30, **request(p["photo"], {"title": p["title"],
                                                                         "description": p["description"]}))
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and word in detail, detail
    assert_still_serving(server, products)


def test_oversized_upload_is_refused_while_it_arrives(server, products):
    """A chunked upload (no Content-Length, so only counting can catch it) of 64 MB against a 2 MB limit: the 413
    must come back while the client is still sending. A server that read the body before checking its size would
    answer only after the last byte."""
    total, piece = 64 * 2**20, b"\xff" * 2**18
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n")
        head = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        answered = b""
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                answered = sock.recv(65536)
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        assert sent < total // 2, f"no answer until {sent} of {total} bytes were sent"
        status, body = read_http_response(sock, answered)
    assert status == 413 and "bytes" in body["detail"], body
    assert_still_serving(server, products)


def test_content_length_over_the_limit_is_refused_before_the_body(server, products):
    """Content-Length says 1 GB and nothing follows: the answer must come from the header alone."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n")
        status, body = read_http_response(sock)
    assert status == 413 and "1000000000" in body["detail"], body
    assert_still_serving(server, products)


def test_missing_model_is_one_line_exit_2(tmp_path):
    proc = run(mmcat_cmd("serve", "--model", str(tmp_path / "nope"), "--port", str(free_port())), check=False,
               timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("mmcat serve: error:") and len(proc.stderr.strip().splitlines()) == 1
    bad = run(mmcat_cmd("serve", "--model", str(tmp_path), "--max-image-bytes", "10XB"), check=False, timeout=60)
    assert bad.returncode == 2 and "max-image-bytes" in bad.stderr, bad.stderr


def test_sigterm_stops_cleanly(server):
    """Last: it stops the shared server."""
    assert server.proc.poll() is None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0, server.output()
    out = server.output()
    assert "mmcat serve: stopped" in out and "Traceback" not in out, out
