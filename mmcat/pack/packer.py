"""``mmcat pack``: table -> plan -> (parallel) image processing -> ordered shard writing -> dataset files.

Determinism with N worker processes: the plan fixes the order of samples in each split up front; workers only
transform rows (``Pool.imap`` returns results in task order) and the parent alone writes shards, rotating by
count and bytes in that order. Output therefore never depends on scheduling or on ``--workers``.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import shutil
from collections import deque
from pathlib import Path
from typing import Deque, Dict, Iterator, List, Tuple

import cv2
from tqdm import tqdm

from mmcat.errors import ConfigError
from mmcat.pack.attributes import (ATTRIBUTE_STATS, FIT_SPLIT, Kinds, check_attribute_settings, infer_kinds,
                                   merged_stats)
from mmcat.pack.layouts import LABEL_FIELDS, read_layout
from mmcat.pack.download import DownloadSettings, Prefetch
from mmcat.pack.manifest import build_manifest, records_summary, sort_failures, sum_notes, write_dataset_files
from mmcat.pack.plan import Plan, Task, build_plan
from mmcat.pack.tables import InputTable, detect_format, read_table
from mmcat.pack.split import check_splits
from mmcat.pack.worker import ImageSettings, Result, init_worker, process_task, process_task_in_worker
from mmcat.pack.writer import SplitWriter, load_records, write_json_atomic, writing

STATE_DIR = ".pack-state"


class Layout:
    """Where a run (the whole table, or one job-array slice) puts its shards, state and summary files."""

    def __init__(self, out: Path, slice_index: int, num_slices: int):
        self.out, self.slice_index, self.num_slices = out, slice_index, num_slices
        self.sliced = num_slices > 1
        tag = f"slice-{slice_index:03d}" if self.sliced else "all"
        self.state = out / STATE_DIR / tag
        self.summary = out / "slices" / tag if self.sliced else out  # manifest/labels/failures(/sizes) go here

    def shard_name(self, index: int) -> str:
        return f"shard-s{self.slice_index:03d}-{index:06d}.tar" if self.sliced else f"shard-{index:06d}.tar"

    def shard_glob(self) -> str:
        return f"shard-s{self.slice_index:03d}-*.tar" if self.sliced else "shard-*.tar"

    def owns_row(self, row: int) -> bool:
        return (row - 1) % self.num_slices == self.slice_index


def _validate(cfg) -> Dict[str, float]:
    checks = [
        (cfg.image_size >= 8, "image_size", "must be >= 8"),
        (1 <= cfg.jpeg_quality <= 100, "jpeg_quality", "must be within 1..100"),
        (cfg.max_samples_per_shard >= 1, "max_samples_per_shard", "must be >= 1"),
        (cfg.max_shard_bytes >= 1e4, "max_shard_bytes", "must be >= 10000"),
        (cfg.max_image_pixels >= 1, "max_image_pixels", "must be >= 1"),
        (cfg.max_image_bytes >= 1, "max_image_bytes", "must be >= 1"),
        (cfg.workers >= 1, "workers", "must be >= 1"),
        (cfg.num_slices >= 1, "num_slices", "must be >= 1"),
        (0 <= cfg.slice_index < max(cfg.num_slices, 1), "slice_index", f"must be within 0..{cfg.num_slices - 1}"),
        (len(cfg.text_columns) >= 1, "text_columns", "needs at least one column"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"config key '{key}': {getattr(cfg, key)!r} {msg}")
    splits = check_splits(cfg.splits)
    check_attribute_settings(cfg, splits)
    return splits


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _settings(cfg, source: InputTable, splits: Dict[str, float]) -> dict:
    """Everything that determines the output bytes (not workers/resume/slice): stored in the manifest."""
    fmt = source.layout if source.layout != "table" else detect_format(Path(cfg.input), cfg.format)
    c = source.columns
    return {
        "input": str(Path(cfg.input).resolve()), "layout": source.layout, "format": fmt,
        "input_files": {str(Path(f).resolve()): _file_sha256(Path(f)) for f in source.files},
        "label_field": (cfg.label_field or LABEL_FIELDS[source.layout]) if source.layout in LABEL_FIELDS else None,
        "language": cfg.language if source.layout == "abo" else None,
        "images_root": str(source.images_root.resolve()), "id_column": c["id"], "image_column": c["image"],
        "text_columns": list(c["text"]), "label_column": c["label"],
        "labels_file": str(Path(cfg.labels).resolve()) if cfg.labels else None, "splits": splits, "seed": cfg.seed,
        "image_size": cfg.image_size, "resize_mode": cfg.resize_mode, "jpeg_quality": cfg.jpeg_quality,
        "max_samples_per_shard": cfg.max_samples_per_shard, "max_shard_bytes": float(cfg.max_shard_bytes),
        "max_image_pixels": cfg.max_image_pixels, "max_image_bytes": cfg.max_image_bytes,
        "attribute_columns": list(c.get("attributes") or []), "numeric_attributes": list(cfg.numeric_attributes),
        "categorical_attributes": list(cfg.categorical_attributes), "attribute_min_count": cfg.attribute_min_count,
    }


def _prepare_state(layout: Layout, run_settings: dict, resume: bool, splits: List[str]) -> None:
    out = layout.out
    if resume and (layout.state / "settings.json").is_file():
        import json

        old = json.loads((layout.state / "settings.json").read_text(encoding="utf-8"))
        for key in sorted(set(old) | set(run_settings)):
            if old.get(key) != run_settings.get(key):
                raise ConfigError(f"--resume: setting '{key}' differs from the interrupted run "
                                  f"({old.get(key)!r} -> {run_settings.get(key)!r}); use the same settings or drop --resume")
        return
    # a fresh run owns its outputs: remove what an earlier run (or this slice's earlier run) left behind
    if layout.sliced:
        shutil.rmtree(layout.state, ignore_errors=True)
        shutil.rmtree(layout.summary, ignore_errors=True)
        (out / "manifest.json").unlink(missing_ok=True)  # a merged manifest no longer describes the shards
    else:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        shutil.rmtree(out / "slices", ignore_errors=True)
        for name in ("manifest.json", "labels.json", "failures.jsonl", "attributes.json"):
            (out / name).unlink(missing_ok=True)
    for split in splits:
        split_dir = out / split
        if split_dir.is_dir():
            for stale in list(split_dir.glob(layout.shard_glob())) + list(split_dir.glob(".shard-*.tmp")):
                stale.unlink()
            if not layout.sliced:
                (split_dir / "sizes.json").unlink(missing_ok=True)
    layout.state.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.state / "settings.json", run_settings)


class Pending:
    """The tasks still to process, in writing order (split by split): made lazily from the columnar plan, so a
    run of millions of rows never holds a Task per row. Iterate it once: a second pass makes every Task again."""

    def __init__(self, plan: Plan, rows: Dict[str, "object"], start: Dict[str, int]):
        self.plan, self.rows, self.start = plan, rows, start  # rows: split -> owned rows; start: first position

    def __len__(self) -> int:
        return sum(len(rows) - self.start[split] for split, rows in self.rows.items())

    def __iter__(self) -> Iterator[Tuple[str, int, Task]]:
        for split, rows in self.rows.items():
            start = self.start[split]
            for pos, task in enumerate(self.plan.tasks(split, rows[start:]), start):
                yield split, pos, task


def _results(todo: Pending, settings: ImageSettings, workers: int, downloads: DownloadSettings
             ) -> Iterator[Tuple[str, int, Task, Result]]:
    """``(split, position, task, result)`` in ``todo`` order; URL photos are downloaded by threads of this process
    ahead of their turn (:class:`mmcat.pack.download.Prefetch`), local ones are read where they are processed.

    ``todo`` is read in one pass (each Task is made once): the entries handed to the workers wait in a queue and
    are paired with their results, which come back in the same order."""
    handed_out: Deque[Tuple[str, int, Task]] = deque()  # handed out, not yet written: as many as before (pipe, workers)

    def tasks() -> Iterator[Task]:  # pulled by Prefetch (from the pool's task thread when workers > 1)
        for entry in todo:
            handed_out.append(entry)
            yield entry[2]

    for result in _processed(tasks(), todo, settings, workers, downloads):
        split, pos, task = handed_out.popleft()
        yield split, pos, task, result


def _processed(tasks: Iterator[Task], todo: Pending, settings: ImageSettings, workers: int,
               downloads: DownloadSettings) -> Iterator[Result]:
    """The results of ``tasks`` in their order, in this process or in a pool of ``workers`` processes."""
    any_url = todo.plan.has_urls()
    window = 4 * downloads.threads  # downloads running ahead of the task being processed
    if workers <= 1 or len(todo) < 2:
        previous = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with Prefetch(tasks, downloads, window, any_url=any_url) as prefetch:
                for task, fetched in prefetch:
                    yield process_task(task, settings, fetched)
        finally:
            cv2.setNumThreads(previous)
        return
    # forkserver: workers do not inherit the parent's threads (OpenCV/BLAS pools deadlock after fork)
    # (like any multiprocessing code, a script calling pack() needs an `if __name__ == "__main__":` guard)
    ctx = mp.get_context("forkserver")
    chunk = max(1, min(16, len(todo) // (workers * 8)))
    with ctx.Pool(workers, initializer=init_worker, initargs=(settings,)) as pool, \
            Prefetch(tasks, downloads, max(window, 2 * workers * chunk), gate=True, any_url=any_url) as prefetch:
        results = pool.imap(process_task_in_worker, prefetch, chunksize=chunk)
        import webdataset  # noqa: F401  -- the writer's slow import (torch) overlaps the workers' start-up
        for result in results:
            prefetch.consumed()
            yield result


def _read_input(cfg) -> InputTable:
    """The input as one table of string columns, whatever its layout (the one seam between input layouts and
    the plan). The generic table: id/label/attribute columns for every row, the text and photo columns only for
    the rows this run (or job-array slice) packs. A public layout (``--format rakuten|rakuten-ens|abo|fashion``, or
    one ``--format auto`` recognises from the files present) is read whole by its reader (catalog layouts are
    ~100k rows)."""
    public = read_layout(cfg, str(cfg.format))
    if public is not None:
        fields = public.table.column_names
        missing = [c for c in cfg.attribute_columns if c not in fields]
        if missing:
            raise ConfigError(f"--attribute-columns: '{missing[0]}' is not a field of the {public.layout} layout "
                              f"(fields: {', '.join(fields)})")
        return public
    input_path = Path(cfg.input)
    columns = {"id": cfg.id_column, "image": cfg.image_column, "text": list(cfg.text_columns),
               "label": cfg.label_column, "attributes": list(cfg.attribute_columns)}
    table, problems = read_table(input_path, detect_format(input_path, cfg.format),
                                 [cfg.id_column, cfg.label_column, *cfg.attribute_columns],
                                 row_columns=[cfg.image_column, *cfg.text_columns],
                                 slice_index=cfg.slice_index, num_slices=cfg.num_slices)
    images_root = Path(cfg.images_root) if cfg.images_root else input_path.parent
    return InputTable(table=table, problems=problems, images_root=images_root, files=[input_path], layout="table",
                      columns=columns)


def plan_input(cfg) -> Tuple[InputTable, Plan]:
    """Read the input and plan it: labels, splits, packing order, rejections, attribute kinds (no photo is
    opened). What ``mmcat pack`` does before writing; ``benchmarks/bench_plan.py`` times it."""
    _validate(cfg)
    source = _read_input(cfg)
    if not source.images_root.is_dir():
        raise ConfigError(f"--images-root {source.images_root}: not a directory")
    plan = build_plan(source, cfg)
    plan.kinds = _attribute_kinds(cfg, plan)
    return source, plan


def pack(cfg) -> dict:
    """Pack the table ``cfg.input`` into WebDataset shards under ``cfg.out``; returns the manifest dict."""
    splits = _validate(cfg)
    source, plan = plan_input(cfg)
    settings = _settings(cfg, source, splits)
    layout = Layout(Path(cfg.out), cfg.slice_index, cfg.num_slices)
    with writing(layout.out):  # a read-only or full file system, or an --out below a regular file
        layout.out.mkdir(parents=True, exist_ok=True)
        _prepare_state(layout, dict(settings, slice_index=cfg.slice_index, num_slices=cfg.num_slices), cfg.resume,
                       list(splits))

    kinds = plan.kinds or {}
    writers, done, todo = _open_writers(cfg, plan, layout, list(splits), kinds)
    image_settings = ImageSettings(cfg.image_size, cfg.resize_mode, cfg.jpeg_quality, cfg.max_image_pixels,
                                   cfg.max_image_bytes)
    with tqdm(total=len(todo), unit="img", desc="pack", disable=None) as bar:
        for split, pos, task, result in _results(todo, image_settings, cfg.workers,
                                                 DownloadSettings.from_config(cfg)):
            writers[split].add(pos, task.key, result)
            bar.update(1)
    for split, writer in writers.items():
        writer.finish(len(todo.rows[split]))
    records = {split: done[split] + writers[split].records for split in splits}
    return _write_summary(cfg, plan, layout, settings, records, kinds)


def _attribute_kinds(cfg, plan: Plan) -> Kinds:
    """The attribute kinds, from the plan's train rows (the whole table's, so every slice agrees)."""
    train = plan.order.get(FIT_SPLIT, [])
    return infer_kinds(cfg, lambda col: plan.cells(col, train))


def _open_writers(cfg, plan: Plan, layout: Layout, splits: List[str], kinds: Kinds
                  ) -> Tuple[Dict[str, SplitWriter], Dict[str, List[dict]], Pending]:
    """A writer per split, positioned after the shards a resumed run already finished; returns (writers, records of
    the finished shards per split, the tasks still to process in writing order)."""
    writers: Dict[str, SplitWriter] = {}
    done: Dict[str, List[dict]] = {}
    owned, starts = {}, {}
    for split in splits:
        owned[split] = plan.owned(split, layout.slice_index, layout.num_slices)
        shard_dir, state_dir = layout.out / split, layout.state / split
        done[split] = load_records(state_dir, shard_dir) if cfg.resume else []
        start = done[split][-1]["end"] if done[split] else 0
        if cfg.resume:  # shards past the recorded prefix are rewritten (same names, same bytes)
            for stale in list(shard_dir.glob(layout.shard_glob())) + list(shard_dir.glob(".shard-*.tmp")):
                if stale.name.endswith(".tmp") or stale.name not in {r["name"] for r in done[split]}:
                    with writing(stale):
                        stale.unlink()
        writers[split] = SplitWriter(shard_dir, state_dir, layout.shard_name, plan.labels, cfg.max_samples_per_shard,
                                     cfg.max_shard_bytes, next_index=len(done[split]), next_pos=start,
                                     attribute_kinds=kinds if kinds and split == FIT_SPLIT else None)
        starts[split] = min(start, len(owned[split]))
    return writers, done, Pending(plan, owned, starts)


def _write_summary(cfg, plan: Plan, layout: Layout, settings: dict, records: Dict[str, List[dict]],
                   kinds: Kinds) -> dict:
    """manifest.json, labels, sizes and failures.jsonl of the run (or of its slice); returns the manifest."""
    all_records = [r for recs in records.values() for r in recs]
    failures = sort_failures([f for f in plan.rejected if layout.owns_row(f["row"])]
                             + [f for r in all_records for f in r["failures"]])
    summaries = {split: records_summary(split_records, plan.labels) for split, split_records in records.items()}
    manifest = build_manifest(settings, plan.labels, summaries, failures, sum_notes(all_records), attributes=kinds)
    stats = merged_stats(kinds, (r.get("attribute_stats") for r in records.get(FIT_SPLIT, []))) if kinds else None
    if layout.sliced:
        # one slice's splits say nothing about the dataset's: pack-merge warns about the merged splits
        manifest.update(slices=cfg.num_slices, slice_index=cfg.slice_index, warnings=[])
        with writing(layout.summary):
            layout.summary.mkdir(parents=True, exist_ok=True)
        if stats is not None:  # a slice's train rows alone would fit the wrong vocabulary: pack-merge fits
            write_json_atomic(layout.summary / ATTRIBUTE_STATS, stats.to_json())
        stats = None
    write_dataset_files(layout.summary, manifest, failures,
                        attributes=stats.fit(cfg.attribute_min_count) if stats is not None else None)
    return manifest
