"""Public product datasets read as they are distributed: ``mmcat pack INPUT --format rakuten|rakuten-ens|abo|fashion``
(or ``--format auto``, which recognises each layout from the files present).

Each reader turns a layout into the one input form the packer plans from (:class:`InputTable`): a pyarrow table of
string columns ``id, image, title, description, label`` (+ the layout's other fields, usable as
``--attribute-columns``), one table row per source row -- unusable ones included, with the reason in ``problems``
-- so every source row ends up packed or in ``failures.jsonl``, never silently dropped.

INPUT is the dataset folder (as unpacked from the download) or the layout's main table file
(``X_train.tsv``, ``X_train_update.csv``, a ``listings_*.json.gz``, ``styles.csv``); the other files are found
relative to it. A missing file of the layout is a one-line :class:`ConfigError` naming what was looked for.
"""
from __future__ import annotations

import csv
import gzip
import html
import json
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from mmcat.errors import ConfigError

LAYOUTS = ("rakuten", "rakuten-ens", "abo", "fashion")
BASE_COLUMNS = ("id", "image", "title", "description", "label")
from mmcat.pack.tables import InputTable, Problem  # noqa: F401  -- the one input form (re-exported)

LABEL_FIELDS = {"abo": "product_type", "fashion": "masterCategory"}  # --label-field defaults
LAYOUT_COLUMNS = {"id": "id", "image": "image", "text": ["title", "description"], "label": "label"}


def _columns(cfg) -> Dict[str, Any]:
    return dict(LAYOUT_COLUMNS, attributes=list(cfg.attribute_columns))

# ---------------------------------------------------------------------------------------------------- text
_BREAKS = {"br", "p", "div", "li", "ul", "ol", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "table"}


class _TextOnly(HTMLParser):
    """Collects the text of an HTML fragment; block tags become spaces so words on either side stay apart."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.hidden = 0  # inside <script>/<style>: code, not product text

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)

    def handle_starttag(self, tag: str, attrs) -> None:
        self.hidden += tag in ("script", "style")
        if tag in _BREAKS:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        self.hidden = max(0, self.hidden - (tag in ("script", "style")))
        if tag in _BREAKS:
            self.parts.append(" ")


def strip_html(text: str) -> str:
    """Text of an HTML fragment: tags dropped, entities (``&eacute;``, ``&#233;``, ``&amp;``) decoded. Plain text
    without ``<`` or ``&`` is returned as is (most titles)."""
    if "<" not in text and "&" not in text:
        return text
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return html.unescape("".join(parser.parts))  # entities the parser left (e.g. double-escaped &amp;eacute;)


# ------------------------------------------------------------------------------------------------ helpers
def _note(message: str) -> None:
    print(f"mmcat pack: {message}", file=sys.stderr)


def _csv_rows(path: Path, delimiter: str) -> Iterator[Tuple[int, List[str]]]:
    """(line number, fields) per non-blank record; the first is the header."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        for fields in reader:
            if fields:
                yield reader.line_num, fields


def _header(path: Path, delimiter: str) -> List[str]:
    try:
        return next((fields for _, fields in _csv_rows(path, delimiter)), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _guarded(path: Path, read):
    """Run ``read()``; a file that cannot be read as text becomes one line naming it."""
    try:
        return read()
    except ConfigError:
        raise
    except UnicodeDecodeError as exc:
        raise ConfigError(f"input {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError, csv.Error, gzip.BadGzipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"input {path}: unreadable ({type(exc).__name__}: {first})") from None


def _require(path: Path, layout: str, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{layout} layout: {what} not found (looked for {path})")
    return path


def _images_root(base: Path, candidates: Sequence[str], layout: str, override: Optional[str]) -> Path:
    if override:
        return Path(override)
    for name in candidates:
        if (base / name).is_dir():
            return base / name
    raise ConfigError(f"{layout} layout: no image folder (looked for {', '.join(str(base / c) for c in candidates)}); "
                      "pass --images-root")


def _table(columns: Sequence[str], rows: List[Dict[str, Optional[str]]]):
    import pyarrow as pa

    return pa.table({c: pa.array([r.get(c) for r in rows], type=pa.string()) for c in columns})


# ------------------------------------------------------------------------------------------------- rakuten
# release -> (X file, Y file, delimiter, X columns (id first), Y columns, image folders looked for, in order)
RAKUTEN = {
    "rakuten": ("X_train.tsv", "Y_train.tsv", "\t", ["Integer_id", "Title", "Description", "Image_id", "Product_id"],
                ["Integer_id", "Prdtypecode"]),
    "rakuten-ens": ("X_train_update.csv", "Y_train_CVw08PX.csv", ",",
                    ["", "designation", "description", "productid", "imageid"], ["", "prdtypecode"]),
}
RAKUTEN_IMAGES = ("images/image_train", "images/image_training", "image_train", "image_training", "images")


def rakuten_release(header: Sequence[str]) -> Optional[str]:
    """Which Rakuten release a table header belongs to (by its columns, whatever the file is called), or None."""
    for release, (_, _, _, columns, _) in RAKUTEN.items():
        if [h.strip() for h in header] == columns or (release == "rakuten-ens" and list(header)[1:] == columns[1:]):
            return release
    return None


def read_rakuten(path: Path, release: str, cfg) -> InputTable:
    x_name, y_name, delim, x_cols, y_cols = RAKUTEN[release]
    folder = path if path.is_dir() else path.parent
    x_path = _require(path / x_name if path.is_dir() else path, release, "the product table " + x_name)
    found = rakuten_release(_header(x_path, delim))
    if found != release:
        other = rakuten_release(_header(x_path, "\t" if delim == "," else ","))
        hint = f"; it looks like the {other} release: use --format {other}" if other else ""
        raise ConfigError(f"{release} layout: {x_path} does not have the columns "
                          f"{', '.join(c or '(index)' for c in x_cols)}{hint}")
    y_path = _require(folder / y_name, release, "the label table " + y_name)
    labels, y_problems = _guarded(y_path, lambda: _rakuten_labels(y_path, delim, y_cols))
    rows, problems = [], {}
    for line, fields in _guarded(x_path, lambda: list(_csv_rows(x_path, delim)))[1:]:
        i = len(rows)
        if len(fields) != len(x_cols):
            problems[i] = f"line {line}: {len(fields)} fields, the header has {len(x_cols)}"
            fields = (fields + [""] * len(x_cols))[:len(x_cols)]
        id_, title, description, a, b = (f.strip() for f in fields)
        image_id, product_id = (a, b) if release == "rakuten" else (b, a)  # ENS: productid, imageid
        rows.append({"id": id_, "title": strip_html(title), "description": strip_html(description),
                     "image": f"image_{image_id}_product_{product_id}.jpg" if image_id and product_id else None,
                     "label": labels.get(id_), "image_id": image_id, "product_id": product_id})
        if i not in problems and id_ and not labels.get(id_):
            problems[i] = ("label_missing", y_problems.get(id_, f"no row for id {id_} in {y_name}"))
    return InputTable(_table([*BASE_COLUMNS, "image_id", "product_id"], rows), problems,
                      _images_root(folder, RAKUTEN_IMAGES, release, cfg.images_root), [x_path, y_path], release,
                      _columns(cfg))


def _rakuten_labels(y_path: Path, delim: str, y_cols: List[str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """({id: product type code, kept as the label *name* string}, {id: why its Y row is unusable})."""
    rows = _csv_rows(y_path, delim)
    header = next(rows, (0, []))[1]
    if [h.strip() for h in header][1:] != y_cols[1:] or (y_cols[0] and header[0].strip() != y_cols[0]):
        raise ConfigError(f"input {y_path}: expected the columns {', '.join(c or '(index)' for c in y_cols)}, "
                          f"found {', '.join(header) or 'none'}")
    labels: Dict[str, str] = {}
    bad: Dict[str, str] = {}
    for line, fields in rows:
        id_ = fields[0].strip()
        code = fields[1].strip() if len(fields) == 2 else ""
        if len(fields) != 2:
            bad[id_] = f"{y_path.name} line {line}: {len(fields)} fields, the header has 2"
        elif not code:
            bad[id_] = f"{y_path.name} line {line}: empty {y_cols[1]}"
        labels.setdefault(id_, code)
    return labels, bad


# ----------------------------------------------------------------------------------------------------- abo
ABO_EXTRAS = ("brand", "color", "product_type", "marketplace", "country")


def _language_values(entries: Any, language: str) -> List[str]:
    """The values of a list of ``{language_tag, value}`` in one language: ``language`` itself, else the first tag of
    the same language (``en_GB`` for ``en_US``), else the first entry's tag. Entries without a tag all count."""
    if isinstance(entries, (str, int, float)):
        return [str(entries)]
    items = [e for e in (entries if isinstance(entries, list) else [entries]) if isinstance(e, dict)]
    values = [(e.get("language_tag"), e.get("value", e.get("node_name"))) for e in items]
    values = [(tag, str(v)) for tag, v in values if v is not None and str(v).strip()]
    tags = [tag for tag, _ in values if tag]
    if tags:
        prefix = language.split("_")[0] + "_"
        chosen = language if language in tags else next((t for t in tags if t.startswith(prefix)), tags[0])
        values = [(tag, v) for tag, v in values if tag in (chosen, None)]
    return [v for _, v in values]


def _abo_row(obj: Dict[str, Any], images: Dict[str, str], label_field: str, language: str) -> Dict[str, Optional[str]]:
    def first(name: str) -> Optional[str]:
        values = _language_values(obj.get(name), language)
        return values[0] if values else None

    description = [*_language_values(obj.get("bullet_point"), language),
                   *_language_values(obj.get("product_description"), language)]
    image_id = obj.get("main_image_id")
    row = {"id": str(obj.get("item_id") or "").strip(), "title": strip_html(first("item_name") or ""),
           "description": strip_html(" ".join(description)), "label": first(label_field),
           "image": images.get(str(image_id)) if image_id else None, "main_image_id": image_id and str(image_id)}
    row.update({name: first(name) for name in ABO_EXTRAS})
    return row


def read_abo(path: Path, cfg) -> InputTable:
    if path.is_file():  # one listings file: listings/metadata/listings_0.json.gz -> the root three levels up
        parents = path.resolve().parents
        root, listings = parents[min(2, len(parents) - 1)], [path]
    else:
        root, listings = path, sorted((path / "listings" / "metadata").glob("listings_*.json.gz"))
        if not listings:
            raise ConfigError(f"abo layout: no listings found (looked for {path}/listings/metadata/listings_*.json.gz)")
    meta = _require(root / "images" / "metadata" / "images.csv.gz", "abo", "the image metadata")
    images = _guarded(meta, lambda: _abo_images(meta))
    label_field, language = cfg.label_field or LABEL_FIELDS["abo"], cfg.language
    rows: List[Dict[str, Optional[str]]] = []
    problems: Dict[int, Problem] = {}
    without_meta = 0
    for listing in listings:
        for line, obj, why in _guarded(listing, lambda: list(_json_lines(listing))):
            if why:
                problems[len(rows)] = ("json_invalid", f"{listing.name} line {line}: {why}")
                rows.append({})
                continue
            row = _abo_row(obj, images, label_field, language)
            without_meta += bool(row["main_image_id"]) and row["image"] is None
            rows.append(row)
    if without_meta:  # packed without a photo (degraded, image_missing "no image path") like listings without one
        _note(f"abo: {without_meta} listings name a main_image_id that {meta.name} does not list: packed without photo")
    root_images = _images_root(root, ("images/small", "images/original"), "abo", cfg.images_root)
    return InputTable(_table([*BASE_COLUMNS, "main_image_id", *ABO_EXTRAS], rows), problems, root_images,
                      [*listings, meta], "abo", _columns(cfg))


def _abo_images(meta: Path) -> Dict[str, str]:
    """image_id -> path below images/small (or images/original), from images.csv.gz."""
    with gzip.open(meta, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"image_id", "path"} <= set(reader.fieldnames or []):
            raise ConfigError(f"input {meta}: expected the columns image_id, height, width, path")
        return {r["image_id"]: r["path"] for r in reader if r.get("image_id") and r.get("path")}


def _json_lines(path: Path) -> Iterator[Tuple[int, Dict[str, Any], Optional[str]]]:
    """(line number, object, None) per JSON object line of a .json(.gz) file, (line, {}, why) for a bad line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):  # bytes, decoded per line: one bad byte costs one listing, not the file
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield n, {}, f"not UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            except json.JSONDecodeError as exc:
                yield n, {}, f"not valid JSON ({exc.msg})"
                continue
            yield (n, obj, None) if isinstance(obj, dict) else (n, {}, "not a JSON object")


# ------------------------------------------------------------------------------------------------- fashion
FASHION_COLUMNS = ["id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year",
                   "usage", "productDisplayName"]


def is_fashion_header(header: Sequence[str]) -> bool:
    return [h.strip() for h in header] == FASHION_COLUMNS


def read_fashion(path: Path, cfg) -> InputTable:
    folder = path if path.is_dir() else path.parent
    styles = _require(path / "styles.csv" if path.is_dir() else path, "fashion", "the product table styles.csv")
    records = _guarded(styles, lambda: list(_csv_rows(styles, ",")))
    header = [h.strip() for h in (records[0][1] if records else [])]
    if header != FASHION_COLUMNS:
        raise ConfigError(f"fashion layout: {styles} does not have the columns {', '.join(FASHION_COLUMNS)} "
                          f"(found {', '.join(header) or 'none'})")
    label_field = cfg.label_field or LABEL_FIELDS["fashion"]
    if label_field not in header or label_field in ("id", "productDisplayName"):  # not the id, not the text
        raise ConfigError(f"--label-field {label_field}: not a label column of {styles.name} "
                          f"(one of {', '.join(FASHION_COLUMNS[1:-1])})")
    rows, problems = [], {}
    for line, fields in records[1:]:
        if len(fields) > len(header):  # unquoted commas inside the last column, the name: they belong to it
            fields = fields[:len(header) - 1] + [",".join(fields[len(header) - 1:])]
        elif len(fields) < len(header):
            problems[len(rows)] = f"line {line}: {len(fields)} fields, the header has {len(header)}"
            fields = fields + [""] * (len(header) - len(fields))
        cells = {name: value.strip() for name, value in zip(header, fields)}
        rows.append({**cells, "id": cells["id"], "title": cells["productDisplayName"], "description": None,
                     "label": cells[label_field], "image": f"{cells['id']}.jpg" if cells["id"] else None})
    extras = [c for c in FASHION_COLUMNS if c not in ("id", "productDisplayName")]
    return InputTable(_table([*BASE_COLUMNS, *extras], rows), problems,
                      _images_root(folder, ("images",), "fashion", cfg.images_root), [styles], "fashion",
                      _columns(cfg))


# ----------------------------------------------------------------------------------------------- detection
LOOKED_FOR = ("X_train.tsv + Y_train.tsv (rakuten), X_train_update.csv + Y_train_CVw08PX.csv (rakuten-ens), "
              "listings/metadata/listings_*.json.gz + images/metadata/images.csv.gz (abo), "
              "styles.csv + images/ (fashion)")


def detect_layout(path: Path) -> Optional[str]:
    """The public layout INPUT (a folder, or a layout's main table file) is in, from the files present and the
    table's columns; None for a file of no layout (a generic table). A folder of no layout: ConfigError."""
    if path.is_dir():
        if (path / "X_train.tsv").is_file():
            return "rakuten"
        if (path / "X_train_update.csv").is_file():
            return "rakuten-ens"
        if any((path / "listings" / "metadata").glob("listings_*.json.gz")):
            return "abo"
        if (path / "styles.csv").is_file():
            return "fashion"
        raise ConfigError(f"input {path}: a folder of no known layout (looked for {LOOKED_FOR}); "
                          "pass the table file itself for a generic table")
    name = path.name
    if name.startswith("listings_") and name.endswith(".json.gz") and path.parent.name == "metadata":
        return "abo"
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        header = _header(path, "\t" if suffix == ".tsv" else ",")
        return rakuten_release(header) or ("fashion" if is_fashion_header(header) else None)
    return None


def check_layout_settings(cfg, layout: str) -> None:
    """The generic table's column flags mean nothing for a layout: refuse them instead of ignoring them."""
    from mmcat.config import PackConfig

    default = PackConfig()
    for key, flag in (("id_column", "--id-column"), ("image_column", "--image-column"),
                      ("text_columns", "--text-columns"), ("label_column", "--label-column")):
        if str(getattr(cfg, key)) != str(getattr(default, key)):  # a list prints as one: ['title', 'description']
            raise ConfigError(f"{flag} is for generic tables; the {layout} layout fixes its columns"
                              + (" (choose the label with --label-field)" if key == "label_column" else ""))
    if cfg.label_field and layout in ("rakuten", "rakuten-ens"):
        raise ConfigError(f"--label-field: the {layout} layout's label is always the product type code")
    label_field = cfg.label_field or LABEL_FIELDS.get(layout)
    for name in cfg.attribute_columns:  # the label (or its field) as an input would leak it
        if name in BASE_COLUMNS or name == label_field:
            raise ConfigError(f"--attribute-columns: '{name}' is the {layout} layout's "
                              f"{'label field' if name == label_field else name + ' column'}")


def read_layout(cfg, requested: str) -> Optional[InputTable]:
    """The InputTable of a public layout (``requested``: its name, or "auto" to detect it), or None when INPUT is a
    generic table (``requested`` a table format, or auto on a file of no layout)."""
    path = Path(cfg.input)
    if requested not in LAYOUTS and requested != "auto":
        return None
    if not path.exists():
        if requested == "auto":
            return None  # the table reader says it in its words ("file not found")
        raise ConfigError(f"input {path}: no such file or folder")
    layout = requested if requested != "auto" else detect_layout(path)
    if layout is None:
        return None
    check_layout_settings(cfg, layout)
    how = " (detected by --format auto)" if requested == "auto" else ""
    release = {"rakuten": ", the SIGIR eCom'20 release", "rakuten-ens": ", the ENS challenge release"}.get(layout, "")
    _note(f"reading {path} as the {layout} layout{release}{how}")
    if layout in RAKUTEN:
        return read_rakuten(path, layout, cfg)
    return read_abo(path, cfg) if layout == "abo" else read_fashion(path, cfg)
