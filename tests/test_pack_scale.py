"""Catalog scale: the pyarrow table reader and the columnar plan keep every row's content.

A job-array slice holds the text and photo paths of its own rows only (compared with the table's rows i::n); a
gzipped, tab-separated or JSON Lines copy of a table packs the same samples as the CSV; numeric-looking ids and
labels stay the strings they are; the columnar split assignment is the row-by-row one; repeated ids are rejected
with the row they repeat.
"""
from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from conftest import pack_config, synth_config

COLUMNS = ["id", "image", "title", "description", "category"]


def _write_csv(path: Path, rows, delimiter: str = ",", extra_lines=()) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(COLUMNS)
        w.writerows([[r[c] for c in COLUMNS] for r in rows])
        for line in extra_lines:
            f.write(line + "\n")
    return path


def _samples(out: Path) -> dict:
    """{key: (split, {member: bytes})} of a packed folder, read with plain webdataset."""
    manifest = json.loads((out / "manifest.json").read_text())
    got = {}
    for split, info in manifest["splits"].items():
        urls = [str(out / split / s["name"]) for s in info["shards"]]
        for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if urls else []:
            got[s["__key__"]] = (split, {k: v for k, v in s.items() if not k.startswith("__")})
    return got


def _config(table: Path, **kw):
    from mmcat.config import PackConfig, load_config

    return load_config(PackConfig, None, values={"input": str(table), "out": "/unused", **kw})


# ------------------------------------------------------------------------------------------------ slices
def test_a_slice_holds_text_and_photo_paths_of_its_own_rows_only(tmp_path: Path):
    from mmcat.pack.packer import plan_input

    rows = [{"id": f"p{i:03d}", "image": f"images/p{i:03d}.jpg", "title": f"title {i}",
             "description": f"description, of {i}", "category": "ab"[i % 2]} for i in range(40)]
    rows[7]["image"] = "https://cdn.example.com/p007.jpg?size=large"  # a URL: kept as is
    table = _write_csv(tmp_path / "products.csv", rows, extra_lines=["broken,images/x.jpg,a title,mugs"])
    (tmp_path / "images").mkdir()
    n = 3
    for index in range(n):
        source, plan = plan_input(_config(table, slice_index=index, num_slices=n, splits={"train": 0.5, "test": 0.5}))
        t = source.table
        assert t.num_rows == 41 and source.problems.keys() == {40}  # the broken row keeps its place, as a problem
        assert t.column("id").to_pylist() == [r["id"] for r in rows] + ["broken"]
        for col in ("image", "title", "description"):  # this slice's rows i::n only, with the table's values
            held = {t.column("id")[i].as_py(): v for i, v in enumerate(t.column(col).to_pylist()) if v is not None}
            assert held == {r["id"]: r[col] for r in rows[index::n]}, col
        tasks = {task.id: task for split in plan.order for task in plan.tasks(split, plan.owned(split, index, n))}
        assert set(tasks) == {r["id"] for r in rows[index::n]}
        for id_, task in tasks.items():
            r = rows[int(id_[1:])]
            assert (task.row, task.label, task.texts) == (int(id_[1:]) + 1, r["category"],
                                                          {"title": r["title"], "description": r["description"]})
            want = r["image"] if r["image"].startswith("https://") else str(tmp_path / r["image"])
            assert task.image_path == want
    assert {f["id"]: f["reason"] for f in plan.rejected} == {"broken": "csv_field_count"}


# ----------------------------------------------------------------------------------------------- formats
@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from mmcat.synth import synthesize

    out = tmp_path_factory.mktemp("scale_raw")
    synthesize(synth_config(out, num_products=24, num_classes=3, min_side=16, max_side=24, seed=9))
    return out


def test_gzip_tsv_and_jsonl_copies_pack_the_same_samples_as_the_csv(raw: Path, tmp_path: Path):
    from mmcat.pack import pack

    with open(raw / "products.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    variants = {}
    variants["csv.gz"] = raw / "products.csv.gz"
    variants["csv.gz"].write_bytes(gzip.compress((raw / "products.csv").read_bytes()))
    with open(raw / "products.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, header, delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    variants["tsv"] = raw / "products.tsv"
    variants["tsv.gz"] = raw / "products.tsv.gz"
    variants["tsv.gz"].write_bytes(gzip.compress(variants["tsv"].read_bytes()))
    variants["jsonl.gz"] = raw / "products.jsonl.gz"
    variants["jsonl.gz"].write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    variants["parquet.gz"] = raw / "products.parquet.gz"
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    variants["parquet.gz"].write_bytes(gzip.compress(sink.getvalue().to_pybytes()))

    settings = dict(image_size=16, max_samples_per_shard=8, attribute_columns=["brand", "colour", "price"],
                    attribute_min_count=2)
    pack(pack_config(raw / "products.csv", tmp_path / "csv", **settings))
    want = _samples(tmp_path / "csv")
    assert len(want) == len(rows)
    for name, path in variants.items():
        manifest = pack(pack_config(path, tmp_path / name, **settings))
        assert manifest["settings"]["format"] == name.split(".")[0].replace("tsv", "csv"), name
        assert _samples(tmp_path / name) == want, name
        assert (tmp_path / name / "attributes.json").read_bytes() == (tmp_path / "csv" / "attributes.json").read_bytes()


def test_numeric_looking_ids_and_labels_stay_strings(tmp_path: Path):
    """"00123" keeps its zeros, "1280" (a Rakuten code) is a label name, "1e5" no float: in CSV, JSON Lines
    (strings and numbers) and Parquet (string and integer columns)."""
    from mmcat.pack.packer import plan_input

    ids = ["00123", "0123", "123", "1e5", "0x1F", "-0", "12.50"]
    labels = ["1280", "0010", "10", "1280", "0010", "10", "2"]
    rows = [{"id": i, "image": "", "title": f"t{i}", "description": "", "category": c} for i, c in zip(ids, labels)]
    _write_csv(tmp_path / "t.csv", rows)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    numbers = [dict(r, id=n, category=int(r["category"])) for r, n in zip(rows, range(7))]
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in numbers))
    pq.write_table(pa.Table.from_pylist(numbers), tmp_path / "n.parquet")
    for name in ("t.csv", "t.jsonl", "t.parquet"):
        source, plan = plan_input(_config(tmp_path / name, splits={"train": 1.0}))
        assert plan.labels == ["0010", "10", "1280", "2"], name  # sorted as strings
        tasks = {t.id: t.label for t in plan.tasks("train", plan.order["train"])}
        assert tasks == dict(zip(ids, labels)), name
    for name in ("n.jsonl", "n.parquet"):  # numbers in the file: their decimal text
        source, plan = plan_input(_config(tmp_path / name, splits={"train": 1.0}))
        assert source.table.schema.types == [pa.string()] * len(source.table.schema), name
        tasks = {t.id: t.label for t in plan.tasks("train", plan.order["train"])}
        assert tasks == {str(n): str(int(c)) for n, c in enumerate(labels)}, name


# --------------------------------------------------------------------------------------------- the plan
def test_columnar_split_assignment_is_the_row_by_row_one():
    import numpy as np

    from mmcat.hashing import stable_hash
    from mmcat.pack.split import assign_split_rows, assign_splits, hash_ids

    rng = random.Random(3)
    ids = [f"{rng.choice(['sku', 'Ä', 'x.y/'])}{rng.randrange(10 ** 6)}" for _ in range(600)]
    ids = list(dict.fromkeys(ids))
    labels = [rng.choice(["a", "b", "c", "d", "e", "f", "g"]) for _ in ids]
    splits = {"train": 0.7, "val": 0.2, "test": 0.1}
    h = hash_ids(ids, 5, "split")
    assert h.tolist() == [stable_hash(5, "split", i) for i in ids]
    codes = np.array([ord(x) for x in labels])
    rows = np.arange(len(ids))
    got = assign_split_rows(rows, codes, h, hash_ids(ids, 5, "order"), lambda i: ids[i], splits)
    want = assign_splits(list(zip(ids, labels)), splits, 5)
    assert {k: [ids[i] for i in v] for k, v in got.items()} == want
    # equal hashes (two ids colliding in 64 bits): ordered by id, as the (hash, id) key of assign_splits
    tied = np.array([7, 3, 7, 7, 3, 1], np.uint64)
    names = ["d", "b", "a", "c", "e", "f"]
    got = assign_split_rows(np.arange(6), np.zeros(6, np.int64), tied, tied, lambda i: names[i], {"train": 1.0})
    assert [names[i] for i in got["train"]] == ["f", "b", "e", "a", "c", "d"]


def test_repeated_ids_are_rejected_with_the_row_they_repeat(tmp_path: Path):
    from mmcat.pack.packer import plan_input

    cells = [("a", "x"), ("b", "x"), ("a", "y"), ("x.y", "x"), ("x.y", "y"), (" a ", "x"), ("c", ""), ("c", "x"),
             ("", "x"), ("x.y", "")]
    rows = [{"id": i, "image": "", "title": "t", "description": "", "category": c} for i, c in cells]
    source, plan = plan_input(_config(_write_csv(tmp_path / "t.csv", rows), splits={"train": 1.0}))
    got = [{k: v for k, v in f.items() if k != "kind"} for f in plan.rejected]
    assert got == [
        {"row": 3, "id": "a", "reason": "duplicate_id", "first_row": 1},
        {"row": 5, "id": "x.y", "reason": "duplicate_id", "first_row": 4},
        {"row": 6, "id": "a", "reason": "duplicate_id", "first_row": 1},
        {"row": 7, "id": "c", "reason": "label_missing"},  # not a repeat: the first usable "c" is row 8
        {"row": 9, "id": "", "reason": "id_missing"},
        {"row": 10, "id": "x.y", "reason": "label_missing"},
    ]
    assert sorted(t.id for t in plan.tasks("train", plan.order["train"])) == ["a", "b", "c", "x.y"]


def test_unreadable_tables_are_one_line_errors(tmp_path: Path):
    """Not UTF-8 (plain or gzipped), a broken gzip stream, a missing column: one line naming the file."""
    from mmcat.config import ConfigError
    from mmcat.pack.packer import plan_input

    latin = ",".join(COLUMNS).encode() + b"\np1,a.jpg,caf\xe9,,mugs\n"
    (tmp_path / "latin.csv").write_bytes(latin)
    (tmp_path / "latin.csv.gz").write_bytes(gzip.compress(latin))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"id": "p1"}\n' * 50)[:-20])
    _write_csv(tmp_path / "ok.csv", [{"id": "p1", "image": "", "title": "t", "description": "", "category": "a"}])
    cases = [("latin.csv", "not UTF-8 text"), ("latin.csv.gz", "not UTF-8 text"), ("cut.jsonl.gz", "unreadable jsonl"),
             ("ok.csv", "missing column 'brand'")]
    for name, needle in cases:
        with pytest.raises(ConfigError) as exc:
            plan_input(_config(tmp_path / name, attribute_columns=["brand"] if name == "ok.csv" else []))
        assert needle in str(exc.value) and str(tmp_path / name) in str(exc.value), str(exc.value)
        assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------- row columns, memory-mapped
def _allocated() -> int:
    """Bytes held by pyarrow's allocators (the default pool and the jemalloc pool the CSV reader uses)."""
    pools = [pa.default_memory_pool(), pa.system_memory_pool()]
    try:
        pools.append(pa.jemalloc_memory_pool())
    except NotImplementedError:
        pass
    return sum(p.bytes_allocated() for p in {id(p): p for p in pools}.values())


def _mapped_from(column, folder: Path) -> bool:
    """Whether every value buffer of ``column`` lies in a mapping of a file of ``folder`` that is already
    unlinked (Linux: /proc/self/maps says "(deleted)")."""
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(folder) + "/") and parts[5].endswith(" (deleted)"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi))
    buffers = [chunk.buffers()[2] for chunk in column.chunks if chunk.buffers()[2] is not None]
    buffers = [b for b in buffers if b.size]
    return bool(buffers) and all(any(lo <= b.address < hi for lo, hi in maps) for b in buffers)


def test_a_whole_table_plan_keeps_text_and_photo_paths_memory_mapped(tmp_path: Path, monkeypatch):
    """The text and photo columns of a whole-table run are not in pyarrow's allocators but mapped from a
    temporary file that is already gone from the folder; the packed samples' texts are the table's rows (by id),
    and a job-array slice's own rows are mapped the same way."""
    from mmcat.pack import pack
    from mmcat.pack.packer import plan_input

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    rng = random.Random(5)
    words = "oak mug lamp steel blue small large glass cotton chair".split()
    rows = [{"id": f"sku{i:04d}", "image": f"images/sku{i:04d}.jpg",
             "title": " ".join(rng.choice(words) for _ in range(8)),
             "description": " ".join(rng.choice(words) for _ in range(400)), "category": "abc"[i % 3]}
            for i in range(600)]
    table = _write_csv(tmp_path / "products.csv", rows, extra_lines=["broken,images/x.jpg,a title,mugs"])
    (tmp_path / "images").mkdir()

    before = _allocated()
    source, plan = plan_input(_config(table))
    held = _allocated() - before
    t = source.table
    row_bytes = sum(t.column(c).nbytes for c in ("image", "title", "description"))
    assert row_bytes > 1_000_000 and held < row_bytes / 4, (held, row_bytes)
    for col in ("image", "title", "description"):
        assert _mapped_from(t.column(col), scratch), col
        assert not _mapped_from(t.column("id"), scratch)  # ids and labels stay in memory
    assert list(scratch.iterdir()) == []  # unlinked once mapped: nothing left behind
    by_id = {r["id"]: r for r in rows}
    for i, (id_, title, desc) in enumerate(zip(*(t.column(c).to_pylist() for c in ("id", "title", "description")))):
        want = by_id.get(id_, {"title": "a title", "description": "mugs"})  # the broken row, as split
        assert (title, desc) == (want["title"], want["description"]), i

    pack(pack_config(table, tmp_path / "out", image_size=16, max_samples_per_shard=200))
    got = {}
    for _, (split, members) in _samples(tmp_path / "out").items():
        meta = json.loads(members["json"])
        got[meta["id"]] = (meta["title"], meta["description"])
    assert got == {r["id"]: (r["title"], r["description"]) for r in rows}
    assert list(scratch.iterdir()) == []

    source, _ = plan_input(_config(table, slice_index=1, num_slices=3))
    for col in ("image", "title", "description"):
        assert _mapped_from(source.table.column(col), scratch), col
        assert {i: v for i, v in zip(source.table.column("id").to_pylist(), source.table.column(col).to_pylist())
                if v is not None} == {r["id"]: r[col] for r in rows[1::3]}


def test_no_room_for_the_temporary_copy_is_one_line(tmp_path: Path, monkeypatch):
    from mmcat.config import ConfigError
    from mmcat.pack.packer import plan_input

    not_a_folder = tmp_path / "full"
    not_a_folder.write_text("")
    monkeypatch.setattr("tempfile.tempdir", str(not_a_folder))
    table = _write_csv(tmp_path / "t.csv", [{"id": "p1", "image": "", "title": "t", "description": "", "category": "a"}])
    with pytest.raises(ConfigError) as exc:
        plan_input(_config(table))
    assert "TMPDIR" in str(exc.value) and str(not_a_folder) in str(exc.value) and "\n" not in str(exc.value)
