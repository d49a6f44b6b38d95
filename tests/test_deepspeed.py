"""DeepSpeed ZeRO 1/2/3 on CPU with 2 real processes (accelerate launch + launch/*.yaml), against plain DDP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_helpers import ROOT, free_port, metrics, mmcat_cmd, run, sizes, tb_scalars, torchrun_cmd, write_config

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def accelerate_cmd(launch_yaml: str, nproc: int, *args: str):
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / launch_yaml),
            "--num_processes", str(nproc), "--main_process_port", str(free_port()), "-m", "mmcat", *args]


def _config(tmp: Path, tiny_text: str, packed: Path, run_dir: Path, **kw) -> Path:
    # log every step (loss comparison), no modality dropout / dropout so that the first steps are comparable
    return write_config(tmp / f"{run_dir.name}.yaml", tiny_text, packed, run_dir, train__log_every=1,
                        model__modality_dropout=0.0, model__dropout=0.0, **kw)


@pytest.fixture(scope="module")
def ddp_run(tiny_packed_dataset, tiny_text, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ddp")
    cfg = _config(work, tiny_text, tiny_packed_dataset, work / "ddp")
    run(torchrun_cmd(2, "train", "--config", str(cfg)))
    return work / "ddp"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_resumes_exports(stage, ddp_run, tiny_packed_dataset, tiny_text, tmp_path):
    launch = f"deepspeed_zero{stage}.yaml"
    cfg = _config(tmp_path, tiny_text, tiny_packed_dataset, tmp_path / "ds")
    run(accelerate_cmd(launch, 2, "train", "--config", str(cfg)))
    m, ddp = metrics(tmp_path / "ds"), metrics(ddp_run)
    assert (m["global_step"], m["samples_seen"], m["world_size"]) == (ddp["global_step"], ddp["samples_seen"], 2)

    # same seed, same data, fp32: the first steps' losses match plain DDP (ZeRO 1/2 shard only optimizer
    # state and gradients; ZeRO-3's partitioned forward reorders reductions, so only a looser check)
    ds_loss, ddp_loss = tb_scalars(tmp_path / "ds"), tb_scalars(ddp_run)
    tol = 1e-3 if stage < 3 else 5e-2
    for step in (1, 2, 3):
        assert ds_loss[step] == pytest.approx(ddp_loss[step], rel=tol, abs=tol), (step, ds_loss, ddp_loss)
    if stage == 1:  # ZeRO-1 and 2 are one DeepSpeed optimizer (stage_1_and_2.py) writing one checkpoint layout:
        return      # stage 2 below covers its resume and export (a ZeRO launch costs ~40 s of the suite's 2 cores)

    # resume from the mid-run checkpoint (DeepSpeed's own sharded state via load_state) in a new run dir
    resumed = tmp_path / "resumed"
    half = m["global_step"] // 2
    assert (tmp_path / "ds" / "checkpoints" / f"step-{half}" / "trainer_state.json").is_file()
    run(accelerate_cmd(launch, 2, "train", "--config", str(cfg), f"output_dir={resumed}",
                       f"train.resume={tmp_path / 'ds' / 'checkpoints' / f'step-{half}'}"))
    r, resumed_loss = metrics(resumed), tb_scalars(resumed)
    assert (r["global_step"], r["samples_seen"]) == (m["global_step"], m["samples_seen"])
    # exact: the same loss at every step after the resume, and bit-identical final weights
    assert sorted(resumed_loss) == list(range(half + 1, m["global_step"] + 1))
    assert resumed_loss == {step: ds_loss[step] for step in resumed_loss}
    assert r["final_weights_sha256"] == m["final_weights_sha256"] is not None

    # best/ is the same self-contained artifact as without DeepSpeed (ZeRO-3: gathered full weights);
    # reloaded in a plain single process it predicts exactly what the training run measured on 2 ranks
    out = tmp_path / "eval.json"
    run(mmcat_cmd("eval", "--model", str(tmp_path / "ds" / "best"), "--data", str(tiny_packed_dataset),
                  "--split", "test", "--out", str(out)))
    got = json.loads(out.read_text())
    for mode in ("fused", "image_only", "text_only"):
        assert got[mode]["accuracy"] == pytest.approx(m["test"][mode]["accuracy"])
        assert got[mode]["num_samples"] == sum(sizes(tiny_packed_dataset, "test").values())


def test_zero3_bf16_on_cpu_chosen_by_launcher_flags_only(tiny_packed_dataset, tiny_text, tmp_path):
    """bf16 under DeepSpeed on CPU: inputs cast, BatchNorm buffers in bf16, artifact still fp32 + reloadable.
    DeepSpeed is chosen by the launcher's environment only (what `accelerate launch --use_deepspeed --zero_stage 3`
    sets; no JSON file): best/ export under ZeRO-3 needs the weights gathered, which DeepSpeed's default forbids
    (the run used to die at its first export, after an epoch). With the lower text layers locked
    (model.text.trainable_layers=1): ZeRO-3 partitions parameters that take no gradient and are in no optimizer
    group, and they come back in best/ as loaded from the text model's folder (to bf16's precision) while the top
    layer trained."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from train_helpers import child_env

    cfg = _config(tmp_path, tiny_text, tiny_packed_dataset, tmp_path / "bf16", train__precision="bf16",
                  train__epochs=1, model__text__pretrained=True, model__text__trainable_layers=1)
    env = child_env()
    env.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)
    env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    proc = run(torchrun_cmd(2, "train", "--config", str(cfg)), env=env)
    assert "precision=bf16" in proc.stderr and "ZeRO-3" in proc.stderr
    m = metrics(tmp_path / "bf16")
    assert m["global_step"] > 0 and m["test"]["fused"]["num_samples"] > 0
    with safe_open(str(tmp_path / "bf16" / "best" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}
        best = {k: f.get_tensor(k) for k in f.keys() if k.startswith("text_encoder.backbone.")}
    loaded = load_file(str(Path(tiny_text) / "model.safetensors"))
    loaded = {k.removeprefix("bert."): v for k, v in loaded.items()}
    for name, weight in best.items():
        start = loaded[name.removeprefix("text_encoder.backbone.")].to(torch.bfloat16).float()
        if ".layer.1." in name:  # the top layer trained
            continue
        assert torch.equal(weight, start), name  # embeddings and layer 0: locked
    top = "text_encoder.backbone.encoder.layer.1.output.dense.weight"
    assert not torch.equal(best[top], loaded[top.removeprefix("text_encoder.backbone.")].to(torch.bfloat16).float())


def test_deepspeed_fp16_on_cpu_fails_before_any_work(tiny_packed_dataset, tiny_text, tmp_path):
    cfg = _config(tmp_path, tiny_text, tiny_packed_dataset, tmp_path / "fp16", train__precision="fp16")
    proc = run(accelerate_cmd("deepspeed_zero2_fp16.yaml", 1, "train", "--config", str(cfg)), check=False)
    assert proc.returncode != 0
    assert "fp16 DeepSpeed needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "fp16" / "checkpoints").exists()


def test_deepspeed_json_disagreeing_with_config_is_refused(tiny_packed_dataset, tiny_text, tmp_path):
    ds = json.loads((ROOT / "launch/deepspeed/zero2.json").read_text())
    ds["gradient_accumulation_steps"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    launch = (ROOT / "launch/deepspeed_zero2.yaml").read_text().replace(
        "launch/deepspeed/zero2.json", str(tmp_path / "ds.json"))
    (tmp_path / "launch.yaml").write_text(launch)
    cfg = _config(tmp_path, tiny_text, tiny_packed_dataset, tmp_path / "bad")
    import sys

    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "launch.yaml"),
                "--num_processes", "1", "--main_process_port", str(free_port()), "-m", "mmcat", "train", "--config",
                str(cfg)], check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]  # the launcher reports the child's exit 2 as a failure
    assert "'gradient_accumulation_steps' is 4 but the trainer config says 1" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_two_nodes_on_localhost(tiny_packed_dataset, tiny_text, tmp_path):
    """torchrun --nnodes 2 (c10d on 127.0.0.1): disjoint shard subsets per epoch, equal batches, union = epoch."""
    import subprocess

    from train_helpers import child_env

    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run")
    port = free_port()
    nodes = [subprocess.Popen(torchrun_cmd(1, "train", "--config", str(cfg), nnodes=2, node_rank=r, port=port),
                              cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    for p in nodes:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
    m = metrics(tmp_path / "run")
    assert m["world_size"] == 2
    all_shards = {str(p) for p in (tiny_packed_dataset / "train").glob("*.tar")}
    reads = {}
    for f in (tmp_path / "run" / "shards_read").glob("*.json"):
        record = json.loads(f.read_text())
        reads[(record["epoch"], record["rank"])] = record
    assert sorted(reads) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for epoch in (0, 1):
        a, b = reads[(epoch, 0)], reads[(epoch, 1)]
        assert a["batches"] == b["batches"]
        assert not set(a["shards"]) & set(b["shards"])
        assert set(a["shards"]) | set(b["shards"]) == all_shards
    assert reads[(0, 0)]["shards"] != reads[(1, 0)]["shards"]  # reshuffled per epoch before the node split
