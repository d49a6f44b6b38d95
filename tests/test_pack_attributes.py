"""mmcat pack --attribute-columns: per-sample values joined back to the table, attributes.json recomputed here from
the packed train rows, the same file from --resume and from slices + pack-merge, kinds, and one-line refusals."""
from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmcat.cli import main
from mmcat.pack.attributes import infer_kinds
from mmcat.pack.merge import merge_slices

from _shards import read_packed
from conftest import synth_config

COLUMNS = "brand,colour,price"
GHOSTS = 6  # rows with neither a photo nor text: rejected while packing, so their brand must not be fit


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A synth table with attributes, plus cells the packer must clean up: padded and unparseable values, and
    rows rejected only when their (missing) photo is opened."""
    from mmcat.synth import synthesize

    out = tmp_path_factory.mktemp("attr_raw")
    synthesize(synth_config(out, num_products=90, num_classes=3, min_side=32, max_side=40, seed=4))
    rows = _table(out / "products.csv")
    rows[0]["brand"] = "  Acme  "
    rows[1]["price"] = "n/a"
    rows[2]["price"] = "nan"
    rows[3]["colour"] = "   "
    for row in rows[10:10 + GHOSTS]:
        row.update(image="images/none.jpg", title="", description="", brand="Ghostbrand")
    with open(out / "products.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _table(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pack(raw: Path, out: Path, *extra: str) -> int:
    return main(["pack", str(raw / "products.csv"), "--out", str(out), "--image-size", "32",
                 "--max-samples-per-shard", "16", "--attribute-columns", COLUMNS, "--attribute-min-count", "3",
                 *extra])


@pytest.fixture(scope="module")
def packed(raw: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attr_packed")
    assert _pack(raw, out) == 0
    return out


def _samples(packed: Path) -> dict:
    """id -> (split, json object) of every packed sample, read with plain webdataset."""
    metas = ((split, json.loads(s["json"])) for split, s in read_packed(packed))
    return {meta["id"]: (split, meta) for split, meta in metas}


def _expected(row: dict) -> dict:
    """The contract, written out independently: stripped string or null; a finite float or null."""
    def number(cell: str):
        try:
            x = float(cell)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return {"brand": row["brand"].strip() or None, "colour": row["colour"].strip() or None,
            "price": number(row["price"].strip())}


def test_every_sample_holds_its_rows_attributes(raw: Path, packed: Path, capsys):
    rows = {r["id"]: r for r in _table(raw / "products.csv")}
    samples = _samples(packed)
    assert len(samples) == len(rows) - GHOSTS
    for id_, (_, meta) in samples.items():
        assert meta["attributes"] == _expected(rows[id_]), id_
        assert list(meta["attributes"]) == ["brand", "colour", "price"]  # every key, even when null
    assert samples["p000000"][1]["attributes"]["brand"] == "Acme"
    assert samples["p000001"][1]["attributes"]["price"] is None and samples["p000002"][1]["attributes"]["price"] is None
    assert samples["p000003"][1]["attributes"]["colour"] is None
    manifest = json.loads((packed / "manifest.json").read_text())
    assert manifest["attributes"] == {"brand": "categorical", "colour": "categorical", "price": "numeric"}
    assert manifest["settings"]["attribute_columns"] == ["brand", "colour", "price"]
    capsys.readouterr()
    assert main(["inspect", str(packed), "--json", "--samples", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attributes"] == json.loads((packed / "attributes.json").read_text())["columns"]
    # synth ids are their own sample keys
    assert report["samples"] and all(r["attributes"] == samples[r["key"]][1]["attributes"] for r in report["samples"])


def _fit_here(values_by_column: dict, min_count: int) -> dict:
    columns = []
    for name, values in values_by_column.items():
        present = [v for v in values if v is not None]
        if name == "price":
            log1p = min(present) >= 0 and max(present) > 10 * statistics.median(present)
            xs = [math.log1p(x) for x in present] if log1p else present
            columns.append({"name": name, "kind": "numeric", "mean": statistics.fmean(xs),
                            "std": statistics.pstdev(xs) or 1.0, "log1p": log1p})
        else:
            counts = Counter(present)
            vocab = sorted((v for v in counts if counts[v] >= min_count), key=lambda v: (-counts[v], v))
            columns.append({"name": name, "kind": "categorical", "vocab": vocab,
                            "rare": sorted(v for v in counts if counts[v] < min_count), "min_count": min_count})
    return {"version": 1, "columns": columns}


def test_attributes_json_is_fit_on_the_packed_train_rows(raw: Path, packed: Path):
    rows = {r["id"]: r for r in _table(raw / "products.csv")}
    train = [rows[id_] for id_, (split, _) in _samples(packed).items() if split == "train"]
    expected = _fit_here({c: [_expected(r)[c] for r in train] for c in COLUMNS.split(",")}, min_count=3)
    got = json.loads((packed / "attributes.json").read_text())
    assert got["columns"][:2] == expected["columns"][:2]
    price, want = got["columns"][2], expected["columns"][2]
    assert price.pop("mean") == pytest.approx(want.pop("mean"), rel=1e-12)
    assert price.pop("std") == pytest.approx(want.pop("std"), rel=1e-12)
    assert price == want
    assert got["columns"][0]["vocab"] and got["columns"][0]["rare"]  # the data exercise both buckets
    # rejected photo-and-text-less rows were planned into train, but are not part of the fit
    failures = [json.loads(line) for line in (packed / "failures.jsonl").read_text().splitlines()]
    assert any(f["reason"] == "no_usable_modality" and f["split"] == "train" for f in failures)
    assert all("Ghostbrand" not in c.get("vocab", []) + c.get("rare", []) for c in got["columns"])


def test_resume_and_slices_give_the_same_attributes_json(raw: Path, packed: Path, tmp_path: Path):
    resumed = tmp_path / "resumed"
    shutil.copytree(packed, resumed)
    for record in sorted((resumed / ".pack-state" / "all" / "train").glob("*.json"))[2:]:
        record.unlink()  # as if interrupted after the second train shard: the rest is packed again
    (resumed / "attributes.json").unlink()
    assert _pack(raw, resumed, "--resume") == 0
    assert (resumed / "attributes.json").read_bytes() == (packed / "attributes.json").read_bytes()

    sliced = tmp_path / "sliced"
    for i in range(3):
        assert _pack(raw, sliced, "--slice-index", str(i), "--num-slices", "3") == 0
    assert not (sliced / "attributes.json").exists()
    merge_slices(sliced)
    assert (sliced / "attributes.json").read_bytes() == (packed / "attributes.json").read_bytes()
    single = json.loads((packed / "manifest.json").read_text())
    assert json.loads((sliced / "manifest.json").read_text())["attributes"] == single["attributes"]
    assert {k: v[1]["attributes"] for k, v in _samples(sliced).items()} == \
        {k: v[1]["attributes"] for k, v in _samples(packed).items()}


def test_forced_kinds_change_the_stored_values(raw: Path, tmp_path: Path):
    out = tmp_path / "forced"
    assert _pack(raw, out, "--categorical-attributes", "price", "--numeric-attributes", "colour") == 0
    rows = {r["id"]: r for r in _table(raw / "products.csv")}
    for id_, (_, meta) in _samples(out).items():
        assert meta["attributes"]["price"] == (rows[id_]["price"].strip() or None)  # the raw string
        assert meta["attributes"]["colour"] is None  # no colour name parses as a number
    kinds = {c["name"]: c["kind"] for c in json.loads((out / "attributes.json").read_text())["columns"]}
    assert kinds == {"brand": "categorical", "colour": "numeric", "price": "categorical"}
    # without attributes: no key in the samples, no attributes.json left from the run before
    assert main(["pack", str(raw / "products.csv"), "--out", str(out), "--image-size", "32"]) == 0
    assert not (out / "attributes.json").exists()
    assert all("attributes" not in meta for _, meta in _samples(out).values())


def test_kind_inference_threshold():
    cfg = SimpleNamespace(attribute_columns=["a", "b", "c"], numeric_attributes=[], categorical_attributes=[])
    cells = [{"a": str(i), "b": str(i), "c": None} for i in range(18)]
    cells += [{"a": "12", "b": "x", "c": None}, {"a": "n/a", "b": "y", "c": None}, {"a": None, "b": None, "c": None}]
    # a: 19 of 20 non-empty cells parse (95 %); b: 18 of 20 (90 %); c: nothing to judge by
    assert infer_kinds(cfg, lambda col: [c[col] for c in cells]) == {"a": "numeric", "b": "categorical", "c": "categorical"}


@pytest.mark.parametrize("extra, needle", [
    (["--attribute-columns", "brand,material"], "missing column 'material'"),
    (["--attribute-columns", "brand", "--numeric-attributes", "price"], "'price' is not one of --attribute-columns"),
    (["--attribute-columns", "brand,category"], "'category' is the label column"),
    (["--attribute-columns", "brand", "--attribute-min-count", "0"], "attribute_min_count"),
])
def test_refusals_are_one_line(raw: Path, tmp_path: Path, extra, needle):
    proc = subprocess.run([sys.executable, "-m", "mmcat", "pack", str(raw / "products.csv"), "--out",
                           str(tmp_path / "o"), *extra], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
