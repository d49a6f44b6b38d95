"""Calibrated confidence: the temperature fit (known miscalibration recovered, held-out ECE lowered, sums that
reduce across ranks), thresholds for a target precision, and the join between training's fit, ``mmcat eval`` and
the Python API on the same samples."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from _shards import read_packed
from train_helpers import mmcat_cmd, run

from mmcat.calibration import (CalibrationStats, ece, input_mode, input_modes, precision_curve,
                               threshold_for_precision)


def _overconfident(n: int, classes: int, factor: float, seed: int):
    """Labels drawn from softmax(z); the "model" reports factor * z: overconfident by exactly ``factor``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    return z * factor, y


def _ece_of(logits: torch.Tensor, y: torch.Tensor, t: float) -> float:
    conf, pred = torch.softmax(logits / t, -1).max(-1)
    return ece(conf.tolist(), (pred == y).tolist())


def test_temperature_fit_recovers_a_known_overconfidence_and_lowers_held_out_ece():
    logits, y = _overconfident(6000, 5, factor=3.0, seed=0)
    stats = CalibrationStats(["fused"])
    fit_logits, fit_y = logits[:3000], y[:3000]
    for start in range(0, 3000, 256):  # batches, as an evaluation adds them
        stats.add(fit_logits[start:start + 256], fit_y[start:start + 256], ["fused"] * len(fit_y[start:start + 256]))
    fit = stats.fit()["fused"]
    assert fit["num_samples"] == 3000
    assert 2.7 <= fit["temperature"] <= 3.3
    before, after = _ece_of(logits[3000:], y[3000:], 1.0), _ece_of(logits[3000:], y[3000:], fit["temperature"])
    assert after < 0.5 * before, (before, after)
    assert fit["ece_before"] == pytest.approx(_ece_of(logits[:3000], y[:3000], 1.0), abs=1e-6)


def test_calibration_sums_from_two_ranks_equal_one_pass_over_all_samples():
    logits, y = _overconfident(600, 4, factor=0.5, seed=1)  # underconfident: T < 1
    modes = ["fused" if i % 3 else "text_only" for i in range(600)]
    whole, a, b = (CalibrationStats(["fused", "text_only"]) for _ in range(3))
    whole.add(logits, y, modes)
    a.add(logits[:250], y[:250], modes[:250])
    b.add(logits[250:], y[250:], modes[250:])
    merged = CalibrationStats(["fused", "text_only"])
    merged.load_tensor(a.tensor() + b.tensor())  # what accelerator.reduce(..., "sum") does across ranks
    got, want = merged.fit(), whole.fit()
    assert set(got) == set(want) == {"fused", "text_only"}
    for mode in want:
        assert got[mode] == pytest.approx(want[mode])
    assert whole.fit()["fused"]["temperature"] < 1.0
    assert whole.fit()["text_only"]["num_samples"] == 200


def test_threshold_for_precision_is_the_one_with_most_coverage():
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(size=300), 2)  # ties, as real scores have
    correct = rng.uniform(size=300) < scores  # higher scores are right more often
    for target in (0.6, 0.8, 0.95):
        hit = threshold_for_precision(scores, correct, target)
        best = None  # brute force over every possible threshold
        for t in sorted(set(scores)):
            acc = scores >= t
            if correct[acc].mean() >= target and (best is None or acc.mean() > best[1]):
                best = (t, acc.mean(), correct[acc].mean())
        assert hit is not None and (hit["threshold"], hit["coverage"], hit["precision"]) == pytest.approx(best)
    assert threshold_for_precision([0.9, 0.8], [False, False], 0.5) is None
    thresholds, precision, coverage = precision_curve([0.5, 0.5, 0.2], [True, False, True])
    assert thresholds.tolist() == [0.5, 0.2] and precision.tolist() == [0.5, 2 / 3] and coverage[-1] == 1.0


def test_input_modes_name_what_a_product_has():
    assert input_modes(["image", "text"]) == ["fused", "image_only", "text_only"]
    names = ["image", "text", "attributes"]
    assert input_modes(names) == ["fused", "without_attributes", "without_text", "without_image", "image_only",
                                  "text_only", "attributes_only"]
    assert input_mode(["text", "image"], names) == "without_attributes"
    assert input_mode([], names) == "none"
    assert input_mode(["a", "b"], ["a", "b", "c", "d"]) == "a+b"


# --------------------------------------------------------------------------------------- a trained model
def _val_predictions(clf, packed, split="val"):
    """(API prediction, true label) of every sample of ``split``, read with plain webdataset."""
    labels = json.loads((packed / "labels.json").read_text())
    out = []
    for s_split, raw in read_packed(packed):
        if s_split == split:
            p = clf.predict_prepared([clf.preprocessor.sample(raw)], top_k=len(labels))[0]
            out.append((p, labels[int(raw["cls"])]))
    return out


def test_training_fits_on_val_and_the_api_scores_agree_with_the_fit(baseline_run, tiny_packed_dataset):
    from mmcat import Classifier

    cal = json.loads((baseline_run / "best" / "calibration.json").read_text())
    m = json.loads((baseline_run / "metrics.json").read_text())
    val_size = m["val"]["fused"]["num_samples"]
    assert cal["split"] == "val" and cal["fit"]["fused"]["num_samples"] == val_size
    assert m["calibration"]["val"]["fit"] == cal["fit"]
    assert set(m["calibration"]["test"]["by_input"]) == {"fused", "image_only", "text_only"}
    assert cal["temperatures"] == {}  # fewer than MIN_SAMPLES val samples: nothing is rescaled
    preds = _val_predictions(Classifier.load(baseline_run / "best", device="cpu"), tiny_packed_dataset)
    assert len(preds) == val_size and {p.modalities for p, _ in preds} == {"fused"}
    api_ece = ece([p.score for p, _ in preds], [p.label == y for p, y in preds])
    assert cal["fit"]["fused"]["ece_before"] == pytest.approx(api_ece, abs=1e-6)


def test_api_applies_the_temperature_of_the_inputs_present(baseline_run, tiny_raw_dataset, tmp_path):
    from mmcat import Classifier

    best = tmp_path / "best"
    shutil.copytree(baseline_run / "best", best)
    (best / "calibration.json").write_text(json.dumps({"version": 1, "temperatures": {"fused": 2.0, "text_only": 0.5}}))
    clf, plain = Classifier.load(best, device="cpu"), Classifier.load(baseline_run / "best", device="cpu")
    photo, title = tiny_raw_dataset / "images" / "p000000.jpg", "Brightline deluxe sneaker"
    for inputs, mode, t in (({"image": photo, "title": title}, "fused", 2.0), ({"title": title}, "text_only", 0.5),
                            ({"image": photo}, "image_only", 2.0)):  # image_only: none fitted, fused's is used
        prepared = clf.preprocessor.product(**inputs)
        logits = clf.logits(clf.collate([prepared]))[0]
        p, q = clf.predict(**inputs, top_k=4), plain.predict(**inputs, top_k=4)
        assert p.modalities == mode
        assert p.score == pytest.approx(float(torch.softmax(logits / t, -1).max()), abs=1e-6)
        assert q.score == pytest.approx(float(torch.softmax(logits, -1).max()), abs=1e-6)
        assert p.label == q.label and [k for k, _ in p.top_k] == [k for k, _ in q.top_k]


def test_eval_threshold_for_a_target_precision_reaches_it_through_the_api(baseline_run, tiny_packed_dataset,
                                                                          tmp_path):
    from mmcat import Classifier

    best = tmp_path / "best"
    shutil.copytree(baseline_run / "best", best)
    (best / "calibration.json").write_text(json.dumps({"version": 1, "temperatures": {"fused": 0.5}}))
    out = tmp_path / "val.json"
    proc = run(mmcat_cmd("eval", "--model", str(best), "--data", str(tiny_packed_dataset), "--split", "val",
                         "--target-precision", "0.3", "--out", str(out)))
    report = json.loads(out.read_text())
    hit = report["target_precision"]["reached"]
    assert f"--min-score {hit['threshold']:.4f}" in proc.stdout
    preds = _val_predictions(Classifier.load(best, device="cpu"), tiny_packed_dataset)
    accepted = [(p, y) for p, y in preds if p.score >= hit["threshold"]]
    assert len(accepted) / len(preds) == pytest.approx(hit["coverage"])
    assert sum(p.label == y for p, y in accepted) / len(accepted) == pytest.approx(hit["precision"])
    assert hit["precision"] >= 0.3
    fused = report["calibration"]["by_input"]["fused"]
    assert fused["temperature"] == 0.5
    assert fused["ece_after"] == pytest.approx(ece([p.score for p, _ in preds], [p.label == y for p, y in preds]),
                                               abs=1e-6)
    bad = run(mmcat_cmd("eval", "--model", str(best), "--data", str(tiny_packed_dataset), "--target-precision",
                        "1.5"), check=False)
    assert bad.returncode == 2 and "must be in (0, 1]" in bad.stderr


def test_calibrate_command_refits_what_training_wrote(baseline_run, tiny_packed_dataset, tmp_path):
    """``mmcat calibrate`` (for artifacts from before calibration, or runs stopped before their end) fits the same
    temperatures on the same split as training did."""
    best = tmp_path / "best"
    shutil.copytree(baseline_run / "best", best)
    (best / "calibration.json").unlink()
    proc = run(mmcat_cmd("calibrate", "--model", str(best), "--data", str(tiny_packed_dataset)))
    assert "wrote" in proc.stdout
    got = json.loads((best / "calibration.json").read_text())
    want = json.loads((baseline_run / "best" / "calibration.json").read_text())
    assert got["split"] == "val" and set(got["fit"]) == set(want["fit"])
    for mode in want["fit"]:
        assert got["fit"][mode] == pytest.approx(want["fit"][mode], abs=1e-6)
