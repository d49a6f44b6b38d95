"""Shard/size/label discovery and the image decode + transforms used by the loader."""
from __future__ import annotations

import json
import random

import cv2
import numpy as np
import pytest
import torch

from _shards import LABELS, write_img2dataset, write_packed
from mmcat.config import TrainRunConfig, load_config
from mmcat.data import DataError, label_counts, read_labels, split_sizes
from mmcat.data.samples import BadSample, LabelReader, decode_image, jpeg_size
from mmcat.data.transforms import (IMAGENET_MEAN, color_jitter, eval_view, random_resized_crop_box, to_pixel_values,
                                   train_view)


def data_cfg(root, *overrides):
    return load_config(TrainRunConfig, None, [f"data.root={root}", "output_dir=/unused", *overrides]).data


def test_sizes_labels_and_counts_from_a_packed_dir(tmp_path):
    write_packed(tmp_path, {"train": [4, 5], "val": [3]})
    cfg = data_cfg(tmp_path)
    assert read_labels(cfg) == LABELS
    assert split_sizes(cfg, "train") == 9 and split_sizes(cfg, "val") == 3
    assert label_counts(cfg, "train") == [3, 3, 3]  # from manifest.json (list form)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["label_counts"] = {"hats": 7, "shoes": 1, "bags": 0}  # mmcat pack's dict form
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert label_counts(cfg, "train") == [1, 0, 7]
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "train" / "sizes.json").unlink()
    assert label_counts(cfg, "train") == [3, 3, 3]  # fallback: scan of the shards' cls members
    assert split_sizes(cfg, "train") == 9  # fallback: tar headers


def test_several_roots_brace_patterns_and_split_placeholder(tmp_path):
    write_packed(tmp_path / "a", {"train": [2, 3]})
    write_packed(tmp_path / "b", {"train": [4]})
    both = data_cfg(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert split_sizes(both, "train") == 9
    pattern = data_cfg(str(tmp_path / "a" / "{split}" / "shard-{000000..000001}.tar"))
    assert split_sizes(pattern, "train") == 5 and read_labels(pattern) == LABELS
    with pytest.raises(DataError, match="shard not found"):
        split_sizes(data_cfg(str(tmp_path / "a" / "train" / "shard-{000000..000003}.tar")), "train")
    i2d = write_img2dataset(tmp_path / "i2d", [3, 2])
    assert split_sizes(data_cfg(str(tmp_path / "i2d" / "*.tar")), "train") == len(i2d)  # *_stats.json
    with pytest.raises(DataError, match="data.weights has 1 values"):
        split_sizes(data_cfg(f"{tmp_path / 'a'},{tmp_path / 'b'}", "data.weights=[1.0]"), "train")


def test_label_reader_cls_and_json_fields():
    cls = LabelReader("cls", LABELS)
    assert cls({"cls": b"2"}) == 2
    with pytest.raises(BadSample, match="outside"):
        cls({"cls": b"3"})
    with pytest.raises(BadSample, match="missing member 'cls'"):
        cls({"json": b"{}"})
    js = LabelReader("json:category", LABELS)
    assert js({"json": json.dumps({"category": "bags"}).encode()}) == 1
    assert js({"json": json.dumps({"category": 2}).encode()}) == 2
    with pytest.raises(BadSample, match="not in the labels file"):
        js({"json": json.dumps({"category": "socks"}).encode()})
    with pytest.raises(ValueError, match="label_key"):
        LabelReader("txt", LABELS)


def test_jpeg_decode_reduces_large_images_but_never_below_the_output_size():
    img = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    assert jpeg_size(data) == (600, 800)
    assert decode_image(data, 224).shape == (300, 400, 3)  # 1/2 scale still >= 224
    assert decode_image(data, 320).shape == (600, 800, 3)
    assert decode_image(data, 64).shape == (75, 100, 3)  # 1/8
    png = cv2.imencode(".png", img[:50, :60])[1].tobytes()
    assert jpeg_size(png) is None and decode_image(png, 32).shape == (50, 60, 3)
    with pytest.raises(BadSample):
        decode_image(data[: len(data) // 3], 224)


def test_transforms_shapes_determinism_and_normalisation():
    img = np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    for seed in range(20):
        top, left, h, w = random_resized_crop_box(90, 120, random.Random(seed))
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
    a, b = train_view(img, 32, random.Random(7)), train_view(img, 32, random.Random(7))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, train_view(img, 32, random.Random(8)))
    e = eval_view(img, 32)
    assert e.shape == (32, 32, 3)
    flat = np.zeros((2, 8, 8, 3), np.uint8)
    flat[:] = (np.array(IMAGENET_MEAN) * 255).round().astype(np.uint8)
    mask = torch.tensor([True, False])
    x = to_pixel_values(flat.copy(), mask, normalize=True)  # CPU training: normalised in the loader worker
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and x.abs().max() < 0.02 and torch.all(x[1] == 0)
    u = to_pixel_values(flat.copy(), mask, normalize=False)  # GPU training: uint8 out, the model normalises
    assert u.dtype == torch.uint8 and torch.equal(u[0, :, 0, 0], torch.from_numpy(flat[0, 0, 0]))
    from mmcat.models.image import ImageEncoder

    enc = ImageEncoder("resnet18", "none")
    assert torch.allclose(enc.normalize(u[:1]), x[:1], atol=1e-5)  # both paths feed the ResNet the same input
    assert torch.equal(enc.normalize(x), x)  # float input is taken as normalised already (cast only)
    grey = np.full((4, 4, 3), 100, np.uint8)
    assert np.array_equal(color_jitter(grey, 1.0, 1.0, 1.0), grey)
    assert color_jitter(grey, 1.2, 1.0, 1.0).mean() == pytest.approx(120, abs=1)  # brightness
    assert color_jitter(img, 1.0, 0.8, 1.0).std() < img.std()  # contrast
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 200
    assert np.ptp(color_jitter(colour, 1.0, 1.0, 0.8)[0, 0]) < 200  # saturation pulls towards grey
