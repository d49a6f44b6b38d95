"""End-to-end training on CPU with real processes: single process, torchrun (gloo), preemption + resume,
corrupt shards, every fusion head, artifact reload, `mmcat eval`."""
from __future__ import annotations

import io
import json
import math
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from train_helpers import ROOT, assert_same_run, child_env, metrics, mmcat_cmd, run, sizes, write_config

pytestmark = pytest.mark.slow


def _expected_steps(packed: Path, batch: int, world: int, workers: int, epochs: int, accum: int = 1):
    # every worker of every rank yields as many batches as the fullest possible worker needs (its ceil(S/G) largest
    # shards), so that no worker drops samples and all ranks step together
    shard_sizes = sorted(sizes(packed).values(), reverse=True)
    fullest = sum(shard_sizes[:math.ceil(len(shard_sizes) / (world * workers))])
    per_rank_batches = math.ceil(fullest / batch) * workers
    steps = per_rank_batches * epochs // accum  # full accumulation windows, carried across epoch ends
    return steps, steps * accum * batch * world


def test_single_process_run_dir_contract(baseline_run, tiny_packed_dataset):
    steps, samples = _expected_steps(tiny_packed_dataset, batch=16, world=1, workers=1, epochs=2)
    m = metrics(baseline_run)
    assert (m["global_step"], m["samples_seen"], m["world_size"]) == (steps, samples, 1)
    for split in ("val", "test"):
        for mode in ("fused", "image_only", "text_only"):
            assert set(m[split][mode]) >= {"accuracy", "macro_f1", "weighted_f1"}
            assert m[split][mode]["num_samples"] == sum(sizes(tiny_packed_dataset, split).values())
    assert (baseline_run / "config.yaml").is_file()
    best = baseline_run / "best"
    for name in ("model.safetensors", "config.yaml", "labels.json", "text_encoder/config.json", "tokenizer"):
        assert (best / name).exists(), name
    ckpts = sorted((p.name for p in (baseline_run / "checkpoints").iterdir()), key=lambda n: int(n.split("-")[1]))
    assert ckpts == [f"step-{steps // 2}", f"step-{steps}"]  # saved each epoch, keep_checkpoints=2
    assert list((baseline_run / "tensorboard").rglob("events.out.tfevents.*"))


def test_artifact_reload_gives_identical_predictions(baseline_run, tiny_packed_dataset):
    """best/ must hold exactly the trained weights: compare with the checkpoint of the same step."""
    from safetensors.torch import load_file

    from mmcat.artifact import load_artifact
    from mmcat.data import build_eval_loader
    from mmcat.models import build_model

    art = load_artifact(baseline_run / "best")
    best_step = metrics(baseline_run)["best_step"]
    trained = build_model(art.cfg.model, len(art.labels))
    trained.load_state_dict(load_file(str(baseline_run / "checkpoints" / f"step-{best_step}" / "model.safetensors")))
    trained.eval()
    again = load_artifact(baseline_run / "best").model
    data_cfg = art.data_config(tiny_packed_dataset)  # best/ does not say where the training data was
    batch = next(iter(build_eval_loader(data_cfg, "test", art.tokenizer, batch_size=8, num_workers=0)))
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["has_image"], batch["has_text"])
    with torch.no_grad():
        a, b, c = art.model(*args), trained(*args), again(*args)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # sanity: real, input-dependent predictions


def test_artifact_config_holds_what_inference_needs_only(baseline_run, tiny_packed_dataset, tmp_path):
    """best/config.yaml: the model section and the preprocessing, nothing of the training machine (data.root,
    output_dir, train). An artifact written before that (the whole run config in best/config.yaml) still loads and
    predicts the same."""
    from mmcat.artifact import load_artifact
    from mmcat.data import build_eval_loader

    best = baseline_run / "best"
    written = yaml.safe_load((best / "config.yaml").read_text())
    run_cfg = yaml.safe_load((baseline_run / "config.yaml").read_text())
    assert set(written) == {"model", "data"} and written["model"] == run_cfg["model"]
    assert written["data"] == {k: run_cfg["data"][k] for k in ("image_size", "min_crop_scale", "max_text_length",
                                                               "label_key", "uint8_pixels")}
    assert str(tiny_packed_dataset) not in (best / "config.yaml").read_text()

    old = tmp_path / "old_best"
    shutil.copytree(best, old)
    shutil.copyfile(baseline_run / "config.yaml", old / "config.yaml")  # the old format: the full run config
    new_art, old_art = load_artifact(best), load_artifact(old)
    assert old_art.cfg == new_art.cfg
    batch = next(iter(build_eval_loader(new_art.data_config(tiny_packed_dataset), "test", new_art.tokenizer,
                                        batch_size=8, num_workers=0)))
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["has_image"], batch["has_text"])
    with torch.no_grad():
        assert torch.equal(new_art.model(*args), old_art.model(*args))


def test_eval_cli_matches_training_metrics(baseline_run, tiny_packed_dataset, tmp_path):
    out = tmp_path / "m.json"
    proc = run(mmcat_cmd("eval", "--model", str(baseline_run / "best"), "--data", str(tiny_packed_dataset),
                         "--split", "test", "--out", str(out)))
    assert "image_only" in proc.stdout and "text_only" in proc.stdout
    got, want = json.loads(out.read_text()), metrics(baseline_run)["test"]
    for mode in ("fused", "image_only", "text_only"):
        assert got[mode]["accuracy"] == pytest.approx(want[mode]["accuracy"])
        assert got[mode]["num_samples"] == want[mode]["num_samples"]


def test_preempt_mid_epoch_then_resume_matches_uninterrupted(baseline_run, tiny_packed_dataset, tiny_text, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, run_dir, train__resume="latest")
    proc = subprocess.Popen(mmcat_cmd("train", "--config", str(cfg)), cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-6").is_dir():  # end of epoch 1
        assert proc.poll() is None and time.time() < deadline, "training ended before the first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert not (run_dir / "metrics.json").exists()
    latest = max((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["batch_in_epoch"] < 6, state  # stopped mid-epoch

    run(mmcat_cmd("train", "--config", str(cfg)))  # train.resume=latest picks it up
    assert_same_run(run_dir, baseline_run)  # same loss at every step, bit-identical final weights


def _corrupt_first_jpeg(shard: Path) -> str:
    """Rewrite a shard with its first JPEG replaced by garbage bytes; returns that sample's key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    tmp = shard.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as out:
        for m, data in members:
            if m.name == victim:
                data = b"\xff\xd8\xff\xe0 this is not a jpeg" * 4
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    tmp.replace(shard)
    return victim.rsplit(".", 1)[0]


def test_corrupt_sample_is_skipped_and_counted_or_fails_in_strict_mode(tiny_packed_dataset, tiny_text, tmp_path):
    packed = tmp_path / "packed"
    shutil.copytree(tiny_packed_dataset, packed)
    for shard in sorted((packed / "train").glob("*.tar")):
        _corrupt_first_jpeg(shard)
    cfg = write_config(tmp_path / "train.yaml", tiny_text, packed, tmp_path / "run", train__epochs=1)
    run(mmcat_cmd("train", "--config", str(cfg)))
    assert metrics(tmp_path / "run")["skipped_samples"] >= 1

    strict = run(mmcat_cmd("train", "--config", str(cfg), f"output_dir={tmp_path / 'strict'}", "data.strict=true"),
                 check=False)
    # a user-fixable problem like any other: one line, exit 2 (the message names the sample and the setting)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr, strict.stderr[-2000:]
    last = strict.stderr.strip().splitlines()[-1]
    assert last.startswith("mmcat train: error: bad sample") and "data.strict=true" in last, last


@pytest.fixture(scope="module")
def fusion_data(tmp_path_factory) -> Path:
    """A slightly larger set (240 products, 4 classes) so that val+test accuracy separates from chance."""
    from mmcat.pack import pack
    from mmcat.synth import synthesize

    from conftest import pack_config, synth_config

    work = tmp_path_factory.mktemp("fusion")
    synthesize(synth_config(work / "raw", num_products=240, num_classes=4, min_side=64, max_side=96, seed=3))
    pack(pack_config(work / "raw" / "products.csv", work / "packed", image_size=40, max_samples_per_shard=32,
                     splits={"train": 0.6, "val": 0.2, "test": 0.2}))
    return work / "packed"


@pytest.mark.parametrize("fusion", ["concat", "late", "gated", "attention"])
def test_each_fusion_head_trains_and_beats_chance(fusion, fusion_data, tiny_text, tmp_path):
    cfg = write_config(tmp_path / "train.yaml", tiny_text, fusion_data, tmp_path / "run", model__fusion=fusion,
                       train__epochs=4, train__batch_size=24)
    run(mmcat_cmd("train", "--config", str(cfg)))
    m = metrics(tmp_path / "run")
    n = m["val"]["fused"]["num_samples"] + m["test"]["fused"]["num_samples"]
    correct = sum(m[s]["fused"]["accuracy"] * m[s]["fused"]["num_samples"] for s in ("val", "test"))
    # chance is 0.25 (4 balanced classes); 0.45 on ~96 samples is > 4 standard deviations above it
    assert correct / n >= 0.45, (fusion, m["val"]["fused"], m["test"]["fused"])


def test_early_stopping_and_bf16_autocast_on_cpu(tiny_packed_dataset, tiny_text, tmp_path):
    """lr 0: val macro-F1 cannot really improve, so patience 1 stops the run at the first flat evaluation."""
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run", train__epochs=3,
                       train__lr=0.0, train__lr_image=0.0, train__lr_text=0.0, train__eval_every=2,
                       train__early_stopping_patience=1, train__precision="bf16")
    proc = run(mmcat_cmd("train", "--config", str(cfg)))
    assert "precision=bf16" in proc.stderr and "early stopping at step" in proc.stderr
    m = metrics(tmp_path / "run")
    total, _ = _expected_steps(tiny_packed_dataset, batch=16, world=1, workers=1, epochs=3)
    assert m["global_step"] < total and m["global_step"] % 2 == 0
