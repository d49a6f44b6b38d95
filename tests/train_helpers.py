"""Helpers for tests that run real `mmcat train` processes on tiny data (tiny ResNet input, tiny BERT)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = {
    "seed": 0,
    "data": {"image_size": 32, "max_text_length": 32, "num_workers": 1, "shuffle_buffer": 64},
    "model": {"image": {"name": "resnet18", "weights": "none"},
              "text": {"pretrained": False, "pooling": "mean"},
              "fusion": "gated", "hidden_dim": 32,
              # every remedy for modality competition on (aux heads are on by default), so the resume, DDP and
              # DeepSpeed tests cover their state (the running strengths) and their random numbers (OGM-GE noise)
              "modality_dropout_target": "stronger", "ogm_alpha": 0.5},
    "train": {"batch_size": 16, "epochs": 2, "lr": 3e-3, "lr_image": 3e-3, "lr_text": 3e-3, "log_every": 1,
              "warmup_steps": 2},
}


def write_config(path: Path, text_model: str, data_root: Path, output_dir: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["model"]["text"]["name"] = str(text_model)
    cfg["data"]["root"] = str(data_root)
    cfg["output_dir"] = str(output_dir)
    for dotted, value in sections.items():  # e.g. train__epochs=3
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def mmcat_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "mmcat", *args]


def torchrun_cmd(nproc: int, *args: str, nnodes: int = 1, node_rank: int = 0, port: Optional[int] = None) -> List[str]:
    port = port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=mmcat-test", "--max_restarts=0", "-m", "mmcat", *args]


def run(cmd: Sequence[str], timeout: int = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=kw.pop("env", child_env()),
                          cwd=kw.pop("cwd", ROOT), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> Dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def sizes(packed: Path, split: str = "train") -> Dict[str, int]:
    return json.loads((Path(packed) / split / "sizes.json").read_text())


def tb_scalars(run_dir: Path, tag: str = "train/loss") -> Dict[int, float]:
    """A scalar's values by step, over every TensorBoard event file of the run (a resumed run appends a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: Dict[int, float] = {}
    for events in sorted((Path(run_dir) / "tensorboard" / "mmcat").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def train_until_done(cmd: Sequence[str], max_invocations: int = 8, **kw) -> List[int]:
    """Run ``cmd`` (which resumes with train.resume=latest) until it exits 0; returns each invocation's exit code.
    Exit 75 means "stopped with a checkpoint, run me again"."""
    codes: List[int] = []
    while not codes or codes[-1] == 75:
        assert len(codes) < max_invocations, codes
        proc = run(cmd, check=False, **kw)
        codes.append(proc.returncode)
        if proc.returncode not in (0, 75):
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return codes


def assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = tb_scalars(resumed), tb_scalars(reference)
    assert sorted(got) == list(range(1, metrics(reference)["global_step"] + 1))  # every step logged, once
    assert got == want  # bit-identical losses (each the mean over the accumulation window and the ranks)
    for key in ("global_step", "samples_seen", "best_step", "final_weights_sha256"):
        assert metrics(resumed)[key] == metrics(reference)[key], key
    assert tb_scalars(resumed, "val/fused/macro_f1") == tb_scalars(reference, "val/fused/macro_f1")


def model_cfg(text_model: str, *overrides: str):
    """The model section of a small config (ResNet-18, the tiny BERT, hidden 16, no dropout) for in-process model
    tests; ``overrides`` are ``key=value`` strings."""
    from mmcat.config import TrainRunConfig, load_config

    return load_config(TrainRunConfig, None, ["model.image.name=resnet18", f"model.text.name={text_model}",
                                              "model.hidden_dim=16", "model.dropout=0.0", *overrides],
                       require_complete=False).model
