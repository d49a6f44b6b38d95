"""mmcat pack on hostile inputs: special files as photos, malformed tables, awkward ids, a full disk, empty splits.

Every check joins the packed samples (read back with plain webdataset) to the table rows by id, or reads the
recorded failures: nothing may be dropped, merged or mislabelled silently.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest
import webdataset as wds

from mmcat.config import ConfigError

from conftest import pack_config

COLUMNS = ["id", "image", "title", "description", "category"]


def _jpeg(seed: int, side: int = 40) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (side, side, 3), np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _table(root: Path, rows: List[Dict[str, str]], images: bool = True) -> Path:
    """products.csv (properly quoted) + a small JPEG for every row whose image path is under images/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n, r in enumerate(rows):
        path = root / r["image"]
        if images and r["image"].startswith("images/") and not path.exists() and not path.is_symlink():
            path.write_bytes(_jpeg(n))
    table = root / "products.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return table


def _row(id_: str, label: str, image: str | None = None, title: str | None = None) -> Dict[str, str]:
    name = hashlib.sha1(id_.encode()).hexdigest()[:12]  # one photo file per id, whatever characters it has
    return {"id": id_, "image": image or f"images/{name}.jpg",
            "title": title or f"title of {id_}", "description": f"description of {id_}", "category": label}


def _samples(out: Path) -> Dict[str, List[dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    got = {}
    for split, info in manifest["splits"].items():
        urls = [str(out / split / s["name"]) for s in info["shards"]]
        got[split] = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())) if urls else []
    return got


def _failures(out: Path) -> Dict[str, dict]:
    return {f["id"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}


def _limit_memory():  # a regression that reads /dev/zero dies with MemoryError instead of filling the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def _mmcat(*args: str, timeout: float = 120, preexec=_limit_memory) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmcat", *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ special image files
def test_special_files_and_oversized_photos_are_degraded_without_reading(tmp_path: Path):
    """/dev/zero, /dev/urandom (via symlinks), a FIFO, a socket, a device, a directory: never opened for reading;
    a regular file over --max-image-bytes: not decoded. Each row is kept with its text and says why."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    os.symlink("/dev/zero", raw / "images" / "zero.jpg")
    os.symlink("/dev/urandom", raw / "images" / "urandom.jpg")
    os.mkfifo(raw / "images" / "fifo.jpg")  # open() for reading would block until a writer appears
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(raw / "images" / "sock.jpg"))
    (raw / "images" / "folder.jpg").mkdir()
    big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)
    (raw / "images" / "big.png").write_bytes(cv2.imencode(".png", big)[1].tobytes())  # ~270 KB
    special = {"zero": ("images/zero.jpg", "image_not_a_file"), "urandom": ("images/urandom.jpg", "image_not_a_file"),
               "fifo": ("images/fifo.jpg", "image_not_a_file"), "sock": ("images/sock.jpg", "image_not_a_file"),
               "null": ("/dev/null", "image_not_a_file"), "folder": ("images/folder.jpg", "image_not_a_file"),
               "big": ("images/big.png", "image_file_too_large")}
    rows = [_row(f"ok{i}", "a" if i % 2 else "b") for i in range(4)]
    rows += [_row(id_, "a", image=img) for id_, (img, _) in special.items()]
    table = _table(raw, rows)
    out = tmp_path / "out"
    try:
        proc = _mmcat("pack", str(table), "--out", str(out), "--image-size", "32", "--splits", "train=1",
                      "--max-image-bytes", "100000")
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr
    samples = {json.loads(s["json"])["id"]: s for s in _samples(out)["train"]}
    assert set(samples) == {r["id"] for r in rows}  # every row kept: the text is still usable
    failures = _failures(out)
    for id_, (img, reason) in special.items():
        meta = json.loads(samples[id_]["json"])
        assert "jpg" not in samples[id_] and meta["image_error"] == reason and not meta["has_image"], id_
        assert samples[id_]["txt"].decode() == f"title of {id_}\ndescription of {id_}"
        assert failures[id_]["kind"] == "degraded" and failures[id_]["reason"] == reason, failures[id_]
    assert "100000" in failures["big"]["detail"]
    for i in range(4):
        assert "jpg" in samples[f"ok{i}"] and f"ok{i}" not in failures
    # the cap is a setting: 0 or a negative number is refused before any work
    assert "max_image_bytes" in _one_line_error(_mmcat("pack", str(table), "--out", str(tmp_path / "o2"),
                                                       "--max-image-bytes", "0"))


# ------------------------------------------------------------------------------------------------- table rows
def test_csv_rows_with_wrong_field_count_are_rejected(tmp_path: Path):
    """An unquoted comma shifts the label into another column: such a row is rejected, never packed under a
    label made of description text (and a row with too few fields likewise)."""
    from mmcat.pack import pack

    raw = tmp_path / "raw"
    rows = [_row(f"p{i}", ["mugs", "lamps"][i % 2]) for i in range(6)]
    table = _table(raw, rows)
    (raw / "images" / "x.jpg").write_bytes(_jpeg(99))
    with open(table, "a", encoding="utf-8") as f:
        f.write("extra,images/x.jpg,Big mug,Holds 350 ml, dishwasher-safe,mugs\n")  # 6 fields for 5 columns
        f.write("short,images/x.jpg,A lamp\n")  # 3 fields
    m = pack(pack_config(table, tmp_path / "out", image_size=32, splits={"train": 1.0}))
    assert m["labels"] == ["lamps", "mugs"]  # not " dishwasher-safe"
    got = {json.loads(s["json"])["id"]: json.loads(s["json"])["label"] for s in _samples(tmp_path / "out")["train"]}
    assert got == {r["id"]: r["category"] for r in rows}
    failures = _failures(tmp_path / "out")
    assert {k: (f["kind"], f["reason"], f["row"]) for k, f in failures.items()} == {
        "extra": ("rejected", "csv_field_count", 7), "short": ("rejected", "csv_field_count", 8)}
    assert "6 fields" in failures["extra"]["detail"] and "3 fields" in failures["short"]["detail"]


def test_tables_without_data_rows_are_one_line_errors(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(COLUMNS) + "\n")
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n  \n")
    zero_rows = tmp_path / "zero.parquet"
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in COLUMNS}), zero_rows)
    zero_bytes = tmp_path / "zero_bytes.parquet"
    zero_bytes.write_bytes(b"")
    from mmcat.pack import pack

    for table in (header_only, empty_jsonl, zero_rows, zero_bytes):
        with pytest.raises(ConfigError, match="no data rows") as exc:
            pack(pack_config(table, tmp_path / "out"))
        assert str(table) in str(exc.value) and "\n" not in str(exc.value)
    no_labels = _table(tmp_path / "raw", [_row("p1", ""), _row("p2", " ")])  # rows, but none usable
    with pytest.raises(ConfigError, match=r"no usable data rows: all 2 rows rejected \(2 label_missing\)"):
        pack(pack_config(no_labels, tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()
    line = _one_line_error(_mmcat("pack", str(header_only), "--out", str(tmp_path / "o")))
    assert "no data rows" in line


# ---------------------------------------------------------------------------------------------- sample keys
def _colliding_ids() -> tuple:
    """Two ids with the same sanitized form whose key hashes collide (a birthday search over unsafe characters)."""
    from mmcat.pack.plan import safe_key

    seen: Dict[str, str] = {}
    chars = ".:/ +@!~"
    for n in range(1 << 22):
        id_ = "k" + "".join(chars[(n >> (3 * i)) & 7] for i in range(8))
        key = safe_key(id_)
        if key in seen:
            return seen[key], id_
        seen[key] = id_
    raise AssertionError("no colliding pair found")


def test_every_id_gets_its_own_key_and_joins_back_to_its_row(tmp_path: Path):
    from mmcat.pack import pack
    from mmcat.pack.plan import safe_key

    ids = ["q.r", "q_r_062807fd", "q_r", "a/b", "a_b", "./p1", "p1", "__x__", "__init__", "x.jpg", "x_jpg",
           "Ä Ö", "A", "a", "-", "1.0", "1_0", "k" * 100, "k" * 100 + ".", "tail_deadbeef"]
    first, second = _colliding_ids()
    assert first != second and safe_key(first) == safe_key(second)
    rows = [_row(id_, ["red", "blue", "green"][n % 3]) for n, id_ in enumerate(ids + [first, second])]
    out = tmp_path / "out"
    pack(pack_config(_table(tmp_path / "raw", rows), out, image_size=32, max_samples_per_shard=5))
    by_id = {r["id"]: (n, r) for n, r in enumerate(rows, 1)}
    keys = []
    for split, items in _samples(out).items():
        for s in items:
            meta = json.loads(s["json"])
            n, r = by_id[meta["id"]]
            assert (meta["row"], meta["label"], s["txt"].decode()) == (n, r["category"], f"{r['title']}\n{r['description']}")
            assert s["__key__"] == safe_key(meta["id"]) and not re.search(r"[./]", s["__key__"])
            keys.append(s["__key__"])
    assert len(keys) == len(set(keys)) == len(ids) + 1  # distinct ids, distinct keys; the colliding id is rejected
    failures = _failures(out)
    assert failures[second]["reason"] == "key_collision" and failures[second]["kind"] == "rejected"
    assert failures[second]["other_id"] == first and set(failures) == {second}


def test_tar_sample_keys_follow_webdataset(tmp_path: Path):
    """Counting samples in a foreign tar: './' prefixes, dotted folders, '__' keys and meta members grouped the way
    webdataset's reader groups them, without reading member data."""
    from mmcat.tarkeys import tar_sample_keys

    shard = tmp_path / "foreign.tar"
    names = ["./p1.jpg", "./p1.cls", "v1.2/p2.jpg", "v1.2/p2.cls", "__x.jpg", "__x.cls", "__meta__",
             "p3.seg.png", "p3.cls", "noext", "p4.cls", "p4.json"]
    with tarfile.open(shard, "w") as tf:
        d = tarfile.TarInfo("folder.d")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    want = [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())]
    assert want == ["./p1", "v1.2/p2", "__x", "p3", "p4"]
    assert tar_sample_keys(shard) == want


# ----------------------------------------------------------------------------------------------- the output
def test_unwritable_out_is_one_line_naming_the_path(tmp_path: Path):
    raw = tmp_path / "raw"
    table = _table(raw, [_row(f"p{i}", "ab"[i % 2]) for i in range(6)])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = _one_line_error(_mmcat("pack", str(table), "--out", str(blocker / "out")))
    assert str(blocker / "out") in line and "--resume" in line


def test_disk_full_while_writing_shards_then_resume(tmp_path: Path):
    """A real write error (the file-size limit: EFBIG, as a full disk gives ENOSPC) in the middle of the shards:
    one line naming the file and suggesting --resume; resuming then gives the bytes of an uninterrupted run."""
    from mmcat.pack import pack

    raw = tmp_path / "raw"
    rows = [_row(f"p{i:02d}", "abc"[i % 3]) for i in range(16)]
    table = _table(raw, rows)  # 40 px photos (~3 KB) ...
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)  # ... and one of ~150 KB
    (raw / rows[5]["image"]).write_bytes(cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    common = ["--resize-mode", "keep", "--max-samples-per-shard", "2", "--jpeg-quality", "95", "--splits", "train=1"]
    out = tmp_path / "out"

    def small_files():
        _limit_memory()
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # Python ignores SIGXFSZ: writes get EFBIG

    line = _one_line_error(_mmcat("pack", str(table), "--out", str(out), *common, preexec=small_files))
    assert re.search(r"cannot write .*shard-\d+\.tar", line) and "--resume" in line, line
    assert str(out) in line and not (out / "manifest.json").exists()
    proc = _mmcat("pack", str(table), "--out", str(out), *common, "--resume")
    assert proc.returncode == 0, proc.stderr
    pack(pack_config(table, tmp_path / "ref", resize_mode="keep", max_samples_per_shard=2, jpeg_quality=95,
                     splits={"train": 1.0}))
    ref = sorted((tmp_path / "ref" / "train").iterdir())
    assert sorted(p.name for p in (out / "train").iterdir()) == [p.name for p in ref]
    for path in ref:
        assert (out / "train" / path.name).read_bytes() == path.read_bytes(), path.name


# ------------------------------------------------------------------------------------------------ empty splits
def test_empty_split_is_a_warning_in_pack_and_inspect(tmp_path: Path, capsys):
    from mmcat.inspect_dataset import inspect_dataset

    rows = [_row(f"only-{label}", label) for label in ("a", "b", "c")] + [_row("b2", "b")]
    table = _table(tmp_path / "raw", rows)
    out = tmp_path / "out"
    proc = _mmcat("pack", str(table), "--out", str(out), "--image-size", "32")
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert any("split 'val' is empty" in ln for ln in warnings) and any("split 'test' is empty" in ln for ln in warnings)
    assert not any("'train'" in ln for ln in warnings)
    assert inspect_dataset(out, as_json=True) == 0
    captured = capsys.readouterr()
    assert any("split 'val' is empty" in w for w in json.loads(captured.out)["warnings"])
    assert "warning: split 'test' is empty" in captured.err
    inspect_dataset(out)
    assert "warning: split 'val' is empty" in capsys.readouterr().err


def test_opencv_lower_bound_has_the_flags_used():
    """cv2.IMREAD_COLOR_RGB (used by the loader) first shipped in OpenCV 4.11."""
    root = Path(__file__).resolve().parents[1]
    uses_rgb_flag = any("IMREAD_COLOR_RGB" in p.read_text(encoding="utf-8") for p in (root / "mmcat").rglob("*.py"))
    spec = re.search(r'"opencv-python-headless>=([\d.]+)', (root / "pyproject.toml").read_text()).group(1)
    assert not uses_rgb_flag or tuple(int(x) for x in spec.split(".")[:2]) >= (4, 11), spec
