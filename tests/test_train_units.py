"""Fast in-process checks of the trainer's building blocks (schedule, loss, checkpoints, DeepSpeed config)."""
from __future__ import annotations

import json

import pytest
from torch import nn

from mmcat.config import ConfigError, TrainRunConfig, load_config


def _cfg(*overrides):
    return load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", *overrides])


class _Parts(nn.Module):
    """Three named parameter groups, like MultimodalClassifier.param_groups."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)

    def param_groups(self, lr_image, lr_text, lr_head, weight_decay):
        return [{"name": "image", "params": self.a.parameters(), "lr": lr_image},
                {"name": "text", "params": self.b.parameters(), "lr": lr_text},
                {"name": "head", "params": self.c.parameters(), "lr": lr_head}]


def test_schedule_warmup_cosine_and_backbone_freeze():
    from mmcat.train.optim import build_optimizer, build_scheduler

    cfg = _cfg("train.lr=1.0", "train.lr_image=0.1", "train.lr_text=0.01", "train.warmup_steps=4",
               "train.freeze_backbones_steps=3")
    opt = build_optimizer(_Parts(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert [lr["image"] for lr in lrs[:3]] == [0.0, 0.0, 0.0] and lrs[3]["image"] > 0  # frozen, then trains
    assert lrs[0]["head"] == pytest.approx(0.25) and lrs[3]["head"] == pytest.approx(1.0)  # warmup
    assert lrs[19]["head"] < 0.05 and lrs[10]["text"] == pytest.approx(0.01 * lrs[10]["head"])  # cosine, per part


def test_total_steps_counts_full_accumulation_windows():
    from mmcat.train.optim import total_optimizer_steps

    assert total_optimizer_steps(_cfg("train.epochs=3", "train.grad_accum=2"), batches_per_epoch=3) == 4
    assert total_optimizer_steps(_cfg("train.epochs=3", "train.max_steps=2"), batches_per_epoch=3) == 2


def test_loss_class_weights_and_label_smoothing():
    from mmcat.train.optim import build_loss

    loss = build_loss(_cfg("train.class_weights=true", "train.label_smoothing=0.1"), [30, 10])
    assert loss.weight.tolist() == pytest.approx([40 / 60, 40 / 20])  # inverse frequency, mean 1
    assert loss.label_smoothing == pytest.approx(0.1)
    assert build_loss(_cfg(), [30, 10]).weight is None


def test_resume_resolution_ignores_incomplete_checkpoints(tmp_path):
    from mmcat.train.checkpoint import STATE_FILE, resolve_resume

    root = tmp_path / "checkpoints"
    for name in ("step-2", "step-10", "step-12.tmp"):
        (root / name).mkdir(parents=True)
        (root / name / STATE_FILE).write_text("{}")
    assert resolve_resume("latest", root) == root / "step-10"  # numeric order; a .tmp is a crashed save
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):  # a fresh run over an old one
        resolve_resume("none", root)
    assert resolve_resume("none", tmp_path / "nothing") is None
    assert resolve_resume("latest", tmp_path / "nothing") is None  # a first (requeued) run starts fresh
    with pytest.raises(ConfigError, match="train.resume"):
        resolve_resume(str(tmp_path), root)


def test_deepspeed_plugin_fills_owned_values_and_refuses_disagreement(tmp_path, monkeypatch):
    from mmcat.train.accel import _deepspeed_plugin

    ds = json.loads(open("launch/deepspeed/zero3.json").read())
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    plugin = _deepspeed_plugin(_cfg("train.batch_size=8", "train.grad_accum=3", "train.clip_grad_norm=0.5",
                                    "train.precision=bf16"))
    c = plugin.deepspeed_config
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["gradient_clipping"]) == (8, 3, 0.5)
    assert c["bf16"]["enabled"] is True and c["data_types"]["buffer_dtype"] == "bf16"
    ds["bf16"]["enabled"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="'bf16.enabled' is True but train.precision is no"):
        _deepspeed_plugin(_cfg())


def test_fingerprint_of_an_older_checkpoint_without_a_newer_key_reads_as_that_keys_old_value(tmp_path):
    """model.text.trainable_layers joined the fingerprint later: checkpoints written before it trained the whole
    text encoder (-1), so they resume with -1 and are refused with anything else."""
    from mmcat.train.checkpoint import check_fingerprint, run_fingerprint

    current = run_fingerprint(_cfg(), 1, "accelerate", ["a", "b"], {"s-000000.tar": 4})
    older = {k: v for k, v in current.items() if k != "model.text.trainable_layers"}
    check_fingerprint(older, current, tmp_path)  # no error
    locked = run_fingerprint(_cfg("model.text.trainable_layers=2"), 1, "accelerate", ["a", "b"], {"s-000000.tar": 4})
    with pytest.raises(ConfigError, match="'model.text.trainable_layers' was -1 and is now 2"):
        check_fingerprint(older, locked, tmp_path)


UNWRAP_PROBE = """
import sys, torch
import torch.distributed as dist
from accelerate import Accelerator
from mmcat.train.accel import full_state_dict, unwrap

acc = Accelerator(cpu=True)
model = acc.prepare(torch.nn.Linear(3, 2))
assert unwrap(acc, model) is model
assert full_state_dict(acc, model).keys() == model.state_dict().keys()
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
ddp = torch.nn.parallel.DistributedDataParallel(model)
assert unwrap(acc, ddp) is model
assert all(torch.equal(a, b) for a, b in zip(full_state_dict(acc, ddp).values(), model.state_dict().values()))
dist.destroy_process_group()
print("deepspeed imported:", "deepspeed" in sys.modules)
"""


def test_unwrapping_outside_deepspeed_never_imports_deepspeed():
    """accelerate's unwrap_model imports deepspeed (3-5 s) whenever it is installed; mmcat's unwrap and
    full_state_dict find the model inside DDP without it, so a run that does not use DeepSpeed never pays that."""
    import subprocess
    import sys

    from train_helpers import child_env, free_port

    env = {k: v for k, v in child_env().items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run([sys.executable, "-c", UNWRAP_PROBE % free_port()], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "deepspeed imported: False", proc.stdout
