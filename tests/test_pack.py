"""mmcat pack: read the shards back with plain webdataset (no mmcat code) and compare with the raw table."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from conftest import pack_config
from mmcat.tarkeys import tar_sample_keys


def read_shards(packed: Path) -> dict:
    """{split: [sample dicts]} using only the public webdataset API."""
    manifest = json.loads((packed / "manifest.json").read_text())
    out = {}
    for split, info in manifest["splits"].items():
        urls = [str(packed / split / s["name"]) for s in info["shards"]]
        out[split] = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())) if urls else []
    return out


def raw_rows(raw: Path):
    with open(raw / "products.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def test_every_valid_row_once_with_label_text_image(bad_raw_dataset: Path, bad_packed_dataset: Path):
    planted = {p["id"]: p for p in json.loads((bad_raw_dataset / "planted.json").read_text())["rows"]}
    by_row = {p["row"]: p for p in planted.values()}
    labels = json.loads((bad_packed_dataset / "labels.json").read_text())
    assert labels == (bad_raw_dataset / "labels.txt").read_text().split()
    rows = raw_rows(bad_raw_dataset)
    expected = {}  # id -> row, for rows that must be packed
    for n, r in enumerate(rows, 1):
        p = by_row.get(n)
        if p is None or p["expect"] != "rejected":
            assert r["id"] not in expected
            expected[r["id"]] = (n, r)
    samples = read_shards(bad_packed_dataset)
    seen = Counter()
    for split, items in samples.items():
        for s in items:
            meta = json.loads(s["json"])
            seen[meta["id"]] += 1
            n, r = expected[meta["id"]]
            assert meta["row"] == n and meta["label"] == r["category"]
            assert int(s["cls"]) == meta["label_index"] == labels.index(r["category"])
            text = "\n".join(t for t in (norm(r["title"]), norm(r["description"])) if t)
            assert (s["txt"].decode("utf-8") if "txt" in s else "") == text
            assert meta["has_text"] == bool(text) and meta["has_image"] == ("jpg" in s)
            if not norm(r["description"]):
                assert meta["description"] is None  # empty description = missing, not ""
            p = planted.get(meta["id"])
            if "jpg" in s:
                img = cv2.imdecode(np.frombuffer(s["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
                assert img.ndim == 3 and img.shape[2] == 3
                assert (img.shape[1], img.shape[0]) == (meta["width"], meta["height"])
                assert min(img.shape[:2]) == min(64, meta["orig_width"], meta["orig_height"])
                if p and p.get("orig_size"):
                    assert [meta["orig_width"], meta["orig_height"]] == p["orig_size"]
                if p and p["case"] == "exif_rotated":
                    assert img.shape[0] > img.shape[1]
                if p and p["case"] == "rgba_png":  # alpha 0 along the top edge -> composited on white
                    assert img[0].mean() > 235
                if p and p["case"] == "cmyk_jpeg":
                    assert np.abs(img.astype(int) - img.mean(2, keepdims=True)).max() > 40  # still in colour
            else:
                assert p is not None and meta["image_error"] == p["reason"]
            if p and p.get("notes"):
                assert set(p["notes"]) <= set(meta["image_notes"])
    assert set(seen) == set(expected) and max(seen.values()) == 1
    failures = [json.loads(line) for line in (bad_packed_dataset / "failures.jsonl").read_text().splitlines()]
    got = {(f["row"], f["kind"], f["reason"]) for f in failures}
    want = {(p["row"], p["expect"], p["reason"]) for p in planted.values() if p["expect"] != "ok"}
    assert got == want
    manifest = json.loads((bad_packed_dataset / "manifest.json").read_text())
    assert manifest["total_samples"] == len(expected)
    for split, info in manifest["splits"].items():
        sizes = json.loads((bad_packed_dataset / split / "sizes.json").read_text())
        assert sizes == {s["name"]: s["samples"] for s in info["shards"]}
        assert info["samples"] == len(samples[split]) == sum(info["label_counts"].values())
        for s in info["shards"]:
            assert (bad_packed_dataset / split / s["name"]).stat().st_size == s["bytes"]


def test_same_seed_identical_bytes_any_workers(bad_raw_dataset: Path, bad_packed_dataset: Path, tmp_path: Path):
    from mmcat.pack import pack

    pack(pack_config(bad_raw_dataset / "products.csv", tmp_path / "w2", image_size=64, max_samples_per_shard=16,
                     labels=str(bad_raw_dataset / "labels.txt"), workers=2))
    files = sorted(p.relative_to(bad_packed_dataset) for p in bad_packed_dataset.rglob("*")
                   if p.is_file() and ".pack-state" not in p.parts)
    assert any(str(f).endswith(".tar") for f in files)
    for rel in files:
        assert (bad_packed_dataset / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes(), rel


def test_stratified_split_deterministic_by_seed(tiny_raw_dataset: Path, tiny_packed_dataset: Path, tmp_path: Path):
    from mmcat.pack import pack

    m0 = json.loads((tiny_packed_dataset / "manifest.json").read_text())
    for split, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        for label, count in m0["splits"][split]["label_counts"].items():
            assert count == round(30 * frac), (split, label)  # 30 products per label
    m1 = pack(pack_config(tiny_raw_dataset / "products.csv", tmp_path / "s1", image_size=64,
                          max_samples_per_shard=16, seed=1))
    assert m1["splits"]["val"]["label_counts"] == m0["splits"]["val"]["label_counts"]
    keys0 = {s["__key__"] for s in read_shards(tiny_packed_dataset)["val"]}
    keys1 = {s["__key__"] for s in read_shards(tmp_path / "s1")["val"]}
    assert keys0 != keys1  # another seed, another (still stratified) split


def test_shards_rotate_by_count_and_bytes(tiny_raw_dataset: Path, tmp_path: Path):
    from mmcat.pack import pack

    m = pack(pack_config(tiny_raw_dataset / "products.csv", tmp_path / "b", image_size=64, max_samples_per_shard=7,
                         max_shard_bytes=40_000.0))
    shards = m["splits"]["train"]["shards"]
    assert all(s["samples"] <= 7 and s["bytes"] <= 40_000 for s in shards)
    assert any(s["samples"] < 7 for s in shards[:-1])  # some rotated by bytes before reaching the count
    for s in shards:  # complete tar files, members of a sample adjacent: each key is one sample for webdataset
        keys = tar_sample_keys(tmp_path / "b" / "train" / s["name"])
        assert len(keys) == len(set(keys)) == s["samples"]
    assert not list((tmp_path / "b").rglob("*.tmp"))


@pytest.mark.parametrize("mode,check", [
    ("shorter", lambda w, h, ow, oh: min(w, h) == 48 and abs(w / h - ow / oh) < 0.05),
    ("center_crop", lambda w, h, ow, oh: (w, h) == (48, 48)),
    ("border", lambda w, h, ow, oh: (w, h) == (48, 48)),
    ("keep", lambda w, h, ow, oh: (w, h) == (ow, oh)),
])
def test_resize_modes(mode, check):
    from mmcat.pack.images import process_image

    src = np.random.default_rng(0).integers(0, 255, (90, 150, 3), np.uint8)
    data = cv2.imencode(".png", src)[1].tobytes()
    out = process_image(data, 48, mode)
    img = cv2.imdecode(np.frombuffer(out.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert check(img.shape[1], img.shape[0], 150, 90)


def test_pixel_limit_guards_before_decoding():
    from mmcat.pack.images import ImageError, process_image

    data = cv2.imencode(".jpg", np.zeros((400, 300, 3), np.uint8))[1].tobytes()
    assert process_image(data, 64, max_pixels=120_000).width == 64
    with pytest.raises(ImageError) as exc:
        process_image(data, 64, max_pixels=119_999)
    assert exc.value.reason == "image_too_large"


def _run(*args: str):
    return subprocess.run([sys.executable, "-m", "mmcat", *args], capture_output=True, text=True)


def test_config_errors_are_one_line(tiny_raw_dataset: Path, tmp_path: Path):
    table = tiny_raw_dataset / "products.csv"
    cases = [
        ([str(table), "--label-column", "cat"], "missing column 'cat'"),
        ([str(table), "--text-columns", "title,body"], "missing column 'body'"),
        ([str(tmp_path / "nope.csv")], "file not found"),
        ([str(table), "--splits", "train=0.8,val=0.1"], "sum to 0.9"),
        ([str(table), "--image-size", "0"], "image_size"),
        ([str(table), "--slice-index", "3", "--num-slices", "2"], "slice_index"),
    ]
    bad_parquet = tmp_path / "t.parquet"
    bad_parquet.write_bytes(b"PAR1 not really")
    cases.append(([str(bad_parquet)], "unreadable parquet"))
    bad_jsonl = tmp_path / "t.jsonl"
    bad_jsonl.write_text('{"id": 1}\n{oops\n')
    cases.append(([str(bad_jsonl)], "line 2 is not valid JSON"))
    for args, needle in cases:
        proc = _run("pack", *args, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


def test_other_columns_formats_and_images_root(tiny_raw_dataset: Path, tmp_path: Path):
    """JSONL with renamed columns and images elsewhere (--images-root) packs like the CSV."""
    from mmcat.pack import pack

    rows = raw_rows(tiny_raw_dataset)[:20]
    with open(tmp_path / "t.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"sku": r["id"], "photo": r["image"], "name": r["title"], "cat": r["category"]}) + "\n")
    m = pack(pack_config(tmp_path / "t.jsonl", tmp_path / "o", id_column="sku", image_column="photo",
                         text_columns=["name"], label_column="cat", images_root=str(tiny_raw_dataset),
                         splits={"train": 0.5, "test": 0.5}, image_size=32))
    assert m["total_samples"] == 20 and list(m["splits"]) == ["train", "test"]
    got = [json.loads(s["json"]) for ss in read_shards(tmp_path / "o").values() for s in ss]
    assert all(g["has_image"] and g["name"] for g in got)


def test_inspect(bad_packed_dataset: Path):
    proc = _run("inspect", str(bad_packed_dataset), "--samples", "2")
    assert proc.returncode == 0, proc.stderr
    for needle in ("train", "val", "test", "rejected:duplicate_id", "degraded:image_truncated"):
        assert needle in proc.stdout
    report = json.loads(_run("inspect", str(bad_packed_dataset), "--json").stdout)
    assert report["total_samples"] == sum(s["samples"] for s in report["splits"].values())
    assert len(report["samples"]) == 3 and report["failures"]["rejected:label_missing"] == 1


def test_rerun_without_resume_replaces_output(tiny_packed_dataset: Path, tiny_raw_dataset: Path, tmp_path: Path):
    from mmcat.pack import pack

    out = tmp_path / "o"
    shutil.copytree(tiny_packed_dataset, out)
    m = pack(pack_config(tiny_raw_dataset / "products.csv", out, image_size=64, max_samples_per_shard=60))
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [s["name"] for s in m["splits"]["train"]["shards"]]
