"""``mmcat eval``: fused / image-only / text-only metrics of a deployable artifact on a packed split."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional

from accelerate import Accelerator

from mmcat.artifact import load_artifact
from mmcat.evaluation import dummy_batch, evaluate
from mmcat.metrics import MODES, format_table, summary
from mmcat.train.accel import multi_cpu_ddp, process_group_kwargs


def evaluate_artifact(model_dir: str, data_root: str, split: str = "test", batch_size: int = 64,
                      num_workers: int = 0, out: Optional[str] = None) -> Dict:
    from mmcat.config import ConfigError
    from mmcat.data import build_eval_loader, read_labels

    acc = Accelerator(cpu=multi_cpu_ddp(), kwargs_handlers=process_group_kwargs())
    art = load_artifact(model_dir, device=acc.device)
    data_cfg = art.cfg.data.copy()
    data_cfg.root = data_root
    data_cfg.labels_file = None
    if read_labels(data_cfg) != art.labels:  # label indices in the shards must mean what the model's outputs mean
        raise ConfigError(f"{data_root}: labels.json differs from the model's labels ({model_dir}/labels.json)")
    loader = build_eval_loader(data_cfg, split, art.tokenizer, batch_size, num_workers,
                               rank=acc.process_index, world_size=acc.num_processes)
    res = evaluate(art.model, loader, acc, art.labels, dummy_batch(art.tokenizer, data_cfg.image_size))
    report = {m: summary(res[m]) for m in MODES}
    report.update(split=split, model=str(model_dir), data=data_root, skipped_samples=res["skipped_samples"],
                  per_class={m: res[m]["per_class"] for m in MODES},
                  confusion_matrix={m: res[m]["confusion_matrix"] for m in MODES})
    if acc.is_main_process:
        print(format_table(res, title=f"[{split}] {model_dir}"), flush=True)
        if out:
            Path(out).write_text(json.dumps(report, indent=2))
    return report


def evaluate_cli(args: argparse.Namespace) -> int:
    evaluate_artifact(args.model, args.data, args.split, args.batch_size, args.num_workers, args.out)
    return 0
