"""Does the fused model use each modality? The share of its predictions that change when the modality is hidden
(``modality_influence`` in metrics.json and ``mmcat eval``'s report), and the warning when a modality that carries
signal on its own changes none of them (``unused_modalities``): on one H100 run a gated fusion shut the text out,
its fused and image-only figures were identical, and nothing said so."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_helpers import metrics, mmcat_cmd, run, tb_scalars, write_config

from mmcat.evaluation import decision_influence


def test_influence_counts_changed_predictions_among_samples_with_the_modality_and_another():
    preds = {"fused": [0, 1, 2, 3, 0, 1], "image_only": [0, 2, 2, 0, 0, 1], "text_only": [1, 1, 2, 3, 1, 1]}
    present = {"image": [True, True, True, True, False, True], "text": [True, True, True, False, True, True]}
    got = decision_influence(preds, present, list(preds))
    # hiding text = image_only; judged on samples 0, 1, 2, 5 (both present): sample 1 changes
    assert got["text"] == {"samples": 4, "changed": 0.25}
    # hiding image = text_only; same four samples: sample 0 changes
    assert got["image"] == {"samples": 4, "changed": 0.25}
    # three modalities: hiding m is without_m; a sample needs m and at least one other
    preds3 = {"fused": [0, 0, 0], "image_only": [2, 2, 2], "text_only": [2, 2, 2], "price_only": [2, 2, 2],
              "without_image": [1, 0, 0], "without_text": [0, 0, 0], "without_price": [0, 1, 1]}
    present3 = {"image": [True, True, False], "text": [True, False, False], "price": [True, True, True]}
    got3 = decision_influence(preds3, present3, list(preds3))
    assert got3["image"] == {"samples": 2, "changed": 0.5}
    assert got3["text"] == {"samples": 1, "changed": 0.0}
    assert got3["price"] == {"samples": 2, "changed": 0.5}  # sample 2 has price alone: hiding it says nothing
    assert decision_influence({"fused": [0, 1]}, {"image": [True, True]}, ["fused"]) == {}  # one modality


def _changed_by_hand(best, data, split):
    """Independently of the evaluator's bookkeeping: the artifact run per mode on the eval loader's batches, joined
    by sample key (forward_batch per mode, not forward_modes)."""
    from mmcat.artifact import load_artifact
    from mmcat.data import build_eval_loader
    from mmcat.models.fusion import forward_batch

    art = load_artifact(best, device="cpu")
    art.model.eval()
    fused, image_only, both = {}, {}, set()
    with torch.no_grad():
        for batch in build_eval_loader(art.data_config(data), split, art.tokenizer, batch_size=64, num_workers=0):
            for preds, mode in ((fused, "fused"), (image_only, "image_only")):
                preds.update(zip(batch["keys"], forward_batch(art.model, batch, mode).argmax(-1).tolist()))
            both |= {k for k, i, t in zip(batch["keys"], batch["has_image"], batch["has_text"]) if i and t}
    return len(both), sum(fused[k] != image_only[k] for k in both) / len(both)


def test_eval_and_the_training_run_report_how_often_hiding_text_changes_a_prediction(baseline_run,
                                                                                    tiny_packed_dataset, tmp_path):
    out = tmp_path / "m.json"
    run(mmcat_cmd("eval", "--model", str(baseline_run / "best"), "--data", str(tiny_packed_dataset),
                  "--out", str(out)))
    report = json.loads(out.read_text())
    samples, changed = _changed_by_hand(baseline_run / "best", tiny_packed_dataset, "test")
    assert report["modality_influence"]["text"] == {"samples": samples, "changed": pytest.approx(changed, abs=1e-6)}
    # the training run's own final figures: the same artifact on the same split
    trained = metrics(baseline_run)
    assert trained["modality_influence"]["test"] == report["modality_influence"]
    assert set(trained["modality_influence"]) == {"val", "test"}
    assert isinstance(trained["unused_modalities"], list)
    # and at every validation, in TensorBoard: a share of the val samples that have both inputs
    n = trained["modality_influence"]["val"]["text"]["samples"]
    for name in ("image", "text"):
        curve = tb_scalars(baseline_run, f"val/influence/{name}")
        assert sorted(curve) == sorted(tb_scalars(baseline_run, "val/fused/macro_f1"))
        assert all(abs(v * n - round(v * n)) < 1e-4 for v in curve.values()), curve


@pytest.fixture(scope="module")
def learned_run(tiny_packed_dataset, tiny_text, tmp_path_factory):
    """Long enough (6 epochs, ~17 s) for the text alone to score well above chance (4 classes: text_only test
    macro-F1 ~0.75), which is when ignoring it is worth a warning; the 2-epoch baseline's text_only is ~0.2."""
    work = tmp_path_factory.mktemp("learned")
    run(mmcat_cmd("train", "--config", str(write_config(work / "train.yaml", tiny_text, tiny_packed_dataset,
                                                        work / "run", train__epochs=6))))
    return work / "run"


def test_a_fused_model_whose_gate_shuts_out_the_text_is_reported_as_not_using_it(learned_run, tiny_packed_dataset,
                                                                                   tmp_path):
    """The H100 case made certain: the gate's text score pinned to -1e4, so with a photo present the text's weight
    is exactly 0; text-only predictions are untouched (the photo's score is -inf there). The train split has
    enough samples to judge (the test split of the tiny set is under the minimum)."""
    best = tmp_path / "best"
    shutil.copytree(learned_run / "best", best)
    weights = load_file(str(best / "model.safetensors"))
    text = metrics(learned_run)["modalities"].index("text")  # the gate's rows follow the model's modality order
    weights["gate.weight"][text] = 0.0
    weights["gate.bias"][text] = -1e4
    save_file(weights, str(best / "model.safetensors"), metadata={"format": "pt"})
    result = {}
    for name, model in (("doctored", best), ("original", learned_run / "best")):
        out = tmp_path / f"{name}.json"
        proc = run(mmcat_cmd("eval", "--model", str(model), "--data", str(tiny_packed_dataset), "--split", "train",
                             "--out", str(out)))
        result[name] = (json.loads(out.read_text()), proc.stdout + proc.stderr)
    report, log = result["doctored"]
    assert report["modality_influence"]["text"]["changed"] == 0.0
    assert report["modality_influence"]["text"]["samples"] >= 30
    assert report["fused"]["macro_f1"] == report["image_only"]["macro_f1"]
    assert report["unused_modalities"] == ["text"]
    assert "the fused model does not use 'text'" in log and "text_only scores macro-F1" in log
    assert report["text_only"]["macro_f1"] >= 1.5 / 4  # the rule's condition holds: the text alone learned
    assert report["modality_influence"]["image"]["changed"] > 0.0
    original, original_log = result["original"]
    assert original["modality_influence"]["text"]["changed"] > 0.0  # the trained gate does use the text
    assert original["unused_modalities"] == [] and "does not use" not in original_log
