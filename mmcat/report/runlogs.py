"""A run's TensorBoard scalars, read back with TensorBoard's own reader (every event file of the run: a resumed
run appends a new one; a later value of the same step wins, as TensorBoard shows it)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple


def event_files(run_dir: Path) -> List[Path]:
    return sorted(Path(run_dir).glob("tensorboard/**/events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p))


def read_scalars(run_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """{tag: [(step, value), ...] by step} over every event file of ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: Dict[str, Dict[int, float]] = {}
    for path in event_files(run_dir):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: float(e.value) for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in values.items()}
