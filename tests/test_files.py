"""Files on disk (mmcat.files): atomic file writes, directories published whole, `best/` never absent, read_json."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmcat.config import ConfigError, TrainRunConfig, load_config

# a second process that opens TARGET as fast as it can until STOP exists; prints how often the file was missing
# and the sha256 of every complete read (a half-written or mixed file would show up as an unknown hash)
READER = r"""
import hashlib, os, sys
target, stop, ready = sys.argv[1:4]
seen, missing, reads = set(), 0, 0
open(ready, "w").close()
while not os.path.exists(stop):
    try:
        with open(target, "rb") as f:
            seen.add(hashlib.sha256(f.read()).hexdigest())
        reads += 1
    except FileNotFoundError:
        missing += 1
print(missing, reads)
print(" ".join(sorted(seen)))
"""


def _watch(target: Path, tmp_path: Path) -> tuple:
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", READER, str(target), str(stop), str(ready)],
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc, stop


def _finish(proc, stop: Path) -> tuple:
    stop.touch()
    out, _ = proc.communicate(timeout=60)
    counts, hashes = out.splitlines()
    missing, reads = map(int, counts.split())
    return missing, reads, set(hashes.split())


def test_best_is_never_absent_while_it_is_re_exported(tiny_text, tmp_path):
    """A reader opening best/model.safetensors during 60 re-exports always finds it, and always one whole version."""
    from transformers import AutoConfig, AutoModel

    from mmcat.artifact import WEIGHTS, export_artifact
    from mmcat.models import load_tokenizer

    cfg = load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", f"model.text.name={tiny_text}"])
    text_model = AutoModel.from_config(AutoConfig.from_pretrained(tiny_text))
    tokenizer = load_tokenizer(cfg.model.text)
    best = tmp_path / "run" / "best"
    versions = set()

    def export(k: int) -> None:
        export_artifact(best, {"w": torch.full((4096,), float(k))}, text_model, cfg, ["a", "b"], tokenizer)
        versions.add(hashlib.sha256((best / WEIGHTS).read_bytes()).hexdigest())

    export(0)
    proc, stop = _watch(best / WEIGHTS, tmp_path)
    for k in range(1, 61):
        export(k)
    missing, reads, seen = _finish(proc, stop)
    assert len(versions) == 61
    assert missing == 0, f"best/{WEIGHTS} was missing {missing} times out of {missing + reads} opens"
    assert reads > 0 and seen <= versions
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]  # no temp or old copy left behind


def test_publish_dir_replaces_a_directory_whole(tmp_path):
    from mmcat.files import publish_dir

    final = tmp_path / "step-3"
    for k in range(3):
        tmp = tmp_path / "step-3.tmp"
        (tmp / "sub").mkdir(parents=True)
        (tmp / "a.txt").write_text(f"a{k}")
        (tmp / "sub" / "b.txt").write_text(f"b{k}")
        if k == 2:
            (tmp / "c.txt").write_text("c")
        publish_dir(tmp, final)
        assert not tmp.exists()
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == ["a.txt", "c.txt", "sub", "sub/b.txt"]
    assert (final / "a.txt").read_text() == "a2" and (final / "sub" / "b.txt").read_text() == "b2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]


def test_publish_dir_without_rename_exchange_still_replaces(tmp_path, monkeypatch):
    """The fallback (no renameat2: other OS, old glibc, file systems without RENAME_EXCHANGE) gives the same result."""
    import mmcat.files as files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final = tmp_path / "best"
    for k in range(2):
        tmp = tmp_path / "best.tmp"
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(bytes([k]) * 10)
        files.publish_dir(tmp, final)
    assert (final / "model.safetensors").read_bytes() == b"\x01" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_write_atomic_never_shows_a_partial_file(tmp_path):
    from mmcat.files import write_atomic

    target = tmp_path / "metrics.json"
    write_atomic(target, "x" * 10)
    proc, stop = _watch(target, tmp_path)
    contents = [bytes([65 + k % 26]) * (200_000 + k) for k in range(100)]
    for data in contents:
        write_atomic(target, data)
    missing, reads, seen = _finish(proc, stop)
    assert missing == 0 and reads > 0
    assert seen <= {hashlib.sha256(c).hexdigest() for c in contents} | {hashlib.sha256(b"x" * 10).hexdigest()}
    write_atomic(target, "é\n")  # str is written as UTF-8
    assert target.read_bytes() == "é\n".encode() and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json", "ready", "stop"]


def test_read_json_one_line_errors(tmp_path):
    from mmcat.files import read_json

    good = tmp_path / "sizes.json"
    good.write_text('{"a": 1}')
    assert read_json(good, ConfigError) == {"a": 1}
    assert read_json(tmp_path / "absent.json", ConfigError, missing_ok=True) is None
    with pytest.raises(ConfigError, match="absent.json"):
        read_json(tmp_path / "absent.json", ConfigError)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as err:
        read_json(bad, ConfigError, missing_ok=True)
    assert str(err.value).startswith(f"cannot read {bad}: ") and "\n" not in str(err.value)
