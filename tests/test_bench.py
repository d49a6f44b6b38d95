"""The benchmarks must not rot: the GPU benchmark's CPU smoke mode end to end, and one suite benchmark's rows."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--work", str(tmp_path / "w"),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] is True and r["device"] == "cpu" and r["model"] == "resnet18 + tiny BERT"
    assert r["samples_per_s"] > 0 and r["ceiling_samples_per_s"] > 0
    assert 0.0 <= r["data_wait_fraction"] <= 1.0
    assert math.isclose(r["pipeline_efficiency"], r["samples_per_s"] / r["ceiling_samples_per_s"])
    # ResNet-18 at 32 px alone is ~0.15 GFLOPs forward per sample (x3 with backward): a wrong count shows here
    assert 1e8 < r["flops_per_sample"] < 1e10
    # no GPU: memory and MFU are not invented
    assert r["peak_gpu_memory_gb"] is None and r["mfu"] is None and r["device_peak_flops"] is None
    assert r["timed_steps"] == 4 and r["batch"] == 8 and r["compile"] is False


def test_suite_plan_rows_compare_ten_times_the_rows(tmp_path: Path) -> None:
    import importlib.util

    # loaded by path: benchmarks/ is a folder of scripts, not a package (and sys.path stays as it was)
    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "benchmarks" / "bench_plan.py")
    bench_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_plan)
    rows = bench_plan.figures(tmp_path, quick=True)["rows"]
    assert [r["unit"] for r in rows] == ["s", "MB"]
    for r in rows:
        assert "200,000 vs 20,000 rows" in r["measure"]
        assert r["mmcat"] > 0 and r["baseline"] > 0
        assert math.isclose(r["ratio"], r["mmcat"] / r["baseline"])
        assert r["met"] == (r["ratio"] <= 10.0) and r["target"] == "<= ~10x"
    # 10x the rows hold more memory than 1x (VmHWM of each planning child, not the parent's ru_maxrss)
    assert rows[1]["ratio"] > 1.0
