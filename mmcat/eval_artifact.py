"""``mmcat eval``: fused, ``<m>_only`` and (from three modalities on) ``without_<m>`` metrics of a deployable
artifact on a packed split."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from accelerate import Accelerator
from omegaconf import OmegaConf

from mmcat.artifact import load_artifact
from mmcat.calibration import (EvalScores, ece_rows, format_calibration, read_temperatures,
                               threshold_for_precision, write_calibration)
from mmcat.evaluation import dummy_batch, evaluate, format_influence
from mmcat.metrics import format_table, summary
from mmcat.train import competition
from mmcat.train.accel import multi_cpu_ddp, process_group_kwargs

log = logging.getLogger(__name__)


def _labels_file(data_cfg, model_labels, model_dir: str, data_root: str) -> Optional[str]:
    """The shards' label list must be the model's (a class index has to mean what the model's output means). Shards
    from other tools may come without labels.json: ``json:<field>`` labels (names) are then mapped through the
    model's own labels.json, which is returned (the ``data.labels_file`` to read with); ``cls`` indices without a
    labels file cannot be checked, so that stays an error."""
    from mmcat.data.shards import find_labels, read_labels
    from mmcat.errors import ConfigError

    labels = find_labels(data_cfg)
    if labels is None and str(data_cfg.label_key).startswith("json:"):
        log.info("no labels.json next to %s: mapping label names through %s/labels.json", data_root, model_dir)
        return str(Path(model_dir) / "labels.json")
    if labels is None:
        read_labels(data_cfg)  # raises the one-line "no labels file found (looked for ...)"
    if labels != list(model_labels):
        raise ConfigError(f"{data_root}: labels.json differs from the model's labels ({model_dir}/labels.json)")
    return None


def _split_run(model_dir: str, data_root: str, split: str, batch_size: int, num_workers: int,
               label_key: Optional[str], fit: bool) -> Tuple[Any, Dict, EvalScores, Any]:
    """Load ``best/``, check the data and evaluate ``split`` in every mode with calibration scores:
    (artifact, results, the scores, accelerator)."""
    from mmcat.config import check_label_key
    from mmcat.data import build_eval_loader
    from mmcat.data.shards import check_root_exists, check_split, root_entries

    if label_key is not None:
        check_label_key(label_key, "--label-key")
    acc = Accelerator(cpu=multi_cpu_ddp(), kwargs_handlers=process_group_kwargs())
    art = load_artifact(model_dir, device=acc.device)
    data_cfg = art.data_config(data_root, **({"label_key": label_key} if label_key is not None else {}))
    for entry in root_entries(data_cfg):
        check_root_exists(entry, "--data")
    labels_file = _labels_file(data_cfg, art.labels, model_dir, data_root)
    if labels_file is not None:
        data_cfg = OmegaConf.merge(data_cfg, {"labels_file": labels_file})
    check_split(data_cfg, split, list(art.labels), key="--split")  # one line now, not a traceback after the loop
    loader = build_eval_loader(data_cfg, split, art.tokenizer, batch_size, num_workers,
                               rank=acc.process_index, world_size=acc.num_processes, modalities=art.modalities)
    scores = EvalScores(list(art.model.names), {} if fit else read_temperatures(Path(model_dir)), fit=fit)
    res = evaluate(art.model, loader, acc, art.labels,
                   dummy_batch(art.tokenizer, data_cfg.image_size, art.modalities), modes=art.modes,
                   calibration=scores)
    return art, res, scores, acc


def calibrate_artifact(model_dir: str, data_root: str, split: str = "val", batch_size: int = 64,
                       num_workers: int = 0, label_key: Optional[str] = None) -> Dict:
    """Fit the temperatures of ``best/`` on ``split`` and write ``best/calibration.json`` (what training does when
    it finishes; for an artifact exported before calibration existed, or from a run stopped before its end)."""
    _, res, _, acc = _split_run(model_dir, data_root, split, batch_size, num_workers, label_key, fit=True)
    fitted = res["calibration"]["fit"]
    if acc.is_main_process:
        path = write_calibration(Path(model_dir), fitted, split)
        print("\n".join(ece_rows(fitted)), f"wrote {path}", sep="\n", flush=True)
    return fitted


def evaluate_artifact(model_dir: str, data_root: str, split: str = "test", batch_size: int = 64,
                      num_workers: int = 0, out: Optional[str] = None, label_key: Optional[str] = None,
                      target_precision: Optional[float] = None) -> Dict:
    """Metrics per mode of ``best/`` on a packed split, the calibration of its scores (ECE before / after the
    temperatures in ``best/calibration.json``, by input combination), the fused model's coverage at precision
    0.90 / 0.95 / 0.99 and, with ``target_precision``, the score threshold that reaches it on this split."""
    art, res, scores, acc = _split_run(model_dir, data_root, split, batch_size, num_workers, label_key, fit=False)
    modes = art.modes
    report = {m: summary(res[m]) for m in modes}
    report["calibration"] = {k: res["calibration"][k] for k in ("temperatures", "by_input", "coverage_at_precision")}
    if target_precision is not None:
        report["target_precision"] = {"precision": target_precision,
                                      "reached": threshold_for_precision(*scores.fused, target_precision)}
    report.update(split=split, model=str(model_dir), data=data_root, skipped_samples=res["skipped_samples"],
                  modality_influence=res["influence"], per_class={m: res[m]["per_class"] for m in modes},
                  confusion_matrix={m: res[m]["confusion_matrix"] for m in modes})
    if acc.is_main_process:
        print(format_table(res, title=f"[{split}] {model_dir}"), flush=True)
        print(format_calibration(report, split), flush=True)
        print(format_influence(res["influence"], split), flush=True)
    report["unused_modalities"] = competition.warn_unused(res, len(art.labels), split, log, acc.is_main_process)
    if acc.is_main_process:
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=2))
    return report


def evaluate_cli(args: argparse.Namespace) -> int:
    evaluate_artifact(args.model, args.data, args.split, args.batch_size, args.num_workers, args.out,
                      label_key=args.label_key, target_precision=args.target_precision)
    return 0


def calibrate_cli(args: argparse.Namespace) -> int:
    calibrate_artifact(args.model, args.data, args.split, args.batch_size, args.num_workers, label_key=args.label_key)
    return 0
