"""``train.precision``: ``auto`` trains in bf16 only where the device computes bf16 in hardware, and whatever precision
trained a model, ``metrics.json`` reports the artifact as ``mmcat eval`` / predict / serve run it (full precision)."""
from __future__ import annotations

import json

import pytest
import torch

from train_helpers import metrics, mmcat_cmd, run, write_config


@pytest.mark.parametrize("cuda, cuda_bf16, cpu_amx, cpu_avx512_bf16, want", [
    (False, False, True, False, "bf16"),  # Intel Sapphire Rapids and later (AMX)
    (False, False, False, True, "bf16"),  # AVX512-BF16 (Cooper Lake, AMD Zen 4)
    (False, False, False, False, "no"),  # a laptop: emulated bf16 is slower than fp32
    (True, True, False, False, "bf16"),  # Ampere and later
    (True, False, True, True, "no"),  # V100 / T4: the GPU trains, not the CPU (fp16 needs asking for)
])
def test_auto_is_bf16_only_where_the_training_device_has_it(monkeypatch, cuda, cuda_bf16, cpu_amx, cpu_avx512_bf16,
                                                            want):
    from mmcat.train import accel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: cpu_amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_avx512_bf16)
    assert accel.resolve_precision("auto")[0] == want
    assert "auto" in accel.resolve_precision("auto")[1]
    for explicit in ("no", "bf16", "fp16"):  # what the user named is used as named
        assert accel.resolve_precision(explicit) == (explicit, "")


def test_a_bf16_run_reports_its_artifact_as_eval_runs_it(tiny_packed_dataset, tiny_text, tmp_path):
    """Training evaluates under bf16 autocast, but best/ is deployed in fp32: the final metrics and calibration in
    metrics.json are the fp32 artifact's, float for float what `mmcat eval` prints (an ECE is a mean of softmax
    scores, so bf16 logits would show in it even where no argmax flips). The precision trained in is recorded."""
    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run",
                       train__precision="bf16")
    proc = run(mmcat_cmd("train", "--config", str(cfg)))
    assert "precision=bf16" in proc.stderr
    m = metrics(tmp_path / "run")
    assert m["precision"] == "bf16"
    out = tmp_path / "eval.json"
    run(mmcat_cmd("eval", "--model", str(tmp_path / "run" / "best"), "--data", str(tiny_packed_dataset),
                  "--split", "test", "--out", str(out)))
    got = json.loads(out.read_text())
    for mode in ("fused", "image_only", "text_only"):
        assert got[mode]["accuracy"] == m["test"][mode]["accuracy"]
        assert got[mode]["macro_f1"] == m["test"][mode]["macro_f1"]
    for mode, ece in m["calibration"]["test"]["by_input"].items():
        assert got["calibration"]["by_input"][mode] == pytest.approx(ece, abs=1e-6), mode


def test_auto_says_what_it_chose(tiny_packed_dataset, tiny_text, tmp_path):
    from mmcat.train.accel import resolve_precision

    cfg = write_config(tmp_path / "train.yaml", tiny_text, tiny_packed_dataset, tmp_path / "run",
                       train__precision="auto", train__epochs=1)
    proc = run(mmcat_cmd("train", "--config", str(cfg)))
    chosen, why = resolve_precision("auto")
    assert f"precision={chosen} ({why})" in proc.stderr
    assert metrics(tmp_path / "run")["precision"] == chosen


def test_a_run_resumed_where_auto_resolves_otherwise_is_refused(monkeypatch, tmp_path):
    """`auto` is resolved before the fingerprint: a checkpoint trained in bf16 on an AMX machine is not continued
    in fp32 on a laptop (the steps after the resume would differ from the run's own), but refused in one line."""
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.errors import ConfigError
    from mmcat.train import accel
    from mmcat.train.checkpoint import check_fingerprint, run_fingerprint
    from mmcat.train.setup import _with_precision

    cfg = load_config(TrainRunConfig, "tiny_cpu", ["data.root=/d", "output_dir=/o"])
    assert str(cfg.train.precision) == "auto"  # the shipped demo config

    def fingerprint(native: bool):
        monkeypatch.setattr(accel, "native_bf16", lambda: (native, "probe"))
        resolved, why = _with_precision(cfg)
        assert why == "auto: probe" and resolved.train.precision == ("bf16" if native else "no")
        return run_fingerprint(resolved, 1, "NO", ["a", "b"], {"train-000000.tar": 8})

    check_fingerprint(fingerprint(True), fingerprint(True), tmp_path)  # same machine: resumes
    with pytest.raises(ConfigError, match="'train.precision' was 'bf16' and is now 'no'"):
        check_fingerprint(fingerprint(True), fingerprint(False), tmp_path)
