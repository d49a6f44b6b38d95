"""GPU training throughput through mmcat's real loader, vs the same model on in-memory tensors (no I/O).

    python benchmarks/bench_gpu.py [--compile] [--batch 256] [--steps 300] [--products 20000] [--workers 8]
                                   [--decode-on cpu|device] [--data PACKED] [--work DIR] [--json PATH]
    python benchmarks/bench_gpu.py --smoke          # tiny sizes on the CPU: checks that the script runs

Model: the ResNet-50 + BERT-base *architecture* (random weights: no hub needed; BertConfig() defaults are
bert-base), gated fusion, 224 px, text 64 tokens, channels-last, bf16 autocast, AdamW (fused on CUDA),
optionally ``torch.compile``. Data: ``mmcat synth`` products packed with ``mmcat pack`` (256 px), or a packed
folder of your own (``--data``), read as the trainer reads it (one ``PersistentTrainLoader``: the workers live
across epochs) with uint8 pixels (normalised on the device). The shards are read in resampled mode
(``data.resampled``) with one virtual epoch as long as the whole run: a small benchmark set would otherwise start a
new epoch every few steps, and every epoch start waits for each worker's first batch (the 2,160-sample train split
of ``gpu_checks.sh`` is 8 batches of 256). What a worker does per sample (read, check, decode, augment, tokenize)
is the same in both modes.
``--decode-on device`` (``data.decode_on=device``): the workers only batch the JPEG bytes and each step first
decodes + augments them on the device (``mmcat.data.device_decode.decode_batch``, nvjpeg on a GPU), inside the
timed step as in the trainer; run once with each value (same --work, same machine) to compare the two.

Reports (and writes as JSON): samples/s end to end (loader + forward/backward/step), the data-wait fraction (time
blocked on the loader / step time), peak GPU memory, FLOPs per sample (torch.utils.flop_counter, forward +
backward) and MFU (FLOPs/sample x rate / the device's dense bf16 peak), and the same model on one random batch
kept on the device: the ceiling without I/O; end-to-end / ceiling is the data pipeline's efficiency; and the
loader alone (batches pulled as fast as the workers deliver them, nothing else running): whether the workers could
keep up with the ceiling at all.
Issue 15's targets on one H100: >= 2,500 samples/s end to end, data wait < 5 %. --smoke: ResNet-18 + a 2-layer
tiny BERT at 32 px, a few steps, on the CPU (MFU and GPU memory are then n/a, written as null).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

# dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity); MFU is null for a device not listed
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # "L40S" before "L4"
        if key in name:
            return PEAK_BF16[key]
    return None


def prepare(work: Path, products: int, pack_size: int, smoke: bool) -> Path:
    """Synthesize + pack with the mmcat CLI (reused when present)."""
    mmcat = [sys.executable, "-m", "mmcat"]
    raw, packed = work / f"raw{products}", work / f"packed{products}-{pack_size}"
    side = ["--min-side", "48", "--max-side", "64"] if smoke else ["--min-side", "300", "--max-side", "500"]
    if not (raw / "products.csv").is_file():
        subprocess.run(mmcat + ["synth", "--out", str(raw), "--num-products", str(products), *side, "--seed", "1"],
                       check=True, stdout=subprocess.DEVNULL)
    if not (packed / "manifest.json").is_file():
        subprocess.run(mmcat + ["pack", str(raw / "products.csv"), "--out", str(packed), "--splits", "train=1.0",
                                "--image-size", str(pack_size), "--workers", str(min(8, os.cpu_count() or 1)),
                                "--max-samples-per-shard", str(max(16, products // 64))],
                       check=True, stdout=subprocess.DEVNULL)
    return packed


def text_model(work: Path, smoke: bool) -> str:
    """A local folder: the tiny BERT, or BERT-base's config (random init) with the MiniLM (BERT uncased) vocab."""
    from mmcat.models.tiny import make_tiny_text_model

    out = work / ("tiny_bert" if smoke else "bert_base")
    if (out / "config.json").is_file():
        return str(out)
    make_tiny_text_model(out, weights=False)
    if not smoke:
        from transformers import BertConfig

        BertConfig().save_pretrained(out)  # defaults = bert-base-uncased: 12 layers, hidden 768, vocab 30522
    return str(out)


def batches(cfg: Any, tokenizer: Any) -> Iterator[Dict[str, Any]]:
    """mmcat's real training loader, epoch after epoch, as the trainer uses it: one loader whose workers persist
    (a small data set would otherwise pay the workers' start-up every few steps)."""
    from mmcat.data import PersistentTrainLoader

    loader, epoch = PersistentTrainLoader(), 0
    try:
        while True:
            yield from loader(cfg, tokenizer, 0, 1, epoch).loader
            epoch += 1
    finally:  # the generator is closed (or collected): stop the workers
        loader.close()


def run(model: Any, optimizer: Any, source: Iterator[Dict[str, Any]], steps: int, warmup: int,
        device: torch.device, amp: bool) -> Dict[str, float]:
    """Samples/s and data-wait fraction over steps warmup..steps (time blocked in next(source) / wall)."""
    wait = samples = 0.0
    start = 0.0
    for step in range(steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, wait, samples = time.perf_counter(), 0.0, 0.0
        t = time.perf_counter()
        b = next(source)
        wait += time.perf_counter() - t
        b = to_device(b, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(b["pixel_values"], b["input_ids"], b["attention_mask"], b["has_image"], b["has_text"])
        loss = torch.nn.functional.cross_entropy(logits.float(), b["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += b["labels"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"samples_per_s": samples / wall, "data_wait_fraction": min(1.0, wait / wall)}


def loader_rate(source: Iterator[Dict[str, Any]], n: int, warmup: int) -> float:
    """Samples/s of the loader alone: ``n`` batches pulled after ``warmup`` (the workers' start and what they
    prefetched meanwhile)."""
    for _ in range(warmup):
        next(source)
    start, samples = time.perf_counter(), 0
    for _ in range(n):
        samples += len(next(source)["labels"])
    return samples / (time.perf_counter() - start)


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """What the trainer does with a batch: decode its JPEG bytes on the device (data.decode_on=device), move it."""
    if "image_bytes" in batch:
        from mmcat.data.device_decode import decode_batch

        batch = decode_batch(batch, device)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def flops_per_sample(model: Any, batch: Dict[str, Any], amp: bool, device: torch.device) -> float:
    """Forward + backward FLOPs of one batch (torch.utils.flop_counter), per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["has_image"],
                           batch["has_text"])
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["labels"].shape[0]


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model and data on the CPU, a few steps")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (run once with, once without)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300, help="timed steps + --warmup")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--products", type=int, default=20000, help="synthetic products packed (epochs cycle)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode-on", choices=("cpu", "device"), default="cpu",
                    help="data.decode_on: JPEG decode + augmentation in the loader workers or on the device")
    ap.add_argument("--data", type=Path, default=None,
                    help="a packed folder to read (its train split) instead of synthesizing and packing --products")
    ap.add_argument("--work", type=Path, default=None, help="keep generated data here (reused when present)")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/gpu-<UTC time>.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup, args.products, args.workers = 8, 6, 2, 48, 1
        args.device = "cpu"
    device = torch.device(args.device)
    size, text_len, image_model = (32, 16, "resnet18") if args.smoke else (224, 64, "resnet50")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench_gpu_")
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    packed = args.data or prepare(work, args.products, 32 if args.smoke else 256, args.smoke)

    from mmcat.config import TrainRunConfig, load_config
    from mmcat.models import build_model, load_tokenizer

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = load_config(TrainRunConfig, None, [
        f"data.root={packed}", f"output_dir={work / 'unused'}", f"model.image.name={image_model}",
        "model.image.weights=none", f"model.text.name={text_model(work, args.smoke)}", "model.text.pretrained=false",
        "model.fusion=gated", f"data.image_size={size}", f"data.max_text_length={text_len}",
        f"data.num_workers={args.workers}", f"train.batch_size={args.batch}", "data.uint8_pixels=true",
        "model.image.channels_last=true", "data.resampled=true",
        f"data.samples_per_epoch={4 * args.steps * args.batch}",  # more than any phase below pulls
        *([f"data.decode_on={args.decode_on}"] if args.decode_on != "cpu" else [])])  # cpu: the schema's default
    tokenizer = load_tokenizer(cfg.model.text)
    labels = json.loads((packed / "labels.json").read_text())
    amp = device.type == "cuda"  # bf16 autocast on the GPU; the CPU smoke run stays fp32 (bf16 is slow there)
    figures: Dict[str, Any] = {}
    source = batches(cfg, tokenizer)
    # the warm-up drains what the workers prefetched while starting, which would otherwise count as instant
    prefetched = args.workers * int(cfg.data.prefetch_factor)
    figures["loader_samples_per_s"] = loader_rate(source, max(2, args.steps - args.warmup), prefetched + args.warmup)
    source.close()  # stops its workers before the timed runs start theirs
    for name in ("ceiling", "end_to_end"):  # a fresh model and optimizer each: the same start for both
        torch.manual_seed(0)
        model = build_model(cfg.model, len(labels)).to(device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        source = batches(cfg, tokenizer)
        first = to_device(next(source), device)
        if name == "ceiling":
            figures["flops_per_sample"] = flops_per_sample(model, first, amp, device)
            source = iter(lambda: first, None)  # the same batch, already on the device: no I/O at all
        if args.compile:
            model = torch.compile(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        figures[name] = run(model, optimizer, source, args.steps, args.warmup, device, amp)
        if device.type == "cuda":
            figures[name]["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        del model, optimizer, source
    peak = peak_flops(device)
    e2e, ceil = figures["end_to_end"], figures["ceiling"]
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": f"{image_model} + {'tiny BERT' if args.smoke else 'BERT-base'}",
        "image_size": size, "text_length": text_len, "batch": args.batch, "workers": args.workers,
        "timed_steps": args.steps - args.warmup, "compile": args.compile, "bf16": amp,
        "decode_on": args.decode_on,
        "samples_per_s": e2e["samples_per_s"], "data_wait_fraction": e2e["data_wait_fraction"],
        "peak_gpu_memory_gb": e2e.get("peak_gpu_memory_gb"),
        "flops_per_sample": figures["flops_per_sample"], "device_peak_flops": peak,
        "mfu": figures["flops_per_sample"] * e2e["samples_per_s"] / peak if peak else None,
        "ceiling_samples_per_s": ceil["samples_per_s"], "ceiling_peak_gpu_memory_gb": ceil.get("peak_gpu_memory_gb"),
        "pipeline_efficiency": e2e["samples_per_s"] / ceil["samples_per_s"],
        "loader_samples_per_s": figures["loader_samples_per_s"],
        "targets": "one H100: >= 2500 samples/s end to end, data wait < 0.05"}
    path = args.json or Path(__file__).parent / "results" / f"gpu-{time.strftime('%Y-%m-%dT%H%M%S', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in result.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    print(f"JSON: {path}")
    if tmp:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
