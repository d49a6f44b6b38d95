"""Job-array packing: N slices + pack-merge == one `mmcat pack` (same samples, splits, labels, failures)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmcat.cli import main
from mmcat.config import ConfigError
from mmcat.pack.merge import merge_slices

from _shards import read_packed


def _samples(packed: Path) -> dict:
    return {s["__key__"]: (split, s.get("jpg"), s.get("txt"), s["json"], s["cls"]) for split, s in read_packed(packed)}


def _slice(raw: Path, out: Path, i: int, n: int, *extra: str) -> int:
    return main(["pack", str(raw / "products.csv"), "--out", str(out), "--image-size", "64",
                 "--max-samples-per-shard", "16", "--labels", str(raw / "labels.txt"),
                 "--slice-index", str(i), "--num-slices", str(n), *extra])


def test_slices_merge_equal_single_run(bad_raw_dataset: Path, bad_packed_dataset: Path, tmp_path: Path):
    out = tmp_path / "sliced"
    for i in range(3):
        assert _slice(bad_raw_dataset, out, i, 3) == 0
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "train").glob("*.tar"))[0].startswith("shard-s000-")
    merge_slices(out)
    for name in ("labels.json", "failures.jsonl"):
        assert (out / name).read_bytes() == (bad_packed_dataset / name).read_bytes(), name
    single = json.loads((bad_packed_dataset / "manifest.json").read_text())
    merged = json.loads((out / "manifest.json").read_text())
    for key in ("labels", "total_samples", "failures", "image_notes", "settings"):
        assert merged[key] == single[key], key
    for split in single["splits"]:
        assert merged["splits"][split]["samples"] == single["splits"][split]["samples"]
        assert merged["splits"][split]["label_counts"] == single["splits"][split]["label_counts"]
        sizes = json.loads((out / split / "sizes.json").read_text())
        assert sum(sizes.values()) == merged["splits"][split]["samples"]
    assert merged["slices"] == 3
    assert _samples(out) == _samples(bad_packed_dataset)  # same samples, same splits, same bytes per member

    # re-running one slice redoes only that slice
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-s00[02]-*.tar")}
    assert _slice(bad_raw_dataset, out, 1, 3) == 0
    assert not (out / "manifest.json").exists()  # the merged manifest is stale until the next merge
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-s00[02]-*.tar")} == before
    merge_slices(out)
    assert _samples(out) == _samples(bad_packed_dataset)


def test_merge_refuses_incomplete_slices(bad_raw_dataset: Path, tmp_path: Path, capsys):
    out = tmp_path / "partial"
    assert _slice(bad_raw_dataset, out, 0, 2) == 0
    with pytest.raises(ConfigError, match="slice 1 of 2 is not complete"):
        merge_slices(out)
    assert main(["pack-merge", str(out)]) == 2
    assert main(["inspect", str(out)]) == 2
    assert "pack-merge" in capsys.readouterr().err
    assert _slice(bad_raw_dataset, out, 1, 2, "--resume") == 0  # a slice never started: --resume starts it
    assert main(["pack-merge", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
