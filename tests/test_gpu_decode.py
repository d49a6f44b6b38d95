"""``data.decode_on=device``: the workers batch JPEG bytes, the trainer decodes and augments them on its device
(mmcat.data.device_decode). No GPU here: the same code runs with device=cpu (torchvision's libjpeg decode), which is
what these tests check against the CPU path (OpenCV in the workers), pixel by pixel and key by key."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from _shards import jpeg_bytes, write_split
from mmcat.config import TrainRunConfig, load_config
from mmcat.data import BadSampleError, build_eval_loader, build_train_loader
from mmcat.data.device_decode import decode_batch
from mmcat.models import load_tokenizer
from mmcat.models.tiny import make_tiny_text_model
from train_helpers import assert_same_run, metrics, mmcat_cmd, run, train_until_done, write_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = make_tiny_text_model(tmp_path_factory.mktemp("tiny_text"), weights=False)
    return load_tokenizer(load_config(TrainRunConfig, None, [f"model.text.name={text}"],
                                      require_complete=False).model.text)


def data_cfg(root: Path, size: int, decode_on: str, *overrides: str):
    return load_config(TrainRunConfig, None, [f"data.root={root}", "output_dir=/unused", f"data.image_size={size}",
                                              "data.uint8_pixels=true", f"data.decode_on={decode_on}",
                                              "train.batch_size=4", "data.num_workers=0", *overrides])


def eval_pixels(root: Path, size: int, decode_on: str, tokenizer, split: str = "val", *overrides: str) -> dict:
    """key -> (pixels as int, has_image) of every sample the eval loader yields, decoded where decode_on says."""
    cfg = data_cfg(root, size, decode_on, *overrides)
    out = {}
    for b in build_eval_loader(cfg.data, split, tokenizer, batch_size=4, num_workers=0):
        b = decode_batch(b, CPU)
        assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape[1:] == (3, size, size)
        out.update({k: (p.int(), bool(h)) for k, p, h in zip(b["keys"], b["pixel_values"], b["has_image"])})
    return out


def max_mean_diff(a: dict, b: dict) -> tuple:
    assert a.keys() == b.keys()
    diffs = torch.stack([(a[k][0] - b[k][0]).abs() for k in a])
    return diffs.max().item(), diffs.float().mean().item()


# ------------------------------------------------------------------------------------------ pixels vs the CPU path
@pytest.mark.parametrize("photo, size, tolerance, min_crop_scale", [
    ((64, 48), 32, 0, 0.35),  # both sides shrink: INTER_AREA, reproduced exactly
    ((64, 48), 64, 1, 0.35),  # enlarging: INTER_LINEAR, OpenCV's fixed-point weights vs float: one level at most
    ((96, 40), 32, 0, 1.0),  # no random crops: the eval view is the photo's widest 4:3 part, not the centre crop
])
def test_eval_view_matches_the_cpu_path(tmp_path, tokenizer, photo, size, tolerance, min_crop_scale):
    write_split(tmp_path, "val", [5, 3], image_size=photo, missing_every=4)
    view = f"data.min_crop_scale={min_crop_scale}"
    cpu, dev = (eval_pixels(tmp_path, size, on, tokenizer, "val", view) for on in ("cpu", "device"))
    if min_crop_scale == 1.0:  # the setting reaches the view: the centre crop shows other pixels
        assert max_mean_diff(cpu, eval_pixels(tmp_path, size, "cpu", tokenizer, "val", "data.min_crop_scale=0.5"))[1]
    assert {k: h for k, (_, h) in cpu.items()} == {k: h for k, (_, h) in dev.items()}  # same image masks
    assert any(not h for _, h in dev.values())  # a sample without image stays zeros on both paths
    assert max_mean_diff(cpu, dev)[0] <= tolerance


def test_photos_the_cpu_path_decodes_at_reduced_scale_differ_by_a_few_levels(tmp_path, tokenizer):
    """200x150 photos for a 32-pixel view: OpenCV decodes them at 1/4 scale in the DCT domain, which nvjpeg cannot;
    the device decodes in full and averages 4x4 blocks. Same geometry, close pixels (noisy test photos: the
    worst case; measured mean 2.2 levels)."""
    write_split(tmp_path, "val", [6], image_size=(200, 150))
    worst, mean = max_mean_diff(eval_pixels(tmp_path, 32, "cpu", tokenizer),
                                eval_pixels(tmp_path, 32, "device", tokenizer))
    assert 0 < mean <= 3.0


def test_train_views_use_the_cpu_paths_random_parameters(tmp_path, tokenizer):
    """Same stream seeds -> same crop boxes, flips and jitter factors on both paths; a wrong draw order or a
    mirrored flip would move pixels by tens of levels, not the 2 measured."""
    write_split(tmp_path, "train", [8, 8], image_size=(64, 48))
    views = {}
    for on in ("cpu", "device"):
        cfg = data_cfg(tmp_path, 32, on)
        for n, b in enumerate(build_train_loader(cfg, tokenizer, 0, 1, epoch=0).loader):
            b = decode_batch(b, CPU)
            views.update({(on, n, k): p.int() for k, p in zip(b["keys"], b["pixel_values"])})
    pairs = [(v, views[("device", n, k)]) for (on, n, k), v in views.items() if on == "cpu"]
    assert len(pairs) == 16
    assert max((a - b).abs().max().item() for a, b in pairs) <= 2


def test_png_and_exif_rotated_members_fall_back_to_the_cpu_decode(tmp_path, tokenizer):
    """What decode_jpeg cannot give as OpenCV does (a PNG member, an EXIF-rotated JPEG) is decoded by the CPU
    helper: same pixels as the CPU path, rotation included."""
    img = cv2.imdecode(np.frombuffer(jpeg_bytes(7, 64, 48), np.uint8), cv2.IMREAD_COLOR)
    img[:, :20] = 0  # a dark left edge, so a missed rotation shows
    png = cv2.imencode(".png", img)[1].tobytes()
    rotated = _with_exif_orientation(cv2.imencode(".jpg", img)[1].tobytes(), 6)  # 90 degrees clockwise
    (tmp_path / "val").mkdir()
    with wds.TarWriter(str(tmp_path / "val" / "shard-000000.tar")) as sink:
        sink.write({"__key__": "png", "png": png, "cls": b"0"})
        sink.write({"__key__": "rot", "jpg": rotated, "cls": b"1"})
    (tmp_path / "labels.json").write_text('["a", "b"]')
    cpu, dev = eval_pixels(tmp_path, 32, "cpu", tokenizer), eval_pixels(tmp_path, 32, "device", tokenizer)
    assert max_mean_diff(cpu, dev)[0] == 0
    rot = dev["rot"][0]
    assert rot[:, :8, :].float().mean() < rot[:, -8:, :].float().mean() - 30  # the dark edge is now at the top


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """A JPEG with an APP1 Exif segment holding one IFD entry: Orientation (0x0112)."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01" \
        + orientation.to_bytes(2, "big") + b"\x00\x00" + b"\x00\x00\x00\x00"
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


# --------------------------------------------------------------------------------------------------- bad images
def test_corrupt_jpegs_are_counted_and_dropped_like_the_cpu_path(tmp_path, tokenizer):
    """p00008 is alone in the eval stream's last batch of 4: on the device path that batch ends up empty."""
    bad = {"p00001": "corrupt_jpg", "p00006": "corrupt_jpg", "p00008": "corrupt_jpg"}
    infos = write_split(tmp_path, "val", [5, 4], bad=bad)
    good = sorted(i["key"] for i in infos if not i["bad"])
    for on in ("cpu", "device"):
        cfg = data_cfg(tmp_path, 32, on)
        batches = [decode_batch(b, CPU) for b in build_eval_loader(cfg.data, "val", tokenizer, 4, 0)]
        assert sorted(k for b in batches for k in b["keys"]) == good, on
        assert sum(b["skipped"] for b in batches) == 3, on
        for b in batches:  # every per-sample field lost the dropped rows together
            n = len(b["keys"])
            assert b["pixel_values"].shape[0] == b["labels"].shape[0] == b["input_ids"].shape[0] == n
            assert [int(b["labels"][i]) for i in range(n)] == [int(k[1:]) % 3 for k in b["keys"]]
        strict = data_cfg(tmp_path, 32, on, "data.strict=true")
        with pytest.raises(BadSampleError, match="p00001"):
            [decode_batch(b, CPU) for b in build_eval_loader(strict.data, "val", tokenizer, 4, 0)]


def test_evaluation_counts_what_the_device_drops(tmp_path, tokenizer):
    """The evaluator's totals on a split with corrupt photos (one eval batch entirely bad) are the CPU path's."""
    from accelerate import Accelerator

    from mmcat.evaluation import dummy_batch, evaluate
    from mmcat.models import build_model

    write_split(tmp_path, "val", [5, 4], bad={k: "corrupt_jpg" for k in ("p00001", "p00006", "p00008")})
    model_cfg = load_config(TrainRunConfig, None, ["model.image.name=resnet18", "model.hidden_dim=16",
                                                   f"model.text.name={tokenizer.name_or_path}",
                                                   "model.text.pretrained=false"], require_complete=False).model
    model, acc, labels = build_model(model_cfg, 3), Accelerator(cpu=True), ["shoes", "bags", "hats"]
    for on in ("cpu", "device"):
        cfg = data_cfg(tmp_path, 32, on)
        res = evaluate(model, build_eval_loader(cfg.data, "val", tokenizer, 4, 0), acc, labels,
                       dummy_batch(tokenizer, 32), modes=("fused",))
        assert res["skipped_samples"] == 3 and res["fused"]["num_samples"] == 6, on


# ------------------------------------------------------------------------------------------- training via the CLI
@pytest.mark.slow
def test_training_with_device_decode_resumes_exactly(tiny_packed_dataset, tiny_text, tmp_path):
    """A whole `mmcat train` with decode_on=device (on CPU): it trains, evaluates, and a run stopped at step 4 and
    resumed logs the same losses and ends with the same weights as the uninterrupted one. One epoch, no test
    split, no loader worker processes: three `mmcat train` processes are the cost of this test."""
    def cfg(name: str, **kw) -> str:
        return str(write_config(tmp_path / f"{name}.yaml", tiny_text, tiny_packed_dataset, tmp_path / name,
                                data__decode_on="device", data__num_workers=0, data__test_split=None,
                                train__epochs=1, **kw))

    run(mmcat_cmd("train", "--config", cfg("full")))
    codes = train_until_done(mmcat_cmd("train", "--config", cfg("resumed", train__resume="latest",
                                                                 train__stop_after_steps=4)))
    assert codes == [75, 0]
    assert_same_run(tmp_path / "resumed", tmp_path / "full")
    m = metrics(tmp_path / "full")
    assert m["global_step"] == 6 and m["skipped_samples"] == 0 and "test" not in m
    assert 0.0 <= m["val"]["fused"]["macro_f1"] <= 1.0 and 0.0 <= m["val"]["image_only"]["accuracy"] <= 1.0
