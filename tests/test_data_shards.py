"""Shard/size/label discovery and the image decode + transforms used by the loader."""
from __future__ import annotations

import json
import random

import cv2
import numpy as np
import pytest
import torch

from _shards import LABELS, write_img2dataset, write_packed, write_split
from mmcat.config import TrainRunConfig, load_config
from mmcat.data import DataError, label_counts, read_labels, split_sizes
from mmcat.data.samples import BadSample, LabelReader, decode_image
from mmcat.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, color_jitter, crop_resize, eval_box, eval_view,
                                   random_resized_crop_box, to_pixel_values, train_view)
from mmcat.images import jpeg_size


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
    with pytest.raises(BadSample, match="not in the labels file"):  # a json label is a name, never an index
        js({"json": json.dumps({"category": 2}).encode()})
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


def test_decode_scaled_reduces_by_the_side_the_caller_resizes_by():
    """The one reduced-scale JPEG decode of pack (shorter or longer side, BGR) and the loader (shorter side, RGB)."""
    from mmcat.images import decode_scaled

    img = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    assert decode_scaled(data, 600, 100).shape == (150, 200, 3)  # shorter side 600: 1/4 keeps it >= 100
    assert decode_scaled(data, 800, 100).shape == (75, 100, 3)  # longer side 800 (pack's border mode): 1/8
    assert decode_scaled(data, None, 100).shape == (600, 800, 3)  # not reducible (pack's keep mode, non-JPEG)
    bgr, rgb = decode_scaled(data, 600, 300), decode_scaled(data, 600, 300, rgb=True)
    assert np.array_equal(bgr[..., ::-1], rgb) and rgb.shape == (300, 400, 3)
    assert decode_scaled(b"not an image", None, 10) is None


@pytest.mark.parametrize("height, width", [(90, 120), (120, 90), (60, 200), (200, 60), (77, 77), (64, 85)])
def test_without_random_crops_eval_shows_the_region_training_saw(height, width):
    """data.min_crop_scale 1.0: every training crop is one region (the whole photo, or its largest centred part
    with an aspect ratio in 3/4-4/3), and eval, predict and serve show that region, not the ImageNet centre crop,
    which shows objects larger than training ever did and cuts off what lies near the edges."""
    img = np.random.default_rng(height * width).integers(0, 255, (height, width, 3), dtype=np.uint8)
    box = eval_box(height, width, 1.0)
    top, left, h, w = box
    assert min(h, w) == min(height, width) and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02  # the shorter side kept
    assert (h, w) == (height, width) or max(h, w) < max(height, width)  # only too wide or tall photos are cut
    for s in range(50):  # a try that succeeds at scale 1 may round a side one pixel short
        trained = random_resized_crop_box(height, width, random.Random(s), scale=(1.0, 1.0))
        assert max(abs(a - b) for a, b in zip(trained, box)) <= 1
    assert np.array_equal(eval_view(img, 32, 1.0), crop_resize(img, box, 32))
    side = round(0.875 * min(height, width))  # with random crops: the ImageNet protocol's centre crop
    assert eval_box(height, width, 0.35) == ((height - side) // 2, (width - side) // 2, side, side)


def test_transforms_shapes_determinism_and_normalisation():
    img = np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    for seed in range(20):
        top, left, h, w = random_resized_crop_box(90, 120, random.Random(seed))
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
    a, b = train_view(img, 32, random.Random(7)), train_view(img, 32, random.Random(7))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, train_view(img, 32, random.Random(8)))
    e = eval_view(img, 32, 0.35)
    assert e.shape == (32, 32, 3)
    flat = np.zeros((2, 8, 8, 3), np.uint8)
    flat[:] = (np.array(IMAGENET_MEAN) * 255).round().astype(np.uint8)
    mask = torch.tensor([True, False])
    x = to_pixel_values(flat.copy(), mask, normalize=True)  # CPU training: normalised in the loader worker
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and x.abs().max() < 0.02 and torch.all(x[1] == 0)
    u = to_pixel_values(flat.copy(), mask, normalize=False)  # GPU training: uint8 out, the model normalises
    assert u.dtype == torch.uint8 and torch.equal(u[0, :, 0, 0], torch.from_numpy(flat[0, 0, 0]))
    from mmcat.models.image import ImageEncoder

    assert torch.all(u[1] == 0)  # the row without an image is zeroed in the uint8 path too
    rand = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)  # any values, not only the mean
    has = torch.tensor([True, False, True])
    got = to_pixel_values(rand.copy(), has, normalize=True)
    ref = (torch.from_numpy(rand).float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(got[[0, 2]], ref[[0, 2]].permute(0, 3, 1, 2), atol=1e-5) and torch.all(got[1] == 0)
    scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD])  # the bits of the float32 expression used before
    shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])  # the lookup table: runs repeat
    same = torch.addcmul(shift, torch.from_numpy(rand[[0, 2]]).float(), scale).permute(0, 3, 1, 2)
    assert torch.equal(got[[0, 2]], same)
    assert torch.equal(to_pixel_values(rand.copy(), has, normalize=False)[[0, 2]],
                       torch.from_numpy(rand[[0, 2]]).permute(0, 3, 1, 2))
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


# ------------------------------------------------------------------------------ pre-flight refusals (check_data)
def run_cfg(root, *overrides):
    return load_config(TrainRunConfig, None, [f"data.root={root}", "output_dir=/unused", *overrides])


def refusal(cfg) -> str:
    from mmcat.data.shards import check_data

    with pytest.raises(DataError) as err:
        check_data(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_check_data_passes_and_counts_each_split(tmp_path):
    from mmcat.data.shards import check_data

    write_packed(tmp_path, {"train": [4, 5], "val": [3], "test": [2]})
    assert check_data(run_cfg(tmp_path)) == {"train": 9, "val": 3, "test": 2}
    pattern = str(tmp_path / "{split}" / "shard-*.tar")
    assert check_data(run_cfg(pattern)) == {"train": 9, "val": 3, "test": 2}


def test_missing_or_empty_val_and_test_splits_are_refused(tmp_path):
    from mmcat.data.shards import check_data

    write_packed(tmp_path, {"train": [4, 5], "val": [3]})
    msg = refusal(run_cfg(tmp_path))
    assert msg.startswith("data.test_split 'test': no 'test' split in") and "data.test_split=null" in msg
    # no test split wanted: fine, and nothing is counted for it
    assert check_data(run_cfg(tmp_path, "data.test_split=null")) == {"train": 9, "val": 3}
    assert refusal(run_cfg(tmp_path, "data.val_split=valid")).startswith("data.val_split 'valid': no 'valid' split")
    # a val split whose shards hold nothing (an empty tar, sizes.json says 0)
    write_split(tmp_path, "val", [0])
    assert refusal(run_cfg(tmp_path, "data.test_split=null")) == (
        f"data.val_split 'val' has no samples (1 shard(s), e.g. {tmp_path / 'val' / 'shard-000000.tar'})")


def test_val_or_test_reading_train_shards_is_refused(tmp_path):
    write_packed(tmp_path, {"train": [4, 5], "val": [3], "test": [3]})
    # a pattern without {split}: every split resolves to the train shards
    msg = refusal(run_cfg(str(tmp_path / "train" / "shard-*.tar")))
    assert msg.startswith("data.val_split 'val' reads 2 shard(s) of data.train_split 'train'") and "{split}" in msg
    # the same through a symlink: compared by resolved path
    (tmp_path / "test").rename(tmp_path / "test_real")
    (tmp_path / "test").symlink_to(tmp_path / "val")
    assert refusal(run_cfg(tmp_path)).startswith("data.test_split 'test' reads 1 shard(s) of data.val_split 'val'")


def test_missing_root_and_unreadable_tar_name_the_path(tmp_path):
    assert refusal(run_cfg(tmp_path / "nope")) == (f"data.root entry '{tmp_path / 'nope'}' does not exist (not a "
                                                   f"directory or a shard pattern)")
    pattern = str(tmp_path / "nope" / "{split}" / "*.tar")
    assert refusal(run_cfg(pattern)) == f"data.root entry '{pattern}' does not exist (no {tmp_path / 'nope'})"
    write_packed(tmp_path / "d", {"train": [4, 5], "val": [3], "test": [3]})
    (tmp_path / "d" / "val" / "sizes.json").unlink()  # sizes now come from the tar headers
    (tmp_path / "d" / "val" / "shard-000001.tar").write_text("not a tar file at all\n" * 50)
    msg = refusal(run_cfg(tmp_path / "d"))
    assert msg.startswith(f"data.val_split 'val': shard {tmp_path / 'd' / 'val' / 'shard-000001.tar'} is not a "
                          f"readable tar file")


def test_split_where_every_sample_would_be_skipped_is_refused(tmp_path):
    from mmcat.data.shards import check_data

    write_packed(tmp_path, {"train": [4], "val": [3], "test": [3]})
    write_split(tmp_path, "test", [3], start=7, bad={f"p{i:05d}": "no_cls" for i in range(7, 10)})
    msg = refusal(run_cfg(tmp_path))
    assert msg == (f"data.test_split 'test': all 3 samples would be skipped (label key 'cls'; first: p00007 in "
                   f"{tmp_path / 'test' / 'shard-000000.tar'}: missing member 'cls')")
    # one usable sample is enough (the others are skipped and counted while training)
    write_split(tmp_path, "test", [3], start=7, bad={"p00007": "no_cls", "p00008": "no_cls"})
    assert check_data(run_cfg(tmp_path))["test"] == 3
    # the label name in the json member works where cls does not, a field that no sample has does not
    assert check_data(run_cfg(tmp_path, "data.label_key=json:label"))["train"] == 4
    assert "json member has no 'category' field" in refusal(run_cfg(tmp_path, "data.label_key=json:category"))


def test_max_text_length_beyond_the_text_model_positions(tmp_path):
    from mmcat.config import ConfigError
    from mmcat.data.shards import check_data

    write_packed(tmp_path / "d", {"train": [4], "val": [3], "test": [3]})
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 40}))
    assert check_data(run_cfg(tmp_path / "d", f"model.text.name={model}", "data.max_text_length=40"))
    with pytest.raises(ConfigError, match=r"^config key 'data.max_text_length': 41 is more than the 40 tokens"):
        check_data(run_cfg(tmp_path / "d", f"model.text.name={model}", "data.max_text_length=41"))


# ------------------------------------------------------------------------------------------ labels files
def test_labels_file_takes_the_pack_formats(tmp_path):
    write_packed(tmp_path, {"train": [4]})
    (tmp_path / "labels.txt").write_text("shoes\nbags\n\nhats\n")
    assert read_labels(data_cfg(tmp_path, f"data.labels_file={tmp_path / 'labels.txt'}")) == LABELS
    (tmp_path / "mine.json").write_text(json.dumps(LABELS))
    assert read_labels(data_cfg(tmp_path, f"data.labels_file={tmp_path / 'mine.json'}")) == LABELS
    (tmp_path / "dup.txt").write_text("shoes\nshoes\n")
    with pytest.raises(DataError, match=r"^labels file .*dup.txt: needs at least one label and no duplicates$"):
        read_labels(data_cfg(tmp_path, f"data.labels_file={tmp_path / 'dup.txt'}"))
    with pytest.raises(DataError, match=r"^data.labels_file '.*nope.json' does not exist$"):
        read_labels(data_cfg(tmp_path, f"data.labels_file={tmp_path / 'nope.json'}"))


def test_labels_json_next_to_pattern_shards(tmp_path):
    """A shard pattern finds labels.json in the directory of its shards ({split} filled in), else one above."""
    write_packed(tmp_path / "d", {"train": [4], "val": [3]})
    pattern = str(tmp_path / "d" / "{split}" / "shard-*.tar")
    assert read_labels(data_cfg(pattern)) == LABELS  # d/labels.json, above the {split} directory
    (tmp_path / "d" / "labels.json").unlink()
    (tmp_path / "d" / "train" / "labels.json").write_text(json.dumps(["x", "y", "z"]))
    assert read_labels(data_cfg(pattern)) == ["x", "y", "z"]  # next to the shards
    i2d = tmp_path / "i2d"
    write_img2dataset(i2d, [3])
    (i2d / "labels.json").write_text(json.dumps(LABELS))
    assert read_labels(data_cfg(str(i2d / "*.tar"))) == LABELS


def test_roots_with_different_labels_are_refused(tmp_path):
    write_packed(tmp_path / "a", {"train": [2]})
    write_packed(tmp_path / "b", {"train": [2]}, labels=["bags", "shoes", "hats"])
    with pytest.raises(DataError, match=r"b/labels.json differs from .*a/labels.json"):
        read_labels(data_cfg(f"{tmp_path / 'a'},{tmp_path / 'b'}"))
