"""``train.report_to``: several experiment trackers at once (mmcat.train.trackers). A real tiny training run through
the CLI logs to TensorBoard, MLflow's local file store (offline; RUN/mlruns by default) and wandb in offline mode
(RUN/wandb), stopped half-way and resumed; all three must then hold the same content, and the MLflow run and the
wandb run must each be the one run, continued."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np
import pytest

from train_helpers import child_env, metrics, mmcat_cmd, run, tb_scalars, write_config

pytestmark = pytest.mark.slow

EVAL_EVERY, STEPS = 2, 4  # optimizer steps (batches of 16 of tiny_packed_dataset's 96 train samples)


def _offline_env() -> Dict[str, str]:
    """No user MLflow/wandb settings leak in: the run must choose RUN/mlruns and RUN/wandb itself; wandb offline."""
    env = {k: v for k, v in child_env().items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def tracked_run(tiny_packed_dataset, tiny_text, tmp_path_factory) -> Path:
    """4 steps (evaluations at steps 2 and 4) to TensorBoard, MLflow and wandb: stopped after step 2 (exit 75), then
    resumed with train.resume=latest and without the stop -- a setting a resume may change, which the MLflow run
    already holds as a parameter (MLflow parameters cannot change)."""
    work = tmp_path_factory.mktemp("tracked")
    cfg = write_config(work / "train.yaml", tiny_text, tiny_packed_dataset, work / "run",
                       train__report_to=["tensorboard", "mlflow", "wandb"], train__max_steps=STEPS,
                       train__eval_every=EVAL_EVERY, train__save_every=EVAL_EVERY, train__resume="latest")
    cmd = mmcat_cmd("train", "--config", str(cfg))
    stopped = run([*cmd, f"train.stop_after_steps={EVAL_EVERY}"], check=False, env=_offline_env())
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    run(cmd, env=_offline_env())
    return work / "run"


@pytest.fixture
def client(tracked_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when told it may
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(tracked_run / "mlruns").as_uri())


@pytest.fixture
def mlflow_run(client, tracked_run):
    """The one MLflow run of the experiment (the resumed invocation went on in it) -- the one RUN names."""
    (experiment,) = [e for e in client.search_experiments() if e.name == "mmcat"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == json.loads((tracked_run / "mlflow_run.json").read_text())["run_id"]
    return found


def _history(client, run_id: str, key: str) -> Dict[int, float]:
    points = client.get_metric_history(run_id, key)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    return {p.step: p.value for p in points}


def _as_f32(values: Dict[int, float]) -> Dict[int, np.float32]:
    return {step: np.float32(v) for step, v in values.items()}  # TensorBoard keeps float32


def test_mlflow_metrics_equal_tensorboard_step_by_step(client, mlflow_run, tracked_run):
    run_id = mlflow_run.info.run_id
    evals = tb_scalars(tracked_run, "val/fused/macro_f1")
    assert sorted(evals) == [EVAL_EVERY, STEPS]
    assert _as_f32(_history(client, run_id, "val/fused/macro_f1")) == _as_f32(evals)
    assert evals[STEPS] == pytest.approx(metrics(tracked_run)["val"]["fused"]["macro_f1"], abs=1e-6)
    losses = _history(client, run_id, "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))  # both invocations, in one MLflow run
    assert _as_f32(losses) == _as_f32(tb_scalars(tracked_run, "train/loss"))


def test_mlflow_holds_the_hyperparameters(mlflow_run, tracked_run):
    params = mlflow_run.data.params
    assert float(params["train.lr"]) == 3e-3 and int(params["train.batch_size"]) == 16
    assert params["model.fusion"] == "gated" and params["output_dir"] == str(tracked_run)
    assert params["train.stop_after_steps"] == str(EVAL_EVERY)  # the first invocation's value: MLflow keeps it


# ------------------------------------------------------------------------------------------------------- wandb
def _wandb_records(path: Path) -> List[Any]:
    """The records of a ``.wandb`` file (wandb's protobuf ``Record``s in the LevelDB log format: a 7-byte file
    header, 32 KiB blocks, each chunk a 7-byte header -- CRC, little-endian length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, parts, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # FULL, FIRST
            parts = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            parts += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


@pytest.fixture
def wandb_runs(tracked_run) -> List[Tuple[Path, List[Any]]]:
    """(folder, records) of each offline wandb run folder of the run, oldest first."""
    folders = sorted((tracked_run / "wandb").glob("offline-run-*"))
    return [(f, _wandb_records(next(f.glob("run-*.wandb")))) for f in folders]


def _wandb_history(records: List[Any]) -> Dict[str, Dict[int, Any]]:
    out: Dict[str, Dict[int, Any]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for key, value in items.items():
                steps = out.setdefault(key, {})
                assert items["_step"] not in steps, f"{key} logged twice at step {items['_step']}"
                steps[items["_step"]] = value
    return out


def test_wandb_offline_run_is_one_run_continued_with_tensorboards_content(wandb_runs, tracked_run):
    kept = json.loads((tracked_run / "wandb_run.json").read_text())["id"]
    assert len(wandb_runs) == 2 and all(f.name.endswith(f"-{kept}") for f, _ in wandb_runs)  # one id, resumed
    history: Dict[str, Dict[int, Any]] = {}
    pngs: Dict[int, Path] = {}
    for folder, records in wandb_runs:
        for key, steps in _wandb_history(records).items():
            if not key.startswith("_"):  # wandb's own _step, _runtime, _timestamp restart with each invocation
                assert not set(steps) & set(history.get(key, {})), f"{key}: a step in both invocations"
            history.setdefault(key, {}).update(steps)
            if key == "val/confusion_matrix/filenames":  # a wandb.Image: its PNG is kept in the run folder
                pngs.update({step: folder / "files" / names[0] for step, names in steps.items()})
    assert sorted(history["train/loss"]) == list(range(1, STEPS + 1))
    assert _as_f32(history["train/loss"]) == _as_f32(tb_scalars(tracked_run, "train/loss"))
    evals = tb_scalars(tracked_run, "val/fused/macro_f1")
    assert sorted(evals) == [EVAL_EVERY, STEPS] and _as_f32(history["val/fused/macro_f1"]) == _as_f32(evals)
    assert sorted(pngs) == [EVAL_EVERY, STEPS]  # the confusion matrix of each evaluation
    for png in pngs.values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and cv2.imread(str(png)).std() > 20
    config = {}
    for _, records in wandb_runs[:1]:
        for r in records:
            if r.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["train.lr"] == 3e-3 and config["model.fusion"] == "gated"  # the hyperparameters


def _tb_images(run_dir: Path, tag: str) -> Dict[int, np.ndarray]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images: Dict[int, np.ndarray] = {}
    for events in sorted((run_dir / "tensorboard" / "mmcat").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        if tag in acc.Tags()["images"]:
            for e in acc.Images(tag):
                images[e.step] = cv2.imdecode(np.frombuffer(e.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    return images


def test_confusion_matrix_figure_in_both_trackers_at_each_evaluation(client, mlflow_run, tracked_run, tmp_path):
    run_id = mlflow_run.info.run_id
    tb = _tb_images(tracked_run, "val/confusion_matrix")
    assert sorted(tb) == [EVAL_EVERY, STEPS]  # TensorBoard still gets its image
    logged = {a.path for a in client.list_artifacts(run_id, "val/confusion_matrix")}
    assert logged == {f"val/confusion_matrix/step_{s:07d}.png" for s in tb}
    for step, tb_image in tb.items():
        path = Path(client.download_artifacts(run_id, f"val/confusion_matrix/step_{step:07d}.png", str(tmp_path)))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        png = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert png.shape == tb_image.shape and min(png.shape[:2]) >= 300  # the same figure, legible size
        assert np.abs(png.astype(int) - tb_image.astype(int)).mean() < 8  # drawn the same (not a blank canvas)
        assert png.std() > 20


def test_no_tracker_writes_no_logs_and_trains(tiny_packed_dataset, tiny_text, tmp_path):
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run",
                       train__report_to="none", train__max_steps=1)
    run(mmcat_cmd("train", "--config", str(cfg)), env=_offline_env())
    assert metrics(tmp_path / "run")["global_step"] == 1
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert not {"tensorboard", "mlruns", "mlflow_run.json"} & set(os.listdir(tmp_path / "run"))


def test_warning_text_reaches_every_tracker_that_takes_text(tmp_path, monkeypatch):
    """The modality-competition warning (rare in a tiny run, so driven directly): TensorBoard text and one MLflow
    text artifact per modality, both holding the message."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmcat.train import trackers

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):  # unset now, and again after the test (the
        monkeypatch.setenv(key, "")  # trainer sets them in its own process)
        monkeypatch.delenv(key)
    run_dir = tmp_path / "run"
    acc = Accelerator(cpu=True, log_with=trackers.active_trackers(["tensorboard", "mlflow"]),
                      project_config=ProjectConfiguration(str(run_dir), logging_dir=str(run_dir / "tensorboard")))
    acc.init_trackers("mmcat", init_kwargs=trackers.init_kwargs(["tensorboard", "mlflow"], run_dir, resuming=False))
    trackers.remember_runs(acc, run_dir)
    trackers.log_warning(acc, "warnings/modality_competition", "image stays at chance", 7, "image")
    trackers.log_warning(acc, "warnings/modality_competition", "text stays at chance", 7, "text")
    acc.end_training()

    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())  # the default store, inside the run dir
    got = {a.path: client.download_artifacts(run_id, a.path, str(tmp_path))
           for a in client.list_artifacts(run_id, "warnings/modality_competition")}
    assert {p: Path(f).read_text() for p, f in got.items()} == {
        "warnings/modality_competition/step_0000007_image.txt": "image stays at chance",
        "warnings/modality_competition/step_0000007_text.txt": "text stays at chance"}
    (events,) = (run_dir / "tensorboard" / "mmcat").glob("events.out.tfevents.*")
    tb = EventAccumulator(str(events), size_guidance={"tensors": 0})
    tb.Reload()
    texts = [t.tensor_proto.string_val[0].decode() for t in tb.Tensors("warnings/modality_competition/text_summary")]
    assert texts == ["image stays at chance", "text stays at chance"]
