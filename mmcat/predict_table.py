"""``mmcat predict``: categorise a product table or packed shards with a trained model, in batches, in bounded
memory, through the Python API's one preprocessing + forward path (:mod:`mmcat.classifier`).

Rows go: input (read incrementally) -> chunks of ``batch_size`` rows -> :class:`~mmcat.classifier.Preprocessor`
(``product`` for a table row, ``sample`` for a packed sample: decoded exactly as ``mmcat eval`` decodes it) ->
one ``Classifier.predict_prepared`` forward per chunk -> the output file, row by row in input order.

Why this shape:

- memory does not grow with the input: the table is streamed (:class:`mmcat.pack.tables.TableStream`), shards are
  read sample by sample with webdataset, and at most a few chunks are in flight (DataLoader prefetch); the output is
  written as it comes (a Parquet row group per few thousand rows). Only the metrics keep something per labelled
  row: two class indices (8 bytes);
- decoding runs in ``workers`` DataLoader processes, each preparing chunks ``w, w + N, ...``; a DataLoader hands
  out an iterable dataset's items in worker round-robin order, so the output keeps the input order and does not
  depend on ``workers``. The forward runs in the main process, on the GPU when there is one;
- a row that cannot be used (no usable image and no text, a CSV row with the wrong field count) gets ``error``
  and the run goes on; the output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from array import array
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from torch.utils.data import IterableDataset

from mmcat.errors import ConfigError, DataError, OutputError

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
COLUMNS = ("id", "label", "score", "top_k", "modalities", "abstain", "error", "warnings")
PARQUET_ROW_GROUP = 4096  # output rows buffered per Parquet row group
UNKNOWN_NAMES_KEPT = 20  # distinct unknown label names listed in the report (all are counted)


@dataclass
class Item:
    """One input row, ready for the forward: its id, its true label (None: unlabelled or unreadable), whether it
    may enter the metrics, and the prepared inputs."""

    id: str
    label: Optional[str]
    counted: bool
    prepared: Any  # mmcat.classifier.Prepared


# ------------------------------------------------------------------------------------------------------ inputs
def _is_pattern(text: str) -> bool:
    return any(c in text for c in "{*?[") or text.endswith(".tar")


def input_kind(path: str, fmt: str) -> str:
    """csv | jsonl | parquet | shards, from ``--format`` or the input itself (a folder or a shard pattern: shards;
    a file: its extension)."""
    from mmcat.pack.tables import detect_format

    if fmt not in ("auto", "csv", "jsonl", "parquet", "shards"):
        raise ConfigError(f"--format {fmt}: use auto, csv, jsonl, parquet or shards")
    p = Path(path)
    if fmt == "shards" or (fmt == "auto" and (p.is_dir() or _is_pattern(path))):
        return "shards"
    if p.is_dir():
        raise ConfigError(f"input {p}: a folder, not a {fmt} table (a packed dataset folder needs --format shards)")
    if not p.is_file():
        raise ConfigError(f"input {p}: file not found")
    if fmt != "auto":
        return fmt
    try:
        return detect_format(p)  # the extension, looking through a .gz (products.csv.gz: csv)
    except ConfigError:
        raise ConfigError(f"input {p}: cannot tell the format from the extension; "
                          f"pass --format csv|jsonl|parquet|shards") from None


class TableInput:
    """The rows of a product table in the ``mmcat pack`` layout: photo paths relative to ``images_root`` (an
    absolute path wins, as in pack), text columns joined as pack joins them, the model's attribute columns."""

    def __init__(self, path: Path, fmt: str, images_root: Optional[str], id_column: str, image_column: str,
                 text_columns: Sequence[str], label_column: str, attribute_columns: Sequence[str]) -> None:
        from mmcat.pack.tables import TableStream

        self.id_column, self.image_column, self.label_column = id_column, image_column, label_column
        self.text_columns, self.attribute_columns = list(text_columns), list(attribute_columns)
        hints = {c: f"the model's attributes.json reads {', '.join(self.attribute_columns)}"
                 for c in self.attribute_columns}
        self.stream = TableStream(path, fmt, [id_column, image_column, *self.text_columns, *self.attribute_columns],
                                  optional=[label_column], hints=hints)
        self.labelled = label_column in self.stream.columns
        self.images_root = Path(images_root) if images_root else Path(path).parent
        if not self.images_root.is_dir():
            raise ConfigError(f"--images-root {self.images_root}: not a directory")
        self.total = self.stream.num_rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.stream)

    def record_id(self, record: Any) -> str:
        return record[0].get(self.id_column, "")

    def prepare(self, record: Any, pre: Any) -> Item:
        from mmcat.classifier import Prepared

        values, problem = record
        label = (values.get(self.label_column, "").strip() or None) if self.labelled else None
        if problem is not None:
            unread = Prepared(None, None, {}, error=f"row not read: {problem}")
            return Item(values[self.id_column], label, False, unread)
        rel = values[self.image_column].strip()
        image = str(self.images_root / rel) if rel else None  # as mmcat pack's build_plan resolves it
        attributes = ({c: values[c].strip() or None for c in self.attribute_columns}
                      if self.attribute_columns else None)
        prepared = pre.product(image=image, text=[values[c] for c in self.text_columns], attributes=attributes)
        return Item(values[self.id_column], label, True, prepared)


class ShardInput:
    """The samples of packed shards (a packed folder and ``split``, or a shard pattern), read with webdataset in
    shard order. Labels: the ``cls`` index through the data's labels.json, or a ``json:<field>`` name (the model's
    ``data.label_key``, as ``mmcat eval``)."""

    def __init__(self, root: str, split: str, clf: Any) -> None:
        from mmcat.data.shards import all_shards, check_root_exists, find_labels, root_entries, shard_sources

        data_cfg = clf.artifact.data_config(root)
        for entry in root_entries(data_cfg):
            check_root_exists(entry, "input")
        sources = shard_sources(data_cfg, split, count_missing=False)
        self.shards = all_shards(sources)
        sizes = [src.sizes.get(s) for src in sources for s in src.shards]
        self.total = sum(sizes) if all(n is not None for n in sizes) else None
        self.label_key = str(data_cfg.label_key)
        self.data_labels = find_labels(data_cfg)
        self.labelled = self.label_key != "cls" or self.data_labels is not None

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        import webdataset as wds

        for url in self.shards:
            try:
                yield from wds.tarfile_samples(iter([{"url": url}]))
            except (OSError, ValueError) as exc:  # webdataset re-raises tar and OS errors as they come
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise DataError(f"shard {url} is not a readable tar file ({why})") from None

    def record_id(self, raw: Dict[str, Any]) -> str:
        return str(raw.get("__key__", ""))

    def prepare(self, raw: Dict[str, Any], pre: Any) -> Item:
        from mmcat.modalities import sample_json

        prepared = pre.sample(raw)
        meta = sample_json(raw) or {}
        key = str(meta.get("id") or raw["__key__"])  # the product id mmcat pack stored, else the sample key
        return Item(key, self._label(raw, meta), _eval_counts(raw, prepared), prepared)

    def _label(self, raw: Dict[str, Any], meta: Dict[str, Any]) -> Optional[str]:
        from mmcat.data.samples import BadSample, LabelReader

        if self.label_key == "cls":
            if self.data_labels is None:
                return None
            try:
                return self.data_labels[LabelReader("cls", self.data_labels)(raw)]
            except BadSample:
                return None
        value = meta.get(self.label_key[len("json:"):])
        return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _eval_counts(raw: Dict[str, Any], prepared: Any) -> bool:
    """Whether ``mmcat eval`` counts this sample: it skips one whose packed photo does not decode (predict then
    uses the text, with a warning) or whose text is not UTF-8, so the metrics leave those out too."""
    if prepared.error or prepared.warnings:
        return False
    try:
        bytes(raw.get("txt") or b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Chunks(IterableDataset):
    """Iterable dataset: the input in chunks of ``batch_size`` prepared items. In DataLoader worker ``w`` of ``N``
    only chunks ``w, w + N, ...`` are prepared (every worker reads the input, the cheap part, and decodes only
    its own chunks); the DataLoader then returns them in chunk order."""

    def __init__(self, source: Any, preprocessor: Any, batch_size: int) -> None:
        self.source, self.pre, self.batch_size = source, preprocessor, int(batch_size)

    def __iter__(self) -> Iterator[List[Item]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            import cv2

            cv2.setNumThreads(1)  # one decode thread per worker: the workers are the parallelism
        chunk: List[Item] = []
        for i, record in enumerate(self.source):
            if (i // self.batch_size) % workers != worker:
                continue
            chunk.append(self._prepare(record))
            if len(chunk) == self.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _prepare(self, record: Any) -> Item:
        from mmcat.classifier import Prepared

        try:
            return self.source.prepare(record, self.pre)
        except Exception as exc:  # an unexpected decoder failure costs one row, not the run
            return Item(self.source.record_id(record), None, False,
                        Prepared(None, None, {}, error=f"{type(exc).__name__}: {exc}"))


def _as_is(chunk: List[Item]) -> List[Item]:
    return chunk


# ----------------------------------------------------------------------------------------------------- output
@contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {exc.filename or path}: {exc.strerror or type(exc).__name__} "
                          f"(choose another --out)") from None


class Output:
    """Output rows streamed to ``.NAME.tmp`` beside ``path`` and renamed to ``path`` when complete
    (:func:`mmcat.files.publish_file`): a reader never sees half a file."""

    def __init__(self, path: Union[str, Path]) -> None:
        from mmcat.files import temp_path

        self.path = Path(path)
        self.fmt = output_format(self.path)
        self.tmp = temp_path(self.path)
        self._rows: List[Dict[str, Any]] = []
        with _writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                self.schema = pa.schema([
                    ("id", pa.string()), ("label", pa.string()), ("score", pa.float64()),
                    ("top_k", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
                    ("modalities", pa.string()), ("abstain", pa.bool_()), ("error", pa.string()),
                    ("warnings", pa.list_(pa.string()))])
                self._file = pq.ParquetWriter(str(self.tmp), self.schema)
            else:
                self._file = open(self.tmp, "w", newline="", encoding="utf-8")
                if self.fmt == "csv":
                    self._csv = csv.writer(self._file)
                    self._csv.writerow(COLUMNS)

    def write(self, rows: Sequence[Dict[str, Any]]) -> None:
        with _writing(self.tmp):
            if self.fmt == "parquet":
                self._rows.extend(rows)
                if len(self._rows) >= PARQUET_ROW_GROUP:
                    self._flush()
            elif self.fmt == "jsonl":
                self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            else:
                self._csv.writerows([_csv_cells(r) for r in rows])

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._file.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def commit(self) -> None:
        from mmcat.files import publish_file

        with _writing(self.tmp):
            if self.fmt == "parquet":
                self._flush()
            self._file.close()
            publish_file(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def output_format(path: Path) -> str:
    try:
        return OUTPUT_FORMATS[path.suffix.lower()]
    except KeyError:
        raise ConfigError(f"--out {path}: cannot tell the output format from '{path.suffix}' "
                          f"(use .csv, .jsonl or .parquet)") from None


def _csv_cell(value: Any) -> str:
    """Lists as JSON, booleans true/false (as in the JSON output), None empty, floats in full (repr reads back
    exactly)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _csv_cells(row: Dict[str, Any]) -> List[str]:
    return [_csv_cell(row[col]) for col in COLUMNS]


def output_row(item: Item, p: Any) -> Dict[str, Any]:
    return {"id": item.id, "label": p.label, "score": None if p.error else float(p.score),
            "top_k": [{"label": k, "score": float(s)} for k, s in p.top_k], "modalities": p.modalities,
            "abstain": bool(p.abstain), "error": p.error, "warnings": list(p.warnings)}


# ---------------------------------------------------------------------------------------------------- metrics
class Tally:
    """What the run saw, and the top-1 labels against the true ones of the rows whose label the model knows
    (abstaining does not change them: they measure the model; coverage and precision measure the threshold)."""

    def __init__(self, labels: Sequence[str], min_score: Optional[float]) -> None:
        self.labels, self.min_score = list(labels), min_score
        self.index = {name: i for i, name in enumerate(self.labels)}
        self.y_true, self.y_pred = array("i"), array("i")
        self.rows = self.errors = self.abstained = self.warned = 0
        self.unlabelled = self.not_counted = self.unknown_rows = self.accepted = self.accepted_correct = 0
        self.unknown: Counter = Counter()

    def add(self, item: Item, p: Any) -> None:
        self.rows += 1
        self.errors += p.error is not None
        self.abstained += bool(p.abstain)
        self.warned += bool(p.warnings)
        if p.error is not None:
            return
        if item.label is None:
            self.unlabelled += 1
        elif item.label not in self.index:
            self.unknown_rows += 1
            if item.label in self.unknown or len(self.unknown) < UNKNOWN_NAMES_KEPT:
                self.unknown[item.label] += 1
        elif not item.counted:
            self.not_counted += 1
        else:
            top = p.top_k[0][0]
            self.y_true.append(self.index[item.label])
            self.y_pred.append(self.index[top])
            if not p.abstain:
                self.accepted += 1
                self.accepted_correct += top == item.label

    def metrics(self) -> Optional[Dict[str, Any]]:
        from mmcat.metrics import classification_metrics

        return classification_metrics(self.y_true, self.y_pred, self.labels) if len(self.y_true) else None

    def report(self, metrics: Optional[Dict[str, Any]], title: str) -> List[str]:
        from mmcat.metrics import format_table

        lines = [format_table({"fused": metrics}, title=title)] if metrics else []
        if self.unknown_rows:
            more = self.unknown_rows > sum(self.unknown.values())  # names past UNKNOWN_NAMES_KEPT
            names = ", ".join(sorted(self.unknown)) + (", ..." if more else "")
            lines.append(f"{self.unknown_rows} row(s) with a label the model does not know ({names}): "
                         f"left out of the metrics")
        if self.unlabelled and (metrics or self.unknown_rows):
            lines.append(f"{self.unlabelled} row(s) without a label: left out of the metrics")
        if self.errors and metrics:
            lines.append(f"{self.errors} row(s) with an error (no prediction): left out of the metrics")
        if self.not_counted:
            lines.append(f"{self.not_counted} sample(s) left out of the metrics as mmcat eval skips them (photo "
                         f"that does not decode, text that is not UTF-8); their predictions are in the output")
        if metrics and self.min_score is not None:
            n = len(self.y_true)
            precision = self.accepted_correct / self.accepted if self.accepted else float("nan")
            lines.append(f"--min-score {self.min_score:g}: coverage {self.accepted / n:.4f} ({self.accepted}/{n}) "
                         f"not abstained, precision of the accepted {precision:.4f}")
        return lines


# ------------------------------------------------------------------------------------------------------- main
def _classifier(model: Any, device: str) -> Any:
    from mmcat.classifier import Classifier

    if isinstance(model, Classifier):
        return model
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(f"--model {path}: no such directory")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available here (use --device auto or cpu)")
    return Classifier.load(path, device=device)


def _attribute_columns(clf: Any) -> List[str]:
    """The table columns the model's attributes modality reads (named by its best/attributes.json)."""
    m = next((m for m in clf.preprocessor.modalities if m.name == "attributes"), None)
    if m is None:
        return []
    unsupported = [x.name for x in clf.preprocessor.modalities if x.name != "attributes"]
    if unsupported:
        raise ConfigError(f"the model reads plug-in modalities ({', '.join(unsupported)}) that a table cannot give; "
                          f"predict on packed shards, or through the Python API")
    return [c["name"] for c in (*m.categorical, *m.numeric)]


def predict_file(model: Any, input: Union[str, Path], out: Union[str, Path], fmt: str = "auto",
                 images_root: Optional[str] = None, top_k: int = 3, batch_size: int = 64, device: str = "auto",
                 min_score: Optional[float] = None, workers: int = 0, split: str = "test", id_column: str = "id",
                 image_column: str = "image", text_columns: Sequence[str] = ("title", "description"),
                 label_column: str = "category", quiet: bool = False, progress: Optional[bool] = None
                 ) -> Dict[str, Any]:
    """Predict every row of ``input`` (a product table, a packed folder + ``split``, or a shard pattern) with
    ``model`` (an artifact folder, ``RUN/best``, or a loaded :class:`~mmcat.classifier.Classifier`) into ``out``
    (.csv, .jsonl or .parquet). Prints the metrics table when the input has labels (unless ``quiet``); returns a
    summary. Bad settings raise ``ConfigError`` / ``DataError`` (one line) before anything is written.
    ``progress``: the tqdm bar on stderr (None: when stderr is a terminal)."""
    if batch_size < 1 or top_k < 1 or workers < 0:
        raise ConfigError("--batch-size and --top-k must be >= 1, --workers >= 0")
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise ConfigError(f"--min-score {min_score}: must be within 0..1 (a calibrated probability)")
    kind = input_kind(str(input), fmt)
    output_format(Path(out))
    clf = _classifier(model, device)
    if kind == "shards":
        source: Any = ShardInput(str(input), split, clf)
    else:
        source = TableInput(Path(input), kind, images_root, id_column, image_column, list(text_columns),
                            label_column, _attribute_columns(clf))
    tally = Tally(clf.labels, min_score)
    sink = Output(out)
    started = time.perf_counter()
    try:
        _run(clf, source, sink, tally, batch_size, workers, top_k, min_score, progress)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    seconds = time.perf_counter() - started
    return _finish(tally, source, kind, clf, input, split, out, seconds, quiet)


def _run(clf: Any, source: Any, sink: Output, tally: Tally, batch_size: int, workers: int, top_k: int,
         min_score: Optional[float], progress: Optional[bool]) -> None:
    """Prepared chunks (from ``workers`` processes, in input order) -> one forward each -> output and tally."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from mmcat.data.loader import iterate_batches

    if workers > 0:
        import cv2

        cv2.setNumThreads(1)  # a forked worker can deadlock on a copied OpenCV thread pool (as the loaders)
    loader = DataLoader(Chunks(source, clf.preprocessor, batch_size), batch_size=None, collate_fn=_as_is,
                        num_workers=workers, prefetch_factor=2 if workers else None)
    disable = None if progress is None else not progress  # None: tqdm shows it only on a terminal
    with tqdm(total=source.total, unit="product", desc="predict", disable=disable, file=sys.stderr) as bar, \
            iterate_batches(loader) as chunks:
        for chunk in chunks:
            predictions = clf.predict_prepared([item.prepared for item in chunk], top_k, min_score)
            sink.write([output_row(item, p) for item, p in zip(chunk, predictions)])
            for item, p in zip(chunk, predictions):
                tally.add(item, p)
            bar.update(len(chunk))


def _finish(tally: Tally, source: Any, kind: str, clf: Any, input: Any, split: str, out: Any, seconds: float,
            quiet: bool) -> Dict[str, Any]:
    from mmcat.metrics import summary

    metrics = tally.metrics()
    title = f"[{split}] {clf.artifact.path}" if kind == "shards" else f"[{Path(input).name}] {clf.artifact.path}"
    predicted = tally.rows - tally.errors
    rate = tally.rows / seconds if seconds > 0 else float("nan")
    lines = tally.report(metrics, title) if source.labelled else []
    lines.append(f"{tally.rows} rows -> {out}: {predicted} predicted ({tally.abstained} abstained), "
                 f"{tally.errors} error(s), {tally.warned} with warnings; {seconds:.1f} s, {rate:.1f} products/s")
    if not quiet:
        print("\n".join(lines), flush=True)
    n = len(tally.y_true)
    return {"rows": tally.rows, "predicted": predicted, "errors": tally.errors, "abstained": tally.abstained,
            "with_warnings": tally.warned, "out": str(out), "seconds": seconds, "products_per_s": rate,
            "metrics": summary(metrics) if metrics else None, "unlabelled": tally.unlabelled,
            "unknown_labels": dict(tally.unknown), "unknown_label_rows": tally.unknown_rows,
            "not_counted": tally.not_counted,
            "coverage": tally.accepted / n if n and tally.min_score is not None else None,
            "precision_accepted": (tally.accepted_correct / tally.accepted
                                   if tally.accepted and tally.min_score is not None else None),
            "report": lines}
