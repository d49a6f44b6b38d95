"""The slurm/ scripts on a real single-node SLURM cluster (started by tools/local_slurm.sh, CPU only).

- pack.sbatch as a 2-task job array + the dependent merge == one plain `mmcat pack`;
- train.sbatch: 2 CPU processes (torchrun + gloo) on one node -> metrics.json;
- preemption: `scancel --signal=USR1 --batch` -> checkpoint, requeue (SLURM_RESTART_COUNT=1), resume from that
  checkpoint, finish at the step and sample count of an uninterrupted run;
- an invalid config fails the job at once (exit 2), without starting a node or requeueing.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
import webdataset as wds

from train_helpers import assert_same_run, free_port, metrics, run, sizes, torchrun_cmd, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
PACK_OPTS = ["--image-size", "32", "--max-samples-per-shard", "4", "--workers", "1"]  # >= 2 shards per split for 2 ranks


@dataclass
class Cluster:
    dir: Path
    env: Dict[str, str]

    def run(self, *cmd: str, timeout: float = 60, check: bool = True, cwd: Path | None = None,
            env: Dict[str, str] | None = None):
        proc = subprocess.run(list(cmd), env=env or self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def jobs(self, job_id: str) -> List[Dict[str, str]]:
        """`scontrol show job -o` as dicts: one per job (an array job gives one per task). No slurmdbd here."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float, logs: List[Path] = ()) -> List[Dict[str, str]]:
        """Wait until every job/task of `job_id` is in a terminal state; fail with the logs on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(job_id)
            if jobs and all(j["JobState"] in TERMINAL for j in jobs):
                return jobs
            time.sleep(0.3)
        pytest.fail(f"job {job_id} not finished after {timeout}s: {[j.get('JobState') for j in self.jobs(job_id)]}\n"
                    + dump_logs(logs))


def dump_logs(paths) -> str:
    out = []
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:
            if f.is_file() and f.suffix in (".log", ".out"):
                out.append(f"----- {f}\n{f.read_text(errors='replace')[-6000:]}")
    return "\n".join(out)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    """A real slurmctld + slurmd + munged for this session, stopped (by PID file) at the end."""
    subprocess.run(["bash", str(LOCAL_SLURM), "ensure-installed"], check=True, timeout=900)
    d = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(d)], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, f"local SLURM did not start:\n{start.stdout}\n{start.stderr}"
    m = re.search(r"export SLURM_CONF=(\S+)", start.stdout)
    assert m, start.stdout
    env = dict(os.environ)
    env["SLURM_CONF"] = m.group(1)
    # jobs inherit the submitting environment (sbatch --export=ALL): make them use this interpreter's venv
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MMCAT_PYTHON"] = sys.executable
    env["PYTHONUNBUFFERED"] = "1"
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MMCAT_RUN", "MMCAT_CONFIG"))]:
        if var != "SLURM_CONF":
            env.pop(var)
    cluster = Cluster(d, env)
    try:
        yield cluster
    finally:
        stop = subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(d)], capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        status = subprocess.run(["bash", str(LOCAL_SLURM), "status", str(d)], capture_output=True, text=True)
        assert status.returncode == 1 and "running (pid" not in status.stdout, status.stdout


@pytest.fixture(scope="session")
def raw_products(tiny_raw_dataset) -> Path:
    return tiny_raw_dataset / "products.csv"  # conftest's 120 products, 4 classes


@pytest.fixture(scope="session")
def packed(raw_products, tmp_path_factory) -> Path:
    """The same table packed at once, without SLURM: the reference, and the training data."""
    out = tmp_path_factory.mktemp("slurm_packed") / "ds"
    subprocess.run([sys.executable, "-m", "mmcat", "pack", str(raw_products), "--out", str(out), *PACK_OPTS],
                   check=True, timeout=300)
    return out


# ------------------------------------------------------------------------------------------------ packing
def read_split(split_dir: Path) -> Dict[str, Dict[str, bytes]]:
    """All samples of a split, by key, from the shards its sizes.json lists (each shard read exactly once)."""
    sizes = json.loads((split_dir / "sizes.json").read_text())
    samples: Dict[str, Dict[str, bytes]] = {}
    for shard, n in sizes.items():
        in_shard = list(wds.tarfile_samples(iter([{"url": str(split_dir / shard)}])))  # webdataset's own grouping
        for sample in in_shard:
            samples[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert len(in_shard) == n, f"{shard}: sizes.json says {n}, tar has {len(in_shard)}"
    return samples


def test_pack_array_and_merge_equal_single_pack(slurm_cluster, raw_products, packed, tmp_path):
    out = tmp_path / "sliced"
    sub = slurm_cluster.run("bash", str(REPO / "slurm" / "submit_pack.sh"), str(raw_products), str(out), "2",
                            *PACK_OPTS, cwd=tmp_path)
    ids = dict(line.split("=", 1) for line in sub.stdout.split())
    assert set(ids) == {"pack_job", "merge_job"}, sub.stdout

    tasks = slurm_cluster.wait(ids["pack_job"], timeout=240, logs=[out / "logs"])
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    assert {t["JobState"] for t in tasks} == {"COMPLETED"}, dump_logs([out / "logs"])
    (merge,) = slurm_cluster.wait(ids["merge_job"], timeout=120, logs=[out / "logs"])
    assert merge["JobState"] == "COMPLETED", dump_logs([out / "logs"])
    # afterok: the merge started only after the last slice ended (scontrol times have 1 s resolution)
    assert merge["StartTime"] >= max(t["EndTime"] for t in tasks)

    # each array task packed its own slice into its own shard names
    logs = dump_logs([out / "logs"])
    assert "slice 0 of 2" in logs and "slice 1 of 2" in logs, logs

    assert json.loads((out / "labels.json").read_text()) == json.loads((packed / "labels.json").read_text())
    ref_manifest = json.loads((packed / "manifest.json").read_text())
    got_manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        ref, got = read_split(packed / split), read_split(out / split)
        assert len(ref) > 0
        assert sorted(got) == sorted(ref), f"{split}: different sample keys"
        assert got == ref, f"{split}: same keys but different sample bytes"
        for field in ("samples", "label_counts"):
            assert got_manifest["splits"][split][field] == ref_manifest["splits"][split][field], (split, field)


# ----------------------------------------------------------------------------------------------- training
BATCH, NPROC = 4, 2


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> str:
    from mmcat.models.tiny import make_tiny_text_model

    return make_tiny_text_model(tmp_path_factory.mktemp("slurm_tiny_bert"))


def train_config(tmp_path: Path, tiny_text: str, packed: Path, **train) -> Path:
    """train_helpers' tiny config, smaller still (batch 4, 32 px) so that a 2-process step takes ~1 s here."""
    sections = {f"train__{k}": v for k, v in dict(batch_size=BATCH, epochs=50, log_every=1, **train).items()}
    return write_config(tmp_path / "train.yaml", tiny_text, packed, tmp_path / "run", data__max_text_length=16,
                        data__shuffle_buffer=16, model__hidden_dim=16, **sections)


def submit_train(cluster: Cluster, tmp_path: Path, config: Path, *overrides: str) -> str:
    # a free rendezvous port: the default (20000 + job id) would collide with a second test session's cluster,
    # whose job ids also start at 1
    env = dict(cluster.env, MMCAT_NPROC_PER_NODE=str(NPROC), MMCAT_MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    sub = cluster.run("sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", str(REPO / "slurm" / "train.sbatch"),
                      "--config", str(config), *overrides, cwd=tmp_path, env=env)
    return sub.stdout.strip().split(";")[0]


def uninterrupted_counts(packed: Path, max_steps: int) -> tuple:
    """(global_step, samples_seen) of an uninterrupted run: every rank sees full batches (the loader loops over
    its shards), so each optimizer step is BATCH x NPROC samples; max_steps must end before the epochs do."""
    per_rank_batches = math.ceil(sum(sizes(packed).values()) / (BATCH * NPROC))
    assert max_steps < per_rank_batches * 50, "the test's max_steps must be reached before the last epoch ends"
    return max_steps, max_steps * BATCH * NPROC


def test_train_two_cpu_processes(slurm_cluster, packed, tiny_text, tmp_path):
    run_dir = tmp_path / "run"
    config = train_config(tmp_path, tiny_text, packed, max_steps=4, eval_every=4, save_every=0)
    job = submit_train(slurm_cluster, tmp_path, config, "train.lr=0.002")
    logs = [run_dir / "logs", tmp_path]
    (info,) = slurm_cluster.wait(job, timeout=300, logs=logs)
    assert info["JobState"] == "COMPLETED", dump_logs(logs)
    assert info["Restarts"] == "0"

    m = metrics(run_dir)
    assert m["world_size"] == NPROC, "expected 2 processes (torchrun, gloo) on the one node"
    assert (m["global_step"], m["samples_seen"]) == uninterrupted_counts(packed, 4)
    assert m["test"]["fused"]["num_samples"] == sum(sizes(packed, "test").values())
    assert (run_dir / "config.yaml").read_text().count("lr: 0.002") == 1, "override after the script was ignored"
    batch_log = (run_dir / "logs" / job / "batch.log").read_text()
    assert "1 node(s) x 2 = 2 process(es)" in batch_log and "training finished" in batch_log
    assert "requeueing" not in batch_log
    assert (run_dir / "logs" / job / "node-0.log").is_file()


def test_preempted_job_requeues_and_resumes(slurm_cluster, packed, tiny_text, tmp_path):
    run_dir = tmp_path / "run"
    total, first_save = 16, 4  # ~1 s a step: 12 steps of margin for the signal to land before the end
    config = train_config(tmp_path, tiny_text, packed, max_steps=total, eval_every=total, save_every=first_save,
                          keep_checkpoints=5)
    job = submit_train(slurm_cluster, tmp_path, config)
    logs = [run_dir / "logs", tmp_path]

    # the first periodic checkpoint proves the training loop (and its signal handler) is running
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / f"step-{first_save}").is_dir():
        states = [j["JobState"] for j in slurm_cluster.jobs(job)]
        if time.monotonic() > deadline or any(s in TERMINAL for s in states):
            pytest.fail(f"no first checkpoint (job {states})\n" + dump_logs(logs))
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)

    # requeued: the same job id runs again with SLURM_RESTART_COUNT=1 and finishes normally
    (info,) = slurm_cluster.wait(job, timeout=300, logs=logs)
    assert info["JobState"] == "COMPLETED", dump_logs(logs)
    assert info["Restarts"] == "1", dump_logs(logs)

    batch_log = (run_dir / "logs" / job / "batch.log").read_text()
    first, sep, second = batch_log.partition(f"job {job} restart 1 on ")
    assert sep, "the job did not run again with SLURM_RESTART_COUNT=1\n" + dump_logs(logs)
    assert "got USR1" in first and f"requeueing job {job}" in first and "training finished" not in first
    assert "train.resume=latest" not in first, "the first run must start fresh"
    assert "train.resume=latest" in second.splitlines()[0], "the requeued run was not told to resume"
    assert second.count("training finished") == 1 and "requeueing" not in second

    node_log = (run_dir / "logs" / job / "node-0.log").read_text()
    first, sep, second = node_log.partition("] restart 1: ")  # the srun task prints SLURM_RESTART_COUNT too
    assert sep, dump_logs(logs)
    m = re.search(r"stopped \(SIG(?:USR1|TERM)\) at step (\d+): checkpoint saved in \S+; exiting for requeue \(exit 75\)",
                  first)
    assert m, "the trainer did not checkpoint on the forwarded signal\n" + dump_logs(logs)
    stopped_at = int(m.group(1))
    assert first_save <= stopped_at < total
    assert (run_dir / "checkpoints" / f"step-{stopped_at}" / "trainer_state.json").is_file()
    assert "resumed from" not in first
    assert re.search(rf"resumed from \S*step-{stopped_at} \(step {stopped_at}, epoch \d+, batch \d+\)", second), \
        dump_logs(logs)

    m = metrics(run_dir)
    assert (m["global_step"], m["samples_seen"]) == uninterrupted_counts(packed, total), m
    assert m["world_size"] == NPROC
    # content, not counters: the same loss at every step and bit-identical weights as an uninterrupted 2-process run
    run(torchrun_cmd(NPROC, "train", "--config", str(config), f"output_dir={tmp_path / 'reference'}"))
    assert_same_run(run_dir, tmp_path / "reference")
    # the batch output file was appended across the requeue, not truncated
    out = (tmp_path / f"mmcat-train-{job}.out").read_text()
    assert f"job {job} restart 0" in out and f"job {job} restart 1" in out


def test_bad_config_fails_fast_without_requeue(slurm_cluster, packed, tiny_text, tmp_path):
    config = train_config(tmp_path, tiny_text, packed, max_steps=2)
    job = submit_train(slurm_cluster, tmp_path, config, "train.no_such_key=1")
    (info,) = slurm_cluster.wait(job, timeout=60, logs=[tmp_path])
    out = (tmp_path / f"mmcat-train-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", out
    assert info["Restarts"] == "0"
    assert "train.no_such_key" in out, out
    assert not (tmp_path / "run").exists(), "no node may start on an invalid config"
