"""Exact resume, tested on content: a run stopped at optimizer-step boundaries (mid-epoch, at an epoch end, inside
an accumulation window that spans an epoch end, by Ctrl-C) and resumed must log the same loss at every step and end
with bit-identical weights as the uninterrupted run; changed settings are refused before any work."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from train_helpers import (ROOT, assert_same_run, child_env, metrics, mmcat_cmd, run, sizes, tb_scalars,
                           torchrun_cmd, train_until_done, write_config)

pytestmark = pytest.mark.slow


def test_stopped_every_3_steps_then_resumed_is_bit_identical(baseline_run, tiny_packed_dataset, tiny_text, tmp_path):
    """Stops at steps 3 (mid-epoch), 6 (the epoch's last step, before its evaluation and checkpoint) and 9."""
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run",
                       train__resume="latest", train__stop_after_steps=3)
    codes = train_until_done(mmcat_cmd("train", "--config", str(cfg)))
    assert codes == [75, 75, 75, 0]
    states = {p.name: json.loads((p / "trainer_state.json").read_text())
              for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert set(states) == {"step-9", "step-12"}  # keep_checkpoints=2
    assert_same_run(tmp_path / "run", baseline_run)


def test_resume_with_changed_settings_is_refused_before_work(baseline_run, tiny_packed_dataset, tiny_text, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, run_dir, train__resume="latest",
                       train__stop_after_steps=2)
    assert run(mmcat_cmd("train", "--config", str(cfg)), check=False).returncode == 75
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    changes = (("train.batch_size=8", "train.batch_size", "16", "8"),
               ("model.fusion=late", "model.fusion", "'gated'", "'late'"),
               ("data.num_workers=0", "data.num_workers", "1", "0"),
               ("model.text.trainable_layers=1", "model.text.trainable_layers", "-1", "1"))
    # one start with every change: one line names them all (a user fixes them at once, not one failed start each)
    proc = run(mmcat_cmd("train", "--config", str(cfg), *(c[0] for c in changes)), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len([ln for ln in lines if "error" in ln]) == 1, proc.stderr
    for _, key, old, new in changes:
        assert f"'{key}' was {old} and is now {new}" in lines[-1], lines[-1]
    assert lines[-1].count(" and is now ") == len(changes) and "the same values" in lines[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing was touched
    # what may change: more epochs continue the same run
    run(mmcat_cmd("train", "--config", str(cfg), "train.stop_after_steps=0", "train.epochs=3"))
    assert metrics(run_dir)["global_step"] == 18


def test_ctrl_c_checkpoints_at_the_step_and_resumes_exactly(baseline_run, tiny_packed_dataset, tiny_text, tmp_path):
    """Ctrl-C reaches the whole foreground process group (loader workers too): one line, exit 130, a checkpoint."""
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, run_dir, train__resume="latest")
    proc = subprocess.Popen(mmcat_cmd("train", "--config", str(cfg)), cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not list((run_dir / "tensorboard").rglob("events.out.tfevents.*")) or not tb_scalars(run_dir):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first step"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "continue with train.resume=latest" in err
    stopped_at = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert 1 <= stopped_at < 12
    run(mmcat_cmd("train", "--config", str(cfg)))
    assert_same_run(run_dir, baseline_run)


@pytest.fixture(scope="module")
def uneven_packed(tiny_raw_dataset, tmp_path_factory) -> Path:
    from mmcat.pack import pack

    from conftest import pack_config

    packed = tmp_path_factory.mktemp("uneven") / "packed"
    pack(pack_config(tiny_raw_dataset / "products.csv", packed, image_size=64, max_samples_per_shard=14))
    return packed


def test_torchrun_resume_inside_a_window_across_an_epoch_end(uneven_packed, tiny_text, tmp_path):
    """2 ranks, 7 shards, grad_accum 3, 4 micro-batches per epoch: step 2's window spans the end of epoch 0.
    Stopped after step 2, then resumed to the end: identical to the uninterrupted 2-rank run."""
    ref = write_config(tmp_path / "ref.yaml", tiny_text, uneven_packed, tmp_path / "ref", train__grad_accum=3,
                       train__epochs=3)
    run(torchrun_cmd(2, "train", "--config", str(ref)))
    m = metrics(tmp_path / "ref")
    # 4 micro-batches per rank and epoch (the fullest rank's 4 shards hold 56 samples): 12 over 3 epochs, 4 windows
    assert (m["global_step"], m["samples_seen"], m["world_size"]) == (4, 4 * 3 * 16 * 2, 2)
    for split in ("val", "test"):  # exact eval counts across ranks: every sample once, none duplicated
        assert m[split]["fused"]["num_samples"] == sum(sizes(uneven_packed, split).values())
    cfg = write_config(tmp_path / "stop.yaml", tiny_text, uneven_packed, tmp_path / "run", train__grad_accum=3,
                       train__epochs=3, train__resume="latest")
    # torchrun reports any failed child as 1; the ranks' own exit code (75: checkpointed, run me again) is in its
    # error summary
    proc = run(torchrun_cmd(2, "train", "--config", str(cfg), "train.stop_after_steps=2"), check=False)
    assert proc.returncode == 1 and re.search(r"exitcode\s*:\s*75", proc.stderr), proc.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)  # the window of step 2 crossed the epoch end
    run(torchrun_cmd(2, "train", "--config", str(cfg)))
    assert_same_run(tmp_path / "run", tmp_path / "ref")


def test_ranks_draw_different_dropout_masks_and_resume_draws_the_same():
    """Dropout and modality dropout draw from torch's global generator, which the trainer seeds per micro-batch."""
    from mmcat.train.loop import seed_step_rng

    def masks(rank: int, batch: int):
        seed_step_rng(0, rank, epoch=1, batch_in_epoch=batch)
        drop = torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True)
        return drop, torch.rand(64)

    r0, r1, r0_again = masks(0, 5), masks(1, 5), masks(0, 5)
    assert not torch.equal(r0[0], r1[0]) and not torch.equal(r0[1], r1[1])
    assert torch.equal(r0[0], r0_again[0]) and torch.equal(r0[1], r0_again[1])
    assert not torch.equal(masks(0, 6)[0], r0[0])


def test_evaluation_stops_when_a_stop_is_requested(tiny_packed_dataset, tiny_text):
    """A preemption during a long validation returns None after the current batch (the trainer checkpoints)."""
    from accelerate import Accelerator

    from mmcat.config import TrainRunConfig, load_config
    from mmcat.data import build_eval_loader, read_labels
    from mmcat.evaluation import dummy_batch, evaluate
    from mmcat.models import build_model
    from mmcat.models.text import load_tokenizer

    cfg = load_config(TrainRunConfig, None, [f"data.root={tiny_packed_dataset}", "output_dir=/tmp/unused",
                                             f"model.text.name={tiny_text}", "model.text.pretrained=false",
                                             "model.image.name=resnet18", "data.image_size=32"])
    labels, tok = read_labels(cfg.data), load_tokenizer(cfg.model.text)
    model, acc = build_model(cfg.model, len(labels)), Accelerator(cpu=True)
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    loader = build_eval_loader(cfg.data, "val", tok, batch_size=2, num_workers=0)
    assert evaluate(model, loader, acc, labels, dummy_batch(tok, 32), stop_requested=stop_after_two) is None
    assert len(calls) == 3 and model.training
    full = evaluate(model, build_eval_loader(cfg.data, "val", tok, batch_size=2, num_workers=0), acc, labels,
                    dummy_batch(tok, 32))
    assert full["fused"]["num_samples"] > 4


def test_logged_loss_is_the_window_mean_and_grad_norm_is_logged(tiny_packed_dataset, tiny_text, tmp_path):
    """With every learning rate 0 the weights never change, so the loss logged for a window of 2 micro-batches
    must be the mean of the losses logged for the same 2 micro-batches without accumulation."""
    frozen = dict(train__epochs=1, train__lr=0.0, train__lr_image=0.0, train__lr_text=0.0)
    single = write_config(tmp_path / "a.yaml", tiny_text, tiny_packed_dataset, tmp_path / "a", **frozen)
    window = write_config(tmp_path / "b.yaml", tiny_text, tiny_packed_dataset, tmp_path / "b",
                          train__grad_accum=2, **frozen)
    run(mmcat_cmd("train", "--config", str(single)))
    run(mmcat_cmd("train", "--config", str(window)))
    per_batch, per_window = tb_scalars(tmp_path / "a"), tb_scalars(tmp_path / "b")
    assert sorted(per_batch) == list(range(1, 7)) and sorted(per_window) == [1, 2, 3]
    for step, loss in per_window.items():
        assert loss == pytest.approx((per_batch[2 * step - 1] + per_batch[2 * step]) / 2, rel=1e-6), step
    norms = tb_scalars(tmp_path / "b", "train/grad_norm")
    assert sorted(norms) == [1, 2, 3] and all(n > 0 for n in norms.values())


def test_early_stop_at_an_epoch_end_inside_a_window_never_checkpoints_half_a_window(tiny_packed_dataset, tiny_text,
                                                                                    tmp_path):
    """6 micro-batches per epoch, windows of 5: both epoch ends fall inside a window. lr 0 makes the second
    evaluation flat, so patience 1 stops the run; every checkpoint must lie on a window boundary."""
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run", train__epochs=5,
                       train__grad_accum=5, train__lr=0.0, train__lr_image=0.0, train__lr_text=0.0,
                       train__early_stopping_patience=1, train__keep_checkpoints=0)
    proc = run(mmcat_cmd("train", "--config", str(cfg)))
    assert "early stopping at step 3" in proc.stderr
    saved = {}
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step-*"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        saved[state["global_step"]] = state["epoch"] * 6 + state["batch_in_epoch"]  # micro-batches consumed
    assert saved == {2: 10, 3: 15}  # steps x window: no checkpoint holds part of a window
    assert metrics(tmp_path / "run")["global_step"] == 3
