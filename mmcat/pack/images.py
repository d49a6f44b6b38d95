"""Photo bytes -> normalized RGB JPEG bytes with OpenCV, or a failure reason.

Why this shape: PIL reads only the header (size, mode, EXIF orientation) so the pixel-count guard against
decompression bombs runs *before* any pixel is allocated; OpenCV then decodes from memory. JPEGs are decoded at 1/2,
1/4 or 1/8 scale directly whenever the reduced image is still at least the target size
(:func:`mmcat.images.decode_scaled`, shared with the training loader). ``IMREAD_COLOR`` applies
the EXIF orientation, converts grayscale/CMYK to BGR and 16-bit to 8-bit; images with an alpha channel
(RGBA, LA, palette PNG with transparency) go through ``IMREAD_UNCHANGED`` and are composited on white.
"""
from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

from mmcat.config import ResizeMode
from mmcat.images import decode_scaled

# EXIF orientation -> OpenCV ops (used only on the IMREAD_UNCHANGED path; IMREAD_COLOR applies it itself)
_EXIF_OPS = {
    2: [("flip", 1)],
    3: [("rot", cv2.ROTATE_180)],
    4: [("flip", 0)],
    5: [("rot", cv2.ROTATE_90_CLOCKWISE), ("flip", 1)],
    6: [("rot", cv2.ROTATE_90_CLOCKWISE)],
    7: [("rot", cv2.ROTATE_90_COUNTERCLOCKWISE), ("flip", 1)],
    8: [("rot", cv2.ROTATE_90_COUNTERCLOCKWISE)],
}


class ImageError(Exception):
    """An unusable image; ``reason`` is a short machine-readable code recorded in failures.jsonl."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ProcessedImage:
    jpeg: bytes
    width: int  # after resize
    height: int
    orig_width: int  # as displayed (after EXIF rotation)
    orig_height: int
    notes: List[str] = field(default_factory=list)  # conversions applied: grayscale, cmyk, alpha_composited, ...


_PIL_GLOBALS = threading.Lock()  # PIL's pixel limit and the warning filters are process-wide: the server's decode
# threads read headers concurrently, and one thread restoring the limit while another opens a file would let PIL's
# own check turn a bomb into "undecodable" instead of mmcat's "too large"


def _header(data: bytes, max_pixels: int) -> Tuple[Image.Image, int, int]:
    with _PIL_GLOBALS, warnings.catch_warnings():
        # our own limit replaces PIL's global one (which warns, or raises at 2x, depending on size)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(io.BytesIO(data))
        except Exception as exc:  # UnidentifiedImageError, SyntaxError on corrupt headers, ...
            raise ImageError("image_undecodable", type(exc).__name__) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError("image_undecodable", f"size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("image_too_large", f"{w}x{h} > {max_pixels} pixels")
    return im, w, h


def _jpeg_truncated(data: bytes) -> bool:
    # a complete JPEG has an end-of-image marker after its last start-of-scan; a cut-off file does not
    sos = data.rfind(b"\xff\xda")
    return sos < 0 or data.rfind(b"\xff\xd9") < sos


def _resize_side(w: int, h: int, mode: str) -> Optional[int]:
    """The side that ``_resize`` scales to ``size`` (None: ``keep`` does not resize, so no decode-time reduction)."""
    if mode == ResizeMode.keep:
        return None
    return max(w, h) if mode == ResizeMode.border else min(w, h)


def _to_8bit(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _composite_on_white(img: np.ndarray) -> np.ndarray:
    bgr = img[:, :, :3].astype(np.float32)
    alpha = img[:, :, 3:4].astype(np.float32) / 255.0
    return (bgr * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)


def _down(scale: float) -> int:
    # INTER_AREA anti-aliases big reductions but is slow at non-integer ratios; below 2x bilinear loses nothing
    # visible (the JPEG decoder already did the big 1/2..1/8 step in the DCT domain)
    return cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR


def _resize(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    h, w = img.shape[:2]
    if mode == ResizeMode.keep:
        return img
    if mode == ResizeMode.shorter:
        scale = size / min(w, h)
        if scale >= 1.0:  # never upscale: the training pipeline resizes anyway, bigger files buy nothing
            return img
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        return cv2.resize(img, (nw, nh), interpolation=_down(scale))
    if mode == ResizeMode.center_crop:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = cv2.resize(img, (nw, nh), interpolation=_down(scale))
        y, x = (nh - size) // 2, (nw - size) // 2
        return np.ascontiguousarray(img[y:y + size, x:x + size])
    # border: fit the longer side, pad the rest with white to a square
    scale = size / max(w, h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    img = cv2.resize(img, (nw, nh), interpolation=_down(scale))
    top, left = (size - nh) // 2, (size - nw) // 2
    return cv2.copyMakeBorder(img, top, size - nh - top, left, size - nw - left, cv2.BORDER_CONSTANT, value=(255, 255, 255))


def _source_notes(pil_mode: str, orientation: int) -> List[str]:
    """The conversions a photo of this mode and EXIF orientation goes through (counted in the manifest)."""
    notes: List[str] = []
    if pil_mode in ("L", "I;16", "I", "LA", "1"):
        notes.append("grayscale")
    elif pil_mode == "CMYK":
        notes.append("cmyk")
    elif pil_mode.startswith("P"):
        notes.append("palette")
    if pil_mode.startswith("I"):
        notes.append("16bit")
    if orientation != 1:
        notes.append(f"exif_orientation_{orientation}")
    return notes


@dataclass
class DecodedPhoto:
    image: np.ndarray  # BGR uint8, upright, no alpha; decoded at reduced scale where that keeps ``size``
    orig_width: int  # as displayed (after EXIF rotation)
    orig_height: int
    notes: List[str] = field(default_factory=list)


def decode_photo(data: bytes, size: int, mode: str = "shorter", max_pixels: int = 89_478_485) -> DecodedPhoto:
    """Decode ``data`` (any format OpenCV reads) to an upright 8-bit BGR array: pixel-count guard from the header,
    truncated JPEGs refused, EXIF orientation, grey/CMYK/16-bit converted, alpha composited on white. A JPEG is
    decoded at reduced scale when the side ``mode`` resizes by stays >= ``size``. Shared by ``mmcat pack`` and
    inference on raw photos (``mmcat.classifier``), so a photo is read the same way in both."""
    mode = ResizeMode(mode)  # a plain string from Python callers; the config already holds a ResizeMode
    if not data:
        raise ImageError("image_empty", "0 bytes")
    im, w, h = _header(data, max_pixels)
    fmt, pil_mode = im.format, im.mode
    try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not a reason to drop the photo
        orientation = 1
    has_alpha = pil_mode in ("RGBA", "LA", "PA", "RGBa", "La") or (pil_mode == "P" and "transparency" in im.info)
    notes: List[str] = []
    if fmt == "JPEG" and _jpeg_truncated(data):
        raise ImageError("image_truncated", "no end-of-image marker")
    buf = np.frombuffer(data, np.uint8)
    if has_alpha:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ImageError("image_undecodable", f"{fmt} {pil_mode}")
        img = _to_8bit(img)
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        elif img.shape[2] == 2:  # gray + alpha
            img = np.dstack([cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR), img[:, :, 1]])
        if img.shape[2] == 4:
            img = _composite_on_white(img)
            notes.append("alpha_composited")
        for op, arg in _EXIF_OPS.get(orientation, []):  # IMREAD_UNCHANGED ignores EXIF orientation
            img = cv2.rotate(img, arg) if op == "rot" else cv2.flip(img, arg)
    else:
        img = decode_scaled(data, _resize_side(w, h, mode) if fmt == "JPEG" else None, size)
        if img is None:
            raise ImageError("image_undecodable", f"{fmt} {pil_mode}")
    notes.extend(_source_notes(pil_mode, orientation))
    ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return DecodedPhoto(img, ow, oh, notes)


def process_image(data: bytes, size: int, mode: str = "shorter", quality: int = 90,
                  max_pixels: int = 89_478_485) -> ProcessedImage:
    """Decode ``data`` (:func:`decode_photo`), resize, re-encode as an RGB JPEG."""
    photo = decode_photo(data, size, mode, max_pixels)
    img = _resize(photo.image, size, ResizeMode(mode))
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any 8-bit BGR array
        raise ImageError("image_encode_failed")
    return ProcessedImage(enc.tobytes(), img.shape[1], img.shape[0], photo.orig_width, photo.orig_height, photo.notes)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _check_regular(path: str, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("image_not_a_file", f"{path}: {_file_kind(st.st_mode)}")
    if st.st_size > max_bytes:
        raise ImageError("image_file_too_large", f"{path}: {st.st_size} bytes > max_image_bytes {max_bytes}")


@contextmanager
def _os_errors_as_image_errors(path: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise ImageError("image_missing", path) from None
    except OSError as exc:  # PermissionError, EIO, ENXIO (a socket), ...
        raise ImageError("image_unreadable", f"{path}: {type(exc).__name__}") from None


def read_image_bytes(path: Optional[str], max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``), or ImageError.

    Why the checks: a photo path can point (often through a symlink) at /dev/zero or /dev/urandom (endless: a
    plain read fills the memory), a FIFO (``open`` blocks until a writer appears), a socket or a device. So the
    target is ``stat``-ed first and must be a regular file no larger than ``max_bytes``; it is opened with
    O_NONBLOCK (a FIFO swapped in after the check cannot block), checked again on the open descriptor, and read up
    to ``max_bytes + 1`` bytes only (a file that grew meanwhile is refused, not read on).
    """
    if not path:
        raise ImageError("image_missing", "no image path")
    with _os_errors_as_image_errors(path):
        _check_regular(path, os.stat(path), max_bytes)  # os.stat follows symlinks: the target decides
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            _check_regular(path, os.fstat(fd), max_bytes)  # the path may have been replaced since the stat
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError("image_file_too_large", f"{path}: more than max_image_bytes {max_bytes} bytes")
    return data
