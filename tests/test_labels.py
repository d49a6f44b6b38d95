"""Labels survive the whole path: table -> `mmcat pack` -> train loader -> eval loader -> `mmcat eval`.

Numeric label names ("1", "10", "100") are the dangerous case: ``labels.json`` is sorted as strings, so the name "2"
sits at index 4 and the index 2 means "100". Every check joins a sample back to its table row by id (pack keeps an
id made of letters and digits as the sample key) and compares label *names*, never counters.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from _shards import jpeg_bytes
from conftest import pack_config
from mmcat.config import TrainRunConfig, load_config
from mmcat.data import build_eval_loader, build_train_loader
from mmcat.data.samples import BadSample, LabelReader
from mmcat.models import build_model, load_tokenizer
from mmcat.models.tiny import make_tiny_text_model
from train_helpers import mmcat_cmd, run

LABEL_SETS = {
    "numeric": ["1", "2", "9", "10", "11", "100"],
    "unicode": ["Küche", "日本語", "café", "Ελληνικά"],
    "mixed": ["1", "2", "10", "a", "Zoë", "007"],
}
SIZE = 32


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> str:
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_text"))


def write_table(folder: Path, labels) -> dict:
    """products.csv where label i has 10 * (i + 1) rows (so per-class supports differ); returns {id: label}."""
    folder.mkdir(parents=True)
    for i in range(8):
        (folder / f"img{i}.jpg").write_bytes(jpeg_bytes(i))
    table, n = {}, 0
    with open(folder / "products.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "title", "description", "category"])
        for i, label in enumerate(labels):
            for _ in range(10 * (i + 1)):
                table[f"p{n:04d}"] = label
                w.writerow([f"p{n:04d}", f"img{n % 8}.jpg", f"product {n}", "", label])
                n += 1
    return table


def train_cfg(root: Path, text: str, *overrides) -> TrainRunConfig:
    return load_config(TrainRunConfig, None, [f"data.root={root}", "output_dir=/unused", f"model.text.name={text}",
                                              f"data.image_size={SIZE}", "train.batch_size=8", "data.num_workers=1",
                                              "data.shuffle_buffer=16", *overrides])


def label_names(batches, labels) -> dict:
    """{sample key: label name} from loader batches (every key once)."""
    got = {}
    for b in batches:
        for key, idx in zip(b["keys"], b["labels"].tolist()):
            got.setdefault(key, labels[idx])
            assert got[key] == labels[idx]
    return got


@pytest.fixture(scope="module", params=sorted(LABEL_SETS))
def packed(request, tmp_path_factory):
    from mmcat.pack import pack

    work = tmp_path_factory.mktemp(f"labels_{request.param}")
    table = write_table(work / "raw", LABEL_SETS[request.param])
    manifest = pack(pack_config(work / "raw" / "products.csv", work / "packed", image_size=SIZE,
                                max_samples_per_shard=16))
    assert manifest["failures"]["rejected"] == 0
    return work / "packed", table, manifest


def test_labels_from_pack_through_train_and_eval_loaders(packed, tiny_text):
    root, table, manifest = packed
    labels = json.loads((root / "labels.json").read_text())
    assert sorted(labels) == sorted(set(table.values()))
    tokenizer = load_tokenizer(train_cfg(root, tiny_text).model.text)
    for label_key in ("cls", "json:label"):  # the packed index, and the name in the json member
        cfg = train_cfg(root, tiny_text, f"data.label_key={label_key}")
        train = label_names(build_train_loader(cfg, tokenizer, rank=0, world_size=1, epoch=0).loader, labels)
        assert train == {k: table[k] for k in train} and len(train) == manifest["splits"]["train"]["samples"]
        splits = {}
        for split in ("train", "val", "test"):
            got = label_names(build_eval_loader(cfg.data, split, tokenizer, batch_size=8, num_workers=1), labels)
            assert got == {k: table[k] for k in got}, (label_key, split)
            assert Counter(got.values()) == +Counter(manifest["splits"][split]["label_counts"]), (label_key, split)
            splits[split] = got
        assert train == splits["train"]  # one train epoch holds every train sample
        assert sorted(k for got in splits.values() for k in got) == sorted(table)  # every row in one split


def test_eval_per_class_support_equals_manifest_counts(packed, tiny_text, tmp_path):
    """`mmcat eval` on an artifact of a freshly built model: support does not depend on the weights."""
    from mmcat.artifact import export_artifact

    root, table, manifest = packed
    labels = json.loads((root / "labels.json").read_text())
    cfg = train_cfg(root, tiny_text, "model.image.name=resnet18", "model.image.weights=none", "model.hidden_dim=16")
    model = build_model(cfg.model, len(labels))
    export_artifact(tmp_path / "best", model.state_dict(), model, cfg, labels, load_tokenizer(cfg.model.text))
    out = tmp_path / "eval.json"
    run(mmcat_cmd("eval", "--model", str(tmp_path / "best"), "--data", str(root), "--split", "test",
                  "--out", str(out)))
    report = json.loads(out.read_text())
    want = manifest["splits"]["test"]["label_counts"]
    for mode in ("fused", "image_only", "text_only"):
        assert {name: report["per_class"][mode][name]["support"] for name in labels} == want, mode


def test_label_reader_rules():
    labels = ["1", "10", "100", "11", "2", "9"]  # labels.json of a table with labels 1, 2, 9, 10, 11, 100
    cls = LabelReader("cls", labels)
    assert [cls({"cls": str(i).encode()}) for i in range(6)] == list(range(6))  # cls is always the index
    assert cls({"cls": b" 4\n"}) == 4
    for bad, reason in ((b"6", "outside"), (b"-1", "not a class index"), (b"x", "not a class index"),
                        (b"", "not a class index")):
        with pytest.raises(BadSample, match=reason):
            cls({"cls": bad})
    js = LabelReader("json:category", labels)

    def name(value):
        return js({"json": json.dumps({"category": value}).encode()})

    assert [name(x) for x in labels] == list(range(6))  # a json field is a label name
    assert name(2) == 4 and name(100) == 2  # an int is the name str(value), never an index
    with pytest.raises(BadSample, match="'3' is not in the labels file"):
        name(3)
    for value in (2.0, True, [1], {"a": 1}):
        with pytest.raises(BadSample, match="must be a string or an integer"):
            name(value)
    with pytest.raises(BadSample, match="no 'category' field"):
        js({"json": b'{"other": "1"}'})
