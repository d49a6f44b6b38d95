"""Tiny WebDataset shards in the mmcat pack format (and img2dataset's), written with webdataset.TarWriter.

Used by the data and model tests so they do not depend on the packer; the layout follows .notes/CONTEXT.md:
DIR/{split}/shard-NNNNNN.tar (jpg, txt, json, cls), DIR/{split}/sizes.json, DIR/labels.json, DIR/manifest.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import webdataset as wds

LABELS = ["shoes", "bags", "hats"]


def jpeg_bytes(seed: int, width: int = 64, height: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3, dtype=np.uint8)  # a flat colour plus a little noise: small and decodable
    img += rng.integers(0, 20, img.shape, dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


def sample_info(index: int, labels: Sequence[str], missing_every: int) -> Dict:
    """Deterministic per-sample content; every ``missing_every``-th sample lacks its image, the next its text."""
    has_image = not (missing_every and index % missing_every == 1)
    has_text = not (missing_every and index % missing_every == 2)
    label = index % len(labels)
    return {"key": f"p{index:05d}", "label": label, "has_image": has_image, "has_text": has_text,
            "text": f"{labels[label]} product {index}\nnice {labels[label]} number {index}"}


def write_split(root: Path, split: str, shard_sizes: Sequence[int], labels: Sequence[str] = LABELS,
                missing_every: int = 0, start: int = 0, image_size: tuple = (64, 48),
                bad: Optional[Dict[str, str]] = None) -> List[Dict]:
    """Write ``len(shard_sizes)`` shards; ``bad`` maps a sample key to a defect: "corrupt_jpg", "no_cls", "empty".
    Returns the per-sample info (bad samples included, flagged with "bad")."""
    bad = bad or {}
    out_dir = Path(root) / split
    out_dir.mkdir(parents=True, exist_ok=True)
    infos, index, sizes = [], start, {}
    for s, n in enumerate(shard_sizes):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(out_dir / name), mtime=0) as sink:
            for _ in range(n):
                info = sample_info(index, labels, missing_every)
                index += 1
                sample = {"__key__": info["key"], "cls": str(info["label"]).encode(),
                          "json": json.dumps({"id": info["key"], "label": labels[info["label"]],
                                              "label_index": info["label"], "has_image": info["has_image"],
                                              "has_text": info["has_text"]}).encode()}
                if info["has_image"]:
                    sample["jpg"] = jpeg_bytes(index, *image_size)
                if info["has_text"]:
                    sample["txt"] = info["text"].encode()
                defect = bad.get(info["key"])
                if defect == "corrupt_jpg":
                    sample["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
                elif defect == "no_cls":
                    del sample["cls"]
                elif defect == "empty":
                    sample.pop("jpg", None)
                    sample.pop("txt", None)
                info["bad"] = defect is not None
                info["shard"] = name
                sink.write(sample)
                infos.append(info)
        sizes[name] = n
    (out_dir / "sizes.json").write_text(json.dumps(sizes))
    (Path(root) / "labels.json").write_text(json.dumps(list(labels)))
    return infos


def write_packed(root: Path, splits: Dict[str, Sequence[int]], labels: Sequence[str] = LABELS,
                 missing_every: int = 0, manifest: bool = True, **kw) -> Dict[str, List[Dict]]:
    infos, start, man = {}, 0, {"splits": {}}
    for split, shard_sizes in splits.items():
        infos[split] = write_split(root, split, shard_sizes, labels, missing_every, start, **kw)
        start += sum(shard_sizes)
        counts = [0] * len(labels)
        for info in infos[split]:
            counts[info["label"]] += 1
        man["splits"][split] = {"samples": sum(shard_sizes), "label_counts": counts}
    if manifest:
        (Path(root) / "manifest.json").write_text(json.dumps(man))
    return infos


def write_img2dataset(folder: Path, shard_sizes: Sequence[int], labels: Sequence[str] = LABELS) -> List[Dict]:
    """img2dataset-style output: 00000.tar + 00000_stats.json, jpg/txt/json with the label *name* in json."""
    folder.mkdir(parents=True, exist_ok=True)
    infos, index = [], 0
    for s, n in enumerate(shard_sizes):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for _ in range(n):
                key = f"{s:05d}{index:04d}"
                label = labels[index % len(labels)]
                sink.write({"__key__": key, "jpg": jpeg_bytes(index, 80, 60), "txt": f"a {label}".encode(),
                            "json": json.dumps({"key": key, "caption": f"a {label}", "status": "success",
                                                "category": label}).encode()})
                infos.append({"key": key, "label": labels.index(label)})
                index += 1
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n, "failed_to_download": 0}))
    return infos


def read_packed(packed: Path) -> Iterator[Tuple[str, Dict]]:
    """(split, raw sample) of every sample of a packed dataset, in the manifest's shard order, read with plain
    webdataset (not mmcat's loader: tests check what mmcat wrote with an independent reader)."""
    manifest = json.loads((packed / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        urls = [str(packed / split / s["name"]) for s in info["shards"]]
        for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if urls else []:
            yield split, s

