"""Every launcher config we ship parses with accelerate's own loader and follows our rules; the CPU one runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from train_helpers import ROOT, free_port, metrics, run, write_config

LAUNCH = sorted((ROOT / "launch").glob("*.yaml"))
DS_JSON = sorted((ROOT / "launch" / "deepspeed").glob("*.json"))


def test_expected_launch_files_exist():
    names = {p.name for p in LAUNCH}
    assert {"cpu.yaml", "single_gpu.yaml", "multi_gpu.yaml", "deepspeed_zero1.yaml", "deepspeed_zero2.yaml",
            "deepspeed_zero3.yaml", "multi_node.yaml"} <= names


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_launch_yaml_is_valid_accelerate_config(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    first = path.read_text().splitlines()[0]
    assert first.startswith("# When:"), f"{path.name} must start with a '# When:' comment"
    cfg = ClusterConfig.from_yaml_file(str(path))  # unknown keys or bad enum values raise
    raw = yaml.safe_load(path.read_text())
    if raw["distributed_type"] == "DEEPSPEED":
        ds = raw["deepspeed_config"]
        assert ds["deepspeed_multinode_launcher"] == "standard"  # never pdsh/ssh
        assert (ROOT / ds["deepspeed_config_file"]).is_file()
        stage = int(path.stem.split("zero")[1][0])
        assert json.loads((ROOT / ds["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"] == stage
        assert "mixed_precision" not in raw  # precision comes from the mmcat config (JSON says "auto")
    if path.name == "multi_node.yaml":
        assert cfg.num_machines >= 2 and raw["rdzv_backend"] == "c10d"


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("path", DS_JSON, ids=lambda p: p.name)
def test_deepspeed_json_leaves_owned_values_to_the_trainer(path: Path):
    cfg = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto", key  # one source of truth: the mmcat config
    precision = [k for k in ("bf16", "fp16") if k in cfg]
    assert len(precision) == 1 and cfg[precision[0]]["enabled"] == "auto"
    for key, value in _walk(cfg["zero_optimization"], "zero_optimization."):
        # "auto" bucket sizes need model.config.hidden_size, which a fusion model has not
        assert value != "auto", key
        if "bucket_size" in key or "threshold" in key:
            assert isinstance(value, int), key
    assert "train_batch_size" not in cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_validate(path: Path):
    from mmcat.config import TrainRunConfig, load_config

    cfg = load_config(TrainRunConfig, path, ["data.root=/d", "output_dir=/o"])
    assert cfg.train.batch_size > 0


@pytest.mark.slow
def test_cpu_yaml_runs(tiny_packed_dataset, tmp_path):
    import sys

    from mmcat.models.tiny import make_tiny_text_model

    text = make_tiny_text_model(tmp_path / "bert")
    cfg = write_config(tmp_path / "t.yaml", text, tiny_packed_dataset, tmp_path / "run", train__epochs=1)
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/cpu.yaml"),
                "--main_process_port", str(free_port()), "-m", "mmcat", "train", "--config", str(cfg)])
    assert "world_size=1" in proc.stderr
    assert metrics(tmp_path / "run")["global_step"] > 0
