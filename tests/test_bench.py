"""The benchmarks must not rot: the GPU benchmark's CPU smoke mode end to end, one suite benchmark's rows, and the
plain image loop that is issue 11's yardstick."""
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
    assert r["samples_per_s"] > 0 and r["ceiling_samples_per_s"] > 0 and r["loader_samples_per_s"] > 0
    assert 0.0 <= r["data_wait_fraction"] <= 1.0
    assert math.isclose(r["pipeline_efficiency"], r["samples_per_s"] / r["ceiling_samples_per_s"])
    # ResNet-18 at 32 px alone is ~0.15 GFLOPs forward per sample (x3 with backward): a wrong count shows here
    assert 1e8 < r["flops_per_sample"] < 1e10
    # no GPU: memory and MFU are not invented
    assert r["peak_gpu_memory_gb"] is None and r["mfu"] is None and r["device_peak_flops"] is None
    assert r["timed_steps"] == 4 and r["batch"] == 8 and r["compile"] is False


def test_plain_image_loop_reads_synth_photos_and_scores_the_held_out_fifth(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, "-m", "mmcat", "synth", "--out", str(raw), "--num-products", "50",
                    "--num-classes", "3", "--generator", "market"], cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "benchmarks/plain_image_loop.py", "--raw", str(raw), "--size", "32",
                           "--epochs", "2", "--batch", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1", "epoch 2"]
    for ln in lines:  # 10 of the 50 products are held out; an accuracy over them is a multiple of 1/10
        accuracy = float(ln.split("test accuracy ")[1].split()[0])
        assert "(10 photos)" in ln and 0.0 <= accuracy <= 1.0 and round(accuracy * 10, 6) % 1 == 0


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


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_run_all_quick_table_and_json_agree(tmp_path: Path) -> None:
    """The real runner, tiny sizes, on the benchmarks that fit a test's time (the others' ``figures(quick=True)``
    are the same code path; ``make bench`` runs them all): every benchmark has rows with figures, the ratio printed
    is mmcat / baseline, the JSON says when, where and with what it was measured."""
    only = ["pack", "plan"]
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--only", ",".join(only), "--json",
                           str(out), "--work", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    import datetime as dt

    assert dt.datetime.fromisoformat(r["date"]).tzinfo is not None and r["quick"] is True and r["repeats"] == 1
    m = r["machine"]
    assert m["cpu_count"] >= 1 and m["cpu_model"] and m["python"] and m["torch"] and m["mmcat"]
    assert m["load_average_start"] >= 0 and m["load_average_end"] >= 0
    assert list(r["seconds"]) == only and all(s > 0 for s in r["seconds"].values())
    assert math.isclose(r["total_seconds"], sum(r["seconds"].values()))
    assert {row["benchmark"] for row in r["rows"]} == set(only)
    printed = {_cells(line)[0]: _cells(line) for line in proc.stdout.splitlines()
               if line.startswith("| ") and not line.startswith("| measure")}
    for row in r["rows"]:
        assert row["mmcat"] > 0 and row["baseline"] > 0, row  # measured, not "not measured"
        assert math.isclose(row["ratio"], row["mmcat"] / row["baseline"]), row  # one pair: its ratio
        cells = printed[row["measure"] + (f" ({row['note']})" if row["note"] else "")]
        mmcat, baseline, ratio = (float(c) for c in cells[2:5])
        assert math.isclose(ratio, mmcat / baseline, rel_tol=0.02), cells  # as printed (3 significant digits)
        assert cells[6] == {True: "yes", False: "**no**", None: "—"}[row["met"]]
    assert len(printed) == len(r["rows"])
    footer = next(line for line in proc.stdout.splitlines() if line.startswith("wall time:"))
    assert all(f"{name} " in footer for name in only) and f"total {sum(r['seconds'].values()):.0f} s" in footer
