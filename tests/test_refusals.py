"""Bad settings are refused before any work -- exit code 2, one stderr line naming the key or path, no run
directory -- and the settings that used to fail only late now work: training without a test split, `mmcat eval`
of shards written by other tools (`--label-key json:<field>`), `--out` into a folder that does not exist yet."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from _shards import LABELS, write_img2dataset, write_packed, write_split
from train_helpers import metrics, mmcat_cmd, run, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> str:
    from mmcat.models.tiny import make_tiny_text_model

    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def no_test_run(tiny_text, tmp_path_factory) -> Path:
    """A dataset without a test split, trained with data.test_split=null (1 epoch)."""
    work = tmp_path_factory.mktemp("no_test")
    write_packed(work / "packed", {"train": [16, 16], "val": [9]})
    cfg = write_config(work / "train.yaml", tiny_text, work / "packed", work / "run", train__epochs=1,
                       data__test_split=None)
    run(mmcat_cmd("train", "--config", str(cfg)))
    return work / "run"


def one_error_line(proc, command: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mmcat {command}: error: "), proc.stderr[-3000:]
    return lines[0][len(f"mmcat {command}: error: "):]


def refused_in_process(monkeypatch, capsys, command: str, *args: str) -> str:
    """``mmcat COMMAND ARGS`` through the console script's own ``main`` in this test process, where torch is already
    imported: ~0.1 s a case instead of a ~9 s start-up. The refusals of the other tests here run as real processes
    (exit code 2, nothing else on stderr). Returns the one error line. Only for refusals that come before the
    Accelerator (process-wide state): starting one fails the test."""
    from mmcat.cli import main

    def no_accelerator(cfg):
        raise AssertionError("refused only after the Accelerator started: test this case in its own process")

    monkeypatch.setattr("mmcat.train.setup.build_accelerator", no_accelerator)
    capsys.readouterr()
    code = main([command, *args])
    return one_error_line(SimpleNamespace(returncode=code, stderr=capsys.readouterr().err), command)


def test_training_without_a_test_split(no_test_run):
    m = metrics(no_test_run)
    assert "test" not in m and m["val"]["fused"]["num_samples"] == 9
    assert (no_test_run / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["missing_test_split", "pattern_without_split"])
def test_train_refuses_bad_data_settings_before_any_work(case, tiny_text, tmp_path):
    write_packed(tmp_path / "packed", {"train": [16, 16], "val": [9]})
    root = tmp_path / "packed" if case == "missing_test_split" else tmp_path / "packed" / "train" / "shard-*.tar"
    cfg = write_config(tmp_path / "train.yaml", tiny_text, root, tmp_path / "run")
    msg = one_error_line(run(mmcat_cmd("train", "--config", str(cfg)), check=False), "train")
    if case == "missing_test_split":
        assert msg == (f"data.test_split 'test': no 'test' split in {tmp_path / 'packed'} (expected "
                       f"{tmp_path / 'packed' / 'test'}/*.tar); set data.test_split=null to train without a test split")
    else:
        assert msg.startswith("data.val_split 'val' reads 2 shard(s) of data.train_split 'train'")
    assert not (tmp_path / "run").exists()  # refused before the run directory was even created


def test_eval_of_other_tools_shards_by_json_label_into_a_new_folder(no_test_run, tmp_path):
    """img2dataset-style shards: no cls member, no labels.json; the label name is mapped through the model's
    labels. Every sample is evaluated under its own label (confusion-matrix rows = the true label counts)."""
    infos = write_img2dataset(tmp_path / "i2d", [5, 4])
    out = tmp_path / "new" / "folder" / "m.json"
    run(mmcat_cmd("eval", "--model", str(no_test_run / "best"), "--data", str(tmp_path / "i2d" / "*.tar"),
                  "--label-key", "json:category", "--out", str(out)))
    report = json.loads(out.read_text())
    want = Counter(LABELS[i["label"]] for i in infos)
    for mode in ("fused", "image_only", "text_only"):
        rows = report["confusion_matrix"][mode]
        assert {LABELS[i]: sum(row) for i, row in enumerate(rows) if sum(row)} == want
        assert {k: v["support"] for k, v in report["per_class"][mode].items() if v["support"]} == want


def test_eval_where_every_sample_would_be_skipped_says_so(no_test_run, tmp_path):
    write_packed(tmp_path / "d", {"train": [4]})
    write_split(tmp_path / "d", "test", [3], start=10, bad={f"p{i:05d}": "no_cls" for i in range(10, 13)})
    proc = run(mmcat_cmd("eval", "--model", str(no_test_run / "best"), "--data", str(tmp_path / "d")), check=False)
    assert one_error_line(proc, "eval") == (
        f"--split 'test': all 3 samples would be skipped (label key 'cls'; first: p00010 in "
        f"{tmp_path / 'd' / 'test' / 'shard-000000.tar'}: missing member 'cls')")


def test_eval_of_data_that_does_not_exist_names_it(no_test_run, tmp_path):
    from mmcat.data import DataError
    from mmcat.eval_artifact import evaluate_artifact

    with pytest.raises(DataError) as err:  # not "no labels file found (looked for ...)"
        evaluate_artifact(str(no_test_run / "best"), str(tmp_path / "nope"), out=str(tmp_path / "m.json"))
    assert str(err.value) == f"--data entry '{tmp_path / 'nope'}' does not exist (not a directory or a shard pattern)"
    assert not (tmp_path / "m.json").exists()


def test_evaluating_nothing_is_a_one_line_data_error():
    """The evaluation loop itself (library callers): no batch at all is a DataError, not scikit-learn's error."""
    import torch
    from accelerate import Accelerator

    from mmcat.data import DataError
    from mmcat.evaluation import evaluate

    with pytest.raises(DataError, match="^nothing to evaluate: every sample was skipped"):
        evaluate(torch.nn.Linear(1, 1), [], Accelerator(), LABELS, dummy={})


def test_zero3_always_gathers_weights_for_the_best_export(monkeypatch, caplog):
    """The plugin config mmcat builds: ZeRO-3 gets stage3_gather_16bit_weights_on_model_save (the end-to-end run
    with launcher flags only is test_deepspeed's bf16 test); an explicit false is overridden with a warning."""
    from mmcat.train.accel import _gather_weights_for_export

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", raising=False)
    flags_only = {"zero_optimization": {"stage": 3}}
    _gather_weights_for_export(flags_only, None)
    assert flags_only == {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    zero2 = {"zero_optimization": {"stage": 2}}
    _gather_weights_for_export(zero2, None)
    assert zero2 == {"zero_optimization": {"stage": 2}}
    said_false = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    _gather_weights_for_export(said_false, "ds.json")
    assert said_false["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "DeepSpeed config ds.json says stage3_gather_16bit_weights_on_model_save=false" in caplog.text


@pytest.mark.parametrize("overrides, expected", [
    (["model.modalities=[image]", "model.fusion=attention"],
     "model.fusion=attention needs image and text (text attends to the image); the model has image: use gated, "
     "concat or late"),
    (["model.modalities=[]"], "model.modalities must list one or more modalities, each once; got []"),
    (["model.modalities=[text,text]"],
     "model.modalities must list one or more modalities, each once; got ['text', 'text']"),
    (["model.aux_loss_weights={photo: 1.0}"],
     "config key 'model.aux_loss_weights': 'photo' is not a modality of the model (image, text)"),
    (["model.modality_dropout_weights={text: 0}"],
     "config key 'model.modality_dropout_weights.text': must be > 0, got 0.0"),
    (["model.aux_loss_weight=0", "model.ogm_alpha=0.5"],
     "model.modality_dropout_target=stronger and model.ogm_alpha measure each modality by its auxiliary head; "
     "image, text has none (aux loss weight 0)"),
    (["model.modality_dropout_target=bigger"],
     "config key 'model.modality_dropout_target': 'bigger' is not one of uniform, stronger"),
    (["model.text.trainable_layers=3"],  # the tiny BERT has 2
     "config key 'model.text.trainable_layers' is 3 but the text encoder has 2 layers (-1 = train all of it)"),
    (["model.text.trainable_layers=-2"], "config key 'model.text.trainable_layers': must be >= -1, got -2"),
])
def test_train_refuses_bad_balance_settings_in_one_line(overrides, expected, tiny_packed_dataset, tiny_text, tmp_path,
                                                       monkeypatch, capsys):
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run")
    assert refused_in_process(monkeypatch, capsys, "train", "--config", str(cfg), *overrides) == expected
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("report_to, expected", [
    ("[tensorboard,tensorbored]",
     "config key 'train.report_to': unknown tracker 'tensorbored'; choose from aim, tensorboard, wandb, trackio, "
     "comet_ml, mlflow, clearml, dvclive, swanlab, all or none"),
    ("[tensorboard,aim]",  # aim is not installed here: Accelerate alone would drop it without a word
     "config key 'train.report_to': tracker 'aim' needs the Python package aim, which is not installed "
     "(pip install aim)"),
])
def test_train_refuses_unknown_or_missing_trackers_in_one_line(report_to, expected, tiny_packed_dataset, tiny_text,
                                                               tmp_path):
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run")
    proc = run(mmcat_cmd("train", "--config", str(cfg), f"train.report_to={report_to}"), check=False)
    assert one_error_line(proc, "train") == expected
    assert not (tmp_path / "run").exists()
