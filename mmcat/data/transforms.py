"""Image transforms with explicit random parameters.

Train: random resized crop (torchvision's ``RandomResizedCrop`` sampling: scale data.min_crop_scale-1, ratio 3/4-4/3, 10 tries,
centre-crop fallback), horizontal flip and light colour jitter (brightness/contrast/saturation +-20%).
Eval: resize the shorter side to ``S / 0.875`` and centre-crop ``S`` (the usual ImageNet protocol); without random
crops (``min_crop_scale`` 1) the region training saw instead, the whole photo (``eval_box``).

The random parameters come from a ``random.Random`` seeded per *sample* (from seed, epoch, rank, worker and the
sample's stream position), never from the global torch RNG: the stream is then reproducible for exact mid-epoch
resume, skipped samples need no RNG draws, and ``num_workers=0`` does not disturb the trainer's RNG state.
Everything per sample runs with OpenCV on small uint8 arrays (one ``cv2.resize``, a few saturating blends for the
jitter); the float conversion + ImageNet normalisation runs once per batch. The batch tensor is returned in
channels-last memory order (a free view of the stacked HWC images; the ResNet runs channels-last anyway).
"""
from __future__ import annotations

import math
import random
from typing import Tuple, Union

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875
JITTER = 0.2  # "light" colour jitter: factors drawn from [1 - JITTER, 1 + JITTER]

Box = Tuple[int, int, int, int]  # top, left, height, width
# ImageNet normalisation of every uint8 value, per channel: [256, 1, 3] float32 for cv2.LUT. Made by the float32
# expression the workers used before (shift + value * scale, torch.addcmul), so the lookup gives the same bits:
# a table in float64 rounded once differs in the last bit for some values, which moves training runs
_NORMALIZE_LUT = torch.addcmul(torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]),
                               torch.arange(256, dtype=torch.float32)[:, None],
                               torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD])).numpy().reshape(256, 1, 3)


def random_resized_crop_box(height: int, width: int, rng: random.Random, scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return whole_photo_box(height, width, ratio)  # fallback


def whole_photo_box(height: int, width: int, ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """The largest centred region with an aspect ratio in ``ratio``: the whole photo unless it is wider or taller
    than that. Every crop of area scale 1 is this region, give or take a pixel of rounding (a try succeeds only at
    the photo's own aspect ratio), so ``data.min_crop_scale: 1.0`` trains on it."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int) -> Box:
    """The source region that ends up in an S x S centre crop after resizing the shorter side to S / 0.875."""
    side = min(height, width) * EVAL_CROP_FRACTION
    h = w = max(1, int(round(side)))
    return (height - h) // 2, (width - w) // 2, h, w


def eval_box(height: int, width: int, min_scale: float) -> Box:
    """The region the eval view (eval, predict, serve) shows: the field of view training showed. With random crops
    (``min_scale`` < 1) the ImageNet protocol's centre crop. Without (1.0) training saw only :func:`whole_photo_box`,
    and so must eval: the centre crop would show objects 1.14-1.5x larger than training ever did, cut at the edges
    (the image-only model of README "Both halves learn" on `market`: test macro-F1 0.28 with it, 0.37 without)."""
    return whole_photo_box(height, width) if min_scale >= 1.0 else center_crop_box(height, width)


def crop_resize(img: np.ndarray, box: Box, size: int) -> np.ndarray:
    top, left, h, w = box
    region = img[top:top + h, left:left + w]
    interp = cv2.INTER_AREA if h > size and w > size else cv2.INTER_LINEAR  # AREA = antialiased downscale
    return cv2.resize(region, (size, size), interpolation=interp)


def color_jitter(img: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """torchvision's brightness, contrast, saturation adjustments (in that order) on a uint8 RGB image; the
    brightness and contrast steps are fused into one saturating affine map."""
    mean = cv2.mean(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))[0] * brightness
    img = cv2.addWeighted(img, brightness * contrast, img, 0.0, (1.0 - contrast) * mean)
    gray = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, saturation, gray, 1.0 - saturation, 0.0)


def train_view(img: np.ndarray, size: int, rng: random.Random, min_scale: float = 0.35) -> np.ndarray:
    """Random resized crop (area fraction in [min_scale, 1]), horizontal flip and light colour jitter."""
    out = crop_resize(img, random_resized_crop_box(img.shape[0], img.shape[1], rng, scale=(min_scale, 1.0)), size)
    if rng.random() < 0.5:
        out = cv2.flip(out, 1)
    return color_jitter(out, *(rng.uniform(1 - JITTER, 1 + JITTER) for _ in range(3)))


def eval_view(img: np.ndarray, size: int, min_scale: float) -> np.ndarray:
    """The deterministic view of a photo for eval, predict and serve; ``min_scale``: the training run's
    ``data.min_crop_scale`` (:func:`eval_box`)."""
    return crop_resize(img, eval_box(img.shape[0], img.shape[1], min_scale), size)


def to_pixel_values(images: Union[np.ndarray, torch.Tensor], has_image: torch.Tensor, normalize: bool) -> torch.Tensor:
    """uint8 [B,S,S,3] (an array, or a tensor such as a :func:`batch_buffer`) -> [B,3,S,S] (channels-last memory),
    zeros where no image.

    ``normalize=False``: uint8 pixels (a view, no copy), 4x less shared memory and host-to-device copy than
    float32; the model normalises them on the GPU. ``normalize=True``: float32 ImageNet-normalised here, in the
    loader worker (on a CPU-only machine the model's process has no spare device to do it on).
    """
    # Only the rows without an image are zeroed, by index: a boolean-mask assignment walks the whole batch even
    # when every sample has its image (20 ms of a 64 x 224 px uint8 batch, ~10 % of a loader worker's time).
    missing = torch.nonzero(~has_image).flatten()
    if not normalize:  # a tensor stays itself (a shared-memory batch stays shared: no copy when handed over)
        x = images if torch.is_tensor(images) else torch.from_numpy(images)
        if missing.numel():
            x[missing] = 0
        return x.permute(0, 3, 1, 2)
    images = images.numpy() if torch.is_tensor(images) else images
    b, h, w, c = images.shape
    x = batch_buffer((b, h, w, c), torch.float32)
    # one table lookup per value (uint8 -> float32, per channel) over the (B*H, W, 3) view: one pass, 5.7 ms for
    # 32 photos at 224 px where torch's uint8 -> float32 + addcmul took ~34 ms, on one core; it matters in the
    # CPU default mode (normalised in the workers)
    cv2.LUT(images.reshape(b * h, w, c), _NORMALIZE_LUT, dst=x.numpy().reshape(b * h, w, c))
    if missing.numel():
        x[missing] = 0.0
    return x.permute(0, 3, 1, 2)


def batch_buffer(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch tensor; in a DataLoader worker, in shared memory from the start, as torch's own
    ``default_collate`` does: the worker then hands the batch over without copying it into shared memory first
    (a 19 MB copy per float32 batch of 32 x 224 px, on top of the page faults of a fresh segment)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).resize_(*shape)
