"""``mmcat pack-merge DIR``: combine the per-slice outputs of a job-array pack into one dataset.

Every slice computed the label map and the split assignment from the whole table, so merging is bookkeeping:
concatenate the shard lists (slice order), add the counts, merge-sort the failures by row, and fit attributes.json
on the slices' train attribute counts and values together. The result has the
same labels.json, samples per split, label counts and failures.jsonl as a single ``mmcat pack``; only the shard
names (``shard-sIII-NNNNNN.tar``) and their number differ.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import List, Optional

from mmcat.errors import ConfigError
from mmcat.pack import print_warnings
from mmcat.files import read_json
from mmcat.pack.attributes import ATTRIBUTE_STATS, merged_stats
from mmcat.pack.manifest import build_manifest, sort_failures, split_summary, write_dataset_files


def merge_slices(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    slice_dirs = sorted((out / "slices").glob("slice-*")) if (out / "slices").is_dir() else []
    if not slice_dirs:
        raise ConfigError(f"{out}: no slices/slice-*/ dirs (was it packed with --num-slices > 1?)")
    first = next((d for d in slice_dirs if (d / "manifest.json").is_file()), None)
    if first is None:
        raise ConfigError(f"{out}: no slice has finished (no slices/slice-*/manifest.json)")
    n = int(read_json(first / "manifest.json", ConfigError)["slices"])
    manifests = []
    for i in range(n):
        path = out / "slices" / f"slice-{i:03d}" / "manifest.json"
        if not path.is_file():
            raise ConfigError(f"slice {i} of {n} is not complete ({path} missing): re-run it with --resume")
        manifests.append(read_json(path, ConfigError))
    ref = manifests[0]
    for i, m in enumerate(manifests):
        if m["slices"] != n or m["labels"] != ref["labels"] or m["settings"] != ref["settings"]:
            raise ConfigError(f"slice {i}: labels/settings differ from slice 0 (slices of different runs?)")

    labels: List[str] = ref["labels"]
    splits = {name: split_summary([s for m in manifests for s in m["splits"][name]["shards"]],
                                  [m["splits"][name]["label_counts"] for m in manifests], labels)
              for name in ref["splits"]}
    failures: List[dict] = []
    notes: Counter = Counter()
    for i in range(n):
        path = out / "slices" / f"slice-{i:03d}" / "failures.jsonl"
        with open(path, encoding="utf-8") as f:
            failures.extend(json.loads(line) for line in f if line.strip())
        notes.update(manifests[i]["image_notes"])
    failures = sort_failures(failures)
    kinds = ref.get("attributes", {})
    manifest = build_manifest(ref["settings"], labels, splits, failures, dict(notes), num_slices=n, attributes=kinds)
    for name, info in splits.items():
        missing = [s["name"] for s in info["shards"] if not (out / name / s["name"]).is_file()]
        if missing:
            raise ConfigError(f"split {name}: shard {missing[0]} listed by its slice is missing")
    write_dataset_files(out, manifest, failures, attributes=_fit_attributes(out, n, kinds, ref["settings"]))
    print(f"merged {n} slices: {manifest['total_samples']} samples, "
          f"{manifest['failures']['rejected']} rejected, {manifest['failures']['degraded']} degraded -> {out}")
    print_warnings("pack-merge", manifest["warnings"])
    return manifest


def _fit_attributes(out: Path, n: int, kinds: dict, settings: dict) -> Optional[dict]:
    """attributes.json over the train rows of all slices (each slice kept its counts and values, not a fit)."""
    if not kinds:
        return None
    parts = [read_json(out / "slices" / f"slice-{i:03d}" / ATTRIBUTE_STATS, ConfigError) for i in range(n)]
    return merged_stats(kinds, parts).fit(settings["attribute_min_count"])
