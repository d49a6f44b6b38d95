"""Loader workers that live for the whole run (issue 15): one train DataLoader and one eval DataLoader per split,
reused across epochs and evaluations, must give exactly the batches that a fresh loader per epoch gives (the
exact-resume and epoch-coverage guarantees), and their workers must still end with the run or an abandoned
iteration."""
from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import webdataset as wds

from _shards import write_packed
from mmcat.config import TrainRunConfig, load_config
from mmcat.data import build_eval_loader, build_train_loader
from mmcat.data.loader import PersistentTrainLoader, close_loader, iterate_batches
from mmcat.models import load_tokenizer
from mmcat.models.tiny import make_tiny_text_model
from train_helpers import ROOT, child_env, mmcat_cmd, write_config

UNEVEN = [9, 2, 5, 1, 7, 3, 6, 4]  # 37 samples, very uneven shards
VAL = [5, 4, 6]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tiny = make_tiny_text_model(tmp_path_factory.mktemp("tiny_text"), weights=False)
    return load_tokenizer(load_config(TrainRunConfig, None, [f"model.text.name={tiny}"],
                                      require_complete=False).model.text)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_packed(root, {"train": UNEVEN, "val": VAL}, missing_every=5)
    return root


def make_cfg(root, *overrides):
    return load_config(TrainRunConfig, None, [f"data.root={root}", "output_dir=/unused", "data.image_size=32",
                                              "train.batch_size=3", "data.num_workers=2", "data.shuffle_buffer=8",
                                              *overrides])


def split_keys(root: Path, split: str) -> list:
    """The split's sample keys, read with plain webdataset (no mmcat code)."""
    urls = sorted(str(p) for p in (root / split).glob("*.tar"))
    return [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]


def documented_repeats(shard_sizes, batch, ranks, workers):
    """README "Data pipeline": G x Q x batch samples per epoch, Q = ceil(sum of the ceil(S / G) largest / batch)."""
    groups = ranks * workers
    largest = sorted(shard_sizes, reverse=True)[: math.ceil(len(shard_sizes) / groups)]
    return groups * math.ceil(sum(largest) / batch) * batch - sum(shard_sizes)


def workers_alive(since: set) -> set:
    """PIDs of this process's live children that were not there before (the loader workers)."""
    return {p.pid for p in psutil.Process().children() if p.pid not in since and p.status() != psutil.STATUS_ZOMBIE}


def gone(pids) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def same_batches(got, want) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for a, b in zip(got, want):
        for name in ("pixel_values", "input_ids", "labels", "has_image", "has_text"):
            assert torch.equal(a[name], b[name]), name  # augmentation seeds included


def test_workers_persist_across_epochs_and_evaluations_with_the_fresh_loaders_batches(data, tokenizer):
    cfg = make_cfg(data)
    before = {p.pid for p in psutil.Process().children()}
    run = PersistentTrainLoader()
    want_keys = set(split_keys(data, "train"))
    pids = []
    try:
        for epoch in range(3):
            info = run(cfg, tokenizer, 0, 1, epoch=epoch)
            with iterate_batches(info.loader) as it:
                got = list(it)
            pids.append(workers_alive(before))
            fresh = build_train_loader(cfg, tokenizer, 0, 1, epoch=epoch)
            same_batches(got, list(fresh.loader))
            assert len(got) == info.batches_per_epoch == len(info.loader) == fresh.batches_per_epoch
            keys = [k for b in got for k in b["keys"]]
            assert set(keys) == want_keys  # every sample of the split, every epoch
            assert len(keys) - len(want_keys) == documented_repeats(UNEVEN, 3, 1, 2)  # the only repeats
            assert info.rank_shards == fresh.rank_shards
        assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]  # the same two workers, every epoch

        val = build_eval_loader(cfg.data, "val", tokenizer, batch_size=4, num_workers=2, persistent=True)
        fresh_val = list(build_eval_loader(cfg.data, "val", tokenizer, batch_size=4, num_workers=2))
        evals = []
        for _ in range(2):
            with iterate_batches(val) as it:
                same_batches(list(it), fresh_val)  # fixed order, partial last batch
            evals.append(workers_alive(before | pids[0]))
        assert sorted(k for b in fresh_val for k in b["keys"]) == sorted(split_keys(data, "val"))
        assert len(evals[0]) == 2 and evals[0] == evals[1]
        assert workers_alive(before) == pids[0] | evals[0]  # the train workers stayed up during the evaluations
    finally:
        run.close()
        close_loader(val)
    assert gone(pids[0] | evals[0]) and not workers_alive(before)


def test_resumed_epoch_then_full_epochs_through_the_same_workers(data, tokenizer):
    """The first epoch after a resume is shorter (skip_batches); the live workers must learn both the skip and the
    full length of the next epoch."""
    cfg = make_cfg(data)
    before = {p.pid for p in psutil.Process().children()}
    run = PersistentTrainLoader()
    try:
        full = list(build_train_loader(cfg, tokenizer, 0, 1, epoch=1).loader)
        skip = len(full) // 2 + 1  # lands on a different worker than batch 0
        info = run(cfg, tokenizer, 0, 1, epoch=1, skip_batches=skip)
        assert len(info.loader) == len(full) - skip and info.skip_batches == skip
        with iterate_batches(info.loader) as it:
            same_batches(list(it), full[skip:])
        first = workers_alive(before)
        info = run(cfg, tokenizer, 0, 1, epoch=2)
        assert len(info.loader) == info.batches_per_epoch == len(full)
        with iterate_batches(info.loader) as it:
            same_batches(list(it), list(build_train_loader(cfg, tokenizer, 0, 1, epoch=2).loader))
        assert len(first) == 2 and workers_alive(before) == first
    finally:
        run.close()
    assert gone(first)


def test_abandoned_iteration_stops_the_workers_and_the_next_epoch_starts_fresh_ones(data, tokenizer):
    cfg = make_cfg(data)
    before = {p.pid for p in psutil.Process().children()}
    run = PersistentTrainLoader()
    try:
        with iterate_batches(run(cfg, tokenizer, 0, 1, epoch=0).loader) as it:
            next(it)  # a preemption or an early stop after one batch
            abandoned = workers_alive(before)
        assert len(abandoned) == 2 and gone(abandoned)
        with iterate_batches(run(cfg, tokenizer, 0, 1, epoch=1).loader) as it:
            same_batches(list(it), list(build_train_loader(cfg, tokenizer, 0, 1, epoch=1).loader))
            assert len(workers_alive(before)) == 2
    finally:
        run.close()
    assert not workers_alive(before)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_few_or_no_workers(data, tokenizer, num_workers):
    cfg = make_cfg(data, f"data.num_workers={num_workers}")
    run = PersistentTrainLoader()
    try:
        for epoch, skip in ((0, 2), (1, 0)):
            info = run(cfg, tokenizer, 0, 1, epoch=epoch, skip_batches=skip)
            want = list(build_train_loader(cfg, tokenizer, 0, 1, epoch=epoch, skip_batches=skip).loader)
            with iterate_batches(info.loader) as it:
                same_batches(list(it), want)
    finally:
        run.close()


def session_pids(sid: int, forked_only: bool = False) -> set:
    """The processes of session ``sid``; with ``forked_only``, those forked from the trainer (its loader workers keep
    its command line), not short-lived helpers a library runs (at import, cuda.pathfinder runs ``ldconfig -p``)."""
    out, leader = set(), None
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid:
                out.add(p.pid)
                leader = p.info["cmdline"] if p.pid == sid else leader
        except (ProcessLookupError, PermissionError):
            pass
    if forked_only:
        out = {pid for pid in out if _cmdline(pid) == leader}
    return out


def _cmdline(pid: int):
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None


@pytest.mark.slow
def test_trainer_reuses_its_workers_and_leaves_none_behind(tiny_packed_dataset, tiny_text, tmp_path):
    """Evaluations at steps 2 and 4 of a 6-step epoch; lr 0 keeps the second flat, so early stopping ends the run
    mid-epoch, then the final val and test passes run. With persistent workers that is one train worker, one val
    worker and one test worker (a fresh loader per evaluation starts 5); when the trainer exits, none of them is
    left. A run stopped mid-epoch by train.stop_after_steps leaves none either."""
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run", train__epochs=1,
                       train__eval_every=2, train__lr=0.0, train__lr_image=0.0, train__lr_text=0.0,
                       train__early_stopping_patience=1)
    for extra, code in (((), 0), (("output_dir=" + str(tmp_path / "stopped"), "train.stop_after_steps=1"), 75)):
        proc = subprocess.Popen(mmcat_cmd("train", "--config", str(cfg), *extra), cwd=ROOT, env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        seen = set()
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            seen |= session_pids(proc.pid, forked_only=True) - {proc.pid}
            time.sleep(0.05)
        err = proc.communicate(timeout=max(1, deadline - time.time()))[1]
        assert proc.returncode == code, err[-3000:]
        assert not session_pids(proc.pid), "processes of the trainer outlived it"
        assert seen and gone(seen)
        if code == 0:
            assert "early stopping at step 4" in err
            assert len(seen) <= 3, f"{len(seen)} worker processes: loaders were rebuilt"
