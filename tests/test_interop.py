"""Shards other tools write (img2dataset's convention, plain webdataset.ShardWriter) trained and evaluated by mmcat,
and mmcat's shards read by Hugging Face ``datasets`` -- each with the call the README documents."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from _shards import jpeg_bytes, read_packed
from mmcat.config import TrainRunConfig, load_config
from mmcat.data import DataError, read_labels
from mmcat.data.shards import check_data, shard_sources, all_shards
from train_helpers import metrics, mmcat_cmd, run, write_config

# not in sorted order, so a label map built by sorting (or by first appearance) would mislabel every class
LABELS = ["shoes", "bags", "hats"]


def write_img2dataset_folder(folder: Path, per_shard: Sequence[Sequence[str]], first_shard: int = 0) -> Dict[str, str]:
    """One img2dataset output folder written by plain ``webdataset.ShardWriter``: ``00000.tar`` ... with keys
    ``<shard:05d><index:04d>`` and members jpg / txt (the caption) / json (img2dataset's fields plus the label as
    the extra column ``category``), and per shard img2dataset's ``_stats.json`` and ``.parquet`` (download
    failures are counted there, never written to the tar). ``per_shard``: the labels of each shard's samples.
    Returns {key: label} of what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    written: Dict[str, str] = {}
    maxcount = max(len(labels) for labels in per_shard)
    assert all(len(labels) == maxcount for labels in per_shard[:-1])  # ShardWriter rotates by count
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=maxcount, start_shard=first_shard, verbose=0) as sink:
        for s, labels in enumerate(per_shard, start=first_shard):
            for i, label in enumerate(labels):
                key = f"{s:05d}{i:04d}"
                caption = f"a {label} for sale, number {i}"
                sink.write({"__key__": key, "jpg": jpeg_bytes(s * 1000 + i, 80, 60), "txt": caption.encode(),
                            "json": json.dumps({"url": f"https://example.com/{key}.jpg", "key": key,
                                                "status": "success", "error_message": None, "caption": caption,
                                                "width": 80, "height": 60, "original_width": 80,
                                                "original_height": 60, "exif": "{}", "category": label}).encode()})
                written[key] = label
    for s, labels in enumerate(per_shard, start=first_shard):
        failed = 2  # rows img2dataset could not download: in count, not in successes, not in the tar
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({
            "count": len(labels) + failed, "successes": len(labels), "failed_to_download": failed,
            "failed_to_resize": 0, "status_dict": {"success": len(labels), "HTTP Error 404": failed}}))
        pq.write_table(pa.table({"key": [f"{s:05d}{i:04d}" for i in range(len(labels))]}), folder / f"{s:05d}.parquet")
    return written


def labels_of(counts: Dict[str, int], shards: int) -> List[List[str]]:
    """``counts`` spread round-robin over ``shards`` equal shards (the last one may be shorter)."""
    flat = [name for name, n in counts.items() for _ in range(n)]
    flat = [flat[i] for i in sorted(range(len(flat)), key=lambda i: (i * 7) % len(flat))]  # labels mixed
    size = -(-len(flat) // shards)
    return [flat[i:i + size] for i in range(0, len(flat), size)]


def data_cfg(*overrides: str):
    return load_config(TrainRunConfig, None, ["output_dir=/unused", *overrides]).data


@pytest.fixture(scope="module")
def i2d(tmp_path_factory) -> Path:
    """img2dataset output for train, val and test in three folders (one img2dataset run each), plus a labels file
    in both formats: labels.json (JSON list) in the train shard folder, labels.txt (one per line) elsewhere."""
    root = tmp_path_factory.mktemp("i2d")
    write_img2dataset_folder(root / "train", labels_of({"shoes": 8, "bags": 8, "hats": 8}, 2))
    write_img2dataset_folder(root / "val", labels_of({"shoes": 4, "bags": 3, "hats": 2}, 1))
    write_img2dataset_folder(root / "test", labels_of({"shoes": 7, "bags": 5, "hats": 3}, 2))
    (root / "train" / "labels.json").write_text(json.dumps(LABELS))
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


def test_labels_file_formats_give_the_same_label_map(i2d):
    """data.labels_file as one label per line == the JSON list found in the shard folder, for the folder and
    the pattern form of data.root."""
    found = read_labels(data_cfg(f"data.root={i2d / 'train'}"))  # labels.json in the shard folder
    assert found == read_labels(data_cfg(f"data.root={i2d / 'train' / '*.tar'}")) == LABELS
    assert read_labels(data_cfg(f"data.root={i2d / 'train'}", f"data.labels_file={i2d / 'labels.txt'}")) == LABELS


def test_img2dataset_folders_train_and_eval_with_val_root_and_test_root(i2d, tiny_text, tmp_path):
    """The documented recipe: data.root = the train folder, data.val_root / data.test_root = the other folders,
    data.label_key=json:category; then `mmcat eval --data TEST_FOLDER`. Every written sample is evaluated under
    its own label, and none of the download failures in *_stats.json is counted."""
    cfg = write_config(tmp_path / "train.yaml", tiny_text, i2d / "train", tmp_path / "run", train__epochs=1,
                       data__val_root=str(i2d / "val"), data__test_root=str(i2d / "test"),
                       data__label_key="json:category", data__labels_file=str(i2d / "labels.txt"))
    run(mmcat_cmd("train", "--config", str(cfg)))
    m = metrics(tmp_path / "run")
    assert m["val"]["fused"]["num_samples"] == 9 and m["test"]["fused"]["num_samples"] == 15
    assert json.loads((tmp_path / "run" / "best" / "labels.json").read_text()) == LABELS

    out = tmp_path / "eval.json"
    run(mmcat_cmd("eval", "--model", str(tmp_path / "run" / "best"), "--data", str(i2d / "test"), "--out", str(out)))
    report = json.loads(out.read_text())
    written = Counter(json.loads(s["json"])["category"] for s in _raw(sorted((i2d / "test").glob("*.tar"))))
    assert written == {"shoes": 7, "bags": 5, "hats": 3}
    for mode in ("fused", "image_only", "text_only"):
        assert {k: v["support"] for k, v in report["per_class"][mode].items() if v["support"]} == written, mode
    assert report["skipped_samples"] == 0


def test_one_folder_split_by_brace_patterns(tmp_path):
    """img2dataset wrote one folder: brace patterns give each split its own shards (by sample keys)."""
    written = write_img2dataset_folder(tmp_path / "one", labels_of({"shoes": 10, "bags": 10, "hats": 10}, 6))
    (tmp_path / "one" / "labels.json").write_text(json.dumps(LABELS))
    cfg = load_config(TrainRunConfig, None, [
        f"data.root={tmp_path / 'one' / '{00000..00003}.tar'}", f"data.val_root={tmp_path / 'one' / '00004.tar'}",
        f"data.test_root={tmp_path / 'one' / '00005.tar'}", "data.label_key=json:category", "output_dir=/unused"])
    assert check_data(cfg) == {"train": 20, "val": 5, "test": 5}
    keys = {split: {s["__key__"] for s in _raw(all_shards(shard_sources(cfg.data, split)))}
            for split in ("train", "val", "test")}
    assert keys["val"] == {k for k in written if k.startswith("00004")}
    assert keys["test"] == {k for k in written if k.startswith("00005")}
    assert keys["train"] | keys["val"] | keys["test"] == set(written) and sum(map(len, keys.values())) == 30


@pytest.mark.parametrize("case", ["folder", "pattern", "no_test_root", "test_root_overlaps"])
def test_one_folder_without_val_and_test_roots_is_refused_naming_the_fix(case, tmp_path):
    """Never train on val: a folder of shards (or a pattern without {split}) read for every split is refused with
    one line naming data.val_root / data.test_root."""
    write_img2dataset_folder(tmp_path / "one", labels_of({"shoes": 6, "bags": 6, "hats": 6}, 3))
    write_img2dataset_folder(tmp_path / "val", labels_of({"shoes": 2, "bags": 2, "hats": 2}, 1))
    (tmp_path / "one" / "labels.json").write_text(json.dumps(LABELS))
    root = {"pattern": str(tmp_path / "one" / "*.tar")}.get(case, str(tmp_path / "one"))
    extra = {"no_test_root": [f"data.val_root={tmp_path / 'val'}"],
             "test_root_overlaps": [f"data.val_root={tmp_path / 'val'}",
                                    f"data.test_root={tmp_path / 'one' / '00002.tar'}"]}.get(case, [])
    cfg = load_config(TrainRunConfig, None, [f"data.root={root}", "data.label_key=json:category",
                                             "output_dir=/unused", *extra])
    with pytest.raises(DataError) as err:
        check_data(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    if case in ("folder", "pattern"):
        assert msg.startswith("data.val_split 'val' reads 3 shard(s) of data.train_split 'train'")
        assert "set data.val_root to the val shards" in msg
    elif case == "no_test_root":
        assert msg.startswith("data.test_split 'test' reads 3 shard(s) of data.train_split 'train'")
        assert "set data.test_root to the test shards" in msg and "data.test_split=null" in msg
    else:
        assert msg.startswith("data.test_split 'test' reads 1 shard(s) of data.train_split 'train'")
        assert msg.endswith("data.test_root must name other shards than the train and val ones")


def _raw(shards) -> list:
    return list(wds.DataPipeline(wds.SimpleShardList([str(s) for s in shards]), wds.tarfile_to_samples()))


# ----------------------------------------------------------------------------------------- Hugging Face datasets
def test_packed_shards_read_by_hf_datasets_with_the_documented_call(bad_packed_dataset, tmp_path):
    """The README's call; rows joined back to the packed samples by __key__: labels, texts, which members exist
    and the json's optional keys (null where not applicable, a value where it is: never dropped by the schema)."""
    if not os.environ.get("CI"):
        pytest.importorskip("datasets")  # in CI a missing `datasets` (the dev extra) must fail, not skip
    from datasets import load_dataset

    from mmcat.data.hf import hf_features

    packed = bad_packed_dataset
    ds = load_dataset("webdataset", data_dir=str(packed), features=hf_features(packed), cache_dir=str(tmp_path),
                      data_files={"train": "train/*.tar", "val": "val/*.tar", "test": "test/*.tar"})
    want = {}
    for split, s in read_packed(packed):
        want[(split, s["__key__"])] = s
    got = {(split, row["__key__"]): row for split in ds for row in ds[split]}
    assert set(got) == set(want)
    labels = json.loads((packed / "labels.json").read_text())
    degraded = Counter()
    for k, row in got.items():
        s, meta = want[k], json.loads(want[k]["json"])
        assert row["cls"] == int(s["cls"]) and labels[row["cls"]] == meta["label"] == row["json"]["label"], k
        assert row["txt"] == (s["txt"].decode() if "txt" in s else None), k
        assert (row["jpg"] is None) == ("jpg" not in s), k
        if "jpg" in s:
            assert row["jpg"].size == (meta["width"], meta["height"]), k
        assert row["json"] == meta, k  # every key, nulls included
        degraded[meta["image_error"] is not None] += 1
    assert degraded[True] > 0 and degraded[False] > 0  # both kinds are in the data: the schema kept image_error


def test_test_root_without_a_test_split_is_refused(tmp_path):
    from mmcat.config import ConfigError

    write_img2dataset_folder(tmp_path / "one", labels_of({"shoes": 2, "bags": 2, "hats": 2}, 2))
    cfg = load_config(TrainRunConfig, None, [f"data.root={tmp_path / 'one' / '00000.tar'}", "data.test_split=null",
                                             f"data.val_root={tmp_path / 'one' / '00001.tar'}",
                                             f"data.test_root={tmp_path / 'one'}", "output_dir=/unused"])
    with pytest.raises(ConfigError, match=r"^data.test_root is set but data.test_split is null: set data.test_split"):
        check_data(cfg)
