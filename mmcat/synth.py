"""``mmcat synth``: the embedded default dataset -- synthetic products with photos, titles and descriptions.
This is ``--generator shapes`` (the default, the one the recipes are tuned on); ``--generator market`` is
mmcat/synth_market.py, a second generator unlike this one, only for validating recipes.

Layout written to ``OUT``: ``products.csv`` (or ``.jsonl`` / ``.parquet``) with columns
``id, image, title, description, category[, brand, colour, price]``; ``images/<id>.jpg``; ``labels.txt`` (the categories, one per line);
``synth.json`` (the rates below and, per product, which modality is informative); with ``--bad-rows`` also the
planted bad inputs and ``planted.json`` (their ids, table rows and the expected pack outcome).

Photos are drawn with OpenCV: each category has its own shape, colour and texture (distinguishable at 64 px),
placed on a light background with grey clutter, then JPEG-compressed with mild noise/blur; sizes vary per product
(``min_side``..``max_side`` per side, so portrait, landscape and square all occur).

Each modality is informative only part of the time, independently per product (deterministic by seed):
  * photo informative with p = 0.65 (IMAGE_INFORMATIVE_P); otherwise half the time a category-neutral
    cardboard box, half the time the real object made unrecognisable (grayscale, heavy blur, random brightness);
  * text informative with p = 0.60 (TEXT_INFORMATIVE_P): category keywords in title and description; otherwise
    generic wording shared by all categories ("Acme deluxe item", "Great value for everyday use.");
  * description empty with p = 0.15 (DESCRIPTION_EMPTY_P), as in real catalogues -- packed as missing.
With attributes (the default; ``--no-attributes`` leaves them out) the table also has ``brand, colour, price``,
drawn from a separate random stream (photos and texts are the same either way), independently of whether the
photo or the text is informative:
  * brand informative with p = 0.50 (BRAND_INFORMATIVE_P): the category's own brand (CATEGORY_BRANDS, sold in no
    other category); otherwise a house brand shared by all categories (85 %) or one of 300 small makers
    ("Maker 017", mostly rarer than pack's --attribute-min-count); empty with p = 0.10 (BRAND_MISSING_P);
  * colour informative with p = 0.40 (COLOUR_INFORMATIVE_P): the category's colour name (the colour its photo
    object has); otherwise uniform over all 13 colour names; empty with p = 0.15 (COLOUR_MISSING_P);
  * price weakly informative: log-normal around a category median (PRICE_MEDIANS, 12..150) with sigma 0.8, so the
    categories overlap widely; empty with p = 0.05 (PRICE_MISSING_P).
The title's leading brand word stays the random BRANDS pick it always was (so the text carries no attribute signal).
So with C classes the best achievable accuracy is about 0.65 + 0.35/C from the photo alone, 0.60 + 0.40/C from
the text alone and 1 - 0.35 * 0.40 * (1 - 1/C) fused: with C = 6, roughly 71 %, 67 % and 88 %.
"""
from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np

from mmcat.errors import ConfigError
from mmcat.files import write_atomic

IMAGE_INFORMATIVE_P = 0.65
TEXT_INFORMATIVE_P = 0.60
DESCRIPTION_EMPTY_P = 0.15
BRAND_INFORMATIVE_P = 0.50
BRAND_MISSING_P = 0.10
COLOUR_INFORMATIVE_P = 0.40
COLOUR_MISSING_P = 0.15
PRICE_MISSING_P = 0.05
PRICE_SIGMA = 0.8
BASE_COLUMNS = ["id", "image", "title", "description", "category"]
ATTRIBUTE_COLUMNS = ["brand", "colour", "price"]

# name, shape, BGR colour, texture, nouns, feature phrases
CATEGORIES: List[Tuple[str, str, Tuple[int, int, int], str, List[str], List[str]]] = [
    ("shoes", "triangle", (40, 40, 210), "stripes", ["sneaker", "running shoe", "hiking boot", "sandal", "loafer"],
     ["a cushioned sole", "a breathable mesh upper", "a lace-up closure", "a non-slip outsole", "ankle support"]),
    ("watches", "circle", (200, 110, 30), "rings", ["wristwatch", "chronograph", "smartwatch", "dive watch"],
     ["a stainless steel case", "sapphire crystal glass", "water resistance to 50 m", "a quartz movement",
      "an adjustable strap"]),
    ("mugs", "square", (30, 200, 235), "dots", ["coffee mug", "travel mug", "tea cup", "espresso cup"],
     ["a 350 ml capacity", "dishwasher-safe ceramic", "a comfortable handle", "double-wall insulation",
      "a spill-proof lid"]),
    ("lamps", "star", (60, 180, 60), "plain", ["desk lamp", "floor lamp", "LED bulb", "night light"],
     ["warm white light", "a dimmable LED", "an adjustable arm", "a touch switch", "a 10 W power draw"]),
    ("backpacks", "hexagon", (170, 50, 170), "checker", ["backpack", "daypack", "laptop bag", "rucksack"],
     ["a padded laptop sleeve", "water-repellent fabric", "adjustable shoulder straps", "a 25 L capacity",
      "a hidden zip pocket"]),
    ("headphones", "cross", (190, 190, 30), "stripes", ["headphones", "earbuds", "headset", "earphones"],
     ["active noise cancelling", "30-hour battery life", "Bluetooth 5.3", "soft ear cushions",
      "a built-in microphone"]),
    ("plants", "diamond", (0, 130, 255), "dots", ["potted plant", "succulent", "herb kit", "bonsai tree"],
     ["a ceramic pot", "easy-care foliage", "a drainage hole", "organic soil", "indirect sunlight needs"]),
    ("toys", "ring", (150, 80, 255), "plain", ["building blocks", "plush bear", "toy car", "puzzle"],
     ["child-safe materials", "bright colours", "ages 3 and up", "hours of imaginative play", "a storage box"]),
    ("bottles", "ellipse", (120, 60, 20), "stripes", ["water bottle", "sports bottle", "flask", "thermos"],
     ["a leak-proof cap", "BPA-free plastic", "vacuum insulation", "a 750 ml volume", "a carry loop"]),
    ("tools", "bar", (20, 90, 140), "checker", ["screwdriver set", "hammer", "drill", "wrench"],
     ["hardened steel", "an ergonomic grip", "a magnetic tip", "a carrying case", "a lifetime warranty"]),
]
# per category (same order as CATEGORIES): its own brand, the colour name of its photo object, its median price
CATEGORY_BRANDS = ["Stridewell", "Tempora", "Brewcraft", "Luxor", "Trailpak", "Sonique", "Greenleaf", "Playnest",
                   "Aquaflo", "Forgeline"]
CATEGORY_COLOURS = ["red", "blue", "yellow", "green", "purple", "teal", "orange", "pink", "navy", "brown"]
COLOURS = CATEGORY_COLOURS + ["white", "black", "grey"]
PRICE_MEDIANS = [60.0, 150.0, 12.0, 35.0, 45.0, 80.0, 20.0, 25.0, 18.0, 40.0]
SMALL_MAKERS = 300
BRANDS = ["Acme", "Nordhaven", "Lumo", "Vexa", "Orbit", "Kestrel", "Tandem", "Brightline", "Solace", "Quill"]
ADJECTIVES = ["deluxe", "classic", "premium", "compact", "modern", "vintage", "essential", "lightweight", "durable",
              "elegant"]
GENERIC_NOUNS = ["item", "product", "gift set", "bundle", "edition", "essential", "pack"]
GENERIC_SENTENCES = ["Great value for everyday use.", "Ships in recyclable packaging.", "A thoughtful gift idea.",
                     "Backed by our satisfaction guarantee.", "Available in several colours.",
                     "Designed with care and built to last.", "Customers love this best seller."]


# ------------------------------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    if shape == "triangle":
        angles, radii = np.array([90, 210, 330]), np.ones(3)
    elif shape == "square":
        angles, radii = np.array([45, 135, 225, 315]), np.ones(4)
    elif shape == "diamond":
        angles, radii = np.array([0, 90, 180, 270]), np.array([0.7, 1.0, 0.7, 1.0])
    elif shape == "hexagon":
        angles, radii = np.arange(6) * 60.0, np.ones(6)
    elif shape == "star":
        angles, radii = np.arange(10) * 36.0 + 90, np.tile([1.0, 0.45], 5)
    elif shape == "cross":
        a = 0.33  # arm half-width relative to r
        pts = np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                        (-1, -a), (-a, -a)]) * r
        c, s = np.cos(np.radians(rot)), np.sin(np.radians(rot))
        return (pts @ np.array([[c, s], [-s, c]]) + (cx, cy)).astype(np.int32)
    elif shape == "bar":
        pts = np.array([(-1, -0.32), (1, -0.32), (1, 0.32), (-1, 0.32)]) * r
        c, s = np.cos(np.radians(rot)), np.sin(np.radians(rot))
        return (pts @ np.array([[c, s], [-s, c]]) + (cx, cy)).astype(np.int32)
    else:
        raise ValueError(shape)
    th = np.radians(angles + rot)
    return np.stack([cx + r * radii * np.cos(th), cy - r * radii * np.sin(th)], 1).astype(np.int32)


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    c = (int(cx), int(cy))
    if shape == "circle":
        cv2.circle(mask, c, int(r), 255, -1, cv2.LINE_AA)
    elif shape == "ring":
        cv2.circle(mask, c, int(r), 255, -1, cv2.LINE_AA)
        cv2.circle(mask, c, int(r * 0.55), 0, -1, cv2.LINE_AA)
    elif shape == "ellipse":
        cv2.ellipse(mask, c, (int(r * 0.55), int(r)), rot, 0, 360, 255, -1, cv2.LINE_AA)
    else:
        cv2.fillPoly(mask, [_polygon(shape, cx, cy, r, rot)], 255, cv2.LINE_AA)
    return mask


def _texture(obj: np.ndarray, kind: str, colour: np.ndarray, r: float, rng: np.random.Generator) -> None:
    dark = tuple(int(v) for v in colour * 0.55)
    h, w = obj.shape[:2]
    step = max(4, int(r / 4))
    if kind == "stripes":
        for x in range(-h, w, step):
            cv2.line(obj, (x, 0), (x + h, h), dark, max(1, step // 3))
    elif kind == "dots":
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                cv2.circle(obj, (x, y), max(1, step // 4), dark, -1)
    elif kind == "checker":
        yy, xx = np.mgrid[0:h, 0:w]
        obj[((yy // step + xx // step) % 2).astype(bool)] = dark
    elif kind == "rings":
        c = (w // 2, h // 2)
        for rad in range(step, int(np.hypot(w, h)), step):
            cv2.circle(obj, c, rad, dark, max(1, step // 4))


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(175, 240)
    tint = rng.integers(-12, 13, 3)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = np.clip(base + tint, 0, 255).astype(np.uint8)
    floor = int(h * rng.uniform(0.55, 0.85))  # a "table" edge: some scene structure
    img[floor:] = np.clip(img[floor:].astype(np.int16) - rng.integers(15, 40), 0, 255).astype(np.uint8)
    side = min(h, w)
    for _ in range(int(rng.integers(6, 15))):  # grey clutter carries no category information
        g = int(rng.integers(60, 220))
        colour = (g, g, g)
        p = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        s = int(rng.integers(side // 30 + 2, side // 6 + 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.line(img, p, (p[0] + s, p[1] + int(rng.integers(-s, s + 1))), colour, int(rng.integers(1, 4)))
        elif kind == 1:
            cv2.rectangle(img, p, (p[0] + s, p[1] + s // 2), colour, int(rng.choice([-1, 2])))
        else:
            cv2.circle(img, p, s // 2, colour, int(rng.choice([-1, 2])))
    return img


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float, blur: float) -> np.ndarray:
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    if noise > 0:
        n = np.empty(img.shape, np.int16)
        cv2.randn(n, 0, noise)  # cv2's RNG is seeded per product by draw_product_image
        img = cv2.add(img, n, dtype=cv2.CV_8U)
    return img


def draw_product_image(rng: np.random.Generator, category: int, w: int, h: int, mode: str = "informative") -> np.ndarray:
    """A BGR photo: mode "informative" (the category's object), "neutral" (a box) or "degraded"."""
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    img = _background(h, w, rng)
    side = min(h, w)
    r = side * rng.uniform(0.26, 0.38)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h
    if mode == "neutral":  # a cardboard box with tape: looks the same for every category
        g = rng.integers(-20, 21)
        colour = np.clip(np.array([90, 140, 180]) + g, 0, 255)
        rw, rh = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.6, 1.0)
        p1, p2 = (int(cx - rw), int(cy - rh)), (int(cx + rw), int(cy + rh))
        cv2.rectangle(img, p1, p2, tuple(int(v) for v in colour), -1)
        cv2.rectangle(img, (int(cx - rw * 0.12), p1[1]), (int(cx + rw * 0.12), p2[1]), (200, 210, 215), -1)
        return _finish(img, rng, rng.uniform(2, 8), rng.uniform(0, 1.2))
    name, shape, colour, texture, _, _ = CATEGORIES[category]
    col = np.clip(np.array(colour) + rng.integers(-25, 26, 3), 0, 255)
    mask = _shape_mask(shape, h, w, cx, cy, r, rng.uniform(-20, 20))
    obj = np.empty_like(img)
    obj[:] = col.astype(np.uint8)
    _texture(obj, texture, col, r, rng)
    cv2.copyTo(obj, mask, img)
    if mode == "degraded":  # shape and colour destroyed: gray, blurred, random brightness
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        small = cv2.resize(gray, (max(1, w // 16), max(1, h // 16)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), side * 0.12 / 16)  # a huge blur, done cheaply at 1/16 scale
        gray = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        gray = cv2.convertScaleAbs(gray, alpha=rng.uniform(0.3, 0.6), beta=rng.uniform(60, 140))
        return _finish(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), rng, rng.uniform(8, 16), 0)
    return _finish(img, rng, rng.uniform(2, 8), rng.uniform(0, 1.2))


# ---------------------------------------------------------------------------------------------------- text
def product_text(rng: np.random.Generator, category: int, informative: bool) -> Tuple[str, str]:
    brand, adj = str(rng.choice(BRANDS)), str(rng.choice(ADJECTIVES))
    generic = [str(s) for s in rng.choice(GENERIC_SENTENCES, 2, replace=False)]
    if informative:
        _, _, _, _, nouns, phrases = CATEGORIES[category]
        noun = str(rng.choice(nouns))
        f1, f2 = (str(p) for p in rng.choice(phrases, 2, replace=False))
        title = f"{brand} {adj} {noun}"
        desc = f"This {adj} {noun} comes with {f1} and {f2}. {generic[0]}"
    else:
        title = f"{brand} {adj} {rng.choice(GENERIC_NOUNS)}"
        desc = " ".join(generic)
    if rng.random() < DESCRIPTION_EMPTY_P:
        desc = ""
    return title, desc


# ---------------------------------------------------------------------------------------------- attributes
def product_attributes(rng: np.random.Generator, category: int | None) -> Tuple[Dict[str, object], Dict[str, bool]]:
    """(brand, colour, price of one product -- None when missing --, which of brand/colour is informative);
    ``category`` None (a planted row with an unusable label): nothing informative."""
    brand_ok = category is not None and bool(rng.random() < BRAND_INFORMATIVE_P)
    colour_ok = category is not None and bool(rng.random() < COLOUR_INFORMATIVE_P)
    if brand_ok:
        brand = CATEGORY_BRANDS[category]
    elif rng.random() < 0.85:
        brand = str(rng.choice(BRANDS))
    else:
        brand = f"Maker {int(rng.integers(0, SMALL_MAKERS)):03d}"
    colour = CATEGORY_COLOURS[category] if colour_ok else str(rng.choice(COLOURS))
    median = PRICE_MEDIANS[category] if category is not None else float(np.median(PRICE_MEDIANS))
    price = round(float(median * np.exp(rng.normal(0.0, PRICE_SIGMA))), 2)
    values = {"brand": None if rng.random() < BRAND_MISSING_P else brand,
              "colour": None if rng.random() < COLOUR_MISSING_P else colour,
              "price": None if rng.random() < PRICE_MISSING_P else price}
    return values, {"brand_informative": brand_ok, "colour_informative": colour_ok}


def _add_attributes(rows: List[Dict[str, object]], truth: List[dict], labels: List[str], seed: int) -> None:
    """Attribute columns for every row (the planted ones too), each from its own random stream."""
    for i, row in enumerate(rows):
        category = labels.index(row["category"]) if row["category"] in labels else None
        values, informative = product_attributes(np.random.default_rng([seed, i, 7]), category)
        row.update(values)
        if i < len(truth):
            truth[i].update(informative)


# ---------------------------------------------------------------------------------------------- bad inputs
def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels: a decompression-bomb stand-in (never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _pil_bytes(img_bgr: np.ndarray, mode: str, fmt: str, **save) -> bytes:
    from PIL import Image

    pil = Image.fromarray(cv2.cvtColor(img_bgr, cv2.COLOR_BGR2RGB))
    if mode == "RGBA":
        pil.putalpha(Image.linear_gradient("L").resize(pil.size))
    elif mode == "P":
        pil = pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        save["transparency"] = 0
    elif mode != "RGB":
        pil = pil.convert(mode)
    buf = io.BytesIO()
    pil.save(buf, fmt, **save)
    return buf.getvalue()


def _plant_bad_rows(out: Path, rows: List[Dict[str, str]], labels: List[str], rng: np.random.Generator) -> List[dict]:
    from PIL import Image

    planted: List[dict] = []

    def add(case: str, expect: str, reason: str = "", data: bytes | None = None, ext: str = "jpg", title: str | None = None,
            description: str | None = None, category: str | None = None, id_: str | None = None, **extra) -> None:
        cat = len(planted) % len(labels)
        t, d = product_text(rng, cat, True)
        pid = id_ or f"bad-{case.replace('_', '-')}"
        image = f"images/bad-{case.replace('_', '-')}.{ext}"  # own file even when the id is a duplicate
        if data is not None:
            (out / image).write_bytes(data)
        rows.append({"id": pid, "image": image, "title": t if title is None else title,
                     "description": d if description is None else description,
                     "category": labels[cat] if category is None else category})
        planted.append({"case": case, "id": pid, "row": len(rows), "expect": expect, "reason": reason or None, **extra})

    def photo(w: int = 480, h: int = 360) -> np.ndarray:
        return draw_product_image(rng, len(planted) % len(labels), w, h)

    good_jpeg = cv2.imencode(".jpg", photo(), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    add("truncated_jpeg", "degraded", "image_truncated", good_jpeg[: len(good_jpeg) * 6 // 10])
    add("not_an_image", "degraded", "image_undecodable", b"this is a text file, not a photo\n" * 20)
    add("missing_file", "degraded", "image_missing")
    add("zero_bytes", "degraded", "image_empty", b"")
    add("decompression_bomb", "degraded", "image_too_large", _png_header_only(100_000, 100_000), ext="png")
    add("grayscale", "ok", data=_pil_bytes(photo(), "L", "JPEG"), notes=["grayscale"])
    add("cmyk_jpeg", "ok", data=_pil_bytes(photo(), "CMYK", "JPEG"), notes=["cmyk"])
    add("rgba_png", "ok", data=_pil_bytes(photo(), "RGBA", "PNG"), ext="png", notes=["alpha_composited"])
    add("palette_png", "ok", data=_pil_bytes(photo(), "P", "PNG"), ext="png", notes=["alpha_composited", "palette"])
    big = cv2.resize(photo(600, 450), (4800, 3600), interpolation=cv2.INTER_LINEAR)
    add("very_large", "ok", data=cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes(),
        orig_size=[4800, 3600])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise -> portrait
    add("exif_rotated", "ok", data=_pil_bytes(photo(600, 400), "RGB", "JPEG", exif=exif.tobytes()),
        notes=["exif_orientation_6"], orig_size=[400, 600])
    add("empty_text", "degraded", "text_empty", good_jpeg, title="", description="  ")
    add("non_ascii_text", "ok", data=good_jpeg, title="Café crème — 北京 ☕ Ünïcödé mug",
        description="Tasse à café en céramique, 350 ml. Спасибо! 🍵")
    add("empty_label", "rejected", "label_missing", good_jpeg, category="")
    add("unknown_label", "rejected", "label_unknown", good_jpeg, category="discontinued",
        note="rejected only with a label whitelist: mmcat pack --labels OUT/labels.txt")
    add("duplicate_id", "rejected", "duplicate_id", good_jpeg, id_=rows[0]["id"], first_row=1)
    add("nothing_usable", "rejected", "no_usable_modality", title="", description="")
    return planted


_ATTRIBUTE_RATES = {"brand_informative": BRAND_INFORMATIVE_P, "brand_missing": BRAND_MISSING_P,
                    "colour_informative": COLOUR_INFORMATIVE_P, "colour_missing": COLOUR_MISSING_P,
                    "price_missing": PRICE_MISSING_P, "price_sigma": PRICE_SIGMA}


# ------------------------------------------------------------------------------------------------- writing
def _table_bytes(rows: List[Dict[str, object]], fmt: str, cols: List[str]) -> bytes:
    """csv: a missing value is an empty cell; jsonl/parquet: null (price a number)."""
    if fmt == "csv":
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().encode("utf-8")
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def check_sizes(cfg, max_classes: int) -> None:
    """The size settings every generator shares (one-line ConfigError)."""
    if not 2 <= cfg.num_classes <= max_classes:
        raise ConfigError(f"config key 'num_classes': {cfg.num_classes} is not within 2..{max_classes}")
    if cfg.num_products < cfg.num_classes:
        raise ConfigError(f"config key 'num_products': {cfg.num_products} is below num_classes ({cfg.num_classes})")
    if not 16 <= cfg.min_side <= cfg.max_side:
        raise ConfigError(f"config key 'min_side': need 16 <= min_side ({cfg.min_side}) <= max_side ({cfg.max_side})")


def write_dataset(out: Path, fmt: str, rows: List[Dict[str, object]], cols: List[str], labels: List[str],
                  meta: dict) -> Path:
    """The raw layout every generator writes (besides images/): the table, labels.txt and synth.json."""
    table = out / f"products.{fmt}"
    write_atomic(table, _table_bytes(rows, fmt, cols))
    write_atomic(out / "labels.txt", "".join(f"{label}\n" for label in labels))
    write_atomic(out / "synth.json", json.dumps(meta, indent=1))
    return table


def synthesize(cfg) -> Path:
    """Write the synthetic raw dataset described in the module docstring (``generator=market``: the one in
    mmcat/synth_market.py); returns the table path."""
    if cfg.generator == "market":
        from mmcat.synth_market import synthesize_market

        return synthesize_market(cfg)
    check_sizes(cfg, len(CATEGORIES))
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels = [c[0] for c in CATEGORIES[: cfg.num_classes]]
    rows: List[Dict[str, str]] = []
    truth = []
    for i in range(cfg.num_products):
        rng = np.random.default_rng([cfg.seed, i])
        cat = i % cfg.num_classes  # balanced classes; the packer's split is stratified anyway
        w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, 2))
        img_ok, txt_ok = bool(rng.random() < IMAGE_INFORMATIVE_P), bool(rng.random() < TEXT_INFORMATIVE_P)
        mode = "informative" if img_ok else str(rng.choice(["neutral", "degraded"]))
        img = draw_product_image(rng, cat, w, h, mode)
        pid = f"p{i:06d}"
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))])
        (out / "images" / f"{pid}.jpg").write_bytes(enc.tobytes())
        title, desc = product_text(rng, cat, txt_ok)
        rows.append({"id": pid, "image": f"images/{pid}.jpg", "title": title, "description": desc,
                     "category": labels[cat]})
        truth.append({"id": pid, "image_informative": img_ok, "image_mode": mode, "text_informative": txt_ok})
    planted = _plant_bad_rows(out, rows, labels, np.random.default_rng([cfg.seed, 10**9])) if cfg.bad_rows else []
    if cfg.attributes:
        _add_attributes(rows, truth, labels, cfg.seed)
    meta = {"seed": cfg.seed, "num_products": cfg.num_products, "labels": labels,
            "rates": {"image_informative": IMAGE_INFORMATIVE_P, "text_informative": TEXT_INFORMATIVE_P,
                      "description_empty": DESCRIPTION_EMPTY_P, **(_ATTRIBUTE_RATES if cfg.attributes else {})},
            "products": truth}
    table = write_dataset(out, cfg.format, rows, BASE_COLUMNS + (ATTRIBUTE_COLUMNS if cfg.attributes else []), labels,
                          meta)
    if cfg.bad_rows:
        write_atomic(out / "planted.json", json.dumps({"table": table.name, "labels_file": "labels.txt",
                                                       "rows": planted}, indent=1, ensure_ascii=False))
    print(f"wrote {len(rows)} products ({len(planted)} planted bad rows) over {len(labels)} categories -> {table}")
    return table
