"""The eval view (eval, predict, serve) shows the region of the photo that training showed: after a run without
random crops (``data.min_crop_scale: 1.0``, the shipped CPU recipe) the whole photo, not the ImageNet centre crop.
The artifact records the setting, so ``mmcat eval``, the Python API and the training run's own final figures agree."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from _shards import read_packed
from train_helpers import metrics, mmcat_cmd, run, write_config

from mmcat.data import build_eval_loader


@pytest.fixture(scope="module")
def whole_photo_run(tiny_packed_dataset, tiny_text, tmp_path_factory):
    work = tmp_path_factory.mktemp("whole_photo")
    cfg = write_config(work / "train.yaml", tiny_text, tiny_packed_dataset, work / "run", data__min_crop_scale=1.0,
                       train__epochs=1)
    run(mmcat_cmd("train", "--config", str(cfg)))
    return work / "run"


def test_the_artifact_records_the_view_and_eval_reproduces_the_runs_figures(whole_photo_run, tiny_packed_dataset,
                                                                            tmp_path):
    best = whole_photo_run / "best"
    assert yaml.safe_load((best / "config.yaml").read_text())["data"]["min_crop_scale"] == 1.0
    run(mmcat_cmd("eval", "--model", str(best), "--data", str(tiny_packed_dataset), "--out", str(tmp_path / "m.json")))
    got, want = json.loads((tmp_path / "m.json").read_text()), metrics(whole_photo_run)
    for mode in ("fused", "image_only", "text_only"):
        assert (got[mode]["accuracy"], got[mode]["macro_f1"]) == (want["test"][mode]["accuracy"],
                                                                  want["test"][mode]["macro_f1"])
    for mode, ece in want["calibration"]["test"]["by_input"].items():  # probabilities, not only argmaxes
        assert got["calibration"]["by_input"][mode] == pytest.approx(ece, abs=1e-6), mode


def test_the_api_sees_each_photo_as_eval_does_and_not_the_centre_crop(whole_photo_run, tiny_packed_dataset):
    """Pixel for pixel, key by key: the API's view of every test sample equals ``mmcat eval``'s loader's; the same
    artifact read as if trained with crops would show other pixels (the photos are not square), so the test sees
    a lost setting."""
    from mmcat import Classifier
    from mmcat.classifier import Preprocessor

    clf = Classifier.load(whole_photo_run / "best", device="cpu")
    art = clf.artifact
    loader_pixels = {}
    for batch in build_eval_loader(art.data_config(tiny_packed_dataset), "test", art.tokenizer, batch_size=8,
                                   num_workers=0):
        loader_pixels.update(zip(batch["keys"], batch["pixel_values"]))
    raws = {raw["__key__"]: raw for split, raw in read_packed(tiny_packed_dataset) if split == "test"}
    assert raws.keys() == loader_pixels.keys()
    cropped = Preprocessor(art.cfg.data.image_size, 0.35)
    differs = 0
    for key, raw in raws.items():
        api = clf.collate([clf.preprocessor.sample(raw)])["pixel_values"][0]
        assert torch.equal(api, loader_pixels[key])
        differs += not np.array_equal(clf.preprocessor.sample(raw).pixels, cropped.sample(raw).pixels)
    assert differs == len(raws)


def test_an_artifact_from_before_the_setting_keeps_the_centre_crop(whole_photo_run, tmp_path):
    """best/config.yaml without data.min_crop_scale (written before it was recorded): those models were trained and
    evaluated with the centre crop as their eval view, and keep it."""
    from mmcat import Classifier

    old = tmp_path / "old_best"
    shutil.copytree(whole_photo_run / "best", old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["data"]["min_crop_scale"]
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert Classifier.load(old, device="cpu").preprocessor.min_scale < 1.0
