"""Planning a catalog: time and peak memory of reading + planning a big product table (no photo is opened).

    .venv/bin/python benchmarks/bench_plan.py [--rows 1000000,10000000] [--formats csv,parquet] [--slices 16]
                                              [--data DIR] [--keep]

For each size, a table like a real catalog export is generated into --data (a temporary folder unless given;
its size is printed): ids ``SKU-<9 digits>``, ~50 category labels, image paths ``images/<2 hex>/<id>.jpg``, a
title of ~60 and a description of ~200 characters. Then, in a fresh subprocess per run (so each peak RSS is the
run's own, ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``), ``mmcat.pack.packer.plan_input`` -- what
``mmcat pack`` does before opening any photo: read (pyarrow, streamed, column-pruned), labels, splits, packing
order, slice assignment -- for the whole table and for slice 0 of --slices. Each child checks that the text it
holds is exactly its own rows'. The text and photo-path columns are memory-mapped from a temporary file (see
``mmcat.pack.tables._Spill``): "text MB" is their size, "arrow MB" what pyarrow's allocators hold (ids, labels). Prints a table with the 10M/1M growth of time and memory (linear: <= 10x).
Not a test: prints figures, asserts only that a slice holds its own rows' text and nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mmcat, not an installed one
CHUNK = 500_000
WORDS = ("steel ceramic cotton linen oak walnut glass matte glossy compact large small classic modern vintage "
         "portable cordless wireless foldable stackable washable premium everyday travel kitchen garden office "
         "outdoor indoor handmade recycled organic waterproof lightweight heavy-duty adjustable ergonomic").split()


def _labels() -> list:
    groups = ["Home", "Kitchen", "Garden", "Office", "Sports", "Toys", "Beauty", "Tools", "Pets", "Baby"]
    kinds = ["Mugs", "Lamps", "Chairs", "Bags", "Shoes"]
    return [f"{g} > {k}" for g in groups for k in kinds]  # 50 labels


def _chunk(start: int, n: int, seed: int):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng([seed, start])
    words = np.array(WORDS, dtype=object)
    labels = np.array(_labels(), dtype=object)
    ids = [f"SKU-{i:09d}" for i in range(start, start + n)]

    def sentences(count: int):
        picks = words[rng.integers(0, len(words), (n, count))]
        return [" ".join(row) for row in picks]

    title, desc = sentences(7), sentences(24)  # ~60 and ~200 characters
    return pa.table({
        "id": ids,
        "image": [f"images/{i[-2:]}/{i}.jpg" for i in ids],
        "title": title,
        "description": desc,
        "category": labels[rng.integers(0, len(labels), n)].tolist(),
    })


def generate(data: Path, rows: int, fmt: str) -> Path:
    """products_<rows>.<fmt> in ``data`` (kept between runs when complete)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = data / f"products_{rows}.{fmt}"
    done = path.with_name(path.name + ".done")
    if done.is_file():
        return path
    writer = None
    for start in range(0, rows, CHUNK):
        table = _chunk(start, min(CHUNK, rows - start), 7)
        if writer is None:
            writer = pcsv.CSVWriter(path, table.schema) if fmt == "csv" else pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    done.touch()
    return path


def child(table: Path, slices: int, index: int) -> None:
    """One planning run (in its own process): prints a JSON line of figures."""
    import numpy as np
    import pyarrow.compute as pc

    from mmcat.config import PackConfig, load_config
    from mmcat.pack.packer import plan_input

    cfg = load_config(PackConfig, None, values={"input": str(table), "out": "/nonexistent", "slice_index": index,
                                                 "num_slices": slices})
    t = time.perf_counter()
    source, plan = plan_input(cfg)
    wall, hwm = time.perf_counter() - t, _hwm_mb()  # before the checks below allocate anything
    allocated = _allocated_mb()  # what pyarrow's allocators hold: the mapped text columns are not in it
    rows = source.table.num_rows
    held = {c: rows - source.table.column(c).null_count for c in cfg.text_columns}
    # the text held is exactly the rows index::slices (row 0 = the first data row)
    # (positions compared in numpy and ids spot-checked: a list of 10M ids would be the run's peak)
    for c in cfg.text_columns:
        where = np.flatnonzero(pc.is_valid(source.table.column(c)).to_numpy(zero_copy_only=False))
        assert np.array_equal(where, np.arange(index, rows, slices)), f"a slice holds other rows' {c}"
    for i in np.linspace(0, rows - 1, 101).astype(int).tolist():
        assert source.table.column("id")[i].as_py() == f"SKU-{i:09d}"
    text_bytes = sum(source.table.column(c).nbytes for c in cfg.text_columns)
    print(json.dumps({"wall_s": wall, "rows": rows, "held_text_rows": held, "text_bytes": text_bytes,
                      "arrow_allocated_mb": allocated,
                      "vm_hwm_mb": hwm, "packed_here": sum(len(plan.owned(s, index, slices)) for s in plan.order),
                      "labels": len(plan.labels)}))


def _allocated_mb() -> float:
    """MB held by pyarrow's memory pools (the default one and the jemalloc one the CSV reader uses)."""
    import pyarrow as pa

    pools = {"default": pa.default_memory_pool()}
    try:
        pools["jemalloc"] = pa.jemalloc_memory_pool()
    except NotImplementedError:
        pass
    return sum(p.bytes_allocated() for p in {p.backend_name: p for p in pools.values()}.values()) / 2 ** 20


def _hwm_mb() -> float:
    """This process's peak resident set (VmHWM: of this program only, not of the parent it was started from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run(args: list) -> tuple:
    """(last stdout line, the child's own ru_maxrss in MB, wall s) of ``bench_plan.py ARGS`` in a new process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone (RUSAGE_CHILDREN keeps a max)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(err.read())
        return out.read().strip().splitlines()[-1], usage.ru_maxrss / 1024, wall


def run_child(table: Path, slices: int, index: int) -> dict:
    line, maxrss, total = _run(["--child", str(table), "--slices", str(slices), "--index", str(index)])
    out = json.loads(line)
    out.update(process_s=total, peak_rss_mb=maxrss)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--formats", default="csv,parquet")
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--data", default=None, help="where the tables go (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the generated tables")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child), args.slices, args.index)
        return
    if args.generate:
        print(generate(Path(args.data), int(args.rows), args.generate))
        return
    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="bench_plan_"))
    data.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.rows.split(",")]
    results = []
    try:
        for fmt in args.formats.split(","):
            for rows in sizes:
                # generated in a child too: this process stays small (a child's ru_maxrss starts from it)
                line, _, took = _run(["--generate", fmt, "--rows", str(rows), "--data", str(data)])
                table = Path(line)
                print(f"{table.name}: {table.stat().st_size / 1e9:.2f} GB (generated in {took:.0f} s)", flush=True)
                for slices in (args.slices, 1):
                    r = run_child(table, slices, 0)
                    r.update(fmt=fmt, size=rows, slices=slices, file_gb=table.stat().st_size / 1e9)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    finally:
        if not args.keep and not args.data:
            shutil.rmtree(data, ignore_errors=True)
    report(results, sizes)


def figures(work: Path, quick: bool = False, repeats: int = 1) -> dict:
    """The suite's rows: planning cost (time, peak RSS) of a whole CSV table at 10 N vs N rows, each a fresh
    process. BENCHMARKS.md's target: growth <= ~10x for 10x rows."""
    sys.path.insert(0, str(Path(__file__).parent))
    from suite import row

    small = 20_000 if quick else 200_000
    got = {}
    for rows in (small, 10 * small):
        table = Path(_run(["--generate", "csv", "--rows", str(rows), "--data", str(work)])[0])
        got[rows] = run_child(table, 1, 0)
    a, b = got[10 * small], got[small]
    # VmHWM, not ru_maxrss: this process is large (torch) and a child's ru_maxrss starts from its parent's
    return {"rows": [
        row(f"plan a CSV, {10 * small:,} vs {small:,} rows: time", "s", a["wall_s"], b["wall_s"],
            a["wall_s"] / b["wall_s"], "<= ~10x", at_most=10.0),
        row(f"plan a CSV, {10 * small:,} vs {small:,} rows: peak RSS", "MB", a["vm_hwm_mb"], b["vm_hwm_mb"],
            a["vm_hwm_mb"] / b["vm_hwm_mb"], "<= ~10x", at_most=10.0)]}


def report(results: list, sizes: list) -> None:
    print(f"\n{'format':8} {'rows':>11} {'run':>11} {'file GB':>8} {'wall s':>8} {'peak RSS MB':>12} "
          f"{'text rows held':>15} {'text MB':>8} {'arrow MB':>9}")
    for r in results:
        run = "whole" if r["slices"] == 1 else f"slice 1/{r['slices']}"
        held = min(r["held_text_rows"].values())
        print(f"{r['fmt']:8} {r['size']:>11,} {run:>11} {r['file_gb']:>8.2f} {r['wall_s']:>8.1f} "
              f"{r['peak_rss_mb']:>12.0f} {held:>15,} {r['text_bytes'] / 2 ** 20:>8.0f} {r['arrow_allocated_mb']:>9.0f}")
    if len(sizes) >= 2:
        small, big = min(sizes), max(sizes)
        print(f"\ngrowth {big // small}x rows ({big:,} / {small:,}):")
        for fmt in sorted({r["fmt"] for r in results}):
            for slices in sorted({r["slices"] for r in results}):
                a = [r for r in results if (r["fmt"], r["slices"], r["size"]) == (fmt, slices, small)]
                b = [r for r in results if (r["fmt"], r["slices"], r["size"]) == (fmt, slices, big)]
                if a and b:
                    run = "whole" if slices == 1 else f"slice 1/{slices}"
                    print(f"  {fmt:8} {run:>11}: time {b[0]['wall_s'] / a[0]['wall_s']:.1f}x, "
                          f"peak RSS {b[0]['peak_rss_mb'] / a[0]['peak_rss_mb']:.1f}x")


if __name__ == "__main__":
    main()
