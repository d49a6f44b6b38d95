"""Turn one Task into the members of one WebDataset sample (runs in worker processes).

A row keeps whichever modality is usable: image broken but text fine (or the reverse) -> the sample is written
without that member and ``json`` says so ("degraded"); neither usable -> "rejected".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import cv2

from mmcat.pack.download import DOWNLOAD_FAILED, Fetched, is_url
from mmcat.pack.images import ImageError, process_image, read_image_bytes
from mmcat.pack.plan import Task


@dataclass
class ImageSettings:
    size: int
    mode: str
    quality: int
    max_pixels: int
    max_bytes: int


@dataclass
class Result:
    members: Optional[Dict[str, bytes]]  # None when the row is rejected
    label_index: int
    failure: Optional[dict] = None  # failures.jsonl record (degraded or rejected)
    notes: List[str] = field(default_factory=list)
    attributes: Optional[Dict[str, Any]] = None  # the sample's typed attributes (for the train split's fit)


_settings: Optional[ImageSettings] = None


def init_worker(settings: ImageSettings) -> None:
    """Pool initializer: one OpenCV thread per process (N processes already use N cores)."""
    global _settings
    _settings = settings
    cv2.setNumThreads(1)


def process_task_in_worker(item: Tuple[Task, Optional[Fetched]]) -> Result:
    """``item``: a task and, for a URL photo, its download (:class:`mmcat.pack.download.Prefetch`)."""
    assert _settings is not None, "init_worker was not called"
    return process_task(item[0], _settings, item[1])


def photo_bytes(task: Task, max_bytes: int, fetched: Optional[Fetched] = None) -> bytes:
    """The photo file of ``task``: its download for a URL (fetched by the pack process), else the local file."""
    if fetched is not None:
        if fetched.error is not None:
            raise ImageError(DOWNLOAD_FAILED, fetched.error)
        return fetched.data
    if is_url(task.image_path):  # every URL task comes with its download: this is a caller's bug
        raise ImageError(DOWNLOAD_FAILED, "not downloaded")
    return read_image_bytes(task.image_path, max_bytes)


def process_task(task: Task, s: ImageSettings, fetched: Optional[Fetched] = None) -> Result:
    # every optional key is always present (null when not applicable): readers that infer a schema from the first
    # samples (Hugging Face datasets' webdataset loader) would otherwise drop keys those samples lack
    meta: dict = {"id": task.id, "label": task.label, "label_index": task.label_index, "row": task.row,
                  "image_error": None, "image_notes": None, "width": None, "height": None, "orig_width": None,
                  "orig_height": None}
    meta.update(task.texts)
    if task.attributes is not None:  # every column as a key, null when missing (the attributes contract)
        meta["attributes"] = dict(task.attributes)
    text_parts = [t for t in task.texts.values() if t]
    members: Dict[str, bytes] = {}
    notes: List[str] = []
    image_error: Optional[ImageError] = None
    try:
        img = process_image(photo_bytes(task, s.max_bytes, fetched), s.size, s.mode, s.quality, s.max_pixels)
        members["jpg"] = img.jpeg
        notes = img.notes
        meta.update(width=img.width, height=img.height, orig_width=img.orig_width, orig_height=img.orig_height)
        if notes:
            meta["image_notes"] = notes
    except ImageError as exc:
        image_error = exc
        meta["image_error"] = exc.reason
    except Exception as exc:  # an unexpected decoder failure must cost one photo, not the run
        image_error = ImageError("image_undecodable", f"{type(exc).__name__}: {exc}")
        meta["image_error"] = image_error.reason
    meta["has_image"] = image_error is None
    meta["has_text"] = bool(text_parts)
    base = {"row": task.row, "id": task.id, "split": task.split}
    if image_error is not None and not text_parts:
        failure = dict(base, reason="no_usable_modality", kind="rejected", image_error=image_error.reason,
                       detail=image_error.detail)
        return Result(None, task.label_index, failure, notes)
    failure = None
    if image_error is not None:
        failure = dict(base, reason=image_error.reason, kind="degraded", detail=image_error.detail)
    elif not text_parts:
        failure = dict(base, reason="text_empty", kind="degraded")
    if text_parts:
        members["txt"] = "\n".join(text_parts).encode("utf-8")
    members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    members["cls"] = str(task.label_index).encode("ascii")
    return Result(members, task.label_index, failure, notes, task.attributes)
