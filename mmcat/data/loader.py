"""Train and eval loaders over WebDataset shards (webdataset public API + a few small, picklable stages).

Train stream of one rank in one epoch, fully determined by (seed, epoch, rank, world size, num_workers):

1. the shard list is shuffled with ``seed + epoch`` -- the same order on every rank -- and only *then* split by
   rank (``order[rank::world]``) and by loader worker (``[worker::num_workers]``), so each epoch every rank reads a
   different, disjoint subset and together the ranks read every shard (webdataset's ``shardshuffle`` would shuffle
   after the split and pin each rank to the same subset forever);
2. each worker reads its shards **once** (``webdataset.tarfile_samples``) through a shuffle buffer seeded from
   (seed, epoch, rank, worker) and drained to the end, so every sample of the split is yielded at least once per
   epoch; samples are label/text-checked, decoded (OpenCV), augmented with per-sample seeds, and batched +
   tokenized (fast tokenizer, dynamic padding) inside the worker;
3. every worker of every rank yields exactly ``Q`` full batches (``worker_quota``: ``ceil(sum of the ceil(S / G)
   largest shard sizes / B)`` for S shards, G = ranks x workers, batch B; sizes from ``sizes.json``), so all ranks
   run the same number of steps (no DDP hang) and no worker holds more samples than it yields, in any epoch. After
   its one pass a worker pads its last batches with further seeded passes over its own shards (each through its
   own seeded buffer): the epoch's only repeats, ``G * Q * B - N`` in all (plus one per bad sample skipped).

Exact mid-epoch resume (``skip_batches=k``): a DataLoader hands out batch i from worker ``i % W``. The resumed
loader's worker w plays the part of worker ``(w + k) % W`` of the uninterrupted run (same shards, same seeds, same
pass + padding stream), and drops that worker's first ``ceil((k - v) / W)`` batches' worth of samples *before*
decoding them, so batch 0 of the resumed loader is batch k of the full epoch. Skipped samples are only
label-checked, not decoded: an image that fails to decode inside the skipped range shifts the rest of that
worker's epoch by one sample.

One loader for the whole run (``PersistentTrainLoader``, what the trainer uses): the workers start once and live
across epochs (``persistent_workers``); the epoch number and the resume skip reach them through a shared-memory
tensor that the parent sets before ``iter(loader)`` and each worker reads when its pass restarts, so every pass is
exactly the stream above for that (epoch, skip). Eval loaders can keep their workers the same way
(``build_eval_loader(persistent=True)``). ``iterate_batches`` stops the workers of an abandoned pass; the owner
stops them at the end of the run (``close_loader``): they ignore SIGTERM.

Resampled mode (``data.resampled=true``) draws shards with replacement (per-root ``data.weights``) with a seeded
RNG per (rank, worker); epochs are "virtual" (``data.samples_per_epoch`` or the size tables).

Bad samples are skipped and counted (``batch["skipped"]``), or raise with ``data.strict=true``.
Do not pass the train loader through ``accelerator.prepare``: it is already split per rank.
"""
from __future__ import annotations

import logging
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from mmcat.data.device_decode import ViewSpec, raw_image
from mmcat.data.samples import IMAGE_EXTS, BadSample, BadSampleCounter, LabelReader, decode_image, parse_sample
from mmcat.data.shards import ShardSource, all_shards, read_labels, shard_sources, total_samples
from mmcat.data.tarstream import tarfile_samples
from mmcat.data.transforms import batch_buffer, eval_view, to_pixel_values, train_view
from mmcat.hashing import stable_seed
from mmcat.errors import DataError
from mmcat.modalities import training_modalities

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenization runs in loader workers, one thread each
log = logging.getLogger(__name__)


@dataclass
class LoaderInfo:
    loader: DataLoader
    batches_per_epoch: int  # per rank, identical on every rank (a full epoch, including skipped batches)
    samples_per_epoch: int  # global, as counted in the size tables (or data.samples_per_epoch)
    num_shards: int
    skip_batches: int = 0  # this loader yields batches_per_epoch - skip_batches batches
    rank_shards: Optional[List[str]] = None  # the shards this rank reads this epoch (None: resampled)
    repeats: int = 0  # global: samples per epoch beyond one pass (padding to equal batches; 0 when resampled)


# --------------------------------------------------------------------------------------------- deterministic plan
def epoch_shard_order(shards: Sequence[str], seed: int, epoch: int) -> List[str]:
    """The epoch's global shard order: identical on every rank, different every epoch."""
    order = sorted(shards)
    random.Random(stable_seed(seed, epoch, "shards")).shuffle(order)
    return order


def rank_shards(shards: Sequence[str], seed: int, epoch: int, rank: int, world_size: int) -> List[str]:
    """This rank's shards: shuffle with the shared seed first, then split by node."""
    return epoch_shard_order(shards, seed, epoch)[rank::world_size]


def batches_per_worker(num_samples: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Resampled mode: a virtual epoch of ``num_samples`` split evenly over ranks and workers (open_clip's rule)."""
    per_rank = math.ceil(num_samples / (batch_size * world_size))
    return max(1, math.ceil(per_rank / max(1, num_workers)))


def worker_quota(shard_sizes: Sequence[int], batch_size: int, groups: int) -> int:
    """Batches every loader worker of every rank yields per epoch, so that no worker holds more samples than it
    yields. ``groups`` = ranks x workers; group g reads positions g, g + groups, … of the epoch's shard order, so it
    holds at most ``ceil(S / groups)`` shards and never more samples than the largest that many shards together.
    That bound is the same in every epoch (the step schedule and resume positions rely on a fixed epoch length)
    and tight for packed data, where all shards but the last are full."""
    most = math.ceil(len(shard_sizes) / groups)
    return max(1, math.ceil(sum(sorted(shard_sizes, reverse=True)[:most]) / batch_size))


def worker_skip(skip_batches: int, virtual_worker: int, num_workers: int) -> int:
    """Batches of ``virtual_worker`` that lie before loader batch ``skip_batches`` (batch i comes from i % W)."""
    return max(0, -(-(skip_batches - virtual_worker) // num_workers))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    if info is None:
        return 0, 1
    import cv2

    cv2.setNumThreads(1)  # one decode thread per loader worker: the workers are the parallelism
    return info.id, info.num_workers


# ------------------------------------------------------------------------------------------------ pipeline stages
@dataclass
class _StreamSpec:
    """What one rank's sample stream is made of: everything a loader worker needs to know which samples it yields
    (shards, mode, seeds, batch quota, resume skip); copied into every worker process."""

    shards: List[str]  # this rank's shards (train) or the split's shards (eval)
    shard_weights: Optional[List[float]]  # resampled mode: draw probabilities
    mode: str  # "train" | "resampled" | "eval"
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    batches_per_worker: int  # 0 = until the shards are exhausted (eval)
    skip_batches: int = 0
    sizes: Optional[Dict[str, int]] = None  # shard -> samples from the size tables (train mode)

    def virtual_worker(self) -> int:
        worker, n = _worker()
        assert n == self.num_workers, (n, self.num_workers)
        return (worker + self.skip_batches) % n

    def base_seed(self, v: int) -> int:
        return stable_seed(self.seed, self.epoch, self.rank, self.world_size, self.num_workers, v)


class _Members:
    """``select_files`` for tar reading: members the pipeline does not use (e.g. ``json`` when labels come from
    ``cls``, embeddings written by other tools) are skipped without being read into memory."""

    def __init__(self, label_key: str, modalities: Sequence[Any] = ()) -> None:
        self.wanted = {*IMAGE_EXTS, "txt", "cls" if label_key == "cls" else "json",
                       *(member for m in modalities for member in m.members)}

    def __call__(self, fname: str) -> bool:
        name = fname.rsplit("/", 1)[-1]
        return "." in name and name.split(".", 1)[1].lower() in self.wanted


class _Samples:
    """Source stage: this worker's samples, shuffled and label-checked but not decoded, after the resume skip.

    Train mode reads the worker's shards once through the shuffle buffer, drained to the end (pass 0: every sample
    once), then pads with further seeded passes over the same shards for as long as the limit stage pulls (the
    padding that gives every worker the same batch count). Eval mode reads its shards once, in order; resampled
    mode draws shards with replacement forever."""

    def __init__(self, spec: _StreamSpec, counter: BadSampleCounter, labels: LabelReader, bufsize: int,
                 members: _Members, modalities: Sequence[Any] = ()) -> None:
        self.spec, self.counter, self.labels, self.bufsize, self.members = spec, counter, labels, bufsize, members
        self.modalities = modalities

    def __call__(self) -> Iterator[Dict[str, Any]]:
        p = self.spec
        v = p.virtual_worker()
        skip = worker_skip(p.skip_batches, v, p.num_workers) * p.batch_size
        index = 0
        for sample in self._checked(v):
            index += 1
            if index <= skip:  # resume: drop what the interrupted run already trained on, before any decode
                if index == skip:
                    self.counter.take()  # bad samples in the skipped range were reported by the earlier run
                continue
            sample["seed"] = stable_seed(p.base_seed(v), "sample", index)
            yield sample

    def _checked(self, v: int) -> Iterator[Dict[str, Any]]:
        p = self.spec
        if p.mode == "eval":  # a rank or worker may have no eval shards: it yields nothing, the evaluator copes
            yield from self._parse(self._read(p.shards[v::p.num_workers]))
        elif p.mode == "resampled":
            yield from self._parse(self._shuffle(self._read(self._resampled_urls(v), guard=True),
                                                 p.batches_per_worker * p.batch_size, p.base_seed(v), "buffer"))
        else:
            yield from self._epoch(v)

    def _epoch(self, v: int) -> Iterator[Dict[str, Any]]:
        p = self.spec
        mine = p.shards[v::p.num_workers]
        if not mine:
            raise DataError(f"loader worker {v} of rank {p.rank} has no shards")  # guarded earlier, kept for safety
        expected = sum((p.sizes or {}).get(s, 0) for s in mine)
        yield from self._parse(self._shuffle(self._read(mine, expected), expected, p.base_seed(v), "buffer"))
        for rep in count(1):  # padding: the limit stage stops pulling once the worker's batches are full
            order = list(mine)
            random.Random(stable_seed(p.base_seed(v), "pass", rep)).shuffle(order)
            got = 0
            for sample in self._parse(self._shuffle(self._read(order), expected, p.base_seed(v), "pad", rep)):
                got += 1
                yield sample
            if not got:
                raise DataError(f"no usable samples in the shards of loader worker {v} of rank {p.rank} "
                                f"({', '.join(os.path.basename(s) for s in mine)})")

    def _resampled_urls(self, v: int) -> Iterator[str]:
        p = self.spec
        rng = random.Random(stable_seed(p.base_seed(v), "resample"))
        while True:
            yield rng.choices(p.shards, weights=p.shard_weights)[0]

    def _read(self, urls: Iterable[str], expected: int = 0, guard: bool = False) -> Iterator[Dict[str, Any]]:
        """Raw tar samples of ``urls``. ``expected`` (pass 0) warns when the shards hold more samples than the
        size tables say: the epoch's batch count comes from those tables, so the surplus may not fit into it."""
        read, empty_in_a_row = 0, 0
        for url in urls:
            got = 0
            for sample in tarfile_samples(url, self.counter.handler, self.members):  # webdataset's, faster
                got += 1
                yield sample
            read += got
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if guard and empty_in_a_row > 2 * max(1, len(self.spec.shards)):  # would loop forever
                raise DataError(f"no readable samples in the shards of rank {self.spec.rank} (last: {url})")
        if expected and read > expected:
            log.warning("the shards of a loader worker of rank %d hold more samples than the size table says "
                        "(%d > %d; sizes.json is stale?): samples past the epoch's batches are not trained on",
                        self.spec.rank, read, expected)

    def _shuffle(self, src: Iterator[Dict[str, Any]], samples: int, *seed: Any) -> Iterator[Dict[str, Any]]:
        """Seeded buffer shuffle, drained to the end of ``src``; no larger than the samples it will hold."""
        bufsize = min(self.bufsize, samples) if samples > 0 else self.bufsize  # 0: size unknown
        if bufsize <= 1:
            return src
        return wds.shuffle(bufsize, min(bufsize, 100), seed=stable_seed(*seed))(src)

    def _parse(self, src: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        """Cheap checks (label, text) before any image decode; bad samples are counted and skipped."""
        for raw in src:
            try:
                yield parse_sample(raw, self.labels, self.modalities)
            except BadSample as exc:
                self.counter.record(str(exc), f"{raw.get('__key__')} in {raw.get('__url__')}")


class _DecodeAugment:
    """Decode + augment in the worker; with ``on_device`` (``data.decode_on=device``) only wrap the image bytes for
    the trainer, which decodes and augments the whole batch on its device (mmcat.data.device_decode)."""

    def __init__(self, counter: BadSampleCounter, image_size: int, train: bool, min_crop_scale: float,
                 on_device: bool = False) -> None:
        self.counter, self.size, self.train, self.min_scale = counter, image_size, train, min_crop_scale
        self.on_device = on_device

    def __call__(self, src: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for s in src:
            if self.on_device:
                s["pixels"], s["raw"] = None, raw_image(s["image"])
            elif s["image"] is None:
                s["pixels"] = None
            else:
                try:
                    img = decode_image(s["image"], self.size)  # decoded no smaller than the output
                except BadSample as exc:
                    self.counter.record(str(exc), f"{s['key']} in {s['url']}")
                    continue
                rng = random.Random(s["seed"]) if self.train else None
                s["pixels"] = train_view(img, self.size, rng, self.min_scale) if rng else \
                    eval_view(img, self.size, self.min_scale)
            del s["image"]
            yield s


class Collate:
    """Batch in the worker: stack images (uint8, or normalised once per batch), tokenize all texts in one call;
    every other modality collates its own values (``batch[name]``, ``batch["has_<name>"]``)."""

    def __init__(self, tokenizer: Any, max_length: int, image_size: int, counter: BadSampleCounter,
                 normalize: bool, modalities: Sequence[Any] = (), device_view: Optional[ViewSpec] = None) -> None:
        self.tokenizer, self.max_length, self.size, self.counter = tokenizer, max_length, image_size, counter
        self.normalize, self.modalities, self.device_view = normalize, modalities, device_view

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if self.device_view is not None:  # image bytes for the device (device_decode.decode_batch), no pixels
            has_image = torch.tensor([s["raw"] is not None for s in samples], dtype=torch.bool)
            images = {"image_bytes": [s["raw"] for s in samples], "image_seeds": [s["seed"] for s in samples],
                      "image_urls": [s["url"] for s in samples], "view": self.device_view}
        else:
            shape = (len(samples), self.size, self.size, 3)  # rows without an image: zeroed by to_pixel_values
            # uint8 out of the worker: fill the shared-memory batch itself; float: a numpy scratch array, normalised
            # (torch.empty here made a worker's private memory grow with the dataset: 1.32-1.41x at 10x the
            # products in benchmarks/, against 1.05-1.11x with numpy)
            pixels = torch.from_numpy(np.empty(shape, np.uint8)) if self.normalize else batch_buffer(shape, torch.uint8)
            view = pixels.numpy()  # filled in place
            for i, s in enumerate(samples):
                if s["pixels"] is not None:
                    view[i] = s["pixels"]
            has_image = torch.tensor([s["pixels"] is not None for s in samples], dtype=torch.bool)
            images = {"pixel_values": to_pixel_values(pixels, has_image, self.normalize)}
        # a sample without text gets the empty string: only the special tokens ([CLS][SEP])
        tok = self.tokenizer([s["text"] or "" for s in samples], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt", return_token_type_ids=False)
        return {
            **images,
            "input_ids": tok["input_ids"].long(),
            "attention_mask": tok["attention_mask"].long(),
            "has_image": has_image,
            "has_text": torch.tensor([s["text"] is not None for s in samples], dtype=torch.bool),
            **self._extra(samples),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "keys": [s["key"] for s in samples],
            "skipped": self.counter.take(),
        }


    def _extra(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for m in self.modalities:
            values = [s["modalities"][m.name] for s in samples]
            out[m.name] = m.collate(values)
            out[f"has_{m.name}"] = torch.tensor([v is not None for v in values], dtype=torch.bool)
        return out


class _Limit:
    """Per-worker epoch length (webdataset's ``with_epoch`` takes one count for all workers; after a resume the
    workers have different numbers of batches left)."""

    def __init__(self, spec: _StreamSpec) -> None:
        self.spec = spec

    def __call__(self, src: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        p = self.spec
        if p.batches_per_worker <= 0:
            yield from src
            return
        v = p.virtual_worker()
        left = p.batches_per_worker - worker_skip(p.skip_batches, v, p.num_workers)
        if left <= 0:
            return
        for i, batch in enumerate(src):  # stop right after the last batch: pulling one more would decode it
            yield batch
            if i + 1 >= left:
                return


def uint8_pixels(data_cfg: Any) -> bool:
    """Ship uint8 pixels (the model normalises on the GPU) unless training runs on the CPU, where normalising in
    the loader workers keeps that work parallel instead of serial in the trainer process."""
    choice = data_cfg.get("uint8_pixels") if hasattr(data_cfg, "get") else getattr(data_cfg, "uint8_pixels", None)
    return torch.cuda.is_available() if choice is None else bool(choice)


def _pipeline(spec: _StreamSpec, data_cfg: Any, tokenizer: Any, modalities: Sequence[Any] = ()) -> wds.DataPipeline:
    train = spec.mode != "eval"
    counter = BadSampleCounter(bool(data_cfg.strict))
    labels = LabelReader(str(data_cfg.label_key), read_labels(data_cfg))
    size = int(data_cfg.image_size)
    # the artifact's config (mmcat eval) has no decode_on: its evaluation decodes in the workers
    on_device = str(getattr(data_cfg, "decode_on", "cpu")) == "device"
    view = ViewSpec(size, train, float(data_cfg.min_crop_scale), bool(data_cfg.strict)) if on_device else None
    stages = [
        _Samples(spec, counter, labels, int(data_cfg.shuffle_buffer), _Members(str(data_cfg.label_key), modalities),
                 modalities),
        _DecodeAugment(counter, size, train, float(data_cfg.min_crop_scale), on_device),
        wds.batched(spec.batch_size, collation_fn=Collate(tokenizer, int(data_cfg.max_text_length), size, counter,
                                                            normalize=not uint8_pixels(data_cfg),
                                                            modalities=modalities, device_view=view),
                    partial=not train),
        _Limit(spec),
    ]
    return wds.DataPipeline(*stages)



def _init_worker(worker_id: int) -> None:
    _ignore_preemption_signals()
    _fixed_malloc_thresholds()


def _ignore_preemption_signals() -> None:
    """Loader workers ignore SIGTERM/SIGUSR1/SIGINT: torch's launcher (and a terminal's Ctrl-C) signals the
    trainer's whole process group, and a killed worker would crash the step the trainer is finishing before its
    checkpoint."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def _fixed_malloc_thresholds() -> None:
    """Keep a worker's memory flat over a long epoch (glibc only; elsewhere nothing). glibc raises its mmap
    threshold each time a large mmapped block (a batch of pixels) is freed, up to 32 MiB; later blocks of that size
    then come from the heap, which fragments and is not given back: the worker's private memory crept from ~17 to
    ~26 MB over a 2,000-product epoch (benchmarks/bench_loader.py, ratio 1.19-1.34 to a 200-product epoch). A
    fixed threshold stops the rise: batches (megabytes) stay in mmap and go back to the system when freed (ratio
    0.81-1.07), while photo-sized blocks stay on the fast heap (a 128 KiB threshold cost ~10 % loader throughput;
    4 MiB costs nothing measurable)."""
    from mmcat.files import libc

    lib = libc()
    if lib is not None and hasattr(lib, "mallopt"):
        lib.mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024)


class _Pass:
    """An iterator over one pass of a loader that remembers whether the pass ran to its end."""

    def __init__(self, iterator: Iterator[Dict[str, Any]]) -> None:
        self.iterator, self.finished = iterator, False

    def __iter__(self) -> "_Pass":
        return self

    def __next__(self) -> Dict[str, Any]:
        try:
            return next(self.iterator)
        except StopIteration:
            self.finished = True
            raise


@contextmanager
def iterate_batches(loader: Iterable[Dict[str, Any]]) -> Iterator[Iterator[Dict[str, Any]]]:
    """Iterate ``loader`` and always stop its workers when the iteration is abandoned (error, preemption, early
    stop). The workers ignore SIGTERM (above), so the interpreter's exit-time terminate() cannot stop them and
    would wait for them forever; an exception's traceback can also keep the iterator alive past the loop.
    Persistent workers (``PersistentTrainLoader``, ``build_eval_loader(persistent=True)``) stay up after a pass
    that ran to its end, for the next epoch or evaluation; ``close_loader`` stops them."""
    iterator = iter(loader)
    tracked = _Pass(iterator)
    try:
        yield tracked
    finally:
        if not (tracked.finished and getattr(iterator, "_persistent_workers", False)):
            _shutdown(loader, iterator)


def _shutdown(loader: Any, iterator: Any) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
    if shutdown is not None:
        shutdown()
    if getattr(loader, "_iterator", None) is iterator:
        loader._iterator = None  # a persistent loader's next pass starts new workers instead of reusing dead ones


def close_loader(loader: Optional[Iterable[Any]]) -> None:
    """Stop the workers a persistent loader keeps between passes (at the end of the run); safe to call twice."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        _shutdown(loader, iterator)


def _data_loader(dataset: torch.utils.data.IterableDataset, num_workers: int, prefetch_factor: int,
                 persistent: bool = False) -> DataLoader:
    if num_workers > 0:
        import cv2

        # A forked worker inherits OpenCV's thread pool with its lock possibly held and can deadlock in its first
        # cv2 call; one thread in the parent means no pool to inherit (the workers are the parallelism anyway).
        cv2.setNumThreads(1)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                      persistent_workers=persistent and num_workers > 0,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=_init_worker,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None)


# ------------------------------------------------------------------------------------------------------ public API
def build_train_loader(cfg: Any, tokenizer: Any, rank: int, world_size: int, epoch: int,
                       skip_batches: int = 0) -> LoaderInfo:
    """The loader of ``epoch`` for ``rank``; ``skip_batches=k`` starts at batch k without decoding batches 0..k-1.
    A new loader (and new workers) per call; the trainer uses ``PersistentTrainLoader``, which yields the same
    batches through workers that live for the whole run."""
    spec, shards, n = _train_spec(cfg, rank, world_size, epoch, skip_batches)
    per_epoch = spec.batches_per_worker * spec.num_workers
    dataset = _pipeline(spec, cfg.data, tokenizer, training_modalities(cfg)[1]).with_length(per_epoch - skip_batches,
                                                                                              silent=True)
    loader = _data_loader(dataset, int(cfg.data.num_workers), int(cfg.data.prefetch_factor))
    return _loader_info(loader, spec, shards, n)


class _EpochStream(torch.utils.data.IterableDataset):
    """The train stream of one rank for a whole run. The epoch and the resume skip live in a small shared-memory
    tensor that the parent sets before each pass; a worker forked once reads it when the DataLoader restarts its
    iteration (``iter(loader)``, after the parent's write) and updates the ``_StreamSpec`` its pipeline stages
    share, so each pass is exactly ``build_train_loader(epoch, skip_batches)``'s stream: same shards, same seeds
    (seed, epoch, rank, virtual worker)."""

    def __init__(self, spec: _StreamSpec, shards: List[str], pipeline: wds.DataPipeline) -> None:
        super().__init__()
        self.spec, self.shards, self.pipeline = spec, shards, pipeline
        self.per_epoch = spec.batches_per_worker * spec.num_workers
        self.now = torch.tensor([spec.epoch, spec.skip_batches], dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, skip_batches: int) -> None:
        self.now[0], self.now[1] = epoch, skip_batches

    def __len__(self) -> int:  # the first epoch after a resume is shorter
        return self.per_epoch - int(self.now[1])

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch, skip = self.now.tolist()
        p = self.spec
        p.epoch, p.skip_batches = epoch, skip
        if p.mode == "train":  # resampled mode draws from all shards in every epoch
            p.shards = rank_shards(self.shards, p.seed, epoch, p.rank, p.world_size)
        return iter(self.pipeline)


class PersistentTrainLoader:
    """``build_train_loader`` for a whole run (same call, same ``LoaderInfo``), but every call returns the same
    DataLoader: its workers (``persistent_workers`` when ``data.num_workers`` > 0) start once and are told each
    epoch's number and resume skip (``_EpochStream``), instead of a new loader, worker start-up and tokenizer
    pickling per epoch. Iterate it with ``iterate_batches`` (an abandoned pass stops the workers; the next call
    starts new ones) and ``close()`` it at the end of the run."""

    def __init__(self) -> None:
        self.loader: Optional[DataLoader] = None
        self._stream: Optional[_EpochStream] = None
        self._made_for: Optional[tuple] = None

    def __call__(self, cfg: Any, tokenizer: Any, rank: int, world_size: int, epoch: int,
                 skip_batches: int = 0) -> LoaderInfo:
        spec, shards, n = _train_spec(cfg, rank, world_size, epoch, skip_batches)
        made_for = (id(cfg), id(tokenizer), rank, world_size)
        if self.loader is None or self._stream is None or made_for != self._made_for:
            self.close()
            self._stream = _EpochStream(spec, shards, _pipeline(spec, cfg.data, tokenizer,
                                                                training_modalities(cfg)[1]))
            self.loader = _data_loader(self._stream, int(cfg.data.num_workers), int(cfg.data.prefetch_factor),
                                       persistent=True)
            self._made_for = made_for
        self._stream.set_epoch(int(epoch), int(skip_batches))
        len(self.loader)  # refreshes the length the DataLoader checks a pass against (it changes after a resume)
        return _loader_info(self.loader, spec, shards, n)

    def close(self) -> None:
        close_loader(self.loader)


def _train_spec(cfg: Any, rank: int, world_size: int, epoch: int,
                skip_batches: int) -> Tuple[_StreamSpec, List[str], int]:
    """(the stream of ``rank`` in ``epoch``, all train shards, samples per epoch); bad settings raise here."""
    data, batch_size = cfg.data, int(cfg.train.batch_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    workers = max(1, int(data.num_workers))
    sources = shard_sources(data, data.train_split)
    shards = all_shards(sources)
    if data.samples_per_epoch and not data.resampled:
        raise DataError("data.samples_per_epoch needs data.resampled=true (without it an epoch is one full pass "
                        "over the train split)")
    n = int(data.samples_per_epoch) if data.samples_per_epoch else total_samples(sources)
    if n <= 0:
        raise DataError(f"no samples in split '{data.train_split}' (its size tables or tar headers count 0)")
    sizes = {shard: size for src in sources for shard, size in src.sizes.items()}
    if data.resampled:
        mode, mine = "resampled", shards
        weights: Optional[List[float]] = _shard_weights(sources)
        per_worker = batches_per_worker(n, batch_size, world_size, workers)
    else:
        if data.weights is not None:
            raise DataError("data.weights needs data.resampled=true (weights pick roots when sampling shards)")
        if len(shards) < workers * world_size:
            raise DataError(
                f"{len(shards)} train shards but {world_size} rank(s) x {workers} loader worker(s) need at least "
                f"{workers * world_size}: repack with smaller shards (pack max_samples_per_shard), lower "
                f"data.num_workers, or set data.resampled=true")
        mode, mine, weights = "train", rank_shards(shards, int(cfg.seed), epoch, rank, world_size), None
        per_worker = worker_quota([sizes.get(s, 0) for s in shards], batch_size, workers * world_size)
    per_epoch = per_worker * workers
    if not 0 <= skip_batches < per_epoch:
        raise ValueError(f"skip_batches={skip_batches} outside the epoch's {per_epoch} batches")
    spec = _StreamSpec(mine, weights, mode, int(cfg.seed), int(epoch), rank, world_size, workers, batch_size,
                       per_worker, int(skip_batches), sizes)
    return spec, shards, n


def _loader_info(loader: DataLoader, spec: _StreamSpec, shards: List[str], n: int) -> LoaderInfo:
    per_epoch = spec.batches_per_worker * spec.num_workers
    resampled = spec.mode == "resampled"
    return LoaderInfo(loader, per_epoch, n, len(shards), spec.skip_batches, None if resampled else list(spec.shards),
                      0 if resampled else per_epoch * spec.world_size * spec.batch_size - n)


def _shard_weights(sources: Sequence[ShardSource]) -> List[float]:
    """A root's weight is the share of draws from it, spread evenly over its shards."""
    total = sum(src.weight for src in sources)
    if total <= 0 or any(src.weight < 0 for src in sources):
        raise DataError("data.weights must be non-negative and not all zero")
    return [src.weight / total / len(src.shards) for src in sources for _ in src.shards]


def build_eval_loader(data_cfg: Any, split: str, tokenizer: Any, batch_size: int, num_workers: int,
                      rank: int = 0, world_size: int = 1, modalities: Sequence[Any] = (),
                      persistent: bool = False) -> DataLoader:
    """The samples of ``split`` in a fixed order, no shuffle, eval transforms, partial last batches. With
    ``world_size`` > 1, rank r reads shards r, r+world, …: counts may differ between ranks, so the evaluator steps
    ranks in lockstep and gathers predictions as objects (exact counts, see mmcat.evaluation). ``modalities``: the
    model's non-built-in modalities (``mmcat.modalities``), read from every sample. ``persistent``: the workers
    stay up between passes (the trainer's evaluations; iterate with ``iterate_batches``, stop with
    ``close_loader``)."""
    shards = all_shards(shard_sources(data_cfg, split, count_missing=False))[rank::world_size]
    workers = max(0, min(int(num_workers), len(shards)))
    spec = _StreamSpec(shards, None, "eval", 0, 0, 0, 1, max(1, workers), int(batch_size), 0)
    return _data_loader(_pipeline(spec, data_cfg, tokenizer, modalities), workers, int(data_cfg.prefetch_factor),
                        persistent)
