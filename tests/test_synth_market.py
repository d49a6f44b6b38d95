"""mmcat synth --generator market: layout, documented rates, determinism, attributes off switch, vocabulary unlike
shapes', colour carrying no class information, CLI, and a pack round trip joined back to the table by id."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from mmcat import synth, synth_market as market
from mmcat.synth import synthesize

from conftest import synth_config


def _rows(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _meta(out: Path) -> dict:
    return json.loads((out / "synth.json").read_text())


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """600 products over 6 classes, tiny photos: enough for the rates."""
    out = tmp_path_factory.mktemp("market_big")
    synthesize(synth_config(out, generator="market", num_products=600, num_classes=6, min_side=32, max_side=48, seed=3))
    return out


def test_layout_every_category_and_image(tmp_path: Path):
    synthesize(synth_config(tmp_path, generator="market", num_products=48, num_classes=12, min_side=60, max_side=160,
                            seed=1))
    rows = _rows(tmp_path / "products.csv")
    assert list(rows[0]) == ["id", "image", "title", "description", "category", "material", "weight_g"]
    labels = (tmp_path / "labels.txt").read_text().splitlines()
    assert labels == [c[0] for c in market.CATEGORIES] and len(labels) == 12
    assert [r["category"] for r in rows] == [labels[i % 12] for i in range(48)]  # balanced, in order
    meta = _meta(tmp_path)
    assert meta["generator"] == "market" and meta["labels"] == labels
    assert [p["id"] for p in meta["products"]] == [r["id"] for r in rows]
    shapes = set()
    for r in rows:
        assert r["image"] == f"images/{r['id']}.jpg"
        img = cv2.imread(str(tmp_path / r["image"]))
        assert img is not None and img.ndim == 3
        h, w = img.shape[:2]
        assert 60 <= h <= 160 and 60 <= w <= 160
        shapes.add("portrait" if h > w else "landscape" if w > h else "square")
        assert re.fullmatch(r"SKU \d{5} \| \S+ — [^,]+, [^,]+, \d+ pcs, \d+ cm", r["title"]), r["title"]
        assert r["description"] == "" or r["description"].startswith("• ")
    assert {"portrait", "landscape"} <= shapes
    for p in meta["products"]:  # the recorded object colour is really in the photo (some of its pixels)
        if p["image_mode"] == "informative":
            img = cv2.imread(str(tmp_path / "images" / f"{p['id']}.jpg")).astype(int)
            assert (abs(img - p["object_bgr"]).max(axis=2) < 60).mean() > 0.01, p
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(f"{r['id']}.jpg" for r in rows)


def test_text_keywords_follow_the_truth(big: Path):
    """An informative title holds its recorded keyword (own, or shared with the sibling category); a generic one
    holds no category keyword at all, and its description no category feature."""
    rows = {r["id"]: r for r in _rows(big / "products.csv")}
    every_keyword = [k for c in market.CATEGORIES for k in c[1]] + [k for ks in market.SHARED_KEYWORDS for k in ks]
    every_feature = [f for fs in market.PAIR_FEATURES for f in fs]
    labels = _meta(big)["labels"]
    for p in _meta(big)["products"]:
        r = rows[p["id"]]
        cat = labels.index(r["category"])
        if p["text_informative"]:
            own = market.SHARED_KEYWORDS[cat // 2] if p["keyword_shared"] else market.CATEGORIES[cat][1]
            assert p["keyword"] in own and f"— {p['keyword']}," in r["title"], (p, r)
            assert not r["description"] or any(f in r["description"] for f in market.PAIR_FEATURES[cat // 2])
        else:
            assert p["keyword"] is None and not any(k in r["title"] for k in every_keyword), r
            assert not any(f in r["description"] for f in every_feature), r


def test_rates_are_documented_and_independent(big: Path):
    meta = _meta(big)
    assert meta["rates"] == {"image_informative": 0.7, "text_informative": 0.6, "shared_keyword": 0.25,
                             "description_empty": 0.2, "material_informative": 0.45, "material_missing": 0.1,
                             "weight_missing": 0.05, "weight_sigma": 0.7}
    products, n = meta["products"], len(meta["products"])
    img = [p["image_informative"] for p in products]
    txt = [p["text_informative"] for p in products]
    assert abs(sum(img) / n - 0.70) < 0.06 and abs(sum(txt) / n - 0.60) < 0.06
    assert abs(sum(not a and not b for a, b in zip(img, txt)) / n - 0.30 * 0.40) < 0.05  # independent
    assert {p["image_mode"] for p in products if p["image_informative"]} == {"informative"}
    assert {p["image_mode"] for p in products if not p["image_informative"]} == {"clutter", "parcel", "hidden"}
    shared = [p["keyword_shared"] for p in products if p["text_informative"]]
    assert abs(sum(shared) / len(shared) - 0.25) < 0.07
    rows = _rows(big / "products.csv")
    assert abs(sum(not r["description"] for r in rows) / n - 0.20) < 0.06


def test_attribute_rates_and_off_switch(big: Path, tmp_path: Path):
    """material is the category's own for about 45 % of products; weight_g medians follow the category;
    --no-attributes writes the same photos and texts without the two columns."""
    rows, meta = _rows(big / "products.csv"), _meta(big)
    labels = meta["labels"]
    informative = [p["material_informative"] for p in meta["products"]]
    assert abs(sum(informative) / len(rows) - 0.45) < 0.07
    assert 0.05 < sum(not r["material"] for r in rows) / len(rows) < 0.15
    for r, ok in zip(rows, informative):
        if r["material"] and ok:
            assert r["material"] == market.MATERIALS[labels.index(r["category"])]
        assert r["material"] in market.MATERIALS + [""]
    for c, label in enumerate(labels):
        weights = sorted(int(r["weight_g"]) for r in rows if r["category"] == label and r["weight_g"])
        assert 0.7 < weights[len(weights) // 2] / market.WEIGHT_MEDIANS[c] < 1.4, (label, weights[len(weights) // 2])

    synthesize(synth_config(tmp_path, generator="market", num_products=40, num_classes=6, min_side=32, max_side=48,
                            seed=3, attributes=False))
    base = _rows(tmp_path / "products.csv")
    assert list(base[0]) == synth.BASE_COLUMNS
    assert base == [{k: r[k] for k in synth.BASE_COLUMNS} for r in rows[:40]]
    for r in base:
        assert (tmp_path / r["image"]).read_bytes() == (big / r["image"]).read_bytes()
    assert "material_informative" not in _meta(tmp_path)["products"][0]


def test_deterministic_by_seed(tmp_path: Path):
    def digest(out: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(out.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(out).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize(synth_config(tmp_path / name, generator="market", num_products=16, num_classes=4, min_side=40,
                                max_side=120, seed=seed))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a" / "products.csv").read_bytes() != (tmp_path / "c" / "products.csv").read_bytes()
    assert (tmp_path / "a" / "images" / "m000003.jpg").read_bytes() != (tmp_path / "c" / "images" / "m000003.jpg").read_bytes()


def _words(phrases) -> set:
    return {w for p in phrases for w in re.findall(r"[a-z]+", p.lower())}


def test_vocabulary_shares_nothing_with_shapes(big: Path):
    shapes_words = _words([c[0] for c in synth.CATEGORIES] + [n for c in synth.CATEGORIES for n in c[4]]
                          + synth.CATEGORY_BRANDS + synth.BRANDS + synth.GENERIC_NOUNS + synth.ADJECTIVES)
    market_vocab = ([c[0] for c in market.CATEGORIES] + [k for c in market.CATEGORIES for k in c[1]]
                    + [k for ks in market.SHARED_KEYWORDS for k in ks] + market.SELLERS + market.GENERIC_TERMS)
    assert _words(market_vocab) & shapes_words == set()
    written = _words(r["title"] + " " + r["description"] for r in _rows(big / "products.csv"))
    assert written & shapes_words == set()
    assert not set(synth.CATEGORY_COLOURS) & _words(market.MATERIALS)  # no colour name as a material either


def test_photo_colour_carries_no_class_information(big: Path):
    """The object's hue (recorded as drawn) has the same spread in every category: the structure is the cue."""
    meta = _meta(big)
    hues = {label: [] for label in meta["labels"]}
    for i, p in enumerate(meta["products"]):
        if p["image_informative"]:
            hues[meta["labels"][i % 6]].append(p["object_hue"])
    everything = [h for hs in hues.values() for h in hs]
    for label, hs in hues.items():
        assert len(hs) > 50
        assert abs(statistics.fmean(hs) - statistics.fmean(everything)) < 20, label
        assert statistics.pstdev(hs) > 40, label  # uniform over 0..179 has sd 52; one colour per class ~ 0


def _mmcat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmcat", *args], capture_output=True, text=True)


def test_cli_generator_flag_and_refusals(tmp_path: Path):
    proc = _mmcat("synth", "--generator", "market", "--out", str(tmp_path / "d"), "--num-products", "8",
                  "--num-classes", "2", "--min-side", "32", "--max-side", "40", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "d" / "products.jsonl").read_text().splitlines()]
    assert [r["category"] for r in rows] == ["kitchenware", "bakeware"] * 4
    assert all(r["weight_g"] is None or isinstance(r["weight_g"], int) for r in rows)
    for extra, needle in ((["--generator", "nope"], "generator"),
                          (["--generator", "market", "--bad-rows"], "bad_rows"),
                          (["--generator", "market", "--num-classes", "13"], "num_classes")):
        proc = _mmcat("synth", "--out", str(tmp_path / "e"), *extra)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "market" in _mmcat("synth", "--out", str(tmp_path / "f"), "--generator", "nope").stderr  # says the values


def test_packed_samples_join_back_to_their_rows(tmp_path: Path):
    raw, packed = tmp_path / "raw", tmp_path / "packed"
    synthesize(synth_config(raw, generator="market", num_products=120, num_classes=4, min_side=48, max_side=96, seed=7))
    proc = _mmcat("pack", str(raw / "products.csv"), "--out", str(packed), "--image-size", "32",
                  "--max-samples-per-shard", "16", "--attribute-columns", "material,weight_g")
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in _rows(raw / "products.csv")}
    labels = json.loads((packed / "labels.json").read_text())
    assert labels == sorted((raw / "labels.txt").read_text().split())  # without --labels: sorted
    manifest = json.loads((packed / "manifest.json").read_text())
    seen = []
    for split, info in manifest["splits"].items():
        urls = [str(packed / split / s["name"]) for s in info["shards"]]
        for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()) if urls else []:
            meta = json.loads(s["json"])
            r = rows[meta["id"]]
            seen.append(meta["id"])
            assert meta["label"] == r["category"] and int(s["cls"]) == labels.index(r["category"])
            assert s["txt"].decode().split("\n")[0] == r["title"]
            assert meta["attributes"] == {"material": r["material"] or None,
                                          "weight_g": float(r["weight_g"]) if r["weight_g"] else None}
            img = cv2.imdecode(np.frombuffer(s["jpg"], np.uint8), cv2.IMREAD_COLOR)
            assert img is not None and min(img.shape[:2]) == 32
    assert sorted(seen) == sorted(rows)  # every product packed exactly once
