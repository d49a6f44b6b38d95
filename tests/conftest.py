"""Shared fixtures: tiny synthetic raw datasets and packed datasets (session-scoped, built once, a few seconds).

``tiny_raw_dataset``     120 products / 4 classes, photos 64-128 px, products.csv + images/ (no bad rows)
``tiny_packed_dataset``  it packed: image_size 64, 16 samples per shard, splits 0.8/0.1/0.1, seed 0
``bad_raw_dataset``      60 products / 3 classes + every planted bad input (planted.json lists them)
``bad_packed_dataset``   it packed with the label whitelist (labels.txt), image_size 64
``tiny_text``            a tiny random BERT folder (tokenizer + config)
``baseline_run``         one uninterrupted single-process training run on tiny_packed_dataset (2 epochs, 12 steps)
``chromium``             Debian's headless chromium (apt-get install on first use, as root), for ``browser`` tests
Tests must not modify these directories (copy them first).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mmcat.config import PackConfig, SynthConfig, load_config


def synth_config(out: Path, **kw) -> SynthConfig:
    return load_config(SynthConfig, None, [f"out={out}"] + [f"{k}={v}" for k, v in kw.items()])


def pack_config(input: Path, out: Path, **kw) -> PackConfig:
    return load_config(PackConfig, None, values={"input": str(input), "out": str(out), **kw})


def kill_pack_after(cmd, out: Path, shards: int, split: str = "train", timeout: float = 60.0) -> Path:
    """Start the ``mmcat pack`` command ``cmd`` writing to ``out``, SIGKILL it as soon as ``shards`` finished-shard
    records of ``split`` exist (a crash mid-run, nothing flushed or cleaned up), and return that split's state
    folder. Fails when the pack ended by itself first: then the resume test would prove nothing."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = out / ".pack-state" / "all" / split
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_dir() and len(list(state.glob("*.json"))) >= shards:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, (
        f"packing ended (exit {proc.returncode}) before it could be killed: {err.decode()[-2000:]}")
    return state


@pytest.fixture(scope="session")
def tiny_raw_dataset(tmp_path_factory) -> Path:
    from mmcat.synth import synthesize

    out = tmp_path_factory.mktemp("tiny_raw")
    synthesize(synth_config(out, num_products=120, num_classes=4, min_side=64, max_side=128, seed=0))
    return out


@pytest.fixture(scope="session")
def tiny_packed_dataset(tiny_raw_dataset, tmp_path_factory) -> Path:
    from mmcat.pack import pack

    out = tmp_path_factory.mktemp("tiny_packed")
    pack(pack_config(tiny_raw_dataset / "products.csv", out, image_size=64, max_samples_per_shard=16))
    return out


@pytest.fixture(scope="session")
def bad_raw_dataset(tmp_path_factory) -> Path:
    from mmcat.synth import synthesize

    out = tmp_path_factory.mktemp("bad_raw")
    synthesize(synth_config(out, num_products=60, num_classes=3, min_side=64, max_side=128, seed=1, bad_rows=True))
    return out


@pytest.fixture(scope="session")
def bad_packed_dataset(bad_raw_dataset, tmp_path_factory) -> Path:
    from mmcat.pack import pack

    out = tmp_path_factory.mktemp("bad_packed")
    pack(pack_config(bad_raw_dataset / "products.csv", out, image_size=64, max_samples_per_shard=16,
                     labels=str(bad_raw_dataset / "labels.txt")))
    return out


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> str:
    from mmcat.models.tiny import make_tiny_text_model

    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def baseline_run(tiny_packed_dataset, tiny_text, tmp_path_factory) -> Path:
    """The reference that exact-resume tests compare losses and weights with, and run-dir tests inspect."""
    from train_helpers import mmcat_cmd, run, write_config

    work = tmp_path_factory.mktemp("baseline")
    cfg = write_config(work / "train.yaml", tiny_text, tiny_packed_dataset, work / "run")
    run(mmcat_cmd("train", "--config", str(cfg)))
    return work / "run"


# ------------------------------------------------------------------------------------------------ a real browser
CHROMIUM_PACKAGES = ("chromium", "fonts-dejavu-core")  # a headless page needs a font to draw its text
CHROMIUM_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's ``chromium``, for the ``browser`` tests. Installed with apt-get on first use when missing (needs
    root, like the local SLURM cluster of the ``slurm`` tests); a lock file makes a second test session wait for
    the first one's install instead of failing on apt's lock."""
    import fcntl
    import os
    import shutil
    import subprocess

    def ready() -> bool:
        return shutil.which("chromium") is not None and CHROMIUM_FONT.is_file()

    if ready():
        return shutil.which("chromium")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"the browser tests need Debian's {' '.join(CHROMIUM_PACKAGES)}: installing them needs root and "
                    "apt-get (apt-get install " + " ".join(CHROMIUM_PACKAGES) + ")")
    Path("/run/lock").mkdir(parents=True, exist_ok=True)
    with open("/run/lock/mmcat-chromium-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready():
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            for cmd in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o",
                         "DPkg::Lock::Timeout=300", *CHROMIUM_PACKAGES]):
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
                assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
    assert ready(), f"installed {' '.join(CHROMIUM_PACKAGES)} but chromium or its font is still missing"
    return shutil.which("chromium")
