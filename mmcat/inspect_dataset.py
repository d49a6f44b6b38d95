"""``mmcat inspect DIR``: split sizes, label counts, failures by reason, warnings (an empty split, labels missing
from a split) and a few sample rows of a packed dataset; with ``--html``, also a page with photos per class
(:mod:`mmcat.report.dataset`)."""
from __future__ import annotations

import json
import sys
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Iterator, List, Optional

from mmcat.errors import ConfigError
from mmcat.pack import print_warnings
from mmcat.pack.split import split_warnings


def split_samples(out: Path, manifest: dict, split: str) -> Iterator[dict]:
    """The samples of one split in shard order, read with webdataset's public API."""
    import webdataset as wds

    urls = [str(out / split / s["name"]) for s in manifest["splits"][split]["shards"]]
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def _samples(out: Path, manifest: dict, n: int) -> List[dict]:
    """The first n samples of the first non-empty split."""
    rows: List[dict] = []
    for split, info in manifest["splits"].items():
        if not info["shards"] or n <= 0:
            continue
        for sample in islice(split_samples(out, manifest, split), n):
            meta = json.loads(sample["json"])
            rows.append({"split": split, "key": sample["__key__"], "label": meta["label"],
                         "has_image": meta["has_image"], "has_text": meta["has_text"],
                         "image": f"{meta['width']}x{meta['height']}" if meta["has_image"] else meta.get("image_error"),
                         "text": sample["txt"].decode("utf-8") if "txt" in sample else None,
                         **({"attributes": meta["attributes"]} if "attributes" in meta else {})})
        break
    return rows


def _attributes(out: Path) -> List[dict]:
    """attributes.json's columns (packed with --attribute-columns), else []."""
    path = out / "attributes.json"
    return json.loads(path.read_text(encoding="utf-8"))["columns"] if path.is_file() else []


def _attribute_lines(columns: List[dict]) -> List[str]:
    lines = [f"attributes ({len(columns)}, fit on the train split):"] if columns else []
    for c in columns:
        if c["kind"] == "categorical":
            lines.append(f"  {c['name']:<16} categorical  {len(c['vocab'])} values seen >= {c['min_count']} times "
                         f"({', '.join(c['vocab'][:5])}{', ...' if len(c['vocab']) > 5 else ''}), {len(c['rare'])} rarer")
        else:
            lines.append(f"  {c['name']:<16} numeric      mean {c['mean']:.4g}, std {c['std']:.4g}"
                         f"{' (of log1p)' if c['log1p'] else ''}")
    return lines


def inspect_dataset(dir: str | Path, as_json: bool = False, samples: int = 3, html: Optional[str] = None) -> int:
    out = Path(dir)
    mpath = out / "manifest.json"
    if not mpath.is_file():
        hint = " (job-array slices? run `mmcat pack-merge DIR`)" if (out / "slices").is_dir() else ""
        raise ConfigError(f"{out}: no manifest.json -- not a packed dataset or packing not finished{hint}")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    failures: Counter = Counter()
    if (out / "failures.jsonl").is_file():
        with open(out / "failures.jsonl", encoding="utf-8") as f:
            failures.update(f"{r['kind']}:{r['reason']}" for r in map(json.loads, filter(str.strip, f)))
    report = {
        "dir": str(out), "labels": manifest["labels"], "total_samples": manifest["total_samples"],
        "splits": {name: {"samples": info["samples"], "shards": len(info["shards"]),
                          "bytes": sum(s["bytes"] for s in info["shards"]), "label_counts": info["label_counts"]}
                   for name, info in manifest["splits"].items()},
        "failures": dict(sorted(failures.items())), "image_notes": manifest.get("image_notes", {}),
        "settings": manifest["settings"], "samples": _samples(out, manifest, samples),
        "attributes": _attributes(out),
        # recomputed, not read from the manifest: datasets packed before warnings existed get them too
        "warnings": split_warnings(manifest["labels"], manifest["splits"], manifest["settings"].get("splits", {})),
    }
    print_warnings("inspect", report["warnings"])  # stderr: --json output stays parseable
    if html:
        from mmcat.report.dataset import write_dataset_report

        path = write_dataset_report(report, lambda split: split_samples(out, manifest, split), html)
        print(f"wrote {path}", file=sys.stderr)  # stderr, like the warnings
    if as_json:
        json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    s = manifest["settings"]
    print(f"{out}: {report['total_samples']} samples, {len(report['labels'])} labels, image_size {s['image_size']} "
          f"({s['resize_mode']}), mmcat {manifest['mmcat_version']}")
    print(f"  read as the {s['layout']} layout from {s['input']}" if s.get("layout", "table") != "table" else
          f"  read as a {s.get('format', 'table')} table from {s.get('input')}")
    width = max(len(label) for label in report["labels"]) if report["labels"] else 5
    names = list(report["splits"])
    print(f"  {'split':<{width}} " + " ".join(f"{n:>8}" for n in names))
    print(f"  {'samples':<{width}} " + " ".join(f"{report['splits'][n]['samples']:>8}" for n in names))
    print(f"  {'shards':<{width}} " + " ".join(f"{report['splits'][n]['shards']:>8}" for n in names))
    print(f"  {'MB':<{width}} " + " ".join(f"{report['splits'][n]['bytes'] / 1e6:>8.1f}" for n in names))
    for label in report["labels"]:
        print(f"  {label:<{width}} " + " ".join(f"{report['splits'][n]['label_counts'].get(label, 0):>8}" for n in names))
    print(f"failures ({sum(failures.values())}):" + ("" if failures else " none"))
    for reason, count in report["failures"].items():
        print(f"  {reason:<32} {count:>6}")
    if report["image_notes"]:
        print("image conversions: " + ", ".join(f"{k} {v}" for k, v in report["image_notes"].items()))
    for line in _attribute_lines(report["attributes"]):
        print(line)
    for r in report["samples"]:
        text = (r["text"] or "<no text>").replace("\n", " | ")
        print(f"  [{r['split']}] {r['key']}  {r['label']}  image={r['image']}  {text[:70]}")
    return 0
