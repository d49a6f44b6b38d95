"""``mmcat inspect DIR --html OUT``: a packed dataset on one page, what a user checks before spending GPU hours:
split sizes, label counts per split, failures by reason, the packer's warnings, and photos with their text for
every class (do the labels mean what they should? are the photos the products?)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List

import numpy as np

from mmcat.report import html as H

PER_CLASS = 4  # sample products shown per class
MAX_SCANNED = 20_000  # samples read at most while looking for every class (a rare class may not be reached)


def class_samples(samples: Iterable[Dict[str, Any]], labels: List[str], per_class: int = PER_CLASS,
                  max_scanned: int = MAX_SCANNED) -> Dict[str, List[Dict[str, Any]]]:
    """The first ``per_class`` samples of each label in ``samples`` (webdataset samples: member -> bytes):
    {label: [{"key" (the product id), "title", "description", "thumbnail" (data: URI or None), "image_error"}]}."""
    found: Dict[str, List[Dict[str, Any]]] = {label: [] for label in labels}
    for n, sample in enumerate(samples):
        if n >= max_scanned or all(len(v) >= per_class for v in found.values()):
            break
        meta = json.loads(sample["json"])
        bucket = found.get(str(meta.get("label")))
        if bucket is None or len(bucket) >= per_class:
            continue
        text = sample["txt"].decode("utf-8", "replace") if "txt" in sample else ""
        title, _, description = text.partition("\n")
        bucket.append({"key": str(meta.get("id") or sample["__key__"]), "title": title, "description": description,
                       "thumbnail": _thumbnail(sample), "image_error": meta.get("image_error")})
    return found


def _thumbnail(sample: Dict[str, Any]) -> Any:
    import cv2

    from mmcat.data.samples import IMAGE_EXTS

    data = next((sample[e] for e in IMAGE_EXTS if sample.get(e)), None)
    if data is None:
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else H.image_uri(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _sizes_section(report: Dict[str, Any]) -> str:
    rows = [[H.cell(name, left=True), H.cell(s["samples"]), H.cell(s["shards"]), H.cell(s["bytes"] / 1e6, "{:.1f}")]
            for name, s in report["splits"].items()]
    s = report["settings"]
    return H.section("Splits", H.table(["split", "samples", "shards", "MB"], rows, cls="splits"),
                     f'<p class="note">image_size {H.esc(s.get("image_size"))} ({H.esc(s.get("resize_mode"))}), '
                     f'{len(report["labels"])} labels, {report["total_samples"]} samples.</p>', id="splits")


def _labels_section(report: Dict[str, Any]) -> str:
    splits = list(report["splits"])
    peak = {n: max(report["splits"][n]["label_counts"].values(), default=0) or 1 for n in splits}
    rows = []
    for label in report["labels"]:
        row = [H.cell(label, left=True)]
        for n in splits:
            count = int(report["splits"][n]["label_counts"].get(label, 0))
            row.append(f'<td data-v="{count}" style="text-align:left">{H.hbar(count / peak[n], 110)} {count}</td>')
        rows.append(row)
    counts = H.table(["label", *splits], rows, sortable=True, cls="label-counts", left_columns=len(splits) + 1)
    return H.section("Label counts per split", '<p class="note">Bars relative to the split\'s largest class; click a '
                     "header to sort.</p>", counts, id="labels")


def _failures_section(report: Dict[str, Any]) -> str:
    failures = report["failures"]
    if not failures:
        body = "<p>No failures: every input row was packed.</p>"
    else:
        peak = max(failures.values())
        rows = [[H.cell(reason, left=True), f'<td data-v="{n}" style="text-align:left">'
                 f'{H.hbar(n / peak, 160, "#e45756")} {n}</td>'] for reason, n in failures.items()]
        body = H.table(["kind:reason", "rows"], rows, sortable=True, cls="failures", left_columns=2) + \
            '<p class="note">Each failed row is in failures.jsonl with its id and the reason.</p>'
    warnings = "".join(f'<p class="bad">warning: {H.esc(w)}</p>' for w in report.get("warnings", []))
    return H.section(f"Failures ({sum(failures.values())})", body, warnings, id="failures")


def _samples_section(found: Dict[str, List[Dict[str, Any]]], split: str) -> str:
    parts = []
    for label, rows in found.items():
        cards = []
        for r in rows:
            thumb = H.img(r["thumbnail"], f"photo of {r['key']}") if r["thumbnail"] else \
                f'<div class="note">no photo ({H.esc(r["image_error"] or "none")})</div>'
            cards.append(f'<div class="card sample">{thumb}<div class="t" title="{H.esc(r["title"])}">'
                         f'{H.esc(r["title"] or "(no text)")}</div><div class="d">{H.esc(r["description"])}</div>'
                         f'<div class="note">{H.esc(r["key"])}</div></div>')
        missing = "" if rows else '<p class="note">no sample of this class in the part read</p>'
        parts.append(f'<h3 class="class-name">{H.esc(label)}</h3>{missing}<div class="cards">{"".join(cards)}</div>')
    return H.section(f"Samples per class ({split} split)", *parts, id="samples")


def write_dataset_report(report: Dict[str, Any], split_samples: Callable[[str], Iterable[Dict[str, Any]]],
                         out: str | Path, per_class: int = PER_CLASS) -> Path:
    """Write the page of ``report`` (``mmcat inspect --json``'s dict); ``split_samples(split)`` reads a split's
    samples (the train split's, else the first non-empty one's, are shown per class)."""
    nonempty = [n for n, s in report["splits"].items() if s["samples"]]
    split = "train" if "train" in nonempty else (nonempty[0] if nonempty else None)
    found = class_samples(split_samples(split), report["labels"], per_class) if split else {}
    sections = [_sizes_section(report), _labels_section(report), _failures_section(report)]
    if split:
        sections.append(_samples_section(found, split))
    page = H.page(f"mmcat dataset: {report['dir']}", f"{report['total_samples']} samples, "
                  f"{len(report['labels'])} labels, splits {', '.join(report['splits'])}", sections)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
