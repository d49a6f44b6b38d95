"""Public datasets packed as they are distributed: `mmcat pack INPUT --format rakuten|rakuten-ens|abo|fashion` and
`--format auto`.

Each fixture is written here in the layout's exact files (~30 products, with the bad rows each real download has),
with the expected outcome per source row. Every check reads the shards back with plain webdataset and joins each
sample to its source row by id (the ids are letters and digits, so the id is the sample key): labels, text, which
samples have a photo, and failures.jsonl, compared whole -- never counters alone.
"""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Dict, Tuple

import pytest

from _shards import jpeg_bytes
from conftest import pack_config
from mmcat.errors import ConfigError
from train_helpers import mmcat_cmd, run, write_config

SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}
KW = dict(image_size=32, max_samples_per_shard=8, splits=SPLITS)


def pack(input: Path, out: Path, **kw) -> dict:
    from mmcat.pack import pack as _pack

    return _pack(pack_config(input, out, **{**KW, **kw}))


def read_back(out: Path) -> Dict[str, dict]:
    """{key: {label (cls through labels.json, checked against json), txt, has jpg, id}} over every split, read with
    plain webdataset."""
    import webdataset as wds

    labels = json.loads((out / "labels.json").read_text())
    urls = sorted(str(p) for p in out.glob("*/shard-*.tar"))
    got = {}
    for s in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(s["json"])
        assert labels[int(s["cls"])] == meta["label"]  # the index and the name agree
        got[s["__key__"]] = {"label": meta["label"], "txt": s["txt"].decode() if "txt" in s else None,
                             "jpg": "jpg" in s, "id": meta["id"]}
    return got


def failures(out: Path) -> Dict[Tuple[str, str], str]:
    """{(id, reason): kind} from failures.jsonl."""
    rows = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines() if x.strip()]
    got = {(r["id"], r["reason"]): r["kind"] for r in rows}
    assert len(got) == len(rows)
    return got


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed, 40, 30))


# ------------------------------------------------------------------------------------------------- rakuten
CODES = ["10", "40", "1280", "2280", "2705"]  # non-contiguous integer codes; as strings "40" sorts after "2705"


def write_rakuten(folder: Path, release: str) -> dict:
    """X/Y tables + images/image_train/ in the release's layout; returns the expected outcome."""
    sep = "\t" if release == "rakuten" else ","
    x_name, y_name = (("X_train.tsv", "Y_train.tsv") if release == "rakuten"
                      else ("X_train_update.csv", "Y_train_CVw08PX.csv"))
    folder.mkdir(parents=True)
    want = {"samples": {}, "failures": {}}
    xs, ys = [], []
    for i in range(30):
        pid, iid = 1000 + i, 5000 + i
        code = CODES[i % len(CODES)]
        title, desc, clean_title, clean_desc = f"Produit {i}", "", f"Produit {i}", ""
        if i % 3 == 0:  # HTML description with entities
            desc = f"<p>Belle <b>chaise</b> n&deg;{i}</p><br/>Bois&nbsp;massif &eacute;t&eacute;"
            clean_desc = f"Belle chaise n°{i} Bois massif été"
        if i % 4 == 1:  # entities in the title
            title, clean_title = f"Chaise &amp; table {i}", f"Chaise & table {i}"
        txt = "\n".join(t for t in (clean_title, clean_desc) if t)
        xs.append([str(i), title, desc, str(iid), str(pid)])
        ys.append([str(i), code])
        has_jpg = True
        if i == 26:  # photo file absent: packed without it
            has_jpg = False
            want["failures"][(str(i), "image_missing")] = "degraded"
        else:
            image(folder / "images" / "image_train" / f"image_{iid}_product_{pid}.jpg", i)
        want["samples"][str(i)] = {"label": code, "txt": txt, "jpg": has_jpg, "id": str(i)}
    # bad rows: no Y row, an empty code, nothing usable (no text, no photo)
    ys = [y for y in ys if y[0] != "25"]
    ys[[y[0] for y in ys].index("27")][1] = ""
    xs[29][1] = ""
    (folder / "images" / "image_train" / f"image_{5029}_product_{1029}.jpg").unlink()
    for i, reason in ((25, "label_missing"), (27, "label_missing"), (29, "no_usable_modality")):
        del want["samples"][str(i)]
        want["failures"][(str(i), reason)] = "rejected"
    ys.append(["999", "10"])  # a Y row without a product: ignored
    if release == "rakuten":
        header_x = ["Integer_id", "Title", "Description", "Image_id", "Product_id"]
        header_y = ["Integer_id", "Prdtypecode"]
    else:  # unnamed index column; productid before imageid
        header_x, header_y = ["", "designation", "description", "productid", "imageid"], ["", "prdtypecode"]
        xs = [[x[0], x[1], x[2], x[4], x[3]] for x in xs]
    with open(folder / x_name, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header_x)
        w.writerows(xs)
        if release == "rakuten":  # a line with a field missing (a tab lost): never guessed at
            f.write("30\tProduit 30\t5030\t1030\n")
            want["failures"][("30", "csv_field_count")] = "rejected"
    with open(folder / y_name, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=sep).writerows([header_y, *ys])
    return want


@pytest.fixture(scope="module")
def rakuten(tmp_path_factory):
    work = tmp_path_factory.mktemp("rakuten")
    want = write_rakuten(work / "raw", "rakuten")
    manifest = pack(work / "raw", work / "packed", format="rakuten")
    return work, want, manifest


@pytest.mark.parametrize("release", ["rakuten", "rakuten-ens"])
def test_rakuten_releases_pack_codes_text_photos_and_failures(release, rakuten, tmp_path):
    if release == "rakuten":
        work, want, manifest = rakuten
        out = work / "packed"
    else:
        want = write_rakuten(tmp_path / "raw", release)
        manifest = pack(tmp_path / "raw", tmp_path / "packed", format=release)
        out = tmp_path / "packed"
    assert read_back(out) == want["samples"]
    assert failures(out) == want["failures"]
    assert json.loads((out / "labels.json").read_text()) == sorted(CODES)  # the codes are the label names
    assert manifest["settings"]["layout"] == release


def test_auto_detects_each_layout_from_folder_or_main_file(tmp_path, capsys):
    write_rakuten(tmp_path / "rak", "rakuten")
    write_rakuten(tmp_path / "ens", "rakuten-ens")
    write_abo(tmp_path / "abo")
    write_fashion(tmp_path / "fashion")
    cases = {"rak": "rakuten", "rak/X_train.tsv": "rakuten", "ens": "rakuten-ens",
             "ens/X_train_update.csv": "rakuten-ens", "abo": "abo", "fashion": "fashion",
             "fashion/styles.csv": "fashion"}
    for i, (rel, layout) in enumerate(cases.items()):
        manifest = pack(tmp_path / rel, tmp_path / f"out{i}")
        assert manifest["settings"]["layout"] == layout, rel
        assert f"as the {layout} layout" in capsys.readouterr().err, rel
    # the release is named; the manifest hashes exactly the files read
    pack(tmp_path / "ens", tmp_path / "out_ens")
    assert "the ENS challenge release (detected by --format auto)" in capsys.readouterr().err
    files = json.loads((tmp_path / "out_ens" / "manifest.json").read_text())["settings"]["input_files"]
    assert sorted(Path(p).name for p in files) == ["X_train_update.csv", "Y_train_CVw08PX.csv"]


def test_layout_refusals_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"a folder of no known layout \(looked for X_train.tsv .*styles.csv"):
        pack(tmp_path / "empty", tmp_path / "o")
    write_rakuten(tmp_path / "rak", "rakuten")
    (tmp_path / "rak" / "Y_train.tsv").unlink()
    with pytest.raises(ConfigError, match=r"rakuten layout: the label table Y_train.tsv not found "
                                          r"\(looked for .*Y_train.tsv\)"):
        pack(tmp_path / "rak", tmp_path / "o")
    write_rakuten(tmp_path / "ens", "rakuten-ens")
    with pytest.raises(ConfigError, match="looks like the rakuten-ens release: use --format rakuten-ens"):
        pack(tmp_path / "ens" / "X_train_update.csv", tmp_path / "o", format="rakuten")
    with pytest.raises(ConfigError, match="--label-column is for generic tables"):
        pack(tmp_path / "ens", tmp_path / "o", label_column="prdtypecode")
    # the CLI: exit code 2, one line, no traceback
    proc = run(mmcat_cmd("pack", str(tmp_path / "empty"), "--out", str(tmp_path / "o")), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no known layout" in proc.stderr


def test_resume_refuses_when_a_layout_file_changed(rakuten, tmp_path):
    work, want, _ = rakuten
    raw = tmp_path / "raw"
    write_rakuten(raw, "rakuten")
    pack(raw, tmp_path / "p", format="rakuten")
    again = pack(raw, tmp_path / "p", format="rakuten", resume=True)  # same files: nothing to redo
    assert read_back(tmp_path / "p") == want["samples"] and again["total_samples"] == len(want["samples"])
    with open(raw / "Y_train.tsv", "a") as f:
        f.write("1000\t10\n")
    with pytest.raises(ConfigError, match="setting 'input_files' differs"):
        pack(raw, tmp_path / "p", format="rakuten", resume=True)


def test_rakuten_codes_survive_training_and_evaluation(rakuten, tiny_text):
    """labels.json, best/labels.json and eval's per-class names are the codes; each sample's class is its Y code."""
    work, want, manifest = rakuten
    packed = work / "packed"
    from mmcat.eval_artifact import evaluate_artifact  # what `mmcat eval` runs (in-process: one start-up less)

    cfg = write_config(work / "train.yaml", tiny_text, packed, work / "run", train__epochs=1, data__num_workers=0)
    run(mmcat_cmd("train", "--config", str(cfg)))
    assert json.loads((work / "run" / "best" / "labels.json").read_text()) == sorted(CODES)
    report = evaluate_artifact(str(work / "run" / "best"), str(packed), "test")
    test_ids = [json.loads(line)["id"] for line in _test_ids(packed)]
    support = {code: sum(want["samples"][i]["label"] == code for i in test_ids) for code in CODES}
    assert {name: v["support"] for name, v in report["per_class"]["fused"].items()} == support


def _test_ids(packed: Path):
    import webdataset as wds

    for s in wds.WebDataset(sorted(str(p) for p in (packed / "test").glob("*.tar")), shardshuffle=False):
        yield s["json"].decode()


# ----------------------------------------------------------------------------------------------------- abo
def write_abo(root: Path) -> dict:
    """listings/metadata/listings_{0,1}.json.gz + images/metadata/images.csv.gz + images/small/<path>."""
    want = {"samples": {}, "failures": {}, "de": {}}
    types = ["CHAIR", "LAMP", "SHOES"]
    listings, images = [], []
    for i in range(30):
        item, img = f"B0ITEM{i:04d}", f"img{i:04d}"
        ptype = types[i % 3]
        obj = {"item_id": item, "product_type": [{"value": ptype}], "main_image_id": img,
               "brand": [{"language_tag": "en_US", "value": f"Acme{i % 2}"}], "marketplace": "Amazon",
               "item_name": [{"language_tag": "de_DE", "value": f"Stuhl {i}"},
                             {"language_tag": "en_US", "value": f"Chair {i}"}],
               "bullet_point": [{"language_tag": "en_US", "value": "Solid oak"},
                                {"language_tag": "de_DE", "value": "Eiche"},
                                {"language_tag": "en_US", "value": "Easy &amp; quick assembly"}],
               "product_description": [{"language_tag": "en_US", "value": "<b>Great</b> chair<br>for you"}]}
        title, desc, de = f"Chair {i}", "Solid oak Easy & quick assembly Great chair for you", f"Stuhl {i}"
        if i % 5 == 0:  # only British English: the same language wins over German
            obj["item_name"] = [{"language_tag": "de_DE", "value": f"Stuhl {i}"},
                                {"language_tag": "en_GB", "value": f"Colour chair {i}"}]
            title = f"Colour chair {i}"
        if i % 7 == 3:  # only French: any language rather than none
            obj["item_name"] = [{"language_tag": "fr_FR", "value": f"Chaise {i}"}]
            obj.pop("bullet_point"), obj.pop("product_description")
            title, desc, de = f"Chaise {i}", "", f"Chaise {i}"
        listings.append(obj)
        images.append([img, "30", "40", f"{img[-2:]}/{img}.jpg"])
        image(root / "images" / "small" / img[-2:] / f"{img}.jpg", i)
        want["samples"][item] = {"label": ptype, "txt": "\n".join(t for t in (title, desc) if t), "jpg": True,
                                 "id": item}
        want["de"][item] = de
    # bad listings: no product type; no main image; an image id images.csv does not list; a photo file absent
    listings[4].pop("product_type")
    del want["samples"]["B0ITEM0004"]
    want["failures"][("B0ITEM0004", "label_missing")] = "rejected"
    listings[8].pop("main_image_id")
    listings[9]["main_image_id"] = "unlisted"
    (root / "images" / "small" / "10" / "img0010.jpg").unlink()
    for item in ("B0ITEM0008", "B0ITEM0009", "B0ITEM0010"):
        want["samples"][item]["jpg"] = False
        want["failures"][(item, "image_missing")] = "degraded"
    meta = root / "listings" / "metadata"
    meta.mkdir(parents=True)
    for n, part in enumerate((listings[:15], listings[15:])):
        lines = [json.dumps(x) for x in part]
        if n == 1:
            lines.insert(3, '{"item_id": "B0BROKEN", "item_name": [')  # a cut-off line
            want["failures"][("", "json_invalid")] = "rejected"
        with gzip.open(meta / f"listings_{n}.json.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    (root / "images" / "metadata").mkdir(parents=True)
    with gzip.open(root / "images" / "metadata" / "images.csv.gz", "wt", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["image_id", "height", "width", "path"], *images])
    return want


def test_abo_language_label_field_photos_and_failures(tmp_path, capsys):
    want = write_abo(tmp_path / "abo")
    manifest = pack(tmp_path / "abo", tmp_path / "p", format="abo", attribute_columns=["brand"])
    assert "abo: 1 listings name a main_image_id that images.csv.gz does not list" in capsys.readouterr().err
    assert read_back(tmp_path / "p") == want["samples"]
    assert failures(tmp_path / "p") == want["failures"]
    bad = [json.loads(x) for x in (tmp_path / "p" / "failures.jsonl").read_text().splitlines()]
    assert [f["detail"] for f in bad if f["reason"] == "json_invalid"][0].startswith("listings_1.json.gz line 4: ")
    assert manifest["settings"]["label_field"] == "product_type" and manifest["settings"]["language"] == "en_US"
    assert manifest["attributes"] == {"brand": "categorical"}
    # another language and label field: German where there is German, the brand as the label
    pack(tmp_path / "abo", tmp_path / "de", format="abo", language="de_DE", label_field="brand")
    got = read_back(tmp_path / "de")
    assert {k: v["txt"].split("\n")[0] for k, v in got.items()} == {k: want["de"][k] for k in got}
    assert {k: v["label"] for k, v in got.items()} == {k: f"Acme{int(k[-4:]) % 2}" for k in got}
    assert set(got) == set(want["samples"]) | {"B0ITEM0004"}  # it has a brand


# ------------------------------------------------------------------------------------------------- fashion
def write_fashion(folder: Path) -> dict:
    """styles.csv (unquoted commas inside productDisplayName, the last column) + images/<id>.jpg."""
    masters = ["Apparel", "Accessories", "Footwear"]
    want = {"samples": {}, "failures": {}, "article": {}}
    lines = ["id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"]
    for i in range(30):
        id_ = str(15000 + i)
        master, article = masters[i % 3], ["Tshirts", "Watches", "Sneakers", "Belts"][i % 4]
        name = f"Puma Men Blue T-shirt {i}"
        if i % 6 == 2:
            name = f"Nike Men, Women Unisex, Running Shoe {i}"  # unquoted commas: still the name
        lines.append(f"{id_},Men,{master},Topwear,{article},Blue,Summer,2012,Casual,{name}")
        image(folder / "images" / f"{id_}.jpg", i)
        want["samples"][id_] = {"label": master, "txt": name, "jpg": True, "id": id_}
        want["article"][id_] = article
    lines[5] = "15004,Men,Apparel,Topwear"  # a cut-off row: never guessed at
    id_, gender, _, rest = lines[10].split(",", 3)
    lines[10] = ",".join([id_, gender, "", rest])  # no masterCategory
    (folder / "images" / "15020.jpg").unlink()  # a photo the download lacks (the real one lacks a few)
    for id_, reason, kind in (("15004", "csv_field_count", "rejected"), ("15009", "label_missing", "rejected"),
                              ("15020", "image_missing", "degraded")):
        want["failures"][(id_, reason)] = kind
        if kind == "rejected":
            del want["samples"][id_]
    want["samples"]["15020"]["jpg"] = False
    want["article"].pop("15004")
    (folder / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return want


def test_fashion_names_with_commas_label_column_and_failures(tmp_path):
    want = write_fashion(tmp_path / "f")
    manifest = pack(tmp_path / "f" / "styles.csv", tmp_path / "p", format="fashion")
    assert read_back(tmp_path / "p") == want["samples"]
    assert failures(tmp_path / "p") == want["failures"]
    assert manifest["settings"]["label_field"] == "masterCategory"
    pack(tmp_path / "f", tmp_path / "a", format="fashion", label_field="articleType", attribute_columns=["gender"])
    got = read_back(tmp_path / "a")
    assert {k: v["label"] for k, v in got.items()} == want["article"]  # 15009 has an articleType
    with pytest.raises(ConfigError, match="--label-field colour: not a label column of styles.csv"):
        pack(tmp_path / "f", tmp_path / "x", format="fashion", label_field="colour")


def test_inspect_names_the_layout(rakuten, capsys):
    from mmcat.inspect_dataset import inspect_dataset

    work, _, _ = rakuten
    inspect_dataset(work / "packed")
    assert f"  read as the rakuten layout from {work / 'raw'}\n" in capsys.readouterr().out


def test_layout_output_is_the_same_with_workers_and_with_slices(tmp_path):
    """A layout goes through the table's writer: byte-identical shards with 2 workers; slices + pack-merge hold the
    same samples and failures as one run."""
    from mmcat.pack.merge import merge_slices

    want = write_fashion(tmp_path / "f")
    one = pack(tmp_path / "f", tmp_path / "one")
    pack(tmp_path / "f", tmp_path / "two", workers=2)
    shards = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").glob("*/shard-*.tar"))
    assert shards == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").glob("*/shard-*.tar"))
    assert {p.parts[0] for p in shards} == set(SPLITS)  # every split wrote shards
    for rel in [*shards, Path("failures.jsonl"), Path("labels.json")]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    for i in range(2):
        pack(tmp_path / "f", tmp_path / "sliced", slice_index=i, num_slices=2)
    merged = merge_slices(tmp_path / "sliced")
    assert read_back(tmp_path / "sliced") == read_back(tmp_path / "one") == want["samples"]
    assert failures(tmp_path / "sliced") == want["failures"]
    assert merged["settings"] == one["settings"] and merged["settings"]["layout"] == "fashion"
