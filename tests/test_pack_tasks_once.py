"""The packer makes each row's Task once: the lazy task stream is read in one pass (tasks, results and writing
positions stay paired), not once for the results and again for the writer."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import pack_config
from mmcat.pack import pack
from mmcat.pack.plan import Plan


@pytest.mark.parametrize("workers", [1, 2])
def test_plan_makes_each_rows_task_once(tiny_raw_dataset: Path, tiny_packed_dataset: Path, tmp_path: Path,
                                        monkeypatch, workers: int):
    made: Counter = Counter()
    real_tasks = Plan.tasks

    def counting_tasks(self, split, rows):  # the plan's task factory, wrapped: which rows got a Task, how often
        for task in real_tasks(self, split, rows):
            made[task.row] += 1
            yield task

    monkeypatch.setattr(Plan, "tasks", counting_tasks)
    out = tmp_path / "packed"
    manifest = pack(pack_config(tiny_raw_dataset / "products.csv", out, image_size=64, max_samples_per_shard=16,
                                workers=workers))
    packed_rows = {json.loads(line)["row"] for split in manifest["splits"]
                   for line in _json_members(out / split)}
    assert packed_rows and set(made) == packed_rows  # a Task for every packed row ...
    assert set(made.values()) == {1}  # ... made exactly once
    # one pass still pairs each result with its own task: the same bytes as the session's packed copy
    for split in manifest["splits"]:
        for shard in sorted((out / split).glob("shard-*.tar")):
            assert shard.read_bytes() == (tiny_packed_dataset / split / shard.name).read_bytes()


def _json_members(split_dir: Path):
    import tarfile

    for shard in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    yield tar.extractfile(m).read().decode("utf-8")
