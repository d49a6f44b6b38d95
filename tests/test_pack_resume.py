"""Kill a real `mmcat pack` process with SIGKILL part-way, `--resume`, and check exactly-once + identical bytes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmcat.config import ConfigError
from mmcat.tarkeys import tar_sample_keys

from conftest import kill_pack_after, pack_config, synth_config


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".pack-state" not in p.parts}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from mmcat.synth import synthesize

    out = tmp_path_factory.mktemp("resume_raw")
    synthesize(synth_config(out, num_products=240, num_classes=4, min_side=300, max_side=480, seed=4, bad_rows=True))
    return out


def test_sigkill_then_resume_gives_every_row_exactly_once(raw: Path, tmp_path: Path):
    from mmcat.pack import pack

    common = ["--image-size", "64", "--max-samples-per-shard", "4", "--labels", str(raw / "labels.txt")]
    reference = pack(pack_config(raw / "products.csv", tmp_path / "ref", image_size=64, max_samples_per_shard=4,
                                 labels=str(raw / "labels.txt")))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmcat", "pack", str(raw / "products.csv"), "--out", str(out), *common]
    state = kill_pack_after(cmd + ["--workers", "2"], out, shards=2)
    assert not (out / "manifest.json").exists()
    done_before = len(list(state.glob("*.json")))
    assert 2 <= done_before < len(reference["splits"]["train"]["shards"])

    resumed = subprocess.run(cmd + ["--resume", "--workers", "2"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.rglob("*.tmp"))
    got, want = _files(out), _files(tmp_path / "ref")
    assert sorted(got) == sorted(want)
    for name in want:  # byte-identical to a run that was never interrupted -> every row exactly once
        assert got[name] == want[name], name
    manifest = json.loads((out / "manifest.json").read_text())
    keys = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:  # complete, readable tar; keys as webdataset groups them
            keys += tar_sample_keys(out / split / shard["name"])
    assert len(keys) == len(set(keys)) == manifest["total_samples"]


def test_resume_refuses_changed_settings(raw: Path, tmp_path: Path):
    from mmcat.pack import pack

    out = tmp_path / "o"
    pack(pack_config(raw / "products.csv", out, image_size=32, max_samples_per_shard=50))
    again = pack(pack_config(raw / "products.csv", out, image_size=32, max_samples_per_shard=50, resume=True))
    assert again["total_samples"] > 0  # resuming a finished run just rewrites its summary
    with pytest.raises(ConfigError, match="image_size"):
        pack(pack_config(raw / "products.csv", out, image_size=48, max_samples_per_shard=50, resume=True))
