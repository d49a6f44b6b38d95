"""Turning raw tar samples into checked records, and counting the ones that cannot be used.

A raw webdataset sample is a dict of member bytes (``jpg``, ``txt``, ``json``, ``cls``, ...). Checks are split in two
so that mid-epoch resume can skip samples cheaply: :func:`parse_sample` (label, text, which members exist: no image
decoding) runs before the resume skip, :func:`decode_image` runs after it.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, Optional, Sequence

import numpy as np

from mmcat.images import decode_scaled, jpeg_size
from mmcat.errors import BadSampleError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_LOGGED_PER_WORKER = 3  # first few bad samples are logged with their reason; the rest are only counted


class BadSample(ValueError):
    """A sample that cannot be used (missing member, bad label, undecodable image)."""


class BadSampleCounter:
    """Counts skipped samples inside one loader worker; the batcher moves the count into ``batch["skipped"]``.

    Each DataLoader worker holds its own copy (the dataset is copied into every worker process), so counts never
    need cross-process state: every batch carries the number of bad samples dropped while it was being built, and
    the trainer sums ``batch["skipped"]`` over batches (and ranks) to log the epoch total.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.pending = 0
        self.total = 0

    def record(self, reason: str, where: str = "") -> None:
        msg = f"bad sample {where}: {reason}".replace(" :", ":")
        if self.strict:
            raise BadSampleError(f"{msg} (data.strict=true; set data.strict=false to skip and count bad samples)")
        self.pending += 1
        self.total += 1
        if self.total <= _LOGGED_PER_WORKER:
            log.warning("skipping %s", msg)

    def handler(self, exn: Exception) -> bool:
        """webdataset ``handler=``: count the error and continue (unlike ``warn_and_continue``, no sleep)."""
        self.record(f"{type(exn).__name__}: {str(exn)[:300]}", "in tar stream")
        return True

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


class LabelReader:
    """Reads the class index of a raw sample according to ``data.label_key``.

    - ``cls`` (what ``mmcat pack`` writes): the member is the class *index* into ``labels.json``, always. It is never
      looked up as a label name first: with numeric names (``labels.json`` = ``["1", "10", "100", "2"]``) the text
      ``2`` is index 2 ("100"), not the name "2".
    - ``json:<field>`` (shards from other tools): the field holds the label *name*, mapped through the labels file.
      An integer is a name too (``10`` -> "10": label names are strings, and a product code is not a position in
      a sorted list); any other type (float, bool, list, object) is a bad sample, as is a name not in the file.
    """

    def __init__(self, label_key: str, labels: Sequence[str]) -> None:
        self.num_labels = len(labels)
        self.index = {name: i for i, name in enumerate(labels)}
        if label_key == "cls":
            self.field: Optional[str] = None
        elif label_key.startswith("json:") and len(label_key) > 5:
            self.field = label_key[5:]
        else:
            raise ValueError(f"data.label_key must be 'cls' or 'json:<field>', got '{label_key}'")

    def __call__(self, raw: Dict[str, Any]) -> int:
        return self._from_cls(raw) if self.field is None else self._from_json(raw, self.field)

    def _from_cls(self, raw: Dict[str, Any]) -> int:
        if "cls" not in raw:
            raise BadSample("missing member 'cls'")
        text = raw["cls"].decode("ascii", "replace").strip()
        if not (text.isascii() and text.isdigit()):
            raise BadSample(f"cls member {text[:40]!r} is not a class index")
        idx = int(text)
        if idx >= self.num_labels:
            raise BadSample(f"label index {idx} outside 0..{self.num_labels - 1}")
        return idx

    def _from_json(self, raw: Dict[str, Any], field: str) -> int:
        if "json" not in raw:
            raise BadSample("missing member 'json'")
        try:
            meta = json.loads(raw["json"])
        except ValueError as exc:
            raise BadSample(f"invalid json member: {exc}") from None
        if not isinstance(meta, dict) or meta.get(field) is None:
            raise BadSample(f"json member has no '{field}' field")
        value = meta[field]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadSample(f"json field '{field}' is {value!r}: a label name must be a string or an integer")
        name = str(value)
        if name not in self.index:
            raise BadSample(f"label {name!r} is not in the labels file")
        return self.index[name]


def parse_sample(raw: Dict[str, Any], labels: LabelReader, modalities: Sequence[Any] = ()) -> Dict[str, Any]:
    """Check a raw sample without decoding its image; any modality may be missing, not all of them.
    ``modalities``: the non-built-in ones (``mmcat.modalities``), each read into ``["modalities"][name]``."""
    image = next((raw[e] for e in IMAGE_EXTS if raw.get(e)), None)
    text = None
    if raw.get("txt"):
        try:
            text = raw["txt"].decode("utf-8").strip() or None  # empty text counts as missing text
        except UnicodeDecodeError:
            raise BadSample("txt member is not UTF-8") from None
    extra = {m.name: m.read(raw) for m in modalities}
    if image is None and text is None and all(v is None for v in extra.values()):
        raise BadSample("no image and no text" + (f" and no {', '.join(extra)}" if extra else ""))
    return {"key": raw["__key__"], "url": raw.get("__url__", ""), "image": image, "text": text,
            "label": labels(raw), "modalities": extra}


# ------------------------------------------------------------------------------------------------ image decode
def decode_image(data: bytes, min_side: int) -> np.ndarray:
    """Decode to an RGB uint8 HxWx3 array. Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale as long as the shorter
    side stays >= ``min_side`` (:func:`mmcat.images.decode_scaled`, shared with ``mmcat pack``)."""
    size = jpeg_size(data)
    img = decode_scaled(data, min(size) if size is not None else None, min_side, rgb=True)
    if img is None or img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise BadSample("image does not decode (corrupt or truncated)")
    return img

