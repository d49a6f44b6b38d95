"""JPEG decode and image transforms on the training device (``data.decode_on=device``), for when the loader
workers' CPU decode is the bottleneck.

With ``decode_on=device`` the loader workers only read, label-check, tokenize and batch: the batch carries each
sample's raw image bytes (``image_bytes``: a list of 1-D uint8 CPU tensors, None where a sample has no image), its
per-sample seed and a :class:`ViewSpec` instead of ``pixel_values``. :func:`decode_batch` (called by the trainer and
the evaluator just before the batch goes to the device) decodes all images of the batch in one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvjpeg on CUDA, libjpeg on CPU, which is how the tests run
it), then makes the same view as the CPU path (:mod:`mmcat.data.transforms`) from the same random parameters: the
crop box, flip and jitter factors are drawn by the same ``random_resized_crop_box`` / ``random.Random(seed)``
calls with the sample's stream seed, so the stream is as reproducible (and resume as exact) as on the CPU path.

What stays different from the CPU path, and why:

- resizing reproduces OpenCV's INTER_AREA / INTER_LINEAR as two batched matrix products (:func:`crop_resize_batch`;
  torchvision's antialiased resize differed by up to 16 levels), in float where OpenCV uses fixed point: about one
  level apart. A JPEG is decoded at full size (nvjpeg has no DCT-domain 1/2, 1/4, 1/8 decode) and block-averaged
  to the size the CPU path's reduced decode gives: photos at least twice ``image_size`` differ by a few levels on
  average (measured in tests/test_gpu_decode.py);
- an image that does not decode is counted, logged (or raises with ``data.strict``) exactly as on the CPU path,
  but its sample is dropped from the already-built batch, which is then one sample smaller (the CPU path takes the
  next sample of the stream instead).

Bytes that ``decode_jpeg`` cannot take (PNG/WebP members, CMYK JPEGs nvjpeg rejects, anything else) and JPEGs with
an EXIF rotation (which ``decode_jpeg`` applies on CPU only) are decoded per sample by the CPU path's helper
(:func:`mmcat.data.samples.decode_image`, OpenCV) and moved to the device.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from mmcat.data.samples import BadSample, BadSampleCounter, decode_image
from mmcat.data.transforms import JITTER, eval_box, random_resized_crop_box
from mmcat.errors import DataError

DECODE_ON = ("cpu", "device")
_GRAY = (4899, 9617, 1868)  # OpenCV's fixed-point RGB->gray weights (x 2^14), so the jitter matches color_jitter


@dataclass(frozen=True)
class ViewSpec:
    """What the device makes of a batch's image bytes: the same view the CPU path makes in the workers."""

    size: int
    train: bool
    min_scale: float
    strict: bool


def raw_image(data: Optional[bytes]) -> Optional[torch.Tensor]:
    """Worker side: the member's bytes as the 1-D uint8 CPU tensor ``decode_jpeg`` takes (a copy: bytes are
    read-only)."""
    return None if data is None else torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_batch(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """A batch with ``image_bytes`` -> the same batch with uint8 ``pixel_values`` [B, 3, S, S] on ``device`` (the
    model normalises uint8 pixels), bad images counted in ``skipped`` and their samples dropped (an eval batch may
    end up with no samples). Any other batch (``decode_on=cpu``) is returned as it is."""
    if "image_bytes" not in batch:
        return batch
    batch = dict(batch)
    raw, seeds, urls = batch.pop("image_bytes"), batch.pop("image_seeds"), batch.pop("image_urls")
    view: ViewSpec = batch.pop("view")
    images = _decode_all(raw, device, view.size)
    bad = [i for i, img in enumerate(images) if img is _BAD]
    counter = _counter(view.strict)
    for i in bad:
        counter.record("image does not decode (corrupt or truncated)", f"{batch['keys'][i]} in {urls[i]}")
    flips, factors, boxes = [], [], []
    for i, img in enumerate(images):
        if img is None or img is _BAD:
            flips.append(False)
            factors.append((1.0, 1.0, 1.0))
            boxes.append(None)
            continue
        rng = random.Random(seeds[i]) if view.train else None
        boxes.append(random_resized_crop_box(img.shape[1], img.shape[2], rng, scale=(view.min_scale, 1.0)) if rng
                     else eval_box(img.shape[1], img.shape[2], view.min_scale))
        if rng:  # the draws of transforms.train_view, in its order: crop box, flip, jitter factors
            flips.append(rng.random() < 0.5)
            factors.append(tuple(rng.uniform(1 - JITTER, 1 + JITTER) for _ in range(3)))
    pixels = crop_resize_batch(images, boxes, view.size, device)
    if view.train:
        pixels = _flip_and_jitter(pixels, flips, factors)
    batch["pixel_values"] = pixels
    batch["skipped"] = int(batch.get("skipped", 0)) + len(bad)
    if bad:
        batch = _drop_rows(batch, bad, len(raw), view.train)
    return batch


# ----------------------------------------------------------------------------------------------------- decoding
class _Bad:
    """Marks an image that neither decode_jpeg nor the CPU helper could decode."""


_BAD = _Bad()
_COUNTERS: Dict[bool, BadSampleCounter] = {}


def _counter(strict: bool) -> BadSampleCounter:
    """One counter per process (as each loader worker has one), so only the first few bad samples are logged."""
    return _COUNTERS.setdefault(strict, BadSampleCounter(strict))


def _decode_all(raw: Sequence[Optional[torch.Tensor]], device: torch.device, size: int) -> List[Any]:
    """Decoded CHW uint8 RGB images on ``device`` (None: no image; _BAD: undecodable). One batched decode_jpeg call;
    when it fails (one bad image fails the whole call), each image is decoded on its own."""
    out: List[Any] = [None] * len(raw)
    jpegs = [i for i, r in enumerate(raw) if r is not None and _for_decode_jpeg(r)]
    for i, r in enumerate(raw):
        if r is not None and i not in jpegs:
            out[i] = _cpu_decode(r, device, size)
    if not jpegs:
        return out
    try:
        decoded = _decode_jpeg([raw[i] for i in jpegs], device)
    except RuntimeError:
        decoded = [_decode_one(raw[i], device, size) for i in jpegs]
    for i, img in zip(jpegs, decoded):
        out[i] = reduce_like_cpu(img, size) if isinstance(img, torch.Tensor) else img
    return out


def reduce_like_cpu(img: torch.Tensor, size: int) -> torch.Tensor:
    """Shrink a full-size decode to the size the CPU path decodes at (mmcat.images.decode_scaled: the largest of
    1/8, 1/4, 1/2 that keeps the shorter side >= ``size``; libjpeg rounds the sides up) by averaging pixel blocks,
    as libjpeg's DCT-domain scaling roughly does. The image then has the CPU path's height and width, so the crop
    boxes and random parameters are the CPU path's own, and the resize that follows has the same scale."""
    h, w = img.shape[1:]
    factor = next((f for f in (8, 4, 2) if min(h, w) // f >= size), 1)
    if factor == 1:
        return img
    small = torch.nn.functional.interpolate(img[None].float(), size=(-(-h // factor), -(-w // factor)), mode="area")
    return small[0].round_().to(torch.uint8)


def _decode_jpeg(data: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: torch.Tensor, device: torch.device, size: int) -> Any:
    try:
        return _decode_jpeg([data], device)[0]
    except RuntimeError:
        return _cpu_decode(data, device, size)


def _cpu_decode(data: torch.Tensor, device: torch.device, size: int) -> Any:
    """The CPU path's decode (OpenCV, EXIF applied, any format it reads), moved to the device; _BAD when it fails."""
    try:
        img = decode_image(data.numpy().tobytes(), size)
    except BadSample:
        return _BAD
    return torch.from_numpy(img).permute(2, 0, 1).to(device)


def _for_decode_jpeg(data: torch.Tensor) -> bool:
    """A JPEG without an EXIF rotation: decode_jpeg gives what the CPU path gives (it applies EXIF on CPU only)."""
    head = data[:65536].numpy().tobytes()
    return head[:2] == b"\xff\xd8" and _exif_orientation(head) in (None, 1)


def _exif_orientation(jpeg: bytes) -> Optional[int]:
    """The EXIF orientation tag (0x0112) of a JPEG's APP1 segment, None when there is none."""
    i = 2
    while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker in (0xDA, 0xD9):  # image data starts: no more metadata segments
            return None
        if marker == 0xE1 and jpeg[i + 4:i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(jpeg[i + 10:i + 2 + length])
        i += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> Optional[int]:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd:ifd + 2], order) if ifd + 2 <= len(tiff) else 0
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        if len(entry) == 12 and int.from_bytes(entry[:2], order) == 0x0112:
            return int.from_bytes(entry[8:10], order)
    return None


# --------------------------------------------------------------------------------------------------- transforms
def crop_resize(img: torch.Tensor, box: Sequence[int], size: int) -> torch.Tensor:
    """transforms.crop_resize on one CHW uint8 tensor, on its device (see :func:`crop_resize_batch`)."""
    return crop_resize_batch([img], [box], size, img.device)[0]


def crop_resize_batch(images: Sequence[Any], boxes: Sequence[Optional[Sequence[int]]], size: int,
                      device: torch.device, chunk: int = 64) -> torch.Tensor:
    """transforms.crop_resize of every image (CHW uint8) at its box -> uint8 [B, 3, size, size]; zeros where the
    box is None. OpenCV's INTER_AREA when both sides shrink, INTER_LINEAR otherwise, written as matrix products:
    one [size, H] weight matrix for the rows and one [size, W] for the columns, each zero outside the crop, so
    the crop needs no kernel of its own. The weights are built on the CPU (numpy) and a chunk of images is two
    batched products: a few kernels per chunk, where building the weights on the device took tens of small
    kernels per image (the first H100 run: 527 samples/s with this path, 1,983 without). The products run in full
    fp32 (no TF32) so the pixels match the CPU path's to about one level (OpenCV's bilinear uses 11-bit
    fixed-point weights, these are float)."""
    out = torch.zeros(len(images), 3, size, size, dtype=torch.uint8, device=device)
    todo = [i for i, box in enumerate(boxes) if box is not None]
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            height = max(images[i].shape[1] for i in part)
            width = max(images[i].shape[2] for i in part)
            rows = np.zeros((len(part), 1, size, height), np.float32)
            cols = np.zeros((len(part), 1, width, size), np.float32)  # transposed: x @ cols
            x = torch.zeros(len(part), 3, height, width, dtype=torch.float32, device=device)
            for k, i in enumerate(part):
                top, left, h, w = boxes[i]
                area = h > size and w > size
                rows[k, 0, :, top:top + h] = resize_weights(h, size, area)
                cols[k, 0, left:left + w, :] = resize_weights(w, size, area).T
                x[k, :, :images[i].shape[1], :images[i].shape[2]] = images[i]
            y = torch.from_numpy(rows).to(device) @ x @ torch.from_numpy(cols).to(device)
            out[part] = y.round_().clamp_(0, 255).to(torch.uint8)
    finally:
        torch.set_float32_matmul_precision(precision)
    return out


def resize_weights(n_in: int, n_out: int, area: bool) -> np.ndarray:
    """[n_out, n_in] float32 weights of OpenCV's 1-D resize. INTER_AREA: output pixel d averages the input span
    [d * scale, (d + 1) * scale), pixels cut by its ends weighted by the part inside. INTER_LINEAR: half-pixel
    centres, two taps, edges clamped. Computed in float64."""
    scale = n_in / n_out
    d = np.arange(n_out, dtype=np.float64)[:, None]
    if area:
        src = np.arange(n_in, dtype=np.float64)[None, :]
        start = d * scale
        span = np.minimum(start + scale, float(n_in))
        overlap = np.clip(np.minimum(src + 1, span) - np.maximum(src, start), 0, None)
        return (overlap / (span - start)).astype(np.float32)
    pos = ((d + 0.5) * scale - 0.5)[:, 0]
    left = np.floor(pos)
    frac = np.where((left < 0) | (left >= n_in - 1), 0.0, pos - left)
    left = np.clip(left, 0, n_in - 1).astype(np.int64)
    right = np.minimum(left + 1, n_in - 1)
    weights = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, left), 1 - frac)
    np.add.at(weights, (rows, right), frac)
    return weights.astype(np.float32)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's COLOR_RGB2GRAY on a uint8-valued float batch [B, 3, H, W] -> [B, 1, H, W] (rounded)."""
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return torch.floor(((x * w).sum(1, keepdim=True) + 8192) / 16384)


def _flip_and_jitter(pixels: torch.Tensor, flips: List[bool], factors: List[tuple]) -> torch.Tensor:
    """transforms.train_view's flip and colour jitter (transforms.color_jitter's saturating steps), batched."""
    x = pixels.float()
    flip = torch.tensor(flips, device=x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    b, c, s = (torch.tensor(f, dtype=torch.float32, device=x.device).view(-1, 1, 1, 1) for f in zip(*factors))
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True) * b
    x = torch.round(x * (b * c) + (1.0 - c) * mean).clamp_(0, 255)
    x = torch.round(x * s + _gray(x) * (1.0 - s)).clamp_(0, 255)
    return x.to(torch.uint8)


# ----------------------------------------------------------------------------------------------------- bad rows
def _drop_rows(batch: Dict[str, Any], bad: Sequence[int], n: int, train: bool) -> Dict[str, Any]:
    """The batch without the samples ``bad``: every per-sample value (a tensor or list of length ``n``, also inside
    a modality's dict) loses those rows; per-batch values (``skipped``) stay."""
    keep = [i for i in range(n) if i not in set(bad)]
    if not keep and train:  # a step needs samples; the evaluator skips an empty batch (only its count remains)
        raise DataError(f"every image of a training batch of {n} failed to decode on the device (the warnings above "
                        "say which); with data.decode_on=cpu bad samples are replaced by the next ones of the stream")

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value[torch.tensor(keep, dtype=torch.long, device=value.device)]
        if isinstance(value, list) and len(value) == n:
            return [value[i] for i in keep]
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        return value

    return {k: (v if k == "skipped" else take(v)) for k, v in batch.items()}
