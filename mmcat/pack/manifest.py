"""The dataset-level files: labels.json, {split}/sizes.json, failures.jsonl and manifest.json (always last).

Shared by a single ``mmcat pack`` run and by ``mmcat pack-merge``, so both produce the same files from the same
per-shard records. Nothing time- or host-dependent goes in, so the same input and seed give identical files.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

from mmcat import __version__
from mmcat.pack.split import split_warnings
from mmcat.pack.writer import write_json_atomic, writing


def split_summary(shards: Iterable[dict], label_counts: Iterable[Mapping[str, int]], labels: List[str]) -> dict:
    """A split's manifest entry: its shards (``{name, samples, bytes}``, in order) and the label counts of its
    parts added up (the shard records of one pack, or the slices' summaries in pack-merge)."""
    shards, counts = list(shards), Counter()
    for part in label_counts:
        counts.update(part)
    return {"samples": sum(s["samples"] for s in shards), "shards": shards,
            "label_counts": {label: counts.get(label, 0) for label in labels}}


def records_summary(records: Iterable[dict], labels: List[str]) -> dict:
    """:func:`split_summary` from the state records of a split's shards (records without a shard add only
    failures)."""
    records = list(records)
    shards = [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"]} for r in records if r.get("name")]
    return split_summary(shards, (r["label_counts"] for r in records), labels)


def failure_summary(failures: List[dict]) -> dict:
    kinds = Counter(f["kind"] for f in failures)
    reasons = Counter(f["reason"] for f in failures)
    return {"rejected": kinds.get("rejected", 0), "degraded": kinds.get("degraded", 0),
            "by_reason": dict(sorted(reasons.items()))}


def sort_failures(failures: Iterable[dict]) -> List[dict]:
    return sorted(failures, key=lambda f: (f["row"], f["reason"]))


def build_manifest(settings: Mapping, labels: List[str], splits: Mapping[str, dict], failures: List[dict],
                   notes: Mapping[str, int], num_slices: int = 1, attributes: Optional[Mapping[str, str]] = None
                   ) -> dict:
    return {
        "format": "webdataset",
        "mmcat_version": __version__,
        "labels": list(labels),
        "num_labels": len(labels),
        "splits": dict(splits),
        "total_samples": sum(s["samples"] for s in splits.values()),
        "failures": failure_summary(failures),
        "image_notes": dict(sorted(notes.items())),
        "settings": dict(settings),
        "attributes": dict(attributes or {}),  # attribute column -> kind (categorical | numeric), in order
        "slices": num_slices,
        "warnings": split_warnings(labels, splits, settings["splits"]),
    }


def write_dataset_files(out: Path, manifest: dict, failures: List[dict], attributes: Optional[dict] = None) -> None:
    """labels, attributes, sizes and failures first; the manifest last, because its presence means "complete".
    ``attributes``: the attributes.json object (None: no attribute columns, and no stale attributes.json stays)."""
    write_json_atomic(out / "labels.json", manifest["labels"])
    if attributes is not None:
        write_json_atomic(out / "attributes.json", attributes)
    else:
        with writing(out):
            (out / "attributes.json").unlink(missing_ok=True)
    for split, info in manifest["splits"].items():
        with writing(out / split):
            (out / split).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / split / "sizes.json", {s["name"]: s["samples"] for s in info["shards"]})
    write_json_atomic(out / "failures.jsonl", failures, lines=True)
    write_json_atomic(out / "manifest.json", manifest)


def sum_notes(records: Iterable[dict]) -> Dict[str, int]:
    total: Counter = Counter()
    for rec in records:
        total.update(rec.get("notes", {}))
    return dict(total)
