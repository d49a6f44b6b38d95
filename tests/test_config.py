"""Config tree: YAML + dotted overrides, one-line errors naming the key, exit code 2 from the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

from mmcat.config import ConfigError, PackConfig, TrainRunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides_merge():
    cfg = load_config(TrainRunConfig, ROOT / "configs/tiny_cpu.yaml",
                      ["data.root=/d", "output_dir=/o", "train.lr=1e-4", "model.fusion=late"])
    assert cfg.data.root == "/d" and cfg.train.lr == pytest.approx(1e-4) and cfg.model.fusion == "late"
    assert cfg.model.image.name == "resnet18"  # from the YAML


@pytest.mark.parametrize("overrides, key", [
    (["train.lrr=1"], "train.lrr"),
    (["train.lr=abc"], "train.lr"),
    (["model.fusion=sum"], "model.fusion"),
    (["train.precision=fp8"], "train.precision"),
    (["model.image.name=vit"], "model.image.name"),
])
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", *overrides])
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="'output_dir' is required"):
        load_config(TrainRunConfig, None, ["data.root=/d"])


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainRunConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(PackConfig, None, ["input=a", "out=b", "seed"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainRunConfig, bad)


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmcat", "train", "--config", str(ROOT / "configs/tiny_cpu.yaml"),
                           f"output_dir={tmp_path}", "data.root=/d", "train.epochz=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmcat train: error: config key 'train.epochz'"), proc.stderr
