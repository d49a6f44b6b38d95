"""Throughput and memory of mmcat train runs, from their TensorBoard logs (benchmarks/gpu_checks.sh):

    python benchmarks/summarize_runs.py OUT.json RUN_DIR...

Per run: medians from step 30 of train/samples_per_s, perf/mfu and train/data_wait_fraction, the largest
perf/peak_gpu_memory_gb, the first and last train/loss, perf/compiled_graphs by step (train.compile), FLOPs per
sample, and whether best/ was exported."""
import json, statistics, sys
from pathlib import Path
from mmcat.report.runlogs import read_scalars

out = {}
for run in sys.argv[2:]:
    run = Path(run)
    try:
        s = read_scalars(run)
    except Exception as e:  # noqa
        out[run.name] = {"error": repr(e)}
        continue
    def after(tag, start=30):
        return [v for step, v in s.get(tag, []) if step >= start]
    r = {"steps_logged": len(s.get("train/loss", []))}
    for tag in ("train/samples_per_s", "perf/samples_per_s_per_device", "perf/mfu", "train/data_wait_fraction"):
        vals = after(tag)
        r[tag] = statistics.median(vals) if vals else None
    mem = s.get("perf/peak_gpu_memory_gb", [])
    r["peak_gpu_memory_gb"] = max(v for _, v in mem) if mem else None
    loss = s.get("train/loss", [])
    r["loss_first_last"] = [loss[0][1], loss[-1][1]] if loss else None
    graphs = s.get("perf/compiled_graphs", [])  # train.compile: a count that grows with each recompile
    r["compiled_graphs"] = [[step, v] for step, v in graphs] if graphs else None
    r["flops_per_sample"] = (s.get("perf/flops_per_sample") or [[0, None]])[-1][1]
    m = run / "metrics.json"
    if m.is_file():
        mj = json.loads(m.read_text())
        r["metrics_keys"] = sorted(mj)[:30]
        r["engine"] = mj.get("engine") or mj.get("distributed")
    r["best_exists"] = (run / "best").is_dir()
    out[run.name] = r
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
