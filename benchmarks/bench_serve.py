"""Serving throughput: ``mmcat serve`` with micro-batching on (``--max-batch 32 --max-wait-ms 5``) vs off
(``--max-batch 1``): requests/s and p50 / p95 latency at concurrency 1 and 16.

    .venv/bin/python benchmarks/bench_serve.py [--model RUN/best] [--requests 300] [--concurrency 1,16]
                                               [--repeats 3] [--threads N] [--device cpu] [--work DIR]

Both servers are real ``python -m mmcat serve`` processes, started once and measured in alternation (on c=1, off
c=1, on c=16, off c=16, repeated ``--repeats`` times; medians reported), so a change of load from other processes
hits both sides alike. Every request is a fused product (photo file + title + description, multipart) of the
synthetic catalogue, photos 256-512 px. The client is asyncio + httpx (``concurrency`` requests in flight, each
waiting for its answer before sending the next); it runs on the same machine and takes some of its CPU. The first
``2 x concurrency`` requests of each measurement are a warm-up and not counted. The mean batch size comes from the
server's own ``/metrics`` over the measured requests.

Without ``--model`` it trains a small model once (cached in ``--work``): ResNet-18 (random init) + a tiny BERT with
gated fusion, image size 64, one epoch on 240 synthetic products -- its accuracy does not matter here, its cost per
forward does. ``--threads`` sets OMP_NUM_THREADS of the servers (default: inherited). Not a test: prints figures,
asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import httpx

SIZE = 64
SETTINGS = {"on": ["--max-batch", "32", "--max-wait-ms", "5"], "off": ["--max-batch", "1"]}


# ------------------------------------------------------------------------------------------------ model and data
def mmcat(*args: str) -> List[str]:
    return [sys.executable, "-m", "mmcat", *args]


def prepare(work: Path, model: Optional[str]) -> Tuple[Path, Path]:
    """(the products table, best/): synthesized and trained once with the mmcat CLI, reused when present."""
    raw = work / "raw"
    if not (raw / "products.csv").is_file():
        subprocess.run(mmcat("synth", "--out", str(raw), "--num-products", "240", "--min-side", "256",
                             "--max-side", "512", "--seed", "5"), check=True, stdout=subprocess.DEVNULL)
    if model:
        return raw / "products.csv", Path(model)
    best = work / "run" / "best"
    if not (best / "model.safetensors").is_file():
        from mmcat.models.tiny import make_tiny_text_model

        packed = work / "packed"
        if not (packed / "manifest.json").is_file():
            subprocess.run(mmcat("pack", str(raw / "products.csv"), "--out", str(packed), "--image-size", str(SIZE)),
                           check=True, stdout=subprocess.DEVNULL)
        text = make_tiny_text_model(work / "tiny_bert")
        subprocess.run(mmcat("train", "model.image.name=resnet18", "model.image.weights=none",
                             f"model.text.name={text}", "model.fusion=gated", "model.hidden_dim=128",
                             f"data.root={packed}", f"output_dir={work / 'run'}", f"data.image_size={SIZE}",
                             "data.max_text_length=32", "data.num_workers=1", "train.batch_size=32", "train.epochs=1",
                             "train.lr=1e-3", "train.log_every=5"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return raw / "products.csv", best


def load_products(table: Path) -> List[Dict]:
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["photo"] = (table.parent / r["image"]).read_bytes()
    return rows


# ------------------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, model: Path, device: str, threads: Optional[int], log: Path) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(mmcat("serve", "--model", str(model), "--port", str(self.port), "--device",
                                               device, *SETTINGS[name]), env=env, stdout=out, stderr=subprocess.STDOUT)
        self.log = log

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {self.name} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"server {self.name} not healthy after {timeout} s")

    def batches(self) -> Tuple[int, int]:
        b = httpx.get(self.url + "/metrics", timeout=10).json()
        return b["batches"]["count"], b["items_predicted"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------------------- load
async def _load(url: str, products: Sequence[Dict], n: int, concurrency: int) -> List[float]:
    """Latencies (s) of n fused /predict requests with ``concurrency`` in flight."""
    latencies: List[float] = []
    counter = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            p = products[i % len(products)]
            t = time.perf_counter()
            r = await client.post(url + "/predict", data={"title": p["title"], "description": p["description"]},
                                  files={"image": (Path(p["image"]).name, p["photo"], "image/jpeg")})
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies


def measure(server: Server, products: Sequence[Dict], n: int, concurrency: int) -> Dict[str, float]:
    asyncio.run(_load(server.url, products, 2 * concurrency, concurrency))  # warm-up: connections, first batches
    b0, i0 = server.batches()
    t = time.perf_counter()
    lat = sorted(asyncio.run(_load(server.url, products, n, concurrency)))
    wall = time.perf_counter() - t
    b1, i1 = server.batches()
    return {"rps": n / wall, "p50": 1000 * lat[len(lat) // 2], "p95": 1000 * lat[int(0.95 * (len(lat) - 1))],
            "batch": (i1 - i0) / max(1, b1 - b0)}


def median_of(runs: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def figures(work: Path, quick: bool = False, repeats: int = 3) -> dict:
    """The suite's rows, time-boxed: the untrained ResNet-18 @64 + tiny BERT model of the predict benchmark
    (reused from ``work/../predict`` when it ran first), its 64-128 px products, both servers started at once,
    fewer requests; on and off alternated, the median of the per-pair ratios. The full measurement (a trained
    model, 256-512 px photos, 300 requests) stays ``main()`` (BENCHMARKS.md section 5)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_predict import synth, untrained_model
    from suite import paired, row

    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request once an earlier benchmark logs INFO
    num, requests = (48, 16) if quick else (96, 48)
    table = synth(work.parent / "predict" / f"raw{num}", num, 64, 128)
    products = load_products(table)
    labels = sorted({p["category"] for p in products})
    model = untrained_model(work.parent / "predict" / "models", "resnet18", 64, "tiny", labels)
    servers = {name: Server(name, model, "cpu", None, work / f"serve-{name}.log") for name in SETTINGS}
    pairs: Dict[int, List[Tuple[Dict[str, float], Dict[str, float]]]] = {16: [], 1: []}
    try:
        for s in servers.values():
            s.wait_healthy()
        for _ in range(repeats):
            for c, n in ((16, requests), (1, requests // 2)):
                pairs[c].append((measure(servers["on"], products, n, c), measure(servers["off"], products, n, c)))
    finally:
        for s in servers.values():
            s.stop()
    rps = paired([(on["rps"], off["rps"]) for on, off in pairs[16]])
    p50 = paired([(on["p50"], off["p50"]) for on, off in pairs[1]])
    what = f"{num} products 64-128 px, untrained ResNet-18 @64 + tiny BERT"
    return {"rows": [
        row(f"serve, micro-batching on vs off, concurrency 16, {requests} requests, {what}", "req/s", *rps,
            "report only"),
        row(f"serve, on vs off at concurrency 1, {requests // 2} requests (p50 latency)", "ms", *p50,
            "<= 1.1 (no added latency)", at_most=1.1)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an existing best/ (default: train a small one in --work)")
    ap.add_argument("--requests", type=int, default=300, help="measured requests per (setting, concurrency)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers (default: inherited)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mmcat-bench-serve"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    table, model = prepare(work, args.model)
    products = load_products(table)
    levels = [int(c) for c in args.concurrency.split(",")]
    threads = args.threads or os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"model {model} (ready in {time.perf_counter() - t:.0f} s); {len(products)} products, photos 256-512 px; "
          f"cpus={os.cpu_count()} device={args.device} OMP_NUM_THREADS={threads}")
    servers = {name: Server(name, model, args.device, args.threads, work / f"serve-{name}.log") for name in SETTINGS}
    try:
        for s in servers.values():
            s.wait_healthy()
        runs: Dict[Tuple[str, int], List[Dict[str, float]]] = {}
        for rep in range(args.repeats):
            for c in levels:
                for name, s in servers.items():  # alternate on / off under the same background load
                    runs.setdefault((name, c), []).append(measure(s, products, args.requests, c))
    finally:
        for s in servers.values():
            s.stop()
    res = {k: median_of(v) for k, v in runs.items()}
    print(f"\nmedian of {args.repeats} runs x {args.requests} requests (fused: photo + title + description)")
    print(f"{'micro-batching':<16}{'concurrency':>12}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'mean batch':>12}")
    for c in levels:
        for name in SETTINGS:
            r = res[(name, c)]
            label = "on (32, 5 ms)" if name == "on" else "off (1)"
            print(f"{label:<16}{c:>12}{r['rps']:>10.1f}{r['p50']:>10.1f}{r['p95']:>10.1f}{r['batch']:>12.2f}")
    for c in levels:
        on, off = res[("on", c)], res[("off", c)]
        print(f"concurrency {c:>3}: on/off  req/s x{on['rps'] / off['rps']:.2f}  p50 x{on['p50'] / off['p50']:.2f}  "
              f"p95 x{on['p95'] / off['p95']:.2f}")


if __name__ == "__main__":
    main()
