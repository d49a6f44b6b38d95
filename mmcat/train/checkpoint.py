"""Full training-state checkpoints: ``accelerator.save_state`` into a temp dir, renamed when complete.

A directory ``checkpoints/step-N/`` exists only once every rank has written its part, so a crash (or a
``kill -9``) mid-save leaves at most a ``step-N.tmp`` that resume ignores and the next save replaces.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
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


def list_checkpoints(ckpt_root: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, ckpt_root: Path) -> Optional[Path]:
    """``none`` -> None; ``latest`` -> newest complete checkpoint (None when there is none yet); else a path."""
    if resume in ("", "none", None):
        return None
    if resume == "latest":
        found = list_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        from mmcat.config import ConfigError

        raise ConfigError(f"config key 'train.resume': {path} is not a checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, ckpt_root: Path, state: TrainerState, keep: int) -> Path:
    """Save on every rank (accelerate and DeepSpeed write per-rank files), then publish atomically on rank 0."""
    final = ckpt_root / f"step-{state.global_step}"
    tmp = ckpt_root / f"step-{state.global_step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        if final.exists():  # re-saving the same step after a resume: replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    log.info("resumed from %s (step %d, epoch %d, batch %d)", path, state.global_step, state.epoch, state.batch_in_epoch)
    return state
