"""`mmcat predict`: batch predictions over a product table or packed shards, through the Python API's one
preprocessing + forward path (mmcat.classifier).

Content, not counters: output rows are joined back to the input rows by id (in input order) and compared with what
the API (`Classifier.predict`) says for the same product, and on shards with the argmax of `mmcat eval`'s own loader
for the same sample key; the metrics table must be `mmcat eval`'s.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import webdataset as wds

from train_helpers import ROOT, child_env, mmcat_cmd, run

pytestmark = pytest.mark.slow

TEXT_BLANK = range(60, 75)  # rows of the mixed table with title and description blanked: image only
IMAGE_BLANK = range(75, 90)  # rows with the image path blanked: text only


# ------------------------------------------------------------------------------------------------------ helpers
def read_rows(table: Path) -> List[Dict[str, str]]:
    with open(table, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(table: Path, rows: List[Dict[str, str]], columns: Optional[List[str]] = None) -> Path:
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return table


def read_out(path: Path) -> List[Dict]:
    """Output rows of any format as plain Python values (CSV: top_k / warnings are JSON, abstain true/false)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    out = []
    for r in read_rows(path):
        out.append({"id": r["id"], "label": r["label"] or None, "score": float(r["score"]) if r["score"] else None,
                    "top_k": json.loads(r["top_k"]), "modalities": r["modalities"],
                    "abstain": {"true": True, "false": False}[r["abstain"]], "error": r["error"] or None,
                    "warnings": json.loads(r["warnings"])})
    return out


def table_row(stdout: str, mode: str) -> List[str]:
    """The numbers of one mode's row in the printed metrics table (mmcat.metrics.format_table: a header
    `mode accuracy macro_f1 weighted_f1 samples`, then a row per mode; other tables may follow)."""
    lines = [ln.split() for ln in stdout.splitlines()]
    header = [i for i, words in enumerate(lines) if words == ["mode", "accuracy", "macro_f1", "weighted_f1", "samples"]]
    assert len(header) == 1, stdout
    rows = []
    for words in lines[header[0] + 1:]:
        if len(words) != 5:  # past the table
            break
        rows += [words[1:]] if words[0] == mode else []
    assert len(rows) == 1, stdout
    return rows[0]


def assert_same_prediction(got: Dict, want, where: str) -> None:
    """An output row vs a mmcat.classifier.Prediction: labels exact, calibrated scores within 1e-5."""
    assert got["label"] == want.label, where
    assert got["modalities"] == want.modalities, where
    assert got["abstain"] == want.abstain and got["warnings"] == want.warnings, where
    assert [t["label"] for t in got["top_k"]] == [k for k, _ in want.top_k], where
    assert all(math.isclose(t["score"], s, abs_tol=1e-5) for t, (_, s) in zip(got["top_k"], want.top_k)), where
    assert math.isclose(got["score"], want.score, abs_tol=1e-5), where
    assert got["error"] is None, where


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmcat predict: error: "), stderr[-3000:]
    return lines[0][len("mmcat predict: error: "):]


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def best(baseline_run) -> Path:
    return baseline_run / "best"


@pytest.fixture(scope="module")
def clf(best):
    """The model in this process, on one thread like the `mmcat` subprocesses (OMP_NUM_THREADS=1): the same
    float results, and no thread oversubscription on a small shared machine (x15 slower with 2 threads on 2
    busy cores)."""
    import torch

    from mmcat import Classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Classifier.load(best, device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixed(tiny_raw_dataset, bad_raw_dataset, tmp_path_factory) -> Dict:
    """A table of every kind of row: the 120 tiny products (15 with no title/description, 15 with no image path),
    then bad_raw's 60 products and planted bad rows (truncated / undecodable / missing / huge photos with text,
    photo without text, nothing usable, unknown and empty labels, a repeated id) with absolute photo paths.
    The tiny rows' photos are found through --images-root (the table lives elsewhere)."""
    rows = read_rows(tiny_raw_dataset / "products.csv")
    for i in TEXT_BLANK:
        rows[i]["title"] = rows[i]["description"] = ""
    for i in IMAGE_BLANK:
        rows[i]["image"] = ""
    bad = read_rows(bad_raw_dataset / "products.csv")
    for r in bad:
        r["image"] = str(bad_raw_dataset / r["image"]) if r["image"] else ""
    table = write_rows(tmp_path_factory.mktemp("mixed") / "in" / "products.csv", rows + bad)
    planted = {p["case"]: p for p in json.loads((bad_raw_dataset / "planted.json").read_text())["rows"]}
    return {"table": table, "rows": rows + bad, "images_root": tiny_raw_dataset, "planted": planted,
            "offset": len(rows)}


@pytest.fixture(scope="module")
def mixed_run(best, mixed, tmp_path_factory) -> Dict:
    out = tmp_path_factory.mktemp("mixed_out") / "preds.jsonl"
    proc = run(mmcat_cmd("predict", "--model", str(best), str(mixed["table"]), "--out", str(out),
                         "--images-root", str(mixed["images_root"]), "--batch-size", "16"))
    return {"out": out, "rows": read_out(out), "stdout": proc.stdout, "stderr": proc.stderr}


def api_kwargs(row: Dict[str, str], images_root: Path) -> Dict:
    """What a user of the Python API passes for a table row (the photo path resolved as mmcat pack does)."""
    image = row["image"].strip()
    return {"image": str(images_root / image) if image else None, "title": row["title"],
            "description": row["description"]}


# ------------------------------------------------------------------------------------------------- on shards
def test_predict_on_packed_shards_equals_mmcat_eval(best, clf, tiny_packed_dataset, tmp_path, capsys):
    """Same metrics table numbers (fused row) as `mmcat eval --split test`, and every sample's label is the argmax
    of eval's own loader + forward for that sample key."""
    from mmcat.data import build_eval_loader
    from mmcat.models.fusion import forward_batch
    from mmcat.predict_table import predict_file

    out = tmp_path / "preds.csv"
    ev = run(mmcat_cmd("eval", "--model", str(best), "--data", str(tiny_packed_dataset), "--split", "test"))
    predict_file(clf, tiny_packed_dataset, out, split="test", batch_size=5)
    assert table_row(capsys.readouterr().out, "fused") == table_row(ev.stdout, "fused")

    art = clf.artifact
    loader = build_eval_loader(art.data_config(str(tiny_packed_dataset)), "test", art.tokenizer, 7, 0,
                               modalities=art.modalities)
    expected: Dict[str, str] = {}
    for batch in loader:
        for key, idx in zip(batch["keys"], forward_batch(art.model, batch, "fused").argmax(-1).tolist()):
            expected[key] = art.labels[idx]
    id_of = {s["__key__"]: json.loads(s["json"])["id"] for s in wds.DataPipeline(
        wds.SimpleShardList(sorted(str(p) for p in (tiny_packed_dataset / "test").glob("*.tar"))),
        wds.tarfile_to_samples())}
    got = {r["id"]: r["label"] for r in read_out(out)}
    assert got == {id_of[k]: label for k, label in expected.items()}


def test_shard_pattern_input_reads_the_same_samples(clf, tiny_packed_dataset, tmp_path):
    from mmcat.predict_table import predict_file

    pattern = str(tiny_packed_dataset / "test" / "shard-{000000..000000}.tar")
    by_dir = predict_file(clf, tiny_packed_dataset, tmp_path / "a.jsonl", split="test", quiet=True)
    by_pattern = predict_file(clf, pattern, tmp_path / "b.jsonl", quiet=True)
    a, b = read_out(tmp_path / "a.jsonl"), read_out(tmp_path / "b.jsonl")  # the test split has one shard
    assert by_dir["rows"] == len(a) > 0 and b == a
    assert by_pattern["metrics"] == by_dir["metrics"] and by_dir["metrics"]["num_samples"] == len(a)


# -------------------------------------------------------------------------------------------------- on a table
def test_table_rows_come_back_in_input_order_and_equal_the_api(mixed, mixed_run, clf):
    rows, out = mixed["rows"], mixed_run["rows"]
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # joined by id, in input order (repeats kept)
    for i, (row, got) in enumerate(zip(rows, out)):
        kwargs = api_kwargs(row, mixed["images_root"])
        try:
            want = clf.predict(**kwargs)
        except ValueError as exc:  # nothing usable: the API refuses, predict records it and goes on
            assert got["error"] == str(exc) and got["label"] is None and got["score"] is None, (i, got)
            continue
        assert_same_prediction(got, want, f"row {i}: {row['id']}")


def test_table_row_kinds_image_only_text_only_and_broken(mixed, mixed_run):
    out, planted, offset = mixed_run["rows"], mixed["planted"], mixed["offset"]
    assert {out[i]["modalities"] for i in TEXT_BLANK} == {"image_only"}
    assert {out[i]["modalities"] for i in IMAGE_BLANK} == {"text_only"}
    assert {out[i]["modalities"] for i in range(60)} == {"fused"}
    for case in ("truncated_jpeg", "not_an_image", "missing_file", "zero_bytes", "decompression_bomb"):
        r = out[offset + planted[case]["row"] - 1]
        assert r["id"] == planted[case]["id"] and r["modalities"] == "text_only" and r["label"], case
        assert len(r["warnings"]) == 1 and r["warnings"][0].startswith("image not used: " + planted[case]["reason"])
    r = out[offset + planted["empty_text"]["row"] - 1]
    assert r["modalities"] == "image_only" and r["label"] and r["warnings"] == []
    r = out[offset + planted["nothing_usable"]["row"] - 1]
    assert r["label"] is None and r["error"].startswith("nothing to predict from") and r["top_k"] == []
    assert "1 error" in mixed_run["stdout"]


def test_table_metrics_are_recomputed_from_the_rows(mixed, mixed_run, clf):
    """The printed fused row is classification_metrics over the rows whose label the model knows; the unknown
    label (discontinued) and the empty one are left out and reported."""
    from mmcat.metrics import classification_metrics

    index = {name: i for i, name in enumerate(clf.labels)}
    pairs = [(index[row["category"]], index[got["label"]]) for row, got in zip(mixed["rows"], mixed_run["rows"])
             if row["category"] in index and got["label"] is not None]
    m = classification_metrics([t for t, _ in pairs], [p for _, p in pairs], clf.labels)
    assert table_row(mixed_run["stdout"], "fused") == [f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}",
                                                       f"{m['weighted_f1']:.4f}", str(len(pairs))]
    assert "1 row(s) with a label the model does not know (discontinued): left out of the metrics" \
        in mixed_run["stdout"]
    assert "1 row(s) without a label" in mixed_run["stdout"]


def test_workers_give_the_same_output(clf, mixed, mixed_run, tmp_path):
    """Two decode workers (each preparing every other chunk of 16 rows) vs the in-process `mmcat predict` run:
    byte for byte the same file."""
    from mmcat.predict_table import predict_file

    out = tmp_path / "w2.jsonl"
    predict_file(clf, mixed["table"], out, images_root=mixed["images_root"], batch_size=16, workers=2, quiet=True)
    assert out.read_bytes() == mixed_run["out"].read_bytes()


def test_csv_jsonl_parquet_hold_the_same_rows(clf, mixed, tmp_path):
    from mmcat.predict_table import predict_file

    got = {}
    for ext in ("csv", "jsonl", "parquet"):
        summary = predict_file(clf, mixed["table"], tmp_path / f"p.{ext}", images_root=mixed["images_root"],
                               batch_size=32, quiet=True)
        got[ext] = read_out(tmp_path / f"p.{ext}")
        assert summary["rows"] == len(got[ext]) == len(mixed["rows"])
    assert got["csv"] == got["jsonl"] == got["parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.jsonl", "p.parquet"]  # no temp files left


def test_jsonl_and_parquet_tables_give_the_rows_of_the_csv(clf, mixed, mixed_run, tmp_path):
    """The same table as JSON Lines (with a line that is not JSON planted after row 3) and as Parquet: the same
    output rows as from the CSV; the broken line is an error row in its place and the run goes on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcat.predict_table import predict_file

    lines = [json.dumps(r) for r in mixed["rows"]]
    (tmp_path / "t.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    pq.write_table(pa.Table.from_pylist(mixed["rows"]), tmp_path / "t.parquet", row_group_size=50)
    for name in ("t.jsonl", "t.parquet"):
        predict_file(clf, tmp_path / name, tmp_path / f"{name}.out.jsonl", images_root=mixed["images_root"],
                     batch_size=16, quiet=True)
    from_jsonl, from_parquet = (read_out(tmp_path / f"{n}.out.jsonl") for n in ("t.jsonl", "t.parquet"))
    assert from_parquet == mixed_run["rows"]
    broken = from_jsonl.pop(3)
    assert broken["label"] is None and broken["error"].startswith("row not read: line 4 is not valid JSON")
    assert len(from_jsonl) == len(mixed_run["rows"])
    for got, want in zip(from_jsonl, mixed_run["rows"]):  # batches shifted by one row: scores to float precision
        scores = [(got[k], want[k]) for k in ("score",) if want[k] is not None]
        scores += [(g["score"], w["score"]) for g, w in zip(got["top_k"], want["top_k"])]
        assert all(math.isclose(g, w, abs_tol=1e-5) for g, w in scores), (got, want)
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        assert {k: v for k, v in got.items() if k not in ("score", "top_k")} == \
            {k: v for k, v in want.items() if k not in ("score", "top_k")}


def test_gzipped_tables_give_the_rows_of_the_plain_file(clf, mixed, mixed_run, tmp_path):
    """products.csv.gz, .tsv.gz, .jsonl.gz and .parquet.gz (the forms `mmcat pack` reads) predict the same rows as
    the plain CSV, with the same batch size, so bit for bit."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcat.predict_table import predict_file

    rows = mixed["rows"]
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress(mixed["table"].read_bytes()))
    with gzip.open(tmp_path / "t.tsv.gz", "wt", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress((tmp_path / "t.parquet").read_bytes()))
    for name in ("t.csv.gz", "t.tsv.gz", "t.jsonl.gz", "t.parquet.gz"):
        out = tmp_path / f"{name}.out.jsonl"
        predict_file(clf, tmp_path / name, out, images_root=mixed["images_root"], batch_size=16, quiet=True)
        assert read_out(out) == mixed_run["rows"], name


def test_min_score_abstains_below_it(clf, mixed, mixed_run, tmp_path, capsys):
    from mmcat.predict_table import predict_file

    scores = sorted(r["score"] for r in mixed_run["rows"] if r["score"] is not None)
    threshold = scores[len(scores) // 2]
    predict_file(clf, mixed["table"], tmp_path / "p.jsonl", images_root=mixed["images_root"], min_score=threshold)
    printed = capsys.readouterr().out
    out = read_out(tmp_path / "p.jsonl")
    index = set(clf.labels)
    labelled = accepted = correct = 0
    for row, plain, got in zip(mixed["rows"], mixed_run["rows"], out):
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in plain["top_k"]]
        assert got["error"] == plain["error"] and (got["score"] is None) == (plain["score"] is None)
        if got["error"]:
            continue
        below = got["score"] < threshold
        assert got["abstain"] == below and got["label"] == (None if below else plain["label"]), got
        if row["category"] in index:
            labelled += 1
            accepted += not below
            correct += (not below) and plain["label"] == row["category"]
    assert 0 < accepted < labelled
    assert f"coverage {accepted / labelled:.4f} ({accepted}/{labelled})" in printed
    assert f"precision of the accepted {correct / accepted:.4f}" in printed
    # abstaining does not change the metrics: the fused row is the top-1 label's
    assert table_row(printed, "fused") == table_row(mixed_run["stdout"], "fused")


# ---------------------------------------------------------------------------------------- attribute columns
@pytest.fixture(scope="module")
def attribute_model(tiny_raw_dataset, tiny_text, tmp_path_factory) -> Path:
    """An untrained image + text + attributes model exported as best/ (random weights still map inputs to
    labels deterministically, which is all this test needs)."""
    import torch

    from mmcat.artifact import export_artifact
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.modalities.attributes import Attributes
    from mmcat.models import build_model
    from mmcat.models.text import load_tokenizer

    work = tmp_path_factory.mktemp("attr_model")
    rows = read_rows(tiny_raw_dataset / "products.csv")
    spec = {"version": 1, "columns": [
        {"name": "brand", "kind": "categorical", "vocab": sorted({r["brand"] for r in rows if r["brand"]})[:6],
         "rare": [], "min_count": 1},
        {"name": "price", "kind": "numeric", "mean": 3.0, "std": 1.0, "log1p": True}]}
    (work / "attributes.json").write_text(json.dumps(spec))
    cfg = load_config(TrainRunConfig, None, [
        "model.image.name=resnet18", "model.image.weights=none", f"model.text.name={tiny_text}",
        "model.text.pretrained=false", "model.hidden_dim=16", "model.modalities=[image,text,attributes]",
        f"data.root={work}", "data.image_size=32", f"output_dir={work}"], require_complete=False)
    mods = [Attributes({"attributes.json": work / "attributes.json"})]
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, mods)
    labels = sorted({r["category"] for r in rows})
    return export_artifact(work / "best", model.state_dict(), model, cfg, labels, load_tokenizer(cfg.model.text),
                           modalities=mods)


def test_attribute_columns_named_by_the_model_are_read_from_the_table(attribute_model, tiny_raw_dataset, tmp_path):
    from mmcat import Classifier
    from mmcat.predict_table import predict_file

    rows = read_rows(tiny_raw_dataset / "products.csv")[:24]
    rows[5].update(image="", title="", description="")  # attributes only
    rows[6].update(brand="", price="")  # image and text, no attribute value: without_attributes
    table = write_rows(tmp_path / "t.csv", rows)
    clf = Classifier.load(attribute_model, device="cpu")
    predict_file(clf, table, tmp_path / "p.jsonl", images_root=tiny_raw_dataset, quiet=True)
    out = read_out(tmp_path / "p.jsonl")
    assert out[5]["modalities"] == "attributes_only" and out[6]["modalities"] == "without_attributes"
    for row, got in zip(rows, out):
        want = clf.predict(**api_kwargs(row, tiny_raw_dataset), attributes={"brand": row["brand"] or None,
                                                                            "price": row["price"] or None})
        assert_same_prediction(got, want, row["id"])
    assert len({r["label"] for r in out}) > 1 or len({r["score"] for r in out}) > 1  # inputs reach the model

    write_rows(tmp_path / "no_price.csv", rows, [c for c in rows[0] if c != "price"])
    from mmcat.errors import ConfigError

    with pytest.raises(ConfigError, match=r"missing column 'price' \(the model's attributes\.json reads brand, price"):
        predict_file(clf, tmp_path / "no_price.csv", tmp_path / "q.jsonl", images_root=tiny_raw_dataset, quiet=True)
    assert not (tmp_path / "q.jsonl").exists()


# ------------------------------------------------------------------------------------------------ bad input
def _bad_cases(tiny: Path, packed: Path, tmp: Path) -> Dict[str, tuple]:
    table = tiny / "products.csv"
    (tmp / "products.txt").write_text(table.read_text())
    (tmp / "a_file").write_text("x")
    write_rows(tmp / "no_title.csv", read_rows(table), ["id", "image", "description", "category"])
    return {
        "missing input": ([str(tmp / "nope.csv")], f"input {tmp / 'nope.csv'}: file not found"),
        "unknown input format": ([str(tmp / "products.txt")],
                                 f"input {tmp / 'products.txt'}: cannot tell the format from the extension; "
                                 f"pass --format csv|jsonl|parquet|shards"),
        "unknown output format": ([str(table), "--out", str(tmp / "p.txt")],
                                  f"--out {tmp / 'p.txt'}: cannot tell the output format from '.txt' "
                                  f"(use .csv, .jsonl or .parquet)"),
        "missing model": ([str(table), "--model", str(tmp / "no_model")],
                          f"--model {tmp / 'no_model'}: no such directory"),
        "unwritable out": ([str(table), "--out", str(tmp / "a_file" / "p.csv")], f"cannot write {tmp / 'a_file'}"),
        "missing column": ([str(tmp / "no_title.csv"), "--images-root", str(tiny)],
                           f"input {tmp / 'no_title.csv'}: missing column 'title'"),
        "missing split": ([str(packed), "--format", "shards", "--split", "nosuch"], "no 'nosuch' split in"),
    }


@pytest.mark.parametrize("case", ["missing input", "unknown input format", "unknown output format", "missing model",
                                  "unwritable out", "missing column", "missing split"])
def test_bad_input_is_one_line_and_exit_2(case, best, tiny_raw_dataset, tiny_packed_dataset, tmp_path, capsys):
    from mmcat.cli import main

    args, message = _bad_cases(tiny_raw_dataset, tiny_packed_dataset, tmp_path)[case]
    argv = ["predict", *args]
    if "--model" not in argv:
        argv += ["--model", str(best)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out" / "p.csv")]
    code = main(argv)
    msg = one_error_line(code, capsys.readouterr().err)
    assert msg.startswith(message) if case != "missing split" else message in msg, msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_a_real_process_exits_2_without_traceback(best, tmp_path):
    proc = subprocess.run(mmcat_cmd("predict", "--model", str(best), str(tmp_path / "nope.csv"), "--out",
                                    str(tmp_path / "p.csv")), capture_output=True, text=True, env=child_env(),
                          cwd=ROOT, timeout=120)
    assert one_error_line(proc.returncode, proc.stderr) == f"input {tmp_path / 'nope.csv'}: file not found"


# ------------------------------------------------------------------------------------------- bounded memory
RSS_PROBE = """
import re, sys
from pathlib import Path
import torch
from mmcat import Classifier
from mmcat.predict_table import predict_file

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

best, images_root, out, small, big = sys.argv[1:]
torch.set_num_threads(1)
clf = Classifier.load(best, device="cpu")
for _ in range(2):  # warm-up: lazy imports, first allocations, the allocator's pools (two runs to settle)
    predict_file(clf, small, out, images_root=images_root, batch_size=32, quiet=True)
for table in (small, big):
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
    start = status("VmRSS")
    predict_file(clf, table, out, images_root=images_root, batch_size=32, quiet=True)
    print(status("VmHWM") - start)
"""


def test_memory_does_not_grow_with_the_input(best, tiny_raw_dataset, tmp_path):
    """How far the resident memory rises above where it started during a predict over 96 rows, then over the same
    rows 10 times (960), in one warmed-up process (peak reset before each run; the batches of 32 are the same 3
    batches, so only the row count differs). Each id is 20 kB (heavy to keep, free to predict): planted, a table
    read whole rose 17 MB at 960 rows, rows kept until the end 23 MB; streaming rises 0.1-1 MB (8 runs)."""
    base = read_rows(tiny_raw_dataset / "products.csv")[:96]

    def table(n: int) -> Path:
        return write_rows(tmp_path / f"t{n}.csv", [dict(base[i % 96], id=f"r{i:06d}-" + "x" * 20_000)
                                                   for i in range(n)])

    small, big = table(96), table(960)
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(best), str(tiny_raw_dataset), str(tmp_path / "o.csv"),
                           str(small), str(big)], capture_output=True, text=True, env=child_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rise_small, rise_big = map(float, proc.stdout.split()[-2:])
    assert [r["id"] for r in read_rows(tmp_path / "o.csv")] == [f"r{i:06d}-" + "x" * 20_000 for i in range(960)]
    assert rise_big < 5.0 and rise_small < 5.0, (rise_small, rise_big)
