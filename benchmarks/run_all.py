"""Every benchmark in one run, one table: measure | mmcat | baseline (measured in the same run) | ratio | target | met.

    python benchmarks/run_all.py [--quick] [--only pack,loader,...] [--repeats N] [--json PATH] [--work DIR]

Each benchmark's ``figures()`` runs mmcat and its baseline interleaved (A B A B ...) and reports the median of the
per-pair ratios, so that load from other processes on a shared machine hits both sides alike. The budget for the
default sizes is 10 minutes on 2 CPU cores (each benchmark's wall time and the total are printed under the table;
4.5 min on an idle machine on 2026-11-26, 13.5-19 min while other jobs shared it); ``--quick`` uses tiny sizes (a
check that the suite runs, not figures to quote). Results also go to benchmarks/results/<UTC date>T<HHMM>.json (date,
machine, versions, every row; a second run on the same day keeps the first).
Not a test: a target not met does not fail the run (exit 0); a benchmark that crashes is reported and exits 1.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repo's mmcat when run as a script

from suite import not_measured  # noqa: E402

BENCHMARKS = ["pack", "loader", "trainer", "predict", "serve", "plan"]


def machine() -> Dict[str, Any]:
    """CPU model and count from /proc/cpuinfo, memory, and the versions the figures depend on."""
    import torch

    import mmcat

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "mmcat": getattr(mmcat, "__version__", "unknown"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": os.getloadavg()[0]}


def run_one(name: str, work: Path, quick: bool, repeats: int) -> Dict[str, Any]:
    module = importlib.import_module(f"bench_{name}")
    (work / name).mkdir(parents=True, exist_ok=True)
    return module.figures(work / name, quick=quick, repeats=repeats)


def fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table (readable in a terminal and pasted as is into BENCHMARKS.md)."""
    out = ["| measure | unit | mmcat | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        measure = r["measure"] + (f" ({r['note']})" if r.get("note") else "")
        out.append(f"| {measure} | {r['unit']} | {fmt(r['mmcat'])} | {fmt(r['baseline'])} | {fmt(r['ratio'])} | "
                   f"{r['target']} | {met} |")
    return "\n".join(out)


def footer(seconds: Dict[str, float]) -> str:
    """The wall time of each benchmark and the total (the suite's budget is 10 minutes on 2 cores)."""
    each = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    total = sum(seconds.values())
    return f"wall time: {each}; total {total:.0f} s ({int(total // 60)} min {total % 60:.0f} s)"


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that every benchmark runs")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--repeats", type=int, default=None, help="interleaved pairs per benchmark (default 3; 1 quick)")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/<UTC date>T<HHMM>.json")
    ap.add_argument("--work", type=Path, default=None, help="keep generated data here (reused when present)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="mmcat_bench_")
    work = args.work or Path(tmp.name)
    started = dt.datetime.now(dt.timezone.utc)
    info = machine()
    rows: List[Dict[str, Any]] = []
    timings: Dict[str, float] = {}
    failed = []
    for name in names:
        t = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            for r in run_one(name, work, args.quick, repeats)["rows"]:
                rows.append(dict(r, benchmark=name))
        except Exception:  # one broken benchmark must not hide the others' figures
            failed.append(name)
            traceback.print_exc()
            rows.append(dict(not_measured(name, "", "the benchmark crashed, see the log"), benchmark=name))
        timings[name] = time.perf_counter() - t
        print(f"[bench] {name} took {timings[name]:.0f} s", file=sys.stderr, flush=True)
    info["load_average_end"] = os.getloadavg()[0]
    result = {"date": started.isoformat(timespec="seconds"), "quick": args.quick, "repeats": repeats,
              "machine": info, "seconds": timings, "total_seconds": sum(timings.values()), "rows": rows}
    path = args.json or HERE / "results" / f"{started:%Y-%m-%dT%H%M}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, {info['cpu_count']} x {info['cpu_model']}, torch {info['torch']}, "
          f"mmcat {info['mmcat']}{' (--quick: sizes too small to quote)' if args.quick else ''}; "
          f"median of {repeats} interleaved pair(s)\n")
    print(table(rows))
    print("\n" + footer(timings))
    print(f"\nJSON: {path}")
    if tmp:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
