"""Loader throughput: mmcat's WebDataset training pipeline vs a raw-folder baseline, in one process.

Both sides do the same work per sample -- decode a product photo, random resized crop 224 + flip + light colour
jitter + ImageNet normalisation, tokenize "title\\ndescription" (max 64 tokens) -- with 2 DataLoader workers and
batch size 32:

* baseline: a plain ``torch.utils.data.Dataset`` over the photo folder: ``PIL.Image.open`` per file, torchvision
  transforms v2, one tokenizer call per sample, ``tokenizer.pad`` in the collate function;
* mmcat: ``build_train_loader`` over shards packed from the same photos (OpenCV decode, batched tokenization in the
  workers). By default the shards come from ``mmcat pack`` (photos resized to 256 px shorter side at pack time,
  as in normal use); ``--full-size`` packs the original photos unchanged, which isolates the loader itself.

Data: ``mmcat synth`` product photos (default 1000, 600-800 px sides) in a temp folder (or ``--work DIR`` to keep
and reuse them). Prints samples/s of both (best of ``--repeats`` epochs, timed from the first batch so worker
start-up is excluded) and their ratio.

    python benchmarks/bench_loader.py [--num-images 1000] [--repeats 2] [--full-size] [--work DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mmcat.config import TrainRunConfig, load_config
from mmcat.data import build_train_loader
from mmcat.data.transforms import IMAGENET_MEAN, IMAGENET_STD, JITTER
from mmcat.models import load_tokenizer

BATCH, WORKERS, SIZE, MAX_LEN = 32, 2, 224, 64


class RawFolder(Dataset):
    """The baseline: one file open + decode + transform + tokenizer call per sample."""

    def __init__(self, rows: List[Dict[str, str]], root: Path, labels: List[str], tokenizer: Any) -> None:
        self.rows, self.root, self.tokenizer = rows, root, tokenizer
        self.index = {name: i for i, name in enumerate(labels)}
        self.transform = v2.Compose([
            v2.PILToTensor(), v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip(),
            v2.ColorJitter(JITTER, JITTER, JITTER), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        row = self.rows[i]
        with Image.open(self.root / row["image"]) as im:
            pixels = self.transform(im.convert("RGB"))
        tok = self.tokenizer(f"{row['title']}\n{row['description']}", truncation=True, max_length=MAX_LEN,
                             return_token_type_ids=False)
        return {"pixel_values": pixels, "tok": tok, "label": self.index[row["category"]]}

    def collate(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        tok = self.tokenizer.pad([it["tok"] for it in items], return_tensors="pt")
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "input_ids": tok["input_ids"],
                "attention_mask": tok["attention_mask"], "labels": torch.tensor([it["label"] for it in items])}


def timed_epoch(loader: Any, on_batch: Any = None) -> float:
    """Samples/s from the first batch to the end of the epoch (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for batch in it:
        if on_batch is not None:
            on_batch(batch)
        n += batch["input_ids"].shape[0]
    return n / (time.perf_counter() - start)


def prepare(work: Path, num_images: int, full_size: bool, side: int = 0) -> Path:
    """Synthesize and pack with the mmcat CLI in subprocesses, so this process starts its loaders clean.
    Photos of 600-800 px packed at 256 px, or of ``side``..1.5 ``side`` px packed at ``side`` when given."""
    mmcat = [sys.executable, "-m", "mmcat"]
    raw = work / "raw"
    lo, hi, size = (side, side * 3 // 2, side) if side else (600, 800, 256)
    if not (raw / "products.csv").is_file():
        subprocess.run(mmcat + ["synth", "--out", str(raw), "--num-products", str(num_images), "--min-side", str(lo),
                                "--max-side", str(hi), "--seed", "1"], check=True, stdout=subprocess.DEVNULL)
    packed = work / ("packed_full" if full_size else "packed")
    if not (packed / "manifest.json").is_file():
        subprocess.run(mmcat + ["pack", str(raw / "products.csv"), "--out", str(packed), "--splits", "train=1.0",
                                "--max-samples-per-shard", str(max(10, num_images // 10)), "--image-size", str(size),
                                "--workers", "2",
                                "--resize-mode", "keep" if full_size else "shorter"],
                       check=True, stdout=subprocess.DEVNULL)
    return packed


def figures(work: Path, quick: bool = False, repeats: int = 3) -> dict:
    """The suite's row: mmcat's loader (CPU default, float32 from the workers) vs the raw-folder Dataset, epochs
    interleaved (baseline, mmcat, baseline, mmcat ...), the median of the per-pair ratios."""
    sys.path.insert(0, str(Path(__file__).parent))
    from suite import paired, row

    num = 96 if quick else 400
    work = work / f"n{num}"
    packed = prepare(work, num, False)
    cfg = load_config(TrainRunConfig, None, [f"data.root={packed}", "output_dir=/unused", f"train.batch_size={BATCH}",
                                             f"data.num_workers={WORKERS}", f"data.image_size={SIZE}",
                                             f"data.max_text_length={MAX_LEN}", "data.uint8_pixels=false"])
    tokenizer = load_tokenizer(cfg.model.text)
    with open(work / "raw" / "products.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    raw = RawFolder(rows, work / "raw", json.loads((packed / "labels.json").read_text()), tokenizer)
    baseline = DataLoader(raw, batch_size=BATCH, shuffle=True, num_workers=WORKERS, collate_fn=raw.collate,
                          drop_last=True)
    pairs = []
    for epoch in range(repeats):
        base = timed_epoch(baseline)
        pairs.append((timed_epoch(build_train_loader(cfg, tokenizer, 0, 1, epoch).loader), base))
    a, b, ratio = paired(pairs)
    return {"rows": [
        row(f"loader, CPU default, {num} photos, {WORKERS} workers vs raw-folder Dataset", "samples/s", a, b, ratio,
            ">= 3x", at_least=3.0),
        worker_rss_row(work.parent, quick, tokenizer)]}


RSS_SMALL, RSS_SIZE = 200, 64  # N products (the dataset grows to 10 N) and their photo side: small, so it is fast
# the shuffle buffer holds up to data.shuffle_buffer decoded samples per worker: memory set by the config, not by
# the dataset, but one of N = 200 (100 per worker) never fills the default 1000 while one of 10 N does. A buffer
# both sizes fill compares what grows with the dataset, and only that
RSS_SHUFFLE = 32


def _worker_peaks(peaks: Dict[int, int], others: set) -> None:
    """Update ``peaks`` (pid -> bytes) with the private resident memory (psutil's USS: Private_Clean +
    Private_Dirty) of every child of this process not in ``others`` (those that ran before the loader: a
    forkserver, a resource tracker), i.e. the DataLoader workers. Not RSS: a forked worker's RSS also counts the
    pages it still shares with this process (~450 MB of torch and the tokenizer), which would hide a growth."""
    for child in psutil.Process().children():
        if child.pid in others:
            continue
        try:
            peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_full_info().uss)
        except psutil.Error:  # the worker ended meanwhile
            continue


def worker_peak_rss_mb(packed: Path, tokenizer: Any) -> float:
    """Peak private resident memory (MB) of the most loaded DataLoader worker over one epoch of mmcat's train
    loader, sampled at every batch."""
    cfg = load_config(TrainRunConfig, None, [f"data.root={packed}", "output_dir=/unused", f"train.batch_size={BATCH}",
                                             f"data.num_workers={WORKERS}", f"data.image_size={RSS_SIZE}",
                                             f"data.max_text_length={MAX_LEN}", "data.uint8_pixels=false",
                                             f"data.shuffle_buffer={RSS_SHUFFLE}"])
    peaks: Dict[int, int] = {}
    others = {p.pid for p in psutil.Process().children()}
    timed_epoch(build_train_loader(cfg, tokenizer, 0, 1, 0).loader,
                lambda _: _worker_peaks(peaks, others))
    if not peaks:
        raise RuntimeError("no DataLoader worker process seen")
    return max(peaks.values()) / 2**20


def worker_rss_row(work: Path, quick: bool, tokenizer: Any) -> Dict[str, Any]:
    """Worker RSS flat as the dataset grows 10x: the peak of N products vs 10 N (photos RSS_SIZE px), interleaved."""
    from suite import paired, row

    small = RSS_SMALL // 4 if quick else RSS_SMALL
    packed = {n: prepare(work / f"rss{n}", n, False, side=RSS_SIZE) for n in (small, 10 * small)}
    pairs = [(worker_peak_rss_mb(packed[10 * small], tokenizer), worker_peak_rss_mb(packed[small], tokenizer))
             for _ in range(2)]
    big, base, ratio = paired(pairs)
    return row(f"loader worker peak private RSS, {10 * small:,} vs {small:,} products ({RSS_SIZE} px, "
               f"{WORKERS} workers)",
               "MB", big, base, ratio, "<= 1.1 (flat)", at_most=1.1,
               note=f"private memory, shuffle buffer {RSS_SHUFFLE}")


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full-size", action="store_true", help="pack the photos without resizing")
    ap.add_argument("--work", type=Path, default=None, help="keep generated data here (reused when present)")
    args = ap.parse_args(argv)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench_loader_")
    work = args.work or Path(tmp.name)
    t0 = time.perf_counter()
    packed = prepare(work, args.num_images, args.full_size)
    print(f"data ready in {time.perf_counter() - t0:.1f}s: {args.num_images} photos, shards in {packed}")

    overrides = [f"data.root={packed}", "output_dir=/unused", f"train.batch_size={BATCH}",
                 f"data.num_workers={WORKERS}", f"data.image_size={SIZE}", f"data.max_text_length={MAX_LEN}"]
    float_cfg = load_config(TrainRunConfig, None, [*overrides, "data.uint8_pixels=false"])
    uint8_cfg = load_config(TrainRunConfig, None, [*overrides, "data.uint8_pixels=true"])
    tokenizer = load_tokenizer(float_cfg.model.text)
    with open(work / "raw" / "products.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = json.loads((packed / "labels.json").read_text())
    raw = RawFolder(rows, work / "raw", labels, tokenizer)
    baseline = DataLoader(raw, batch_size=BATCH, shuffle=True, num_workers=WORKERS, collate_fn=raw.collate,
                          drop_last=True, persistent_workers=False)

    rates: Dict[str, List[float]] = {"baseline": [], "mmcat": [], "mmcat_uint8": []}
    for epoch in range(args.repeats):  # alternate, so that load from other processes hits both alike
        rates["baseline"].append(timed_epoch(baseline))
        # the CPU default: normalised float32 from the workers — the same work as the baseline does
        rates["mmcat"].append(timed_epoch(build_train_loader(float_cfg, tokenizer, 0, 1, epoch).loader))
        # the GPU default: uint8 out of the workers, normalised by the model on the device (not charged here)
        rates["mmcat_uint8"].append(timed_epoch(build_train_loader(uint8_cfg, tokenizer, 0, 1, epoch).loader))
        print(f"epoch {epoch}: baseline {rates['baseline'][-1]:.0f}/s, mmcat {rates['mmcat'][-1]:.0f}/s, "
              f"mmcat uint8 {rates['mmcat_uint8'][-1]:.0f}/s")
    base, ours, ours_u8 = max(rates["baseline"]), max(rates["mmcat"]), max(rates["mmcat_uint8"])
    what = "full-size shards" if args.full_size else "shards from mmcat pack (256 px)"
    print(f"raw-folder baseline (PIL + per-sample tokenizer, {WORKERS} workers): {base:.0f} samples/s")
    print(f"mmcat train loader ({what}, {WORKERS} workers):      {ours:.0f} samples/s")
    print(f"ratio: {ours / base:.2f}x  (target >= 3x; cpu count {os.cpu_count()})")
    print(f"mmcat with data.uint8_pixels=true (GPU default; normalised on the device): {ours_u8:.0f} samples/s, "
          f"{ours_u8 / base:.2f}x")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
