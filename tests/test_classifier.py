"""The Python API (``mmcat.Classifier``): it predicts what ``mmcat eval`` measures, hides a missing modality the way
the ablations do, reads every image form the same way, falls back to the text when a photo is broken, and encodes
attributes exactly as ``mmcat pack`` + the loader do."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _shards import read_packed
from conftest import synth_config

from mmcat.metrics import classification_metrics
from mmcat.models.fusion import forward_batch


@pytest.fixture(scope="module")
def clf(baseline_run):
    from mmcat import Classifier

    return Classifier.load(baseline_run / "best", device="cpu")


def _rows(raw: Path) -> list:
    with open(raw / "products.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_api_on_packed_samples_equals_eval(clf, baseline_run, tiny_packed_dataset):
    """Every test sample through the API (as mmcat predict reads shards): the metrics equal the training run's."""
    labels = json.loads((tiny_packed_dataset / "labels.json").read_text())
    y, pred = [], []
    for split, raw in read_packed(tiny_packed_dataset):
        if split == "test":
            p = clf.predict_prepared([clf.preprocessor.sample(raw)])[0]
            pred.append(labels.index(p.label))
            y.append(int(raw["cls"]))
    want = json.loads((baseline_run / "metrics.json").read_text())["test"]["fused"]
    got = classification_metrics(y, pred, labels)
    assert got["num_samples"] == want["num_samples"]
    assert (got["accuracy"], got["macro_f1"]) == pytest.approx((want["accuracy"], want["macro_f1"]))


def test_a_missing_modality_is_hidden_as_the_ablations_hide_it(clf, tiny_packed_dataset):
    """A sample without its text (or photo) gets the logits eval's image_only (text_only) mode gives the full one."""
    raws = [raw for split, raw in read_packed(tiny_packed_dataset) if split == "val"][:6]
    full = clf.collate([clf.preprocessor.sample(r) for r in raws])
    for drop, mode in (("txt", "image_only"), ("jpg", "text_only")):
        prepared = [clf.preprocessor.sample({k: v for k, v in r.items() if k != drop}) for r in raws]
        preds = clf.predict_prepared(prepared, top_k=4)
        assert {p.modalities for p in preds} == {mode}
        with torch.inference_mode():
            want = torch.softmax(forward_batch(clf.artifact.model, full, mode), -1)
        assert [p.score for p in preds] == pytest.approx(want.max(-1).values.tolist(), abs=1e-5)
        assert [p.label for p in preds] == [clf.labels[i] for i in want.argmax(-1).tolist()]


def test_every_image_form_reads_the_same(clf, tiny_raw_dataset):
    row = _rows(tiny_raw_dataset)[0]
    path = tiny_raw_dataset / row["image"]
    by_path = clf.predict(image=str(path), title=row["title"])
    assert clf.predict(image=path.read_bytes(), title=row["title"]) == by_path
    rgb = np.asarray(Image.open(path).convert("RGB"))
    from_array = clf.predict(image=rgb, title=row["title"])
    assert clf.predict(image=Image.fromarray(rgb), title=row["title"]) == from_array
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    assert clf.predict(image=png.getvalue(), title=row["title"]) == from_array
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])  # opaque alpha: the same photo
    assert clf.predict(image=rgba, title=row["title"]) == from_array
    assert by_path.modalities == "fused" and by_path.label in clf.labels


def test_broken_photo_falls_back_to_the_text_and_says_so(clf, tiny_raw_dataset, tmp_path):
    row = _rows(tiny_raw_dataset)[1]
    good = (tiny_raw_dataset / row["image"]).read_bytes()
    text_only = clf.predict(title=row["title"], description=row["description"])
    for broken in (good[: len(good) // 2], b"not an image at all", tmp_path / "missing.jpg"):
        p = clf.predict(image=broken, title=row["title"], description=row["description"])
        assert (p.label, p.score, p.modalities) == (text_only.label, text_only.score, "text_only")
        assert len(p.warnings) == 1 and p.warnings[0].startswith("image not used: image_")
        with pytest.raises(ValueError, match="nothing to predict from"):
            clf.predict(image=broken)
    with pytest.raises(ValueError, match="nothing to predict from: no usable image or text"):
        clf.predict(title="   ")
    with pytest.raises(ValueError, match="unknown product field"):
        clf.predict(title="x", colour="red")
    batch = clf.predict_batch([{"title": row["title"]}, {"title": ""}], errors="record")
    assert batch[0].score == pytest.approx(clf.predict(title=row["title"]).score, abs=1e-6)
    assert batch[1].label is None and batch[1].error.startswith("nothing to predict from")
    with pytest.raises(ValueError, match="product 1: nothing to predict from"):
        clf.predict_batch([{"title": row["title"]}, {"title": ""}])


def test_min_score_abstains_and_keeps_the_candidates(clf, tiny_raw_dataset):
    row = _rows(tiny_raw_dataset)[2]
    p = clf.predict(title=row["title"], top_k=2)
    held = clf.predict(title=row["title"], top_k=2, min_score=p.score + 1e-3)
    assert held.abstain and held.label is None and held.top_k == p.top_k
    kept = clf.predict(title=row["title"], top_k=2, min_score=p.score)
    assert not kept.abstain and kept.label == p.label == p.top_k[0][0]
    assert kept.as_dict()["top_k"][0] == {"label": p.label, "score": p.score}


def test_attributes_given_to_the_api_encode_as_packed_samples_do(tmp_path):
    """Every packed sample's attributes, read by the loader's modality, equal what the API makes of the table row's
    raw cells (padded, empty and unparseable ones included)."""
    from mmcat.classifier import Preprocessor
    from mmcat.cli import main
    from mmcat.modalities.attributes import Attributes
    from mmcat.synth import synthesize

    raw = tmp_path / "raw"
    synthesize(synth_config(raw, num_products=40, num_classes=2, min_side=32, max_side=40, seed=5))
    rows = _rows(raw)
    rows[0]["brand"], rows[1]["price"], rows[2]["colour"] = "  Acme ", "n/a", " "
    with open(raw / "products.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    packed = tmp_path / "packed"
    assert main(["pack", str(raw / "products.csv"), "--out", str(packed), "--image-size", "32",
                 "--attribute-columns", "brand,colour,price", "--attribute-min-count", "2"]) == 0
    modality = Attributes({"attributes.json": packed / "attributes.json"})
    pre = Preprocessor(32, 0.35, [modality])
    by_id = {r["id"]: r for r in rows}
    seen = 0
    for _, sample in read_packed(packed):
        row = by_id[json.loads(sample["json"])["id"]]
        api = pre.product(title=row["title"], attributes={k: row[k] for k in ("brand", "colour", "price")})
        assert api.modalities["attributes"] == modality.read(sample), row["id"]
        seen += 1
    assert seen == len(rows)
