"""``mmcat report`` and ``mmcat inspect --html``: self-contained pages whose numbers are ``mmcat eval``'s, whose
examples are real products of the split, and that a real browser opens without script errors; the trainer's
TensorBoard confusion matrix with class names, per-class F1 scalars, and a logged last optimizer step.

One short training run (log_every larger than the run, an evaluation at every step, early stopping after one
evaluation without improvement) serves every test here: it stops early, the case where the last step went
unlogged."""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from bs4 import BeautifulSoup
from PIL import Image

from mmcat.cli import main
from train_helpers import metrics, mmcat_cmd, run, tb_scalars, write_config

FULL_STEPS = 12  # the tiny config's 2 epochs on tiny_packed_dataset, when nothing stops it early


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def report_run(tiny_packed_dataset, tiny_text, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("report_run")
    cfg = write_config(work / "train.yaml", tiny_text, tiny_packed_dataset, work / "run", train__log_every=50,
                       train__eval_every=1, train__early_stopping_patience=1)
    run(mmcat_cmd("train", "--config", str(cfg)))
    return work / "run"


# The commands below run in this process (mmcat.cli.main, as `mmcat ...` would): a subprocess each would spend
# most of its time importing torch.
@pytest.fixture(scope="module")
def eval_json(report_run, tiny_packed_dataset, tmp_path_factory) -> Dict:
    out = tmp_path_factory.mktemp("report_eval") / "eval.json"
    assert main(["eval", "--model", str(report_run / "best"), "--data", str(tiny_packed_dataset),
                 "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def model_page(report_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_html") / "nested" / "report.html"
    assert main(["report", "--run", str(report_run), "--out", str(out), "--examples", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def dataset_page(tiny_packed_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset_html") / "dataset.html"
    assert main(["inspect", str(tiny_packed_dataset), "--html", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def products(tiny_raw_dataset) -> Dict[str, Dict[str, str]]:
    with open(tiny_raw_dataset / "products.csv", newline="", encoding="utf-8") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def labels_of(run_dir: Path) -> List[str]:
    return json.loads((run_dir / "best" / "labels.json").read_text())


def values(row) -> List[float]:
    return [float(td["data-v"]) for td in row.find_all("td") if td.has_attr("data-v")]


def decode_data_uri(uri: str) -> Image.Image:
    head, _, data = uri.partition(",")
    assert re.fullmatch(r"data:image/(jpeg|png);base64", head), head
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_last_optimizer_step_is_logged(report_run):
    """The run stops early (eval_every=1, patience 1) long before log_every=50: the loss curve still ends at the
    run's last optimizer step."""
    steps = sorted(tb_scalars(report_run))
    final = metrics(report_run)["global_step"]
    assert final < FULL_STEPS  # early stopping ended it, the case that went unlogged
    assert steps == [1, final]


def test_tensorboard_confusion_image_and_per_class_f1(report_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    labels = labels_of(report_run)
    (events,) = (report_run / "tensorboard" / "mmcat").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    images = acc.Images("val/confusion_matrix")
    assert [e.step for e in images] == sorted(tb_scalars(report_run, "val/fused/macro_f1"))
    picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert min(picture.shape[:2]) >= 400  # a labelled figure, not the 4 x 24 px heat map of before
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50  # text and colour scale, not flat blocks
    macro = tb_scalars(report_run, "val/fused/macro_f1")
    per_class = {name: tb_scalars(report_run, f"val/per_class_f1/{name}") for name in labels}
    for step, value in macro.items():  # macro F1 is the mean of the per-class F1 of every label
        assert np.mean([per_class[name][step] for name in labels]) == pytest.approx(value, abs=1e-6)


def test_confusion_figure_names_classes_and_counts():
    from mmcat.train.tensorboard import confusion_figure, figure_rgb

    labels = ["boots", "sandals", "watches"]
    fig = confusion_figure([[3, 1, 0], [0, 4, 2], [5, 0, 0]], labels)
    ax, colorbar = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted label", "true label")
    assert sorted(t.get_text() for t in ax.texts) == sorted(["3", "1", "4", "2", "5"])  # every non-zero count
    assert colorbar.get_ylabel() == "share of the true class"
    pixels = figure_rgb(fig)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 400


def test_confusion_matrix_svg_for_50_classes_is_compact_and_named():
    """50 classes: every name on both axes, one cell per pair with its count, and a matrix narrow enough for the
    ranked list of confusions to sit beside it on the page (max-width 1180 px)."""
    from mmcat.report.svg import confusion_svg

    labels = [f"category number {i}" for i in range(50)]
    matrix = (np.arange(2500).reshape(50, 50) % 7).tolist()
    svg = BeautifulSoup(confusion_svg(matrix, labels), "html.parser").svg
    assert [t.get_text() for t in svg.find_all("text", class_="axis-y")] == labels
    assert [t.get_text() for t in svg.find_all("text", class_="axis-x")] == labels
    assert [int(r["data-count"]) for r in svg.find_all("rect", class_="cm")] == [n for row in matrix for n in row]
    assert float(svg["width"]) < 1180 - 440 - 24  # the page's width less the list's and the gap


# ------------------------------------------------------------------------------------------- model report
def test_model_report_numbers_are_evals(model_page, eval_json, report_run, tiny_packed_dataset):
    page = soup(model_page)
    labels = labels_of(report_run)
    modes = list(eval_json["per_class"])
    embedded = json.loads(page.find("script", id="eval-json").string)
    assert embedded == eval_json  # --run picked the run's best/, data and test split
    headline = page.find("table", class_="headline").tbody.find_all("tr")
    assert [r.td.get_text() for r in headline] == modes
    for row, mode in zip(headline, modes):
        want = eval_json[mode]
        assert values(row) == [want["accuracy"], want["macro_f1"], want["weighted_f1"], want["num_samples"]]
        assert row.find_all("td")[2].get_text() == f"{want['macro_f1']:.4f}"

    rows = page.find("table", class_="per-class").tbody.find_all("tr")
    names = [r.td.get_text() for r in rows]
    assert sorted(names) == sorted(labels)
    fused = eval_json["per_class"]["fused"]
    for row, name in zip(rows, names):
        c = fused[name]
        assert values(row) == [c["precision"], c["recall"], c["f1-score"], c["support"]]
    f1 = [fused[n]["f1-score"] for n in names]
    assert f1 == sorted(f1)  # worst first

    matrix = page.find("svg", id="confusion-matrix")
    assert [t.get_text() for t in matrix.find_all("text", class_="axis-y")] == labels
    assert [t.get_text() for t in matrix.find_all("text", class_="axis-x")] == labels
    counts = [int(r["data-count"]) for r in matrix.find_all("rect", class_="cm")]
    assert counts == [n for row in eval_json["confusion_matrix"]["fused"] for n in row]

    for row in page.find("table", class_="modalities").tbody.find_all("tr")[1:]:
        name = row.td.get_text()
        assert values(row) == [eval_json["per_class"][m][name]["f1-score"] for m in modes]

    influence = page.find("p", class_="influence").get_text()  # does the fused model use each input
    assert influence == "Fused predictions that change when one input is hidden: " + ", ".join(
        f"{m} {v['changed']:.1%} of {v['samples']}" for m, v in eval_json["modality_influence"].items()) + "."
    assert len(eval_json["modality_influence"]) == 2 and page.find("p", class_="unused") is None

    ece_rows = page.find("table", class_="ece").tbody.find_all("tr")
    by_input = eval_json["calibration"]["by_input"]
    assert [r.td.get_text() for r in ece_rows] == list(by_input)
    for row, v in zip(ece_rows, by_input.values()):
        assert values(row) == [v["num_samples"], v["temperature"], v["ece_before"], v["ece_after"]]
    assert page.find("svg", id="reliability") is not None


def test_model_report_names_an_input_the_fused_model_ignores():
    """The warning mmcat eval logs, on the page too (the report dict as eval writes it for such a model)."""
    from mmcat.report.model import influence_note

    report = {"split": "test", "fused": {"macro_f1": 0.74}, "image_only": {"macro_f1": 0.74},
              "text_only": {"macro_f1": 0.62}, "unused_modalities": ["text"],
              "modality_influence": {"image": {"samples": 120, "changed": 0.4},
                                     "text": {"samples": 120, "changed": 0.0}}}
    page = BeautifulSoup(influence_note(report, ["a", "b", "c", "d", "e", "f"]), "html.parser")
    assert page.find("p", class_="influence").get_text().endswith("image 40.0% of 120, text 0.0% of 120.")
    warning = page.find("p", class_="unused").get_text()
    assert warning.startswith("the fused model does not use 'text': hiding it changes 0.0% of the test predictions")
    assert "text_only scores macro-F1 0.620 (chance 0.167)" in warning
    assert influence_note({"split": "test"}, ["a"]) == ""  # a report written before influence existed


def test_model_report_examples_are_products_of_the_pair(model_page, eval_json, report_run, products):
    """Each example card is a test product whose table row has the card's true label and title, shown under the
    pair it belongs to, with its photo embedded as an image that decodes."""
    from mmcat.report.model import EXAMPLE_PAIRS, confused_pairs

    labels = labels_of(report_run)
    pairs = confused_pairs(eval_json["confusion_matrix"]["fused"], labels, EXAMPLE_PAIRS)
    assert pairs, "the tiny early-stopped model makes mistakes"
    section = soup(model_page).find("section", id="examples")
    headings = section.find_all("h3")
    assert [h.get_text() for h in headings] == [f"{t} \u2192 predicted {p}: {n} samples" for t, p, n in pairs]
    for heading, (true, pred, count) in zip(headings, pairs):
        cards = heading.find_next_sibling("div", class_="cards").find_all("div", class_="card")
        assert len(cards) == min(3, count)
        for card in cards:
            pid = card.find_all("div", class_="note")[-1].get_text()
            assert products[pid]["category"] == true
            assert card.find("div", class_="t").get_text() == products[pid]["title"]
            pills = [s.get_text() for s in card.find_all("span", class_="pill")]
            assert pills == [true, pred]
            score = float(card.find("span", class_="score")["data-v"])
            assert 1 / len(labels) <= score <= 1.0  # the top-1 probability
            assert decode_data_uri(card.img["src"]).size[0] > 8


def test_model_report_has_training_curves_to_the_last_step(model_page, report_run):
    curves = soup(model_page).find("section", id="curves")
    titles = [s["aria-label"] for s in curves.find_all("svg")]
    assert titles == ["train loss", "learning rate", "samples / s", "data-wait fraction", "val macro F1"]
    assert f"last step {metrics(report_run)['global_step']}" in curves.get_text()


def test_pages_fetch_nothing(model_page, dataset_page):
    for path in (model_page, dataset_page):
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text
        page = BeautifulSoup(text, "html.parser")
        assert not page.find_all("link") and not page.find_all("iframe")
        for tag in page.find_all(src=True):
            assert tag["src"].startswith("data:"), tag["src"][:80]
        for tag in page.find_all(href=True):
            assert tag["href"].startswith("#"), tag["href"]
        assert all(not s.has_attr("src") for s in page.find_all("script"))
        assert "url(" not in "".join(s.get_text() for s in page.find_all("style"))


def test_report_refuses_a_folder_without_best(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err.strip() == f"mmcat report: error: {tmp_path}: no best/ -- not a run directory, " \
                                              "or no evaluation has exported a model yet"
    assert not (tmp_path / "r.html").exists()


def test_inspect_json_stays_parseable_with_html(tiny_packed_dataset, tmp_path, capsys):
    assert main(["inspect", str(tiny_packed_dataset), "--json", "--html", str(tmp_path / "d.html")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["total_samples"] > 0
    assert f"wrote {tmp_path / 'd.html'}" in err and (tmp_path / "d.html").is_file()


# ----------------------------------------------------------------------------------------- dataset report
def test_dataset_page_shows_the_manifest_and_products_per_class(dataset_page, tiny_packed_dataset, products):
    """Tables equal the manifest; each class shows 4 train products of that class (joined to the product table by
    id), each with its packed photo."""
    from mmcat.inspect_dataset import split_samples

    manifest = json.loads((tiny_packed_dataset / "manifest.json").read_text())
    packed = {json.loads(s["json"])["id"]: s["jpg"] for s in split_samples(tiny_packed_dataset, manifest, "train")}
    page = soup(dataset_page)
    splits = page.find("table", class_="splits").tbody.find_all("tr")
    assert {r.td.get_text(): values(r)[:2] for r in splits} == \
        {n: [s["samples"], len(s["shards"])] for n, s in manifest["splits"].items()}
    counts = page.find("table", class_="label-counts").tbody.find_all("tr")
    assert [r.td.get_text() for r in counts] == manifest["labels"]
    for row in counts:
        label = row.td.get_text()
        assert values(row) == [s["label_counts"].get(label, 0) for s in manifest["splits"].values()]
    assert "No failures" in page.find("section", id="failures").get_text()
    headings = page.find("section", id="samples").find_all("h3")
    assert [h.get_text() for h in headings] == manifest["labels"]
    for heading in headings:
        cards = heading.find_next_sibling("div", class_="cards").find_all("div", class_="card")
        assert len(cards) == 4
        for card in cards:
            pid = card.find_all("div", class_="note")[-1].get_text()
            assert products[pid]["category"] == heading.get_text()
            assert card.find("div", class_="t").get_text() == products[pid]["title"]
            shown = np.asarray(decode_data_uri(card.img["src"]).convert("RGB"), dtype=np.float64)
            photo = np.asarray(Image.open(io.BytesIO(packed[pid])).convert("RGB"), dtype=np.float64)
            assert shown.shape == photo.shape  # small enough to be shown as packed
            assert np.abs(shown - photo).mean() < 6  # the same picture (re-encoded as JPEG)


def test_dataset_page_lists_failures_by_reason(bad_packed_dataset, tmp_path):
    out = tmp_path / "bad.html"
    assert main(["inspect", str(bad_packed_dataset), "--html", str(out)]) == 0
    failures = {}
    with open(bad_packed_dataset / "failures.jsonl", encoding="utf-8") as f:
        for r in map(json.loads, filter(str.strip, f)):
            failures[f"{r['kind']}:{r['reason']}"] = failures.get(f"{r['kind']}:{r['reason']}", 0) + 1
    rows = soup(out).find("table", class_="failures").tbody.find_all("tr")
    assert {r.td.get_text(): values(r)[0] for r in rows} == failures


# ------------------------------------------------------------------------------------------------ browser
def _chromium(binary: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", "--enable-logging=stderr", "--v=0", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


MEASURE = """<script>(function(){var r=document.getElementById('%s').getBoundingClientRect();
document.documentElement.setAttribute('data-box',[r.left,r.top,r.width,r.height].join(','));})();</script>"""
# clicks the per-class table's F1 header twice (ascending, then descending) and records the F1 column's order
SORT = """<script>(function(){var t=document.querySelector('table.per-class'),th=t.tHead.rows[0].cells[3];
th.click();th.click();
var v=Array.prototype.map.call(t.tBodies[0].rows,function(r){return r.cells[3].getAttribute('data-v');});
document.documentElement.setAttribute('data-sorted',v.join(','));})();</script>"""


def _open(binary: str, page: Path, size=(1200, 1600), screenshot: Path = None):
    """Load ``page`` in headless chromium: (its DOM after the scripts ran, chromium's stderr); with ``screenshot``,
    the same load also writes the window as a PNG."""
    shot = [f"--screenshot={screenshot}"] if screenshot else []
    proc = _chromium(binary, f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=3000", *shot,
                     "--dump-dom", page.as_uri())
    return BeautifulSoup(proc.stdout, "html.parser").html, proc.stderr


@pytest.mark.browser
@pytest.mark.parametrize("which, element", [("model", "confusion-matrix"), ("dataset", "samples")])
def test_pages_load_in_chromium_without_errors(chromium, model_page, dataset_page, which, element, tmp_path):
    """Chromium loads the page from disk: no script error or console.error (recorded by the page itself on
    <html data-js-errors>), every script ran (data-js-ready), and the screenshot shows the matrix (or the photo
    grid): the pixels where the element lies are not blank."""
    page = model_page if which == "model" else dataset_page
    size = (1200, 1600)
    # a copy of the page also says where the element lies (it adds nothing visible: the layout is the page's)
    probe = tmp_path / "probe.html"
    extra = MEASURE % element + (SORT if which == "model" else "")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", extra + "</body>"), encoding="utf-8")
    shot = tmp_path / f"{which}.png"
    dom, stderr = _open(chromium, probe, size, shot)
    assert json.loads(dom["data-js-errors"]) == []
    assert dom["data-js-ready"] == "1"
    assert "Uncaught" not in stderr, stderr[-2000:]
    left, top, width, height = (float(v) for v in dom["data-box"].split(","))
    assert width > 100 and height > 100 and top < size[1]
    if which == "model":  # the sortable table sorts: best F1 first after the second click
        f1 = [float(v) for v in dom["data-sorted"].split(",")]
        assert f1 == sorted(f1, reverse=True) and f1 != sorted(f1)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    region = pixels[int(top):int(min(top + height, size[1])), int(left):int(left + width)]
    assert region.size and region.std() > 20  # drawn: coloured cells and text, not a blank area
    assert len(np.unique(region.reshape(-1, 3), axis=0)) > 20


@pytest.mark.browser
def test_a_script_error_is_caught_by_the_page(chromium, tmp_path):
    """The check above can fail: a page of the same skeleton with a broken script reports it."""
    from mmcat.report.html import page

    broken = tmp_path / "broken.html"
    broken.write_text(page("t", "s", ["<script>console.error('bad value'); undefinedFunction();</script>"]))
    dom, _ = _open(chromium, broken, (400, 300))
    errors = json.loads(dom["data-js-errors"])
    assert errors[0] == "bad value" and "undefinedFunction" in errors[1]
