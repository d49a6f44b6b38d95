"""``mmcat synth --generator market``: a second synthetic product generator, unlike ``shapes`` (mmcat/synth.py).

It exists to VALIDATE training recipes (never to tune them): the recipes were tuned on ``shapes``, so a recipe
that only works there learnt ``shapes``' cues, not products. Its photos, layout and vocabulary share nothing with
``shapes``; the raw layout is the same (``mmcat pack`` treats both alike): ``products.csv`` (or ``.jsonl`` /
``.parquet``) with ``id, image, title, description, category[, material, weight_g]``, ``images/<id>.jpg``,
``labels.txt`` and ``synth.json`` (the rates and, per product, ``image_informative``, ``image_mode``,
``object_hue``/``object_bgr`` (the drawn colour, None without an object), ``text_informative``, ``keyword``,
``keyword_shared`` and, with attributes, ``material_informative``).

Photos ("one object among clutter, with blur and rotation"), drawn with OpenCV at most 160 px on the short side
and resized to the product's size (``min_side``..``max_side`` per side):
  * background dark or mid grey-ish (value 25..130): a linear gradient in a random direction or a tiled pattern,
    plus pixel noise -- never ``shapes``' light table;
  * the object is a GLYPH of several strokes/discs/rings whose STRUCTURE is the category (GLYPHS: three bars, a
    ring with a cross, a T with a dot, a triangle with a hole, ...), in a random bright colour per product (the
    colour carries no class information: ``object_hue`` is recorded to check that), at any rotation, 35..70 % of
    the short side, anywhere in the frame;
  * 3..8 clutter fragments in the same style as the glyph parts (a bar, a disc, a ring, an arc, a wedge; random
    bright colours) so the model must find the composed object rather than any coloured stroke;
  * then a Gaussian or a motion blur (random angle) or none, and JPEG quality 60..95.
Each modality is informative only part of the time, independently per product (deterministic by seed):
  * photo informative with p = 0.70 (IMAGE_INFORMATIVE_P); otherwise, a third each: clutter only, a generic
    taped parcel (the same for every category), or the object hidden (so out of focus it is a blob);
  * text informative with p = 0.60 (TEXT_INFORMATIVE_P): a marketplace title
    ``SKU 48213 | Korvane — whisk, stainless, 3 pcs, 25 cm`` with a category keyword, and bullet features shared by
    the category and its sibling (categories come in sibling pairs: kitchenware/bakeware, ...); in 1 of 4
    informative texts (SHARED_KEYWORD_P) the keyword is one the sibling uses too, so even informative text is not
    perfect; otherwise generic wording (GENERIC_TERMS, GENERIC_BULLETS);
  * description empty with p = 0.20 (DESCRIPTION_EMPTY_P).
With attributes (the default; ``--no-attributes`` leaves them out), drawn from a separate random stream (photos and
texts are the same either way), independently of the photo and the text:
  * ``material`` informative with p = 0.45 (MATERIAL_INFORMATIVE_P): the category's own material; otherwise
    uniform over all 12 materials; empty with p = 0.10 (MATERIAL_MISSING_P);
  * ``weight_g`` weakly informative: an integer, log-normal around a category median (WEIGHT_MEDIANS) with
    sigma 0.7; empty with p = 0.05 (WEIGHT_MISSING_P).
With C classes the best accuracy is about 0.70 + 0.30/C from the photo and 0.60 * (0.75 + 0.25/2) + 0.40/C from
the text alone. ``--bad-rows`` plants ``shapes``' bad inputs only, so it is refused here (one line, exit 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np

from mmcat.errors import ConfigError
from mmcat.synth import BASE_COLUMNS, check_sizes, write_dataset

IMAGE_INFORMATIVE_P = 0.70
TEXT_INFORMATIVE_P = 0.60
SHARED_KEYWORD_P = 0.25  # of the informative texts: a keyword the sibling category uses too
DESCRIPTION_EMPTY_P = 0.20
MATERIAL_INFORMATIVE_P = 0.45
MATERIAL_MISSING_P = 0.10
WEIGHT_MISSING_P = 0.05
WEIGHT_SIGMA = 0.7
ATTRIBUTE_COLUMNS = ["material", "weight_g"]
DRAW_SIDE = 160  # photos are drawn at most this big on the short side, then resized (fast at 800 px)

# name, own keywords, glyph; categories 2k and 2k+1 are siblings (SHARED_KEYWORDS[k], PAIR_FEATURES[k])
CATEGORIES: List[Tuple[str, List[str], str]] = [
    ("kitchenware", ["whisk", "ladle", "colander", "grater", "peeler"], "bars3"),
    ("bakeware", ["cake tin", "muffin tray", "rolling pin", "piping nozzle", "cooling rack"], "ring_cross"),
    ("gardening", ["trowel", "pruning shears", "seed tray", "watering can", "rake"], "tee_dot"),
    ("camping", ["tent peg", "sleeping mat", "camp stove", "tarp", "hammock"], "triangle_hole"),
    ("stationery", ["fountain pen", "notebook", "stapler", "highlighter", "envelope"], "rings2"),
    ("crafts", ["glue gun", "yarn skein", "embroidery hoop", "paintbrush", "felt sheet"], "squares4"),
    ("pet supplies", ["dog leash", "cat scratcher", "chew rope", "litter scoop", "feeding dish"], "ell_disc"),
    ("aquarium", ["fish net", "air pump", "gravel vacuum", "aquarium heater", "filter sponge"], "spokes3"),
    ("bathroom", ["shower caddy", "soap dish", "bath mat", "towel rail", "toothbrush holder"], "aitch"),
    ("cleaning", ["mop", "dustpan", "scrubbing pad", "squeegee", "microfibre cloth"], "zigzag"),
    ("fitness", ["kettlebell", "yoga mat", "skipping rope", "resistance band", "foam roller"], "dumbbell"),
    ("cycling", ["bike pump", "inner tube", "chain lube", "saddle", "pedal"], "ring_moons"),
]
SHARED_KEYWORDS = [["mixing bowl", "measuring spoon"], ["folding stool", "jute twine"], ["scissors", "washi tape"],
                   ["auto feeder", "grooming comb"], ["toilet brush", "drain unblocker"], ["sweatband", "cadence sensor"]]
PAIR_FEATURES = [["food-safe finish", "easy to rinse", "oven-proof to 220 C"],
                 ["weatherproof", "folds flat", "outdoor use"],
                 ["acid-free", "smudge-proof", "for office and hobby"],
                 ["animal-safe", "easy to refill", "for daily care"],
                 ["mould-resistant", "wall-mountable", "quick-drying"],
                 ["sweat-proof", "for training sessions", "adjustable fit"]]
MATERIALS = ["stainless steel", "silicone", "galvanised iron", "ripstop nylon", "recycled paper", "cotton canvas",
             "hemp", "borosilicate glass", "polypropylene", "microfibre", "neoprene", "aluminium alloy"]
WEIGHT_MEDIANS = [180, 450, 900, 1500, 60, 120, 350, 250, 700, 300, 2500, 800]  # grams, per category
SELLERS = ["Korvane", "Miltrex", "Zentoro", "Halvik", "Pebblo", "Quarro", "Dunmore", "Velspar", "Ostrana", "Brixley",
           "Tevanu", "Yorrik", "no-name", "OEM"]
QUALIFIERS = ["stainless", "foldable", "heavy-duty", "reusable", "non-slip", "multi-size", "mini", "XL", "2024 model",
              "refurbished"]
GENERIC_TERMS = ["assorted lot", "household accessory", "utility piece", "spare part", "multipurpose organiser",
                 "clearance lot", "misc accessory", "replacement unit"]
GENERIC_BULLETS = ["fast dispatch", "returns within 30 days", "seller rated 4.8/5", "bulk discount available",
                   "new old stock", "stock photo for reference", "free shipping over 25 EUR", "multi-buy offer"]


# ------------------------------------------------------------------------------------------------- drawing
# a glyph is a list of parts in a unit frame (y down, radius 1): ("seg", x1, y1, x2, y2, thickness),
# ("disc", x, y, r), ("ring", x, y, r, thickness), ("poly", [(x, y), ...]) and ("hole", x, y, r) which erases
def _spokes(n: int, start: float, length: float, th: float) -> list:
    angles = np.radians(start + np.arange(n) * 360.0 / n)
    return [("seg", 0.0, 0.0, length * np.cos(a), length * np.sin(a), th) for a in angles]


GLYPHS: Dict[str, list] = {
    "bars3": [("seg", -0.8, y, 0.8, y, 0.24) for y in (-0.62, 0.0, 0.62)],
    "ring_cross": [("ring", 0, 0, 0.82, 0.18), ("seg", -0.82, 0, 0.82, 0, 0.18), ("seg", 0, -0.82, 0, 0.82, 0.18)],
    "tee_dot": [("seg", -0.8, -0.7, 0.8, -0.7, 0.24), ("seg", 0, -0.7, 0, 0.4, 0.24), ("disc", 0, 0.78, 0.2)],
    "triangle_hole": [("poly", [(0, -0.92), (0.86, 0.7), (-0.86, 0.7)]), ("hole", 0, 0.18, 0.3)],
    "rings2": [("ring", 0, 0, 0.85, 0.16), ("ring", 0, 0, 0.4, 0.16)],
    "squares4": [("poly", [(x - 0.3, y - 0.3), (x + 0.3, y - 0.3), (x + 0.3, y + 0.3), (x - 0.3, y + 0.3)])
                 for x in (-0.42, 0.42) for y in (-0.42, 0.42)],
    "ell_disc": [("seg", -0.6, -0.85, -0.6, 0.65, 0.24), ("seg", -0.6, 0.65, 0.8, 0.65, 0.24),
                 ("disc", 0.4, -0.35, 0.32)],
    "spokes3": _spokes(3, -90.0, 0.9, 0.2) + [("ring", 0, 0, 0.3, 0.14)],
    "aitch": [("seg", -0.65, -0.85, -0.65, 0.85, 0.22), ("seg", 0.65, -0.85, 0.65, 0.85, 0.22),
              ("seg", -0.65, 0, 0.65, 0, 0.22)],
    "zigzag": [("seg", *a, *b, 0.2) for a, b in zip([(-0.9, -0.55), (-0.45, 0.55), (0, -0.35), (0.45, 0.55)],
                                                      [(-0.45, 0.55), (0, -0.35), (0.45, 0.55), (0.9, -0.55)])],
    "dumbbell": [("seg", -0.6, 0, 0.6, 0, 0.18), ("disc", -0.68, 0, 0.3), ("disc", 0.68, 0, 0.3)],
    "ring_moons": [("ring", 0, 0, 0.42, 0.16)] + [("disc", 0.8 * np.cos(a), 0.8 * np.sin(a), 0.16)
                                                   for a in np.radians([0, 90, 180, 270])],
}
# clutter: single parts in the glyphs' style, sized for a unit frame the size of a fragment
FRAGMENTS = [[("seg", -0.9, 0, 0.9, 0, 0.3)], [("disc", 0, 0, 0.6)], [("ring", 0, 0, 0.75, 0.25)],
             [("poly", [(0, -0.8), (0.7, 0.6), (-0.7, 0.6)])], [("seg", -0.8, 0.5, 0, -0.5, 0.3), ("seg", 0, -0.5, 0.8, 0.5, 0.3)]]
PARCEL = [("poly", [(-0.9, -0.6), (0.9, -0.6), (0.9, 0.6), (-0.9, 0.6)])]  # a generic box, the same for all


def _paint(mask: np.ndarray, parts: list, cx: float, cy: float, r: float, rot: float) -> None:
    """Rasterise ``parts`` into ``mask`` (255) at centre (cx, cy), radius r, rotation rot (radians)."""
    c, s = np.cos(rot), np.sin(rot)

    def pt(x: float, y: float) -> Tuple[int, int]:
        return int(round(cx + r * (c * x - s * y))), int(round(cy + r * (s * x + c * y)))

    for kind, *a in parts:
        if kind == "seg":
            cv2.line(mask, pt(a[0], a[1]), pt(a[2], a[3]), 255, max(1, int(round(r * a[4]))), cv2.LINE_AA)
        elif kind in ("disc", "hole"):
            cv2.circle(mask, pt(a[0], a[1]), max(1, int(round(r * a[2]))), 255 if kind == "disc" else 0, -1, cv2.LINE_AA)
        elif kind == "ring":
            cv2.circle(mask, pt(a[0], a[1]), max(1, int(round(r * a[2]))), 255, max(1, int(round(r * a[3]))),
                       cv2.LINE_AA)
        else:
            cv2.fillPoly(mask, [np.array([pt(x, y) for x, y in a[0]], np.int32)], 255, cv2.LINE_AA)


def _bright_colour(rng: np.random.Generator) -> Tuple[int, np.ndarray]:
    """(OpenCV hue 0..179, BGR): any hue, saturated and bright enough to stand out from the dark background."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(110, 256), rng.integers(170, 256)]]], np.uint8)
    return int(hsv[0, 0, 0]), cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _blend(img: np.ndarray, mask: np.ndarray, bgr: np.ndarray, rng: np.random.Generator) -> None:
    """Paint ``bgr`` where ``mask`` is set (anti-aliased edges), with a little lighting falloff across the canvas."""
    h, w = mask.shape
    along_x = bool(rng.random() < 0.5)
    light = np.linspace(rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), w if along_x else h, dtype=np.float32)
    x, y, bw, bh = cv2.boundingRect(mask)  # only the painted box: most of the canvas is untouched
    if bw == 0 or bh == 0:
        return
    light = light[None, x:x + bw, None] if along_x else light[y:y + bh, None, None]
    alpha = (mask[y:y + bh, x:x + bw].astype(np.float32) / 255.0)[..., None]
    roi = img[y:y + bh, x:x + bw]
    roi[:] = roi * (1 - alpha) + (bgr * light) * alpha


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Dark or mid, low-saturation: a gradient in a random direction or tiles, plus pixel noise."""
    def colour() -> np.ndarray:
        hsv = np.array([[[rng.integers(0, 180), rng.integers(0, 120), rng.integers(25, 131)]]], np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)

    c1, c2 = colour(), colour()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = ((t - t.min()) / max(1e-6, float(np.ptp(t))))[..., None]
        img = c1 * (1 - t) + c2 * t
    else:
        step = int(rng.integers(max(4, min(h, w) // 10), max(5, min(h, w) // 4)))
        shift = float(rng.uniform(-0.5, 0.5))  # brick-like rows
        tiles = ((yy // step).astype(int) + ((xx + shift * step * (yy // step)) // step).astype(int)) % 2
        img = np.where(tiles[..., None] == 1, c1, c1 * 0.8 + c2 * 0.2)
    return img + rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(3, 12))


def _clutter(img: np.ndarray, n: int, rng: np.random.Generator) -> None:
    h, w = img.shape[:2]
    side = min(h, w)
    for _ in range(n):
        mask = np.zeros((h, w), np.uint8)
        _paint(mask, FRAGMENTS[int(rng.integers(len(FRAGMENTS)))], rng.uniform(0, w), rng.uniform(0, h),
               side * rng.uniform(0.05, 0.12), rng.uniform(0, 2 * np.pi))
        _blend(img, mask, _bright_colour(rng)[1], rng)


def _camera(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, a motion blur at a random angle, or none; sized relative to the photo (the same look at any
    size)."""
    kind, side = rng.integers(0, 3), min(img.shape[:2])
    if kind == 1:
        return cv2.GaussianBlur(img, (0, 0), side * rng.uniform(0.002, 0.009))
    if kind == 2:
        n = max(2, int(round(side * rng.uniform(0.015, 0.045))))
        kernel = np.zeros((n, n), np.float32)
        cv2.line(kernel, (0, n // 2), (n - 1, n // 2), 1.0)
        rot = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (n, n))
        return cv2.filter2D(img, -1, kernel / max(1e-6, float(kernel.sum())))
    return img


def draw_market_image(rng: np.random.Generator, category: int, w: int, h: int,
                      mode: str = "informative") -> Tuple[np.ndarray, dict]:
    """(BGR photo of w x h, what was drawn): mode "informative" (the category's glyph among clutter), "clutter"
    (no object), "parcel" (a generic box) or "hidden" (the glyph so out of focus that only a blob is left)."""
    scale = min(1.0, DRAW_SIDE / min(w, h))
    dw, dh = max(8, round(w * scale)), max(8, round(h * scale))
    img = _background(dh, dw, rng)
    side = min(dw, dh)
    _clutter(img, int(rng.integers(3, 9)) + (3 if mode == "clutter" else 0), rng)
    drawn = {"object_hue": None, "object_bgr": None}
    if mode != "clutter":
        r = side * rng.uniform(0.35, 0.70) / 2
        cx, cy = rng.uniform(r, dw - r), rng.uniform(r, dh - r)
        hue, bgr = _bright_colour(rng)
        mask = np.zeros((dh, dw), np.uint8)
        _paint(mask, PARCEL if mode == "parcel" else GLYPHS[CATEGORIES[category][2]], cx, cy, r,
               rng.uniform(0, 2 * np.pi))
        if mode == "hidden":  # a huge blur, done cheaply at 1/4 scale
            small = cv2.resize(mask, (max(1, dw // 4), max(1, dh // 4)), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(cv2.GaussianBlur(small, (0, 0), r * 0.15), (dw, dh), interpolation=cv2.INTER_LINEAR)
        elif mode == "parcel":  # a tape band across the box, in the box's darker shade
            tape = np.zeros_like(mask)
            _paint(tape, [("seg", -0.9, 0, 0.9, 0, 0.22)], cx, cy, r, rng.uniform(0, 2 * np.pi))
            _blend(img, mask, bgr, rng)
            _blend(img, cv2.bitwise_and(tape, mask), bgr * 0.6, rng)
        else:
            _blend(img, mask, bgr, rng)
        drawn = {"object_hue": hue, "object_bgr": [int(v) for v in bgr]}
    img = _camera(np.clip(img, 0, 255).astype(np.uint8), rng)
    if (dw, dh) != (w, h):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return img, drawn


# ---------------------------------------------------------------------------------------------------- text
def market_text(rng: np.random.Generator, category: int, informative: bool) -> Tuple[str, str, dict]:
    """(title, description, {"keyword", "keyword_shared"}): a marketplace listing."""
    sku, seller, qualifier = int(rng.integers(10000, 100000)), str(rng.choice(SELLERS)), str(rng.choice(QUALIFIERS))
    pcs, cm = int(rng.choice([1, 2, 3, 4, 5, 6, 10, 12])), int(rng.integers(5, 120))
    bullets = [str(b) for b in rng.choice(GENERIC_BULLETS, 3, replace=False)]
    keyword, shared = None, False
    if informative:
        shared = bool(rng.random() < SHARED_KEYWORD_P)
        keyword = str(rng.choice(SHARED_KEYWORDS[category // 2] if shared else CATEGORIES[category][1]))
        what = keyword
        bullets[0] = str(rng.choice(PAIR_FEATURES[category // 2]))
    else:
        what = str(rng.choice(GENERIC_TERMS))
    title = f"SKU {sku} | {seller} — {what}, {qualifier}, {pcs} pcs, {cm} cm"
    desc = "" if rng.random() < DESCRIPTION_EMPTY_P else " ".join(f"• {b}" for b in bullets)
    return title, desc, {"keyword": keyword, "keyword_shared": shared}


# ---------------------------------------------------------------------------------------------- attributes
def market_attributes(rng: np.random.Generator, category: int) -> Tuple[Dict[str, object], bool]:
    """(material, weight_g of one product -- None when missing --, whether the material is informative)."""
    informative = bool(rng.random() < MATERIAL_INFORMATIVE_P)
    material = MATERIALS[category] if informative else str(rng.choice(MATERIALS))
    weight = max(1, int(round(WEIGHT_MEDIANS[category] * float(np.exp(rng.normal(0.0, WEIGHT_SIGMA))))))
    values = {"material": None if rng.random() < MATERIAL_MISSING_P else material,
              "weight_g": None if rng.random() < WEIGHT_MISSING_P else weight}
    return values, informative


_RATES = {"image_informative": IMAGE_INFORMATIVE_P, "text_informative": TEXT_INFORMATIVE_P,
          "shared_keyword": SHARED_KEYWORD_P, "description_empty": DESCRIPTION_EMPTY_P}
_ATTRIBUTE_RATES = {"material_informative": MATERIAL_INFORMATIVE_P, "material_missing": MATERIAL_MISSING_P,
                    "weight_missing": WEIGHT_MISSING_P, "weight_sigma": WEIGHT_SIGMA}
NON_INFORMATIVE_MODES = ["clutter", "parcel", "hidden"]


# ------------------------------------------------------------------------------------------------- writing
def synthesize_market(cfg) -> Path:
    """Write the market dataset described in the module docstring; returns the table path."""
    check_sizes(cfg, len(CATEGORIES))
    if cfg.bad_rows:
        raise ConfigError("config key 'bad_rows': planted bad rows come with generator=shapes only")
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels = [c[0] for c in CATEGORIES[: cfg.num_classes]]
    rows: List[Dict[str, object]] = []
    truth: List[dict] = []
    for i in range(cfg.num_products):
        rng = np.random.default_rng([cfg.seed, i])
        cat = i % cfg.num_classes  # balanced classes
        w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, 2))
        img_ok, txt_ok = bool(rng.random() < IMAGE_INFORMATIVE_P), bool(rng.random() < TEXT_INFORMATIVE_P)
        mode = "informative" if img_ok else str(rng.choice(NON_INFORMATIVE_MODES))
        img, drawn = draw_market_image(rng, cat, w, h, mode)
        pid = f"m{i:06d}"
        enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))])[1]
        (out / "images" / f"{pid}.jpg").write_bytes(enc.tobytes())
        title, desc, said = market_text(rng, cat, txt_ok)
        row = {"id": pid, "image": f"images/{pid}.jpg", "title": title, "description": desc, "category": labels[cat]}
        fact = {"id": pid, "image_informative": img_ok, "image_mode": mode, **drawn, "text_informative": txt_ok, **said}
        if cfg.attributes:  # own stream: photos and texts do not depend on whether attributes are written
            values, fact["material_informative"] = market_attributes(np.random.default_rng([cfg.seed, i, 7]), cat)
            row.update(values)
        rows.append(row)
        truth.append(fact)
    meta = {"generator": "market", "seed": cfg.seed, "num_products": cfg.num_products, "labels": labels,
            "rates": {**_RATES, **(_ATTRIBUTE_RATES if cfg.attributes else {})}, "products": truth}
    table = write_dataset(out, cfg.format, rows, BASE_COLUMNS + (ATTRIBUTE_COLUMNS if cfg.attributes else []), labels,
                          meta)
    print(f"wrote {len(rows)} market products over {len(labels)} categories -> {table}")
    return table
