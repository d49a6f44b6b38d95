"""Trainer throughput on CPU: the mmcat training loop vs a minimal hand-written PyTorch loop, and 2 vs 1 process.

Model and data for every measurement: ResNet-18 (random init) + a tiny BERT (2 layers, hidden 32, MiniLM tokenizer)
with gated fusion, image size 64, batch 32, on ``mmcat synth`` products packed with ``mmcat pack --image-size 64``.

1. Loop overhead, in this process, on the *same in-memory batches* (collected once from ``build_train_loader``):
   * hand loop: ``build_model`` + the trainer's own AdamW param groups, scheduler and loss; forward, backward,
     grad-norm clipping, step, zero_grad, scheduler step -- nothing else;
   * trainer: the real ``mmcat.train.loop.Trainer``, built by ``build_training(cfg, build_loader=...)`` with a
     loader builder that returns those batches (one epoch), so only the loop differs (accelerate wrapping,
     ``accumulate``, one ``reduce`` per step, TensorBoard logging, tqdm). Target: trainer / hand >= 0.97.
   Both are timed from the outside: the time each batch is requested is the end of the previous step. The first
   ``--warmup`` steps are left out; eval, checkpoint and start-up lie outside the timed span. Measured twice:
   runs one after the other, and step-interleaved (the batch iterator fed to the trainer runs hand-loop step i on
   a second model just before handing batch i over), which pairs every trainer step with a hand step taken under
   the same load from other processes -- the figure to trust on a shared machine.
2. ``python -m mmcat train`` (real loader, 1 loader worker) vs ``torchrun --nproc_per_node 2 -m mmcat train``
   (gloo, 1 loader worker per rank) on the same config and the same number of samples. Global samples/s from the
   trainer's own TensorBoard scalar ``train/samples_per_s`` (its windows between log steps), windows after
   step 10 only, so start-up is excluded; epoch ends (loader restart) stay in, as in real use.
   Threads: 1 process with OMP_NUM_THREADS=2; 2 processes with OMP_NUM_THREADS=1 each.

Each measurement is repeated ``--repeats`` times, alternating sides; the median is reported. Not a test: prints
figures, asserts nothing.

    .venv/bin/python benchmarks/bench_trainer.py [--products 800] [--steps 50] [--repeats 3] [--work DIR] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch

BATCH, SIZE, MAX_LEN, WORKERS = 32, 64, 32, 1
MODEL_OVERRIDES = ["model.image.name=resnet18", "model.image.weights=none", "model.text.pretrained=true",
                   "model.fusion=gated", "model.hidden_dim=128"]


# --------------------------------------------------------------------------------------------------------- data
def prepare(work: Path, products: int) -> Tuple[Path, str]:
    """Synthesize + pack with the mmcat CLI (reused when present); write the tiny text model."""
    from mmcat.models.tiny import make_tiny_text_model

    mmcat = [sys.executable, "-m", "mmcat"]
    raw, packed = work / "raw", work / "packed"
    if not (raw / "products.csv").is_file():
        subprocess.run(mmcat + ["synth", "--out", str(raw), "--num-products", str(products), "--min-side", "96",
                                "--max-side", "160", "--seed", "3"], check=True, stdout=subprocess.DEVNULL)
    if not (packed / "manifest.json").is_file():
        subprocess.run(mmcat + ["pack", str(raw / "products.csv"), "--out", str(packed), "--image-size", str(SIZE),
                                "--max-samples-per-shard", str(max(8, products // 20)), "--workers", "2"],
                       check=True, stdout=subprocess.DEVNULL)
    text = work / "tiny_bert"
    if not (text / "config.json").is_file():
        make_tiny_text_model(text)
    return packed, str(text)


def overrides(packed: Path, text: str, out: Path, steps: int, log_every: int = 10) -> List[str]:
    return MODEL_OVERRIDES + [
        f"model.text.name={text}", f"data.root={packed}", f"output_dir={out}", f"data.image_size={SIZE}",
        f"data.max_text_length={MAX_LEN}", f"data.num_workers={WORKERS}", "data.shuffle_buffer=256",
        f"train.batch_size={BATCH}", "train.epochs=100", f"train.max_steps={steps}", "train.warmup_steps=5",
        "train.lr=1e-3", "train.lr_image=1e-3", "train.lr_text=1e-3",
        "train.eval_every=1000000", "train.save_every=1000000", f"train.log_every={log_every}"]


def collect_batches(cfg: Any, n: int) -> List[Dict[str, Any]]:
    from mmcat.data import build_train_loader, iterate_batches
    from mmcat.models.text import load_tokenizer

    tokenizer, out, epoch = load_tokenizer(cfg.model.text), [], 0
    while len(out) < n:
        with iterate_batches(build_train_loader(cfg, tokenizer, 0, 1, epoch).loader) as it:
            out.extend(b for b, _ in zip(it, range(n - len(out))))
        epoch += 1
    return out


class Stamped:
    """In-memory batches that record when each is requested: the end of the previous training step."""

    def __init__(self, batches: Sequence[Dict[str, Any]]) -> None:
        self.batches, self.stamps = batches, []  # type: ignore[var-annotated]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for batch in self.batches:
            self.stamps.append(time.perf_counter())
            yield batch

    def rate(self, warmup: int) -> Tuple[float, float]:
        """(samples/s over the span, samples/s from the median step) for steps warmup .. len-2 (the last step's
        end is not observable: the trainer stops without asking for another batch)."""
        stamps = self.stamps[warmup:]
        if len(stamps) < 2:
            raise RuntimeError("too few timed steps: raise --steps")
        samples = sum(int(b["labels"].shape[0]) for b in self.batches[warmup:len(self.stamps) - 1])
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return samples / (stamps[-1] - stamps[0]), BATCH / statistics.median(steps)


# ---------------------------------------------------------------------------------------------- 1. loop overhead
def hand_step_fn(cfg: Any, num_labels: int, total_steps: int) -> Callable[[Dict[str, Any]], None]:
    """The minimal loop body, on the same model, optimizer groups, schedule and loss as the trainer."""
    from accelerate.utils import set_seed

    from mmcat.models import build_model
    from mmcat.train.optim import build_loss, build_optimizer, build_scheduler

    set_seed(cfg.seed)
    model = build_model(cfg.model, num_labels)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    loss_fn = build_loss(cfg, None)
    model.train()

    def step(b: Dict[str, Any]) -> None:
        logits = model(b["pixel_values"], b["input_ids"], b["attention_mask"], b["has_image"], b["has_text"])
        loss = loss_fn(logits.float(), b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    return step


def hand_loop(cfg: Any, batches: List[Dict[str, Any]], num_labels: int) -> Stamped:
    step = hand_step_fn(cfg, num_labels, len(batches))
    stamped = Stamped(batches)
    for b in stamped:
        step(b)
    return stamped


class Paired(Stamped):
    """Fed to the trainer; before handing over batch i it runs hand-loop step i on a second model. The two loops
    thus alternate step by step and see the same load from other processes (the machine is shared)."""

    def __init__(self, batches: Sequence[Dict[str, Any]], hand_step: Callable[[Dict[str, Any]], None]) -> None:
        super().__init__(batches)
        self.hand_step, self.after = hand_step, []  # type: ignore[var-annotated]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for batch in self.batches:
            self.stamps.append(time.perf_counter())  # end of trainer step i-1
            self.hand_step(batch)
            self.after.append(time.perf_counter())  # end of hand step i = start of trainer step i
            yield batch

    def paired_times(self, warmup: int) -> Tuple[float, float]:
        """Total seconds of (hand, trainer) steps warmup .. len-2."""
        idx = range(warmup, len(self.stamps) - 1)
        return (sum(self.after[i] - self.stamps[i] for i in idx),
                sum(self.stamps[i + 1] - self.after[i] for i in idx))


def trainer_in_memory(cfg: Any, batches: List[Dict[str, Any]], stamped: Stamped) -> Stamped:
    from mmcat.data.loader import LoaderInfo
    from mmcat.train.loop import Trainer
    from mmcat.train.setup import build_training

    def in_memory(*args: Any, **kwargs: Any) -> LoaderInfo:  # build_train_loader's signature
        return LoaderInfo(loader=stamped, batches_per_epoch=len(batches), samples_per_epoch=len(batches) * BATCH,
                          num_shards=0)

    rc = Trainer(build_training(cfg, build_loader=in_memory)).run()
    if rc != 0 or len(stamped.stamps) != len(batches):
        raise RuntimeError(f"trainer exited {rc} after {len(stamped.stamps)} of {len(batches)} batches")
    return stamped


# ------------------------------------------------------------------------------------------ 2. 1 vs 2 processes
def tensorboard_rate(run_dir: Path, after_step: int) -> float:
    """Time-weighted mean of the trainer's train/samples_per_s windows that end after ``after_step``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(run_dir.glob("tensorboard/**/events.out.tfevents.*")):  # hparams live in a sub-folder
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/samples_per_s" in acc.Tags()["scalars"]:
            break
    else:
        raise RuntimeError(f"no train/samples_per_s scalars under {run_dir}")
    scalars = sorted(acc.Scalars("train/samples_per_s"), key=lambda e: e.step)
    num = den = 0.0
    for prev, cur in zip(scalars, scalars[1:]):
        if prev.step >= after_step:
            dt = cur.wall_time - prev.wall_time
            num, den = num + cur.value * dt, den + dt
    if den == 0:
        raise RuntimeError("too few logged windows: raise --steps")
    return num / den


def cli_run(nproc: int, cfg_args: List[str], run_dir: Path, log_every: int) -> Tuple[float, float, Dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="2" if nproc == 1 else "1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "mmcat", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mmcat", "train"]
    start = time.perf_counter()
    proc = subprocess.run(cmd + cfg_args, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return tensorboard_rate(run_dir, after_step=log_every), wall, metrics


def figures(work: Path, quick: bool = False, repeats: int = 3) -> dict:
    """The suite's row: the real Trainer vs the hand loop, step-interleaved on the same in-memory batches; the
    median over repeats of (hand step time / trainer step time)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from suite import row

    from mmcat.config import TrainRunConfig, load_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    products, steps, warmup = (120, 6, 2) if quick else (400, 20, 4)  # 15 timed step pairs: fewer were not stable
    packed, text = prepare(work / f"p{products}", products)
    num_labels = len(json.loads((packed / "labels.json").read_text()))
    runs = work / f"runs-{time.time_ns()}"
    cfg = load_config(TrainRunConfig, None, overrides(packed, text, runs / "unused", steps))
    batches = collect_batches(cfg, steps)
    timed = sum(int(b["labels"].shape[0]) for b in batches[warmup:-1])
    pairs = []
    for r in range(repeats):
        run_cfg = load_config(TrainRunConfig, None, overrides(packed, text, runs / f"paired-{r}", steps))
        pair = Paired(batches, hand_step_fn(cfg, num_labels, len(batches)))
        trainer_in_memory(run_cfg, batches, pair)
        hand_s, trainer_s = pair.paired_times(warmup)
        pairs.append((timed / trainer_s, timed / hand_s))
    ours = statistics.median(a for a, _ in pairs)
    hand = statistics.median(b for _, b in pairs)
    ratio = statistics.median(a / b for a, b in pairs)
    return {"rows": [row(f"Trainer vs hand-written loop, step-interleaved, {steps - warmup - 1} steps, ResNet-18 + "
                         "tiny BERT @64", "samples/s", ours, hand, ratio, ">= 0.97", at_least=0.97)]}


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", type=int, default=800)
    ap.add_argument("--steps", type=int, default=40, help="in-memory steps per run (incl. --warmup)")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--cli-samples", type=int, default=1920, help="samples per `mmcat train` run")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every of the `mmcat train` runs")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the in-memory loop comparison")
    ap.add_argument("--cli-repeats", type=int, default=2, help="repeats of the 1- and 2-process `mmcat train` runs")
    ap.add_argument("--work", type=Path, default=None, help="keep generated data here (reused when present)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings, to check that the script runs")
    ap.add_argument("--skip-cli", action="store_true", help="only the in-process loop comparison")
    args = ap.parse_args(argv)
    if args.smoke:
        args.products, args.steps, args.warmup, args.repeats = 120, 6, 2, 1
        args.cli_samples, args.log_every, args.cli_repeats = 8 * BATCH, 2, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench_trainer_")
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    packed, text = prepare(work, args.products)
    num_labels = len(json.loads((packed / "labels.json").read_text()))
    train_n = json.loads((packed / "manifest.json").read_text())
    print(f"data ready in {time.perf_counter() - t0:.1f}s: {packed} ({num_labels} labels); "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}", flush=True)

    from mmcat.config import TrainRunConfig, load_config

    runs = work / f"runs-{int(time.time())}"
    cfg = load_config(TrainRunConfig, None, overrides(packed, text, runs / "unused", args.steps))
    batches = collect_batches(cfg, args.steps)
    results: Dict[str, List[Tuple[float, float]]] = {"hand": [], "trainer": []}
    paired: List[Tuple[float, float]] = []
    timed = sum(int(b["labels"].shape[0]) for b in batches[args.warmup:-1])
    for r in range(args.repeats):  # alternate, so that load from other processes hits both alike
        results["hand"].append(hand_loop(cfg, batches, num_labels).rate(args.warmup))
        run_cfg = load_config(TrainRunConfig, None, overrides(packed, text, runs / f"inmem-{r}", args.steps))
        results["trainer"].append(trainer_in_memory(run_cfg, batches, Stamped(batches)).rate(args.warmup))
        print(f"[loop] repeat {r} one after the other: hand {results['hand'][-1][0]:.1f}/s, trainer "
              f"{results['trainer'][-1][0]:.1f}/s (from median step: {results['hand'][-1][1]:.1f} vs "
              f"{results['trainer'][-1][1]:.1f})", flush=True)
        run_cfg = load_config(TrainRunConfig, None, overrides(packed, text, runs / f"paired-{r}", args.steps))
        pair = Paired(batches, hand_step_fn(cfg, num_labels, len(batches)))
        trainer_in_memory(run_cfg, batches, pair)
        paired.append(tuple(timed / t for t in pair.paired_times(args.warmup)))  # type: ignore[arg-type]
        print(f"[loop] repeat {r} step-interleaved: hand {paired[-1][0]:.1f}/s, trainer {paired[-1][1]:.1f}/s",
              flush=True)
    hand = statistics.median(x[0] for x in results["hand"])
    ours = statistics.median(x[0] for x in results["trainer"])
    hand_m = statistics.median(x[1] for x in results["hand"])
    ours_m = statistics.median(x[1] for x in results["trainer"])
    pair_ratio = statistics.median(t / h for h, t in paired)

    cli: Dict[int, List[Tuple[float, float]]] = {1: [], 2: []}
    if not args.skip_cli:
        for r in range(args.cli_repeats):
            for nproc in (1, 2):
                steps = args.cli_samples // (BATCH * nproc)
                run_dir = runs / f"cli-{nproc}p-{r}"
                rate, wall, m = cli_run(nproc, overrides(packed, text, run_dir, steps, args.log_every), run_dir,
                                       args.log_every)
                if m["world_size"] != nproc or m["samples_seen"] < steps * BATCH * nproc * 0.9:
                    raise RuntimeError(f"unexpected metrics.json: {m}")
                cli[nproc].append((rate, wall))
                print(f"[cli] repeat {r}: {nproc} process(es): {rate:.1f} samples/s (steady, global), "
                      f"{m['samples_seen']} samples, {wall:.1f}s wall incl. start-up/eval", flush=True)

    w = args.warmup
    print(f"\n=== mmcat trainer throughput: median of {args.repeats} in-memory / {args.cli_repeats} CLI runs; batch "
          f"{BATCH}, image {SIZE}, ResNet-18 + tiny BERT; {args.steps - w - 1} timed steps per in-memory run ===")
    print(f"{'measurement':58s} {'samples/s':>10s}")
    print(f"{'hand-written PyTorch loop, in-memory batches':58s} {hand:10.1f}")
    print(f"{'mmcat Trainer, same in-memory batches':58s} {ours:10.1f}")
    print(f"{'ratio trainer / hand loop, runs one after the other':58s} {ours / hand:10.3f}")
    print(f"{'  same, from median step times':58s} {ours_m / hand_m:10.3f}")
    print(f"{'ratio trainer / hand loop, step-interleaved (target >= 0.97)':58s} {pair_ratio:10.3f}")
    print(f"{'  interleaved hand / trainer samples/s (median)':58s} "
          f"{statistics.median(x[0] for x in paired):5.1f} / {statistics.median(x[1] for x in paired):.1f}")
    if not args.skip_cli:
        one = statistics.median(x[0] for x in cli[1])
        two = statistics.median(x[0] for x in cli[2])
        print(f"{'mmcat train, 1 process, real loader (OMP 2 threads)':58s} {one:10.1f}")
        print(f"{'  ratio vs hand loop on in-memory batches':58s} {one / hand:10.3f}")
        print(f"{'torchrun 2 processes gloo, real loader (OMP 1 thread each)':58s} {two:10.1f}")
        print(f"{'ratio 2 processes / 1 process':58s} {two / one:10.3f}")
        print(f"{'wall time per run incl. start-up+final eval, 1p / 2p (s)':58s} "
              f"{statistics.median(x[1] for x in cli[1]):5.1f} / {statistics.median(x[1] for x in cli[2]):.1f}")
    print(f"(train samples in the packed set: {train_n['splits']['train']['samples'] if 'splits' in train_n else '?'};"
          f" load average now {os.getloadavg()[0]:.2f})")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
