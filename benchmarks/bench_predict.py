"""Batch prediction throughput: `mmcat predict` (batched forward, decode workers) vs a naive per-row loop over the
Python API (`Classifier.predict` per product), same model, same products, same process; and the peak memory of the
`mmcat predict` command on N vs 10 N rows.

    .venv/bin/python benchmarks/bench_predict.py [--num 600] [--naive 200] [--workers 2] [--batch-sizes 16,64]
        [--image-model resnet50] [--image-size 224] [--text-model minilm|tiny] [--device auto] [--data DIR]
        [--model RUN/best] [--rss-rows 300] [--threads N]

Model: ``--model`` (a trained ``best/``), else an untrained one of the given architecture exported once into
--data (throughput does not depend on the weights; default: the training defaults, ResNet-50 at 224 px + MiniLM).
Input: NUM synthetic products (`mmcat synth`, photos 320-800 px) in --data. Memory: `mmcat predict` as a child
process on RSS_ROWS and 10 x RSS_ROWS rows of tiny products (64-128 px photos, the same 300 photos repeated) with
a small untrained model (ResNet-18 at 64 px + a 2-layer BERT), peak RSS from getrusage(RUSAGE_CHILDREN) (the
largest of the command and its decode workers). RSS_ROWS should be several batches: the forward's activations
grow with the batch up to --batch-size.
Not a test: prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def synth(out: Path, num: int, min_side: int = 320, max_side: int = 800) -> Path:
    from mmcat.config import SynthConfig, load_config
    from mmcat.synth import synthesize

    table = out / "products.csv"
    if not (table.is_file() and sum(1 for _ in open(table)) == num + 1):
        synthesize(load_config(SynthConfig, None, [f"out={out}", f"num_products={num}", f"min_side={min_side}",
                                                   f"max_side={max_side}"]))
    return table


def untrained_model(out: Path, image_model: str, image_size: int, text_model: str, labels) -> Path:
    """An untrained model of the given architecture, exported as best/ (what `mmcat train` writes)."""
    import torch

    from mmcat.artifact import export_artifact
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.models import build_model
    from mmcat.models.text import load_tokenizer

    best = out / f"{image_model}-{image_size}-{text_model}" / "best"
    if (best / "model.safetensors").is_file():
        return best
    text = ["model.text.name=sentence-transformers/all-MiniLM-L6-v2"]
    if text_model == "tiny":
        from mmcat.models.tiny import make_tiny_text_model

        text = [f"model.text.name={make_tiny_text_model(out / 'tiny_bert')}", "model.text.pretrained=false"]
    cfg = load_config(TrainRunConfig, None, [f"model.image.name={image_model}", "model.image.weights=none", *text,
                                             f"data.root={out}", f"data.image_size={image_size}",
                                             f"output_dir={out}"], require_complete=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(labels))
    return export_artifact(best, model.state_dict(), model, cfg, list(labels), load_tokenizer(cfg.model.text))


def naive_loop(clf, rows, images_root: Path) -> float:
    """What one writes first: the Python API, one product at a time."""
    t = time.perf_counter()
    for r in rows:
        clf.predict(image=str(images_root / r["image"]), title=r["title"], description=r["description"])
    return len(rows) / (time.perf_counter() - t)


def mmcat_predict(clf, table: Path, out: Path, workers: int, batch_size: int) -> float:
    from mmcat.predict_table import predict_file

    summary = predict_file(clf, table, out, batch_size=batch_size, workers=workers, quiet=True, progress=False)
    return summary["products_per_s"]


def repeated_table(src: Path, out: Path, rows: int) -> Path:
    """``rows`` rows cycling over the products of ``src`` (new ids; photo paths made absolute)."""
    with open(src, newline="") as f:
        base = list(csv.DictReader(f))
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(base[0]))
        w.writeheader()
        for i in range(rows):
            r = dict(base[i % len(base)], id=f"r{i:07d}")
            r["image"] = str(src.parent / r["image"])
            w.writerow(r)
    return out


RSS_PROBE = """
import resource, subprocess, sys, time
t = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)
"""


def peak_rss(model: Path, table: Path, out: Path, workers: int, batch_size: int, device: str,
             threads: int = 0) -> tuple:
    """(peak RSS in MiB of `mmcat predict` and its workers, wall seconds including start-up)."""
    threads = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    cmd = [sys.executable, "-m", "mmcat", "predict", "--model", str(model), str(table), "--out", str(out),
           "--workers", str(workers), "--batch-size", str(batch_size), "--device", device]
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, *cmd], capture_output=True, text=True, check=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **threads))
    kib, seconds = proc.stdout.split()
    return int(kib) / 1024, float(seconds)


def figures(work: Path, quick: bool = False, repeats: int = 3) -> dict:
    """The suite's row: `mmcat predict`'s batched path (batch 64, 2 workers) vs the per-row API loop, small model
    (ResNet-18 @64 + 2-layer BERT, the report-only row of BENCHMARKS.md), runs interleaved, median ratio."""
    sys.path.insert(0, str(Path(__file__).parent))
    from suite import paired, row

    from mmcat import Classifier

    num = 48 if quick else 300
    table = synth(work / f"raw{num}", num, 64, 128)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = sorted({r["category"] for r in rows})
    clf = Classifier.load(untrained_model(work / "models", "resnet18", 64, "tiny", labels), device="cpu")
    naive_loop(clf, rows[:4], table.parent)  # warm-up (lazy imports, first-call allocations)
    pairs = []
    for r in range(repeats):
        naive = naive_loop(clf, rows, table.parent)
        pairs.append((mmcat_predict(clf, table, work / f"out{r}.csv", 2, 64), naive))
    a, b, ratio = paired(pairs)
    return {"rows": [row(f"predict batch 64, 2 workers vs per-row Classifier.predict, {num} products, ResNet-18 "
                         "@64 + tiny BERT", "products/s", a, b, ratio, "report only")]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=600, help="products predicted by mmcat predict")
    ap.add_argument("--naive", type=int, default=200, help="products predicted by the per-row loop")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-sizes", default="16,64", help="comma-separated: a mmcat predict run per size")
    ap.add_argument("--image-model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--text-model", choices=["minilm", "tiny"], default="minilm")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; on a small shared "
                    "machine 1 avoids oversubscription, which slows single-product forwards most)")
    ap.add_argument("--model", help="a trained best/ (default: an untrained one of the architecture above)")
    ap.add_argument("--rss-rows", type=int, default=300, help="memory: rows of the small input (the big one: 10x)")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "mmcat-bench-predict"))
    args = ap.parse_args()

    import torch

    from mmcat import Classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    t = time.perf_counter()
    table = synth(data / "raw", args.num)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = sorted({r["category"] for r in rows})
    model = Path(args.model) if args.model else untrained_model(data / "models", args.image_model, args.image_size,
                                                                args.text_model, labels)
    clf = Classifier.load(model, device=args.device)
    print(f"input: {args.num} products in {table} (photos 320-800 px; ready in {time.perf_counter() - t:.1f} s)")
    print(f"model: {model} ({clf.artifact.cfg.model.image.name} at {clf.artifact.cfg.data.image_size} px + "
          f"{clf.artifact.cfg.model.text.name}); device {clf.device}; cpus={os.cpu_count()} "
          f"torch threads={torch.get_num_threads()}")

    naive_loop(clf, rows[:8], table.parent)  # warm-up (lazy imports, first-call allocations)
    naive = naive_loop(clf, rows[: args.naive], table.parent)
    print()
    print(f"{'':48}{'products/s':>12}{'vs naive':>10}")
    print(f"{'naive loop: Classifier.predict per row':48}{naive:>12.1f}{1.0:>10.2f}", flush=True)
    out = data / "out"
    out.mkdir(exist_ok=True)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for batch_size in sizes:
        for workers in (0, args.workers):
            rate = mmcat_predict(clf, table, out / f"b{batch_size}w{workers}.parquet", workers, batch_size)
            name = f"mmcat predict --batch-size {batch_size} --workers {workers}"
            print(f"{name:48}{rate:>12.1f}{rate / naive:>10.2f}", flush=True)

    if args.rss_rows > 0:
        tiny = synth(data / "tiny_raw", 300, 64, 128)
        rss_model = untrained_model(data / "models", "resnet18", 64, "tiny", labels)
        small = repeated_table(tiny, data / f"rss_{args.rss_rows}.csv", args.rss_rows)
        big = repeated_table(tiny, data / f"rss_{10 * args.rss_rows}.csv", 10 * args.rss_rows)
        print()
        print(f"peak RSS of `mmcat predict` (command + decode workers), tiny products (64-128 px), model "
              f"{rss_model.parent.name}:")
        print(f"{'rows':>8}{'workers':>9}{'peak RSS MiB (2 runs)':>24}{'wall s':>8}")
        for workers in (0, args.workers):
            for t in (small, big):
                runs = [peak_rss(rss_model, t, out / "rss.csv", workers, sizes[-1], args.device, args.threads or 0)
                        for _ in range(2)]
                n = sum(1 for _ in open(t)) - 1
                peaks = " / ".join(f"{mib:.1f}" for mib, _ in runs)
                print(f"{n:>8}{workers:>9}{peaks:>24}{runs[0][1]:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
