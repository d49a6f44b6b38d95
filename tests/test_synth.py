"""mmcat synth: layout, determinism, sizes, informativeness rates, planted bad inputs."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from mmcat.config import ConfigError
from mmcat.synth import (BRAND_INFORMATIVE_P, CATEGORIES, CATEGORY_BRANDS, CATEGORY_COLOURS, COLOUR_INFORMATIVE_P,
                         GENERIC_NOUNS, IMAGE_INFORMATIVE_P, PRICE_MEDIANS, TEXT_INFORMATIVE_P, synthesize)

from conftest import synth_config


def _rows(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_layout_sizes_and_vocabulary(tiny_raw_dataset: Path):
    rows = _rows(tiny_raw_dataset / "products.csv")
    assert len(rows) == 120 and list(rows[0]) == ["id", "image", "title", "description", "category", "brand", "colour",
                                                  "price"]
    labels = (tiny_raw_dataset / "labels.txt").read_text().split()
    assert labels == [c[0] for c in CATEGORIES[:4]]
    assert {r["category"] for r in rows} == set(labels)
    shapes = set()
    for r in rows:
        img = cv2.imread(str(tiny_raw_dataset / r["image"]))
        assert img is not None and img.shape[2] == 3
        h, w = img.shape[:2]
        assert 64 <= h <= 128 and 64 <= w <= 128
        shapes.add("portrait" if h > w else "landscape" if w > h else "square")
    assert {"portrait", "landscape"} <= shapes
    truth = {p["id"]: p for p in json.loads((tiny_raw_dataset / "synth.json").read_text())["products"]}
    nouns = {c[0]: c[4] for c in CATEGORIES}
    for r in rows:
        keyword = any(n in r["title"] for n in nouns[r["category"]])
        assert keyword == truth[r["id"]]["text_informative"], r
        if not keyword:
            assert any(r["title"].endswith(g) for g in GENERIC_NOUNS)


def test_rates_are_documented_and_independent(tmp_path: Path):
    synthesize(synth_config(tmp_path, num_products=400, num_classes=6, min_side=32, max_side=48, seed=3))
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["rates"] == {"image_informative": 0.65, "text_informative": 0.6, "description_empty": 0.15,
                             "brand_informative": 0.5, "brand_missing": 0.1, "colour_informative": 0.4,
                             "colour_missing": 0.15, "price_missing": 0.05, "price_sigma": 0.8}
    img = [p["image_informative"] for p in meta["products"]]
    txt = [p["text_informative"] for p in meta["products"]]
    assert abs(sum(img) / 400 - IMAGE_INFORMATIVE_P) < 0.08
    assert abs(sum(txt) / 400 - TEXT_INFORMATIVE_P) < 0.08
    both_bad = sum(1 for a, b in zip(img, txt) if not a and not b) / 400
    assert abs(both_bad - (1 - IMAGE_INFORMATIVE_P) * (1 - TEXT_INFORMATIVE_P)) < 0.06  # independent
    modes = {p["image_mode"] for p in meta["products"]}
    assert modes == {"informative", "neutral", "degraded"}


def test_deterministic_by_seed(tmp_path: Path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        synthesize(synth_config(out, num_products=12, num_classes=3, min_side=40, max_side=80, seed=seed))
    assert (a / "products.csv").read_bytes() == (b / "products.csv").read_bytes()
    for p in sorted((a / "images").iterdir()):
        assert p.read_bytes() == (b / "images" / p.name).read_bytes()
    assert (a / "products.csv").read_bytes() != (c / "products.csv").read_bytes()


def test_planted_bad_rows(bad_raw_dataset: Path):
    planted = json.loads((bad_raw_dataset / "planted.json").read_text())
    rows = _rows(bad_raw_dataset / "products.csv")
    cases = {p["case"]: p for p in planted["rows"]}
    assert set(cases) >= {"truncated_jpeg", "not_an_image", "missing_file", "zero_bytes", "grayscale", "cmyk_jpeg",
                          "rgba_png", "palette_png", "very_large", "exif_rotated", "empty_text", "non_ascii_text",
                          "empty_label", "unknown_label", "duplicate_id", "decompression_bomb"}
    for p in planted["rows"]:
        assert rows[p["row"] - 1]["id"] == p["id"]
    assert not (bad_raw_dataset / rows[cases["missing_file"]["row"] - 1]["image"]).exists()
    assert (bad_raw_dataset / rows[cases["zero_bytes"]["row"] - 1]["image"]).stat().st_size == 0
    big = cv2.imread(str(bad_raw_dataset / rows[cases["very_large"]["row"] - 1]["image"]), cv2.IMREAD_REDUCED_COLOR_8)
    assert big.shape[:2] == (450, 600)
    assert rows[cases["duplicate_id"]["row"] - 1]["id"] == rows[0]["id"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_other_formats_hold_the_same_rows(tmp_path: Path, fmt: str):
    from mmcat.pack.tables import read_table

    synthesize(synth_config(tmp_path / "csv", num_products=8, num_classes=2, min_side=32, max_side=40, seed=2))
    synthesize(synth_config(tmp_path / fmt, num_products=8, num_classes=2, min_side=32, max_side=40, seed=2, format=fmt))
    cols = ["id", "image", "title", "description", "category"]
    assert read_table(tmp_path / fmt / f"products.{fmt}", "auto", cols) == read_table(tmp_path / "csv" / "products.csv", "auto", cols)


def test_cli_and_config_errors(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "mmcat", "synth", "--out", str(tmp_path / "d"), "--num-products", "6",
                           "--num-classes", "2", "--min-side", "32", "--max-side", "40"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(_rows(tmp_path / "d" / "products.csv")) == 6
    with pytest.raises(ConfigError, match="num_classes"):
        synthesize(synth_config(tmp_path / "e", num_classes=99))
    proc = subprocess.run([sys.executable, "-m", "mmcat", "synth", "--out", str(tmp_path / "f"), "--min-side", "500",
                           "--max-side", "100"], capture_output=True, text=True)
    assert proc.returncode == 2 and "min_side" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_attribute_columns_rates_and_off_switch(tmp_path: Path):
    """brand/colour carry the category for about their documented share of products, independently of the photo;
    price medians follow the category; --no-attributes writes the base table with the same photos and texts."""
    synthesize(synth_config(tmp_path / "a", num_products=400, num_classes=6, min_side=16, max_side=16, seed=3))
    rows = _rows(tmp_path / "a" / "products.csv")
    meta = json.loads((tmp_path / "a" / "synth.json").read_text())
    truth = {p["id"]: p for p in meta["products"]}
    labels = [c[0] for c in CATEGORIES]
    for r in rows:
        cat, t = labels.index(r["category"]), truth[r["id"]]
        if r["brand"]:  # a category's own brand appears exactly when the brand is informative
            assert (r["brand"] == CATEGORY_BRANDS[cat]) == t["brand_informative"], r
            assert r["brand"] not in CATEGORY_BRANDS or r["brand"] == CATEGORY_BRANDS[cat]
        if r["colour"] and t["colour_informative"]:
            assert r["colour"] == CATEGORY_COLOURS[cat]
    brand = [p["brand_informative"] for p in meta["products"]]
    image = [p["image_informative"] for p in meta["products"]]
    assert abs(sum(brand) / 400 - BRAND_INFORMATIVE_P) < 0.08
    assert abs(sum(p["colour_informative"] for p in meta["products"]) / 400 - COLOUR_INFORMATIVE_P) < 0.08
    both = sum(a and b for a, b in zip(brand, image)) / 400
    assert abs(both - BRAND_INFORMATIVE_P * IMAGE_INFORMATIVE_P) < 0.07  # independent of the photo
    assert 0.05 < sum(not r["brand"] for r in rows) / 400 < 0.16
    prices = {c: sorted(float(r["price"]) for r in rows if r["category"] == labels[c] and r["price"]) for c in range(6)}
    medians = [ps[len(ps) // 2] for ps in prices.values()]
    assert all(0.6 < m / PRICE_MEDIANS[c] < 1.6 for c, m in enumerate(medians)), medians

    synthesize(synth_config(tmp_path / "b", num_products=400, num_classes=6, min_side=16, max_side=16, seed=3,
                            attributes=False))
    base = _rows(tmp_path / "b" / "products.csv")
    assert list(base[0]) == ["id", "image", "title", "description", "category"]
    assert base == [{k: r[k] for k in base[0]} for r in rows]
    assert (tmp_path / "a" / "images" / "p000007.jpg").read_bytes() == (tmp_path / "b" / "images" / "p000007.jpg").read_bytes()
