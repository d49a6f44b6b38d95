"""``train.report_to``: the experiment trackers a run logs to, several at once, through Accelerate's trackers.

Scalars and hyperparameters go through ``Accelerator.log`` / ``init_trackers`` to every tracker. What Accelerate
has no common call for -- the confusion-matrix figure and the modality-competition warning text -- goes through
``log_confusion`` and ``log_warning`` here, to each active tracker with such a call in its own library
(TensorBoard, MLflow, wandb); other trackers get the scalars only.

Offline by default: with no ``MLFLOW_TRACKING_URI`` set, MLflow writes a file store at ``RUN/mlruns``; with no
``WANDB_DIR`` set, wandb writes under ``RUN/wandb`` (``WANDB_MODE=offline`` keeps it off the network). A resumed run
goes on in the same MLflow run and the same wandb run (their ids are kept in ``RUN/mlflow_run.json`` and
``RUN/wandb_run.json``). Only the main process logs: Accelerate creates the trackers there only.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections import abc
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from mmcat.errors import ConfigError

KEY = "config key 'train.report_to'"
MLFLOW_RUN_FILE = "mlflow_run.json"
WANDB_RUN_FILE = "wandb_run.json"
log = logging.getLogger(__name__)

# what `pip install` needs for each tracker Accelerate knows (the name in the error when it is missing)
PIP_PACKAGE = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "aim": "aim", "comet_ml": "comet-ml",
    "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
}


def known_trackers() -> List[str]:
    """The tracker names Accelerate accepts in ``log_with`` (``all`` aside)."""
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t != LoggerType.ALL]


def requested(report_to: Any) -> List[str]:
    """``train.report_to`` as a list of names: a single string is one name; ``none`` (alone) or ``[]`` is no
    tracker. Unknown names are refused (Accelerate would raise a bare ValueError mid-setup)."""
    if report_to is None:
        return []
    names = list(report_to) if isinstance(report_to, abc.Sequence) and not isinstance(report_to, str) else [report_to]
    if names == ["none"]:
        return []
    known = known_trackers()
    for name in names:
        if name == "none":
            raise ConfigError(f"{KEY}: 'none' means no tracker, it cannot be listed with others; got {names}")
        if not isinstance(name, str) or (name not in known and name != "all"):
            raise ConfigError(f"{KEY}: unknown tracker {name!r}; choose from {', '.join(known)}, all or none")
    return list(dict.fromkeys(names))  # each once, in the given order


def active_trackers(report_to: Any) -> List[str]:
    """The trackers this run logs to. ``all`` is every tracker whose package is installed; a named tracker whose
    package is missing is refused here, before the run directory is written (Accelerate would drop it silently)."""
    from accelerate.tracking import get_available_trackers

    available = [str(t.value) for t in get_available_trackers()]
    names = requested(report_to)
    if "all" in names:
        return available
    for name in names:
        if name not in available:
            pkg = PIP_PACKAGE.get(name, name)
            raise ConfigError(f"{KEY}: tracker {name!r} needs the Python package {pkg}, which is not installed "
                              f"(pip install {pkg})")
    return names


# ---------------------------------------------------------------------------------------------- starting
def init_kwargs(names: Sequence[str], out: Path, resuming: bool) -> Dict[str, Dict[str, Any]]:
    """Per-tracker keyword arguments for ``Accelerator.init_trackers`` (on every process; the trackers start on the
    main one): where each writes, and the MLflow run a resumed run continues. Call before ``init_trackers``: it
    also points MLflow at its store."""
    kwargs: Dict[str, Dict[str, Any]] = {}
    if "mlflow" in names:
        kwargs["mlflow"] = _mlflow_kwargs(out, resuming)
    if "wandb" in names:
        kwargs["wandb"] = _wandb_kwargs(out, resuming)
    return kwargs


def _wandb_kwargs(out: Path, resuming: bool) -> Dict[str, Any]:
    """Where wandb writes (RUN/wandb unless WANDB_DIR says otherwise; wandb itself honours WANDB_MODE=offline and
    the rest) and which run this is: a resumed run goes on in the wandb run it started (id kept in
    RUN/wandb_run.json, ``resume="allow"``), so the history of both invocations is one run's, also offline, where
    each invocation writes its own ``offline-run-*-<id>`` folder that ``wandb sync`` joins into that run."""
    kwargs: Dict[str, Any] = {"resume": "allow", "name": out.name}
    if "WANDB_DIR" not in os.environ:
        out.mkdir(parents=True, exist_ok=True)
        kwargs["dir"] = str(out)
    kept = out / WANDB_RUN_FILE
    if "WANDB_RUN_ID" in os.environ:  # the user's choice of run wins
        return kwargs
    kwargs["id"] = json.loads(kept.read_text())["id"] if resuming and kept.is_file() else uuid.uuid4().hex[:8]
    return kwargs


def _mlflow_kwargs(out: Path, resuming: bool) -> Dict[str, Any]:
    if "MLFLOW_TRACKING_URI" not in os.environ:
        # one folder holds the whole offline run (MLflow reads the variable when it starts the run). MLflow 3
        # refuses a file store unless told it may: the file store is what mlflow-skinny supports (no SQLAlchemy),
        # and this location is our choice, not the user's
        os.environ["MLFLOW_TRACKING_URI"] = (out / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    kwargs: Dict[str, Any] = {"run_name": out.name}
    kept = out / MLFLOW_RUN_FILE
    if resuming and kept.is_file():
        saved = json.loads(kept.read_text())
        if saved.get("tracking_uri") == os.environ["MLFLOW_TRACKING_URI"]:  # the same store: go on in the same run
            kwargs["run_id"] = saved["run_id"]
    return kwargs


def remember_runs(acc: Any, out: Path) -> None:
    """After ``init_trackers`` (main process): keep the MLflow and wandb run ids in the run directory for a
    resume."""
    from mmcat.files import write_atomic

    mlflow = _active(acc, "mlflow")
    if mlflow is not None:  # None on other ranks too
        write_atomic(out / MLFLOW_RUN_FILE, json.dumps({"run_id": mlflow.tracker.info.run_id,
                                                        "tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}))
    wandb = _active(acc, "wandb")
    if wandb is not None:
        write_atomic(out / WANDB_RUN_FILE, json.dumps({"id": wandb.tracker.id}))


def store_config(acc: Any, hparams: Dict[str, Any]) -> None:
    """The hyperparameters to every tracker, what ``init_trackers(config=...)`` does -- except that a continued
    MLflow run gets only the keys it lacks: MLflow parameters cannot change, and a resume may legitimately change
    settings (epochs, learning rates, trackers); RUN/config.yaml holds each invocation's values."""
    for tracker in _all_active(acc):
        if tracker.name == "mlflow":
            tracker.store_init_configuration(_new_mlflow_params(tracker, hparams))
        else:
            tracker.store_init_configuration(hparams)


def _new_mlflow_params(tracker: Any, hparams: Dict[str, Any]) -> Dict[str, Any]:
    held = tracker.tracker.data.params  # the run as MLflow started it: a continued run's earlier parameters
    changed = sorted(k for k, v in hparams.items() if k in held and held[k] != str(v))
    if changed:
        log.warning("MLflow run %s keeps its first value of %s (parameters cannot change); this invocation's "
                    "settings are in config.yaml", tracker.tracker.info.run_id, ", ".join(changed))
    return {k: v for k, v in hparams.items() if k not in held}


def _active(acc: Any, name: str) -> Any:
    """Accelerate's tracker ``name``; None when it is not active, and on every process but the main one
    (Accelerate starts the trackers there only)."""
    if not acc.is_main_process:
        return None
    return next((t for t in acc.trackers if t.name == name), None)


# ------------------------------------------------------------------------------------------ rich items
# Through Accelerate's tracker wrappers (log_figure, log_images, log_table, log_artifact): they call each library's
# own API (mlflow.log_figure, wandb.Image, wandb.Table), so mmcat imports no tracker package itself.
def log_confusion(acc: Any, matrix: Sequence[Sequence[int]], labels: Sequence[str], step: int) -> None:
    """The confusion-matrix figure (mmcat.train.tensorboard.confusion_figure) to every tracker that takes images:
    TensorBoard image ``val/confusion_matrix``; MLflow artifact ``val/confusion_matrix/step_NNNNNNN.png``; wandb
    image ``val/confusion_matrix``. Main process only (the trackers exist there only)."""
    active = [(t, _CONFUSION[t.name]) for t in _all_active(acc) if t.name in _CONFUSION]
    if not active:
        return  # drawing a figure nobody takes costs a second per evaluation on many classes
    from mmcat.train.tensorboard import confusion_figure

    fig = confusion_figure(matrix, labels)
    for tracker, log in active:
        log(tracker, fig, step)


def log_warning(acc: Any, tag: str, text: str, step: int, about: str) -> None:
    """A warning text (e.g. ``warnings/modality_competition`` about modality ``about``) to every tracker that takes
    text: TensorBoard text ``TAG``; MLflow artifact ``TAG/step_NNNNNNN_ABOUT.txt``; wandb table ``TAG/ABOUT``."""
    for tracker in _all_active(acc):
        if tracker.name in _TEXT:
            _TEXT[tracker.name](tracker, tag, text, step, about)


def _all_active(acc: Any) -> List[Any]:
    return list(acc.trackers) if acc.is_main_process else []


def _tb_image(tracker: Any, fig: Any, step: int) -> None:
    from mmcat.train.tensorboard import figure_rgb

    tracker.writer.add_image("val/confusion_matrix", figure_rgb(fig), step, dataformats="HWC")


def _mlflow_figure(tracker: Any, fig: Any, step: int) -> None:
    tracker.log_figure(fig, artifact_file=f"val/confusion_matrix/step_{step:07d}.png")


def _wandb_image(tracker: Any, fig: Any, step: int) -> None:
    from mmcat.train.tensorboard import figure_rgb

    tracker.log_images({"val/confusion_matrix": [figure_rgb(fig)]}, step=step)


def _tb_text(tracker: Any, tag: str, text: str, step: int, about: str) -> None:
    tracker.writer.add_text(tag, text, step)


def _mlflow_text(tracker: Any, tag: str, text: str, step: int, about: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # MLflow copies a file into the run's artifacts
        path = Path(tmp) / f"step_{step:07d}_{about}.txt"
        path.write_text(text)
        tracker.log_artifact(str(path), artifact_path=tag)


def _wandb_text(tracker: Any, tag: str, text: str, step: int, about: str) -> None:
    tracker.log_table(f"{tag}/{about}", columns=["step", "warning"], data=[[step, text]], step=step)


_CONFUSION: Dict[str, Callable] = {"tensorboard": _tb_image, "mlflow": _mlflow_figure, "wandb": _wandb_image}
_TEXT: Dict[str, Callable] = {"tensorboard": _tb_text, "mlflow": _mlflow_text, "wandb": _wandb_text}
