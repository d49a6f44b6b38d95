"""``mmcat report``: one HTML page that shows how a trained model behaves on a packed split.

Every number on the page is ``mmcat eval``'s: the page is rendered from the very dict that ``mmcat eval --out``
writes (:func:`mmcat.eval_artifact.evaluate_artifact`), so the two cannot disagree. What eval does not keep is
collected in a second pass over the same split with the deployable :class:`mmcat.classifier.Classifier` (the
predict / serve path, which decodes packed samples exactly as eval does): example products of the most-confused
class pairs, and the fused model's calibrated scores for the reliability diagram. With a run directory, the
training curves come from its TensorBoard event files.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mmcat.calibration import BINS, FILE as CALIBRATION_FILE, ece
from mmcat.errors import ConfigError
from mmcat.evaluation import influence_text
from mmcat.report import html as H
from mmcat.report.svg import confusion_svg, line_chart, reliability_svg
from mmcat.train import competition

TOP_PAIRS = 15  # ranked confusions listed beside the matrix
EXAMPLE_PAIRS = 6  # most-confused pairs shown with example products
MODE_COLORS = {"fused": "#4c78a8", "image_only": "#f58518", "text_only": "#54a24b"}


@dataclass
class Example:
    """A misclassified product of one confused pair, as the page shows it."""

    id: str
    title: str
    description: str
    true: str
    pred: str
    score: float
    thumbnail: Optional[str]  # data: URI of the eval view the model saw; None without a photo


@dataclass
class Scan:
    """What the classifier pass collects: examples per (true, predicted) pair, and the fused (score, correct)."""

    examples: Dict[Tuple[str, str], List[Example]] = field(default_factory=dict)
    scores: List[float] = field(default_factory=list)
    correct: List[bool] = field(default_factory=list)


def confused_pairs(matrix: Sequence[Sequence[int]], labels: Sequence[str], top: int) -> List[Tuple[str, str, int]]:
    """Off-diagonal cells, most samples first (ties: in label order): (true, predicted, count)."""
    m = np.asarray(matrix)
    cells = [(-int(m[i, j]), i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j and m[i, j] > 0]
    return [(labels[i], labels[j], -c) for c, i, j in sorted(cells)[:top]]


def scan_split(model_dir: str, data: str, split: str, pairs: Sequence[Tuple[str, str]], per_pair: int,
               batch_size: int = 64, device: str = "auto") -> Scan:
    """One pass of the deployable classifier over the samples ``mmcat eval`` counts: the ``per_pair`` most
    confident mistakes of each pair in ``pairs`` (only those are kept, so memory does not grow with the split),
    and every sample's calibrated fused score and whether it was right."""
    from mmcat.classifier import Classifier
    from mmcat.predict_table import ShardInput

    clf = Classifier.load(model_dir, device=device)
    source = ShardInput(data, split, clf)
    wanted = set(pairs)
    heaps: Dict[Tuple[str, str], List[Tuple[float, int, Any]]] = {p: [] for p in wanted}
    scan, chunk, seen = Scan(), [], 0

    def flush() -> None:
        nonlocal seen
        items = [it for it in (source.prepare(raw, clf.preprocessor) for raw in chunk)
                 if it.counted and it.label is not None]
        for it, p in zip(items, clf.predict_prepared([it.prepared for it in items], top_k=1)):
            pred = p.top_k[0][0]
            scan.scores.append(p.score)
            scan.correct.append(pred == it.label)
            heap = heaps.get((it.label, pred))
            if heap is not None:  # a min-heap of the most confident mistakes
                seen += 1
                entry = (p.score, seen, (it, pred))
                heapq.heappush(heap, entry) if len(heap) < per_pair else heapq.heappushpop(heap, entry)
        chunk.clear()

    for raw in source:
        chunk.append(raw)
        if len(chunk) >= batch_size:
            flush()
    flush()
    for pair, heap in heaps.items():
        scan.examples[pair] = [_example(it, pred, score) for score, _, (it, pred) in sorted(heap, reverse=True)]
    return scan


def _example(item: Any, pred: str, score: float) -> Example:
    text = item.prepared.text or ""
    title, _, description = text.partition("\n")
    pixels = item.prepared.pixels
    return Example(item.id, title, description, item.label, pred, float(score),
                   H.image_uri(pixels) if pixels is not None else None)


def reliability_bins(scores: Sequence[float], correct: Sequence[bool], bins: int = BINS) -> List[Dict[str, float]]:
    """Count, mean confidence and accuracy per equal-width confidence bin (the bins of
    :func:`mmcat.calibration.ece`)."""
    s, c = np.asarray(scores, np.float64), np.asarray(correct, np.float64)
    idx = np.minimum((s * bins).astype(int), bins - 1) if len(s) else np.zeros(0, int)
    count = np.bincount(idx, minlength=bins)
    conf = np.bincount(idx, s, minlength=bins) / np.maximum(count, 1)
    acc = np.bincount(idx, c, minlength=bins) / np.maximum(count, 1)
    return [{"lo": k / bins, "hi": (k + 1) / bins, "count": int(count[k]), "confidence": float(conf[k]),
             "accuracy": float(acc[k])} for k in range(bins)]


# ------------------------------------------------------------------------------------------------ sections
def _modes(report: Dict[str, Any]) -> List[str]:
    return list(report["per_class"])


def headline_section(report: Dict[str, Any]) -> str:
    rows = [[H.cell(m, left=True), H.cell(report[m]["accuracy"]), H.cell(report[m]["macro_f1"]),
             H.cell(report[m]["weighted_f1"]), H.cell(report[m]["num_samples"])] for m in _modes(report)]
    note = f'<p class="note">{report["skipped_samples"]} samples skipped as unreadable.</p>' \
        if report.get("skipped_samples") else ""
    return H.section("Headline (what mmcat eval prints)",
                     H.table(["mode", "accuracy", "macro F1", "weighted F1", "samples"], rows, cls="headline"), note,
                     id="headline")


def _worst_first(per_class: Dict[str, Dict[str, float]]) -> List[str]:
    """Classes by fused F1, lowest first (ties: more support first: the bigger problem)."""
    return sorted(per_class, key=lambda c: (per_class[c]["f1-score"], -per_class[c]["support"]))


def per_class_section(report: Dict[str, Any], labels: Sequence[str]) -> str:
    per_class = report["per_class"]["fused"]
    m = np.asarray(report["confusion_matrix"]["fused"])
    rows = []
    for name in _worst_first(per_class):
        c, i = per_class[name], labels.index(name)
        off = m[i].copy()
        off[i] = 0
        top = f"{labels[int(off.argmax())]} ({int(off.max())})" if off.max() > 0 else ""
        rows.append([H.cell(name, left=True), H.cell(c["precision"]), H.cell(c["recall"]), H.cell(c["f1-score"]),
                     H.cell(int(c["support"])), H.cell(top, left=True)])
    return H.section("Per class (fused), worst first",
                     '<p class="note">Click a column header to sort.</p>',
                     H.table(["class", "precision", "recall", "F1", "support", "most often mistaken for"], rows,
                             sortable=True, cls="per-class"), id="per-class")


def confusion_section(report: Dict[str, Any], labels: Sequence[str]) -> str:
    matrix = report["confusion_matrix"]["fused"]
    ranked = confused_pairs(matrix, labels, TOP_PAIRS)
    support = np.asarray(matrix).sum(axis=1)
    items = [f"{H.esc(t)} \u2192 {H.esc(p)}: <b>{n}</b> <span class=\"note\">"
             f"({n / max(support[labels.index(t)], 1):.0%} of {H.esc(t)})</span>" for t, p, n in ranked]
    ranked_list = H.listing(items) if items else "<p>none: every sample right</p>"
    side = f'<div style="max-width:440px"><h3>Top confusions</h3>{ranked_list}</div>'
    return H.section("Confusion matrix (fused)",
                     '<p class="note">Rows: true class; columns: predicted. Colour: share of the row; numbers: '
                     "counts (hover a cell for both).</p>",
                     f'<div class="row"><div>{confusion_svg(matrix, labels)}</div>{side}</div>', id="confusion")


def examples_section(pairs: Sequence[Tuple[str, str, int]], scan: Scan) -> str:
    if not pairs:
        return H.section("Most-confused pairs", "<p>No mistakes on this split.</p>", id="examples")
    parts = []
    for true, pred, n in pairs:
        cards = []
        for e in scan.examples.get((true, pred), []):
            thumb = H.img(e.thumbnail, f"photo of {e.id}") if e.thumbnail else '<div class="note">(no photo)</div>'
            cards.append(f'<div class="card example">{thumb}<div class="t" title="{H.esc(e.title)}">'
                         f'{H.esc(e.title or "(no text)")}</div><div class="d">{H.esc(e.description)}</div>'
                         f'<div>true <span class="pill ok">{H.esc(e.true)}</span></div>'
                         f'<div>predicted <span class="pill err">{H.esc(e.pred)}</span> '
                         f'<span class="score" data-v="{e.score!r}">{e.score:.2f}</span></div>'
                         f'<div class="note">{H.esc(e.id)}</div></div>')
        parts.append(f"<h3>{H.esc(true)} \u2192 predicted {H.esc(pred)}: {n} samples</h3>"
                     f'<div class="cards">{"".join(cards)}</div>')
    return H.section("Most-confused pairs, with products", '<p class="note">The most confident mistakes of each pair '
                     "(score: the calibrated probability of the predicted class; the photo as the model saw it).</p>",
                     *parts, id="examples")


def modality_section(report: Dict[str, Any], labels: Sequence[str]) -> str:
    modes = _modes(report)
    per_class = report["per_class"]
    header = ["class", *modes]
    rows = [[H.cell("macro F1", left=True), *(_bar_cell(report[m]["macro_f1"], m) for m in modes)]]
    for name in _worst_first(per_class["fused"]):
        rows.append([H.cell(name, left=True), *(_bar_cell(per_class[m][name]["f1-score"], m) for m in modes)])
    return H.section("What each modality contributes (F1 per class)",
                     '<p class="note">The same weights with inputs hidden: <code>image_only</code> / '
                     "<code>text_only</code> see one modality, <code>without_&lt;m&gt;</code> all but one.</p>",
                     H.table(header, rows, sortable=True, cls="modalities", left_columns=len(header)),
                     influence_note(report, labels), id="modalities")


def influence_note(report: Dict[str, Any], labels: Sequence[str]) -> str:
    """Whether the fused model uses each input (the share of its predictions that change when the input is hidden),
    and the warning ``mmcat eval`` logs for an input it ignores."""
    influence = report.get("modality_influence") or {}  # absent from reports written before it existed
    if not influence:
        return ""
    parts = H.esc(influence_text(influence))
    split = report.get("split", "")
    warnings = "".join(
        f'<p class="bad unused">{H.esc(competition.unused_message(m, influence, report, len(labels), split))}</p>'
        for m in report.get("unused_modalities", []))
    return f'<p class="influence">Fused predictions that change when one input is hidden: {parts}.</p>{warnings}'


def _bar_cell(value: float, mode: str) -> str:
    color = MODE_COLORS.get(mode, "#b279a2")
    return f'<td data-v="{float(value)!r}" style="text-align:left">{H.hbar(value, 90, color)} {value:.3f}</td>'


def calibration_section(report: Dict[str, Any], scan: Scan, model_dir: Path, split: str) -> str:
    cal = report["calibration"]
    if not (Path(model_dir) / CALIBRATION_FILE).is_file():
        return H.section("Calibration", f"<p>No {CALIBRATION_FILE} in {H.esc(model_dir)}: scores are uncalibrated "
                         "(T = 1). <code>mmcat calibrate</code> fits it on val.</p>", id="calibration")
    by_input = [[H.cell(mode, left=True), H.cell(v["num_samples"]), H.cell(v["temperature"], "{:.3f}"),
                 H.cell(v["ece_before"]), H.cell(v["ece_after"])] for mode, v in cal["by_input"].items()]
    unreached = (H.cell("unreached"), H.cell(""), H.cell(""))
    coverage = [[H.cell(p, left=True), *((H.cell(v["threshold"]), H.cell(v["precision"]),
                                          H.cell(v["coverage"], "{:.1%}")) if v else unreached)]
                for p, v in cal["coverage_at_precision"].items()]
    diagram = reliability_svg(reliability_bins(scan.scores, scan.correct))
    tables = (H.table(["inputs", "samples", "temperature", "ECE before", "ECE after"], by_input, cls="ece")
              + "<h3>Fused coverage at precision</h3>"
              + H.table(["precision", "score \u2265", "precision reached", "coverage"], coverage, cls="coverage"))
    return H.section("Calibration",
                     f'<p class="note">Reliability of the fused model\'s calibrated scores on {H.esc(split)} '
                     f"(ECE {ece(scan.scores, scan.correct):.4f} over {len(scan.scores)} samples); ECE per input "
                     "combination before / after the temperatures of calibration.json.</p>",
                     f'<div class="row"><div>{diagram}</div><div>{tables}</div></div>', id="calibration")


def curves_section(scalars: Dict[str, List[Tuple[int, float]]]) -> str:
    """Loss, learning rates, samples/s, data-wait fraction and validation macro-F1 per mode, over steps."""
    def pick(prefix: str, suffix: str = "") -> Dict[str, List[Tuple[int, float]]]:
        return {t[len(prefix):len(t) - len(suffix)] or t: v for t, v in scalars.items()
                if t.startswith(prefix) and t.endswith(suffix)}

    charts = [line_chart("train loss", {"loss": scalars.get("train/loss", [])}),
              line_chart("learning rate", pick("lr/")),
              line_chart("samples / s", {"samples/s": scalars.get("train/samples_per_s", [])}),
              line_chart("data-wait fraction", {"wait": scalars.get("train/data_wait_fraction", [])}, y_range=(0, 1)),
              line_chart("val macro F1", pick("val/", "/macro_f1"), y_range=(0, 1))]
    charts = [c for c in charts if c]
    last = max((s for v in scalars.values() for s, _ in v), default=0)
    return H.section("Training curves", f'<p class="note">From the run\'s TensorBoard logs; last step {last}.</p>',
                     f'<div class="row">{"".join(charts) or "<p>no scalars logged</p>"}</div>', id="curves")


# -------------------------------------------------------------------------------------------------- the page
def render_model_report(report: Dict[str, Any], labels: Sequence[str], scan: Scan, model_dir: Path, split: str,
                        examples: int, scalars: Optional[Dict[str, List[Tuple[int, float]]]] = None) -> str:
    pairs = confused_pairs(report["confusion_matrix"]["fused"], labels, EXAMPLE_PAIRS) if examples > 0 else []
    sections = [headline_section(report), confusion_section(report, labels), per_class_section(report, labels),
                examples_section(pairs, scan), modality_section(report, labels),
                calibration_section(report, scan, model_dir, split)]
    if scalars is not None:
        sections.append(curves_section(scalars))
    # eval's dict itself, for scripts that read the page (and the tests that compare it with `mmcat eval --out`)
    data = json.dumps(report, sort_keys=True).replace("</", "<\\/")
    sections.append(f'<script type="application/json" id="eval-json">{data}</script>')
    return H.page(f"mmcat report: {Path(model_dir)}",
                  f"{len(labels)} classes, split {split} of {report['data']}, "
                  f"{report['fused']['num_samples']} samples", sections)


def run_defaults(run_dir: str, data: Optional[str], split: Optional[str]) -> Tuple[str, str, str]:
    """(model dir, data root, split) of a run directory: its ``best/``, and the data and test split of its
    config.yaml unless given."""
    from omegaconf import OmegaConf

    run = Path(run_dir)
    if not (run / "best").is_dir():
        raise ConfigError(f"{run}: no best/ -- not a run directory, or no evaluation has exported a model yet")
    cfg_path = run / "config.yaml"
    cfg = OmegaConf.load(cfg_path) if cfg_path.is_file() else OmegaConf.create({})
    root = data or OmegaConf.select(cfg, "data.root")
    if not root:
        raise ConfigError(f"{run}: no data.root in config.yaml; give --data")
    chosen = split or OmegaConf.select(cfg, "data.test_split") or OmegaConf.select(cfg, "data.val_split") or "test"
    return str(run / "best"), str(root), str(chosen)


def model_report(out: str, model: Optional[str] = None, data: Optional[str] = None, split: Optional[str] = None,
                 run: Optional[str] = None, examples: int = 6, batch_size: int = 64, num_workers: int = 0) -> Path:
    """Evaluate ``model`` on ``split`` of ``data`` (as ``mmcat eval``), find example products of the most-confused
    pairs and write the HTML page to ``out``. With ``run``: the model, data and split default to the run's, and
    the page adds its training curves."""
    from mmcat.eval_artifact import evaluate_artifact
    from mmcat.report.runlogs import read_scalars

    if run is not None:
        model_default, data, split = run_defaults(run, data, split)
        model = model or model_default
    if model is None or data is None:
        raise ConfigError("give --model and --data, or --run")
    split = split or "test"
    report = evaluate_artifact(model, data, split, batch_size, num_workers)
    labels = list(report["per_class"]["fused"])
    pairs = confused_pairs(report["confusion_matrix"]["fused"], labels, EXAMPLE_PAIRS) if examples > 0 else []
    # the device eval's Accelerator picks: CUDA when there is one
    scan = scan_split(model, data, split, [(t, p) for t, p, _ in pairs], examples, batch_size)
    scalars = read_scalars(Path(run)) if run is not None else None
    page = render_model_report(report, labels, scan, Path(model), split, examples, scalars)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)", flush=True)
    return path
