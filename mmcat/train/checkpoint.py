"""Full training-state checkpoints: ``accelerator.save_state`` into a temp dir, renamed when complete.

A directory ``checkpoints/step-N/`` exists only once every rank has written its part, so a crash (or a
``kill -9``) mid-save leaves at most a ``step-N.tmp`` that resume ignores and the next save replaces.

Each checkpoint also records the run's *fingerprint*: every setting that the data stream or the shape of the saved
state depends on. Resuming under a different value would silently train on other samples (or crash deep inside
``load_state``), so it is refused before any work, naming the key and both values.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mmcat.files import fresh_dir, publish_dir

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FINGERPRINT_FILE = "fingerprint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where training is: everything beyond accelerate's own state that resume needs to continue exactly."""

    global_step: int = 0  # optimizer steps
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed on each rank
    samples_seen: int = 0  # global, all ranks
    skipped_samples: int = 0  # bad samples dropped by the pipeline, all ranks
    best_metric: float = -1.0
    best_step: int = -1
    last_eval_step: int = -1
    evals_without_improvement: int = 0
    eval_pending: bool = False  # an evaluation is due at this step (it was interrupted, or waits for the window)
    save_pending: bool = False  # a checkpoint is due at the next optimizer step (epoch end inside a window)
    stopped_early: bool = False
    # val macro-F1 per evaluation of fused and each <m>_only mode (mmcat.train.competition), and the modalities
    # already warned about
    ablation_history: Dict[str, List[float]] = field(default_factory=dict)
    competition_warned: List[str] = field(default_factory=list)


def run_fingerprint(cfg: Any, world_size: int, engine: str, labels: Sequence[str],
                    train_shards: Dict[str, int]) -> Dict[str, Any]:
    """What the data stream and the saved state depend on. Everything else (epochs, max_steps, eval/save/log
    cadence, learning rates, early-stopping patience, output paths) may change on resume."""
    m = cfg.model
    return {
        "world_size": world_size, "engine": engine, "seed": int(cfg.seed),
        "train.batch_size": int(cfg.train.batch_size), "train.grad_accum": int(cfg.train.grad_accum),
        "train.precision": str(cfg.train.precision),
        "data.num_workers": int(cfg.data.num_workers), "data.shuffle_buffer": int(cfg.data.shuffle_buffer),
        "data.resampled": bool(cfg.data.resampled), "data.samples_per_epoch": cfg.data.samples_per_epoch,
        "model.image.name": str(m.image.name), "model.text.name": str(m.text.name),
        "model.text.pooling": str(m.text.pooling), "model.text.trainable_layers": int(m.text.get("trainable_layers", -1)),
        "model.fusion": str(m.fusion), "model.hidden_dim": int(m.hidden_dim),
        "model.modalities": [str(x) for x in (m.get("modalities") or [])],
        "model.aux_heads": _aux_heads(m),
        "labels": list(labels), "train_shards": dict(sorted(train_shards.items())),
    }


def _aux_heads(m: Any) -> List[str]:
    """The modalities with an auxiliary head (weight > 0): they are part of the saved model."""
    names = [str(x) for x in (m.get("modalities") or [])]
    if len(names) < 2:
        return []
    weights = dict(m.get("aux_loss_weights") or {})
    return [n for n in names if float(weights.get(n, m.get("aux_loss_weight") or 0)) > 0]


# fingerprint keys added after checkpoints were first written, with the value an older checkpoint had implicitly
ADDED_KEYS: Dict[str, Any] = {"model.text.trainable_layers": -1}


def check_fingerprint(saved: Optional[Dict[str, Any]], current: Dict[str, Any], where: Path) -> None:
    """Raise a one-line ConfigError naming every setting that differs from the checkpoint's (all at once: a user
    who changed three settings should not learn of them one failed start at a time)."""
    from mmcat.errors import ConfigError

    if saved is None:
        log.warning("%s has no %s (written by an older mmcat): resume settings are not checked", where,
                    FINGERPRINT_FILE)
        return
    changed = [f"'{key}' was {_short(before)} and is now {_short(now)}"
               for key, now in current.items() if (before := saved.get(key, ADDED_KEYS.get(key))) != now]
    if changed:
        values = "the same value" if len(changed) == 1 else "the same values"
        raise ConfigError(f"cannot resume from {where}: {', '.join(changed)}; resume with {values}, or start a new "
                          f"run (new output_dir)")


def _short(value: Any) -> str:
    """Label and shard lists can be long: show their size and first difference-worthy items."""
    if isinstance(value, dict):
        return f"{len(value)} shards ({sum(v or 0 for v in value.values())} samples)"
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} labels [{', '.join(map(str, value[:3]))}, ...]"
    return repr(value)


def list_checkpoints(ckpt_root: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, ckpt_root: Path) -> Optional[Path]:
    """``none`` -> None; ``latest`` -> newest complete checkpoint (None when there is none yet); else a path.
    A fresh run (``none``) over the checkpoints of an earlier run is refused: it would mix two runs' files."""
    from mmcat.errors import ConfigError

    if resume in ("", "none", None):
        if list_checkpoints(ckpt_root):
            raise ConfigError(f"output_dir {ckpt_root.parent} holds checkpoints of an earlier run: set "
                              f"train.resume=latest to continue it, or choose a new output_dir")
        return None
    if resume == "latest":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"config key 'train.resume': {path} is not a checkpoint (no {STATE_FILE})")
    return path


def decide_resume(accelerator, resume: str, ckpt_root: Path) -> Optional[Path]:
    """Resolve ``train.resume`` on rank 0 only and broadcast the answer (or its error): a shared filesystem can
    list a directory differently on each node, and ranks that resumed from different steps would silently diverge."""
    from accelerate.utils import broadcast_object_list

    from mmcat.errors import ConfigError

    answer: List[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            found = resolve_resume(resume, ckpt_root)
            answer = [None if found is None else str(found), None]
        except ConfigError as exc:
            answer = [None, str(exc)]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    if answer[1] is not None:
        raise ConfigError(answer[1])
    return None if answer[0] is None else Path(answer[0])


def save_checkpoint(accelerator, ckpt_root: Path, state: TrainerState, keep: int,
                    fingerprint: Dict[str, Any]) -> Path:
    """Save on every rank (accelerate and DeepSpeed write per-rank files), then publish atomically on rank 0."""
    final = ckpt_root / f"step-{state.global_step}"
    tmp = ckpt_root / f"step-{state.global_step}.tmp"
    if accelerator.is_main_process:
        fresh_dir(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1))
        publish_dir(tmp, final)  # fsynced; an existing step-N (re-saved after a resume) is swapped out whole
        for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def weights_sha256(state_dict: Optional[Dict[str, Any]]) -> Optional[str]:
    """One hash of every weight's bytes (fp32, in key order): proves two runs ended bit-identical. Under ZeRO-3
    only rank 0 holds the gathered weights (None elsewhere)."""
    import hashlib

    import torch

    if not state_dict:
        return None
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_fingerprint(path: Path) -> Optional[Dict[str, Any]]:
    file = path / FINGERPRINT_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    log.info("resumed from %s (step %d, epoch %d, batch %d)", path, state.global_step, state.epoch, state.batch_in_epoch)
    return state
