"""Image decoding shared by ``mmcat pack`` and the training loader: JPEGs are decoded at reduced scale.

libjpeg decodes a JPEG directly at 1/2, 1/4 or 1/8 of its size (scaling in the DCT domain; OpenCV's
``IMREAD_REDUCED_COLOR_*``, PIL's ``draft``): several times faster than a full decode, and equivalent to the
downscale that follows anyway. The packer (resizing to ``image_size``) and the loader (cropping to the training
size) both ask :func:`decode_scaled` for the largest reduction that keeps the side they resize by at least as long as
their target. The packer knows the size from the PIL header it reads for its decompression-bomb check; the loader,
which decodes every sample of every epoch, reads it with :func:`jpeg_size` (a few microseconds, where opening a PIL
header costs as much as a sixth of decoding a 256-pixel photo).
"""
from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
# start-of-frame markers (baseline, progressive, lossless, arithmetic ...): they hold the image size
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def decode_scaled(data: bytes, side: Optional[int], target: int, rgb: bool = False) -> Optional[np.ndarray]:
    """``cv2.imdecode`` in 8-bit colour (BGR, or RGB with ``rgb``), EXIF orientation applied; None when OpenCV cannot
    decode ``data``. ``side``: for a JPEG, the length of the side the caller resizes by (None: not a JPEG, or no
    reduction wanted); the image is then decoded at the largest of 1/8, 1/4, 1/2 that keeps ``side`` >= ``target``.
    Only JPEGs may be reduced: OpenCV decodes other formats in full and then resizes."""
    flags = cv2.IMREAD_COLOR_RGB if rgb else cv2.IMREAD_COLOR
    if side is not None:
        for factor, reduced in _REDUCED:
            if side // factor >= target:
                flags |= reduced & ~cv2.IMREAD_COLOR
                break
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) from a JPEG's frame header, or None when ``data`` is not a readable JPEG header."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None
