"""Train/eval loaders on real WebDataset shards: masks, equal batches per rank, shuffling, resume, bad samples."""
from __future__ import annotations

import math
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from _shards import LABELS, write_img2dataset, write_packed, write_split
from mmcat.config import TrainRunConfig, load_config
from mmcat.data import BadSampleError, DataError, build_eval_loader, build_train_loader
from mmcat.data.loader import epoch_shard_order, iterate_batches, rank_shards
from mmcat.models import load_tokenizer
from mmcat.models.tiny import make_tiny_text_model

SIZE = 32


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> str:
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_text"), weights=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_text):
    return load_tokenizer(load_config(TrainRunConfig, None, [f"model.text.name={tiny_text}"],
                                      require_complete=False).model.text)


def make_cfg(root, *overrides):
    return load_config(TrainRunConfig, None, [f"data.root={root}", "output_dir=/unused", f"data.image_size={SIZE}",
                                              "train.batch_size=4", "data.num_workers=2", "data.shuffle_buffer=8",
                                              *overrides])


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def test_eval_loader_reads_all_samples_with_modality_masks(tmp_path, tokenizer):
    infos = write_packed(tmp_path, {"val": [5, 4, 6]}, missing_every=4)["val"]
    cfg = make_cfg(tmp_path)
    batches = list(build_eval_loader(cfg.data, "val", tokenizer, batch_size=4, num_workers=2))
    by_key = {i["key"]: i for i in infos}
    assert sorted(keys_of(batches)) == sorted(by_key)  # every sample exactly once
    assert any(not i["has_image"] for i in infos) and any(not i["has_text"] for i in infos)
    special = tokenizer("", return_tensors="pt")["input_ids"][0].tolist()  # [CLS] [SEP]
    for b in batches:
        n = len(b["keys"])
        assert b["pixel_values"].shape == (n, 3, SIZE, SIZE) and b["pixel_values"].dtype == torch.float32
        assert b["input_ids"].dtype == torch.int64 and b["attention_mask"].dtype == torch.int64
        assert b["input_ids"].shape[1] <= cfg.data.max_text_length and b["skipped"] == 0
        for i, key in enumerate(b["keys"]):
            info = by_key[key]
            assert b["has_image"][i].item() == info["has_image"] and b["has_text"][i].item() == info["has_text"]
            assert b["labels"][i].item() == info["label"]
            assert (b["pixel_values"][i].abs().sum() > 0).item() == info["has_image"]  # zeros where no image
            ids = b["input_ids"][i][b["attention_mask"][i].bool()].tolist()
            if info["has_text"]:
                assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(info["text"].lower().split())
            else:
                assert ids == special
    # eval order is fixed: a second pass gives the same batches
    again = list(build_eval_loader(cfg.data, "val", tokenizer, batch_size=4, num_workers=2))
    assert keys_of(again) == keys_of(batches)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(again, batches))


def split_keys(root: Path, split: str) -> list:
    """The split's sample keys, read with plain webdataset (no mmcat code)."""
    urls = sorted(str(p) for p in (root / split).glob("*.tar"))
    return [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]


def documented_repeats(shard_sizes, batch, ranks, workers):
    """README "Data pipeline": with G = ranks x workers, every worker yields Q = ceil(sum of the ceil(S / G) largest
    shards / batch) batches; an epoch yields G x Q x batch samples, so N of them are the split, the rest repeats."""
    groups = ranks * workers
    largest = sorted(shard_sizes, reverse=True)[: math.ceil(len(shard_sizes) / groups)]
    return groups * math.ceil(sum(largest) / batch) * batch - sum(shard_sizes)


UNEVEN = [9, 2, 5, 1, 7, 3, 6, 4]  # 37 samples, very uneven shards


@pytest.mark.parametrize("ranks, workers", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_every_sample_every_epoch_and_resume_mid_epoch(tmp_path, tokenizer, ranks, workers):
    write_packed(tmp_path, {"train": UNEVEN}, missing_every=5)
    cfg = make_cfg(tmp_path, "train.batch_size=3", f"data.num_workers={workers}")
    epoch = []
    for rank in range(ranks):
        info = build_train_loader(cfg, tokenizer, rank=rank, world_size=ranks, epoch=1)
        full = [b["keys"] for b in info.loader]
        assert len(full) == info.batches_per_epoch == len(info.loader)  # the same on every rank: no DDP hang
        assert all(len(keys) == 3 for keys in full)  # full batches only: same shapes on every rank
        skip = info.batches_per_epoch // 2 + 1  # lands on a different loader worker than batch 0
        resumed = [b["keys"] for b in build_train_loader(cfg, tokenizer, rank=rank, world_size=ranks, epoch=1,
                                                         skip_batches=skip).loader]
        assert full[:skip] + resumed == full  # exactly the tail of the uninterrupted epoch, in order
        epoch += [k for keys in full for k in keys]
    want = split_keys(tmp_path, "train")
    assert set(epoch) == set(want) and len(want) == sum(UNEVEN)  # every sample of the split, every epoch
    assert len(epoch) - len(want) == documented_repeats(UNEVEN, 3, ranks, workers)  # the only repeats: padding


def test_stale_size_table_is_not_silent(tmp_path, tokenizer, caplog):
    write_packed(tmp_path, {"train": [6, 6]})
    (tmp_path / "train" / "sizes.json").write_text('{"shard-000000.tar": 2, "shard-000001.tar": 6}')
    cfg = make_cfg(tmp_path, "data.num_workers=0")
    with caplog.at_level("WARNING"):
        list(build_train_loader(cfg, tokenizer, rank=0, world_size=1, epoch=0).loader)
    assert "more samples than the size table says" in caplog.text
    with pytest.raises(DataError, match="data.samples_per_epoch needs data.resampled=true"):
        build_train_loader(make_cfg(tmp_path, "data.samples_per_epoch=8"), tokenizer, rank=0, world_size=1, epoch=0)


def test_too_few_shards_for_workers_times_ranks_is_a_clear_error(tmp_path, tokenizer):
    write_packed(tmp_path, {"train": [4, 4, 4]})
    with pytest.raises(DataError, match=r"3 train shards but 2 rank\(s\) x 2 loader worker\(s\) need at least 4"):
        build_train_loader(make_cfg(tmp_path), tokenizer, rank=0, world_size=2, epoch=0)
    info = build_train_loader(make_cfg(tmp_path, "data.resampled=true"), tokenizer, rank=0, world_size=2, epoch=0)
    assert info.batches_per_epoch == 2  # resampled mode has no such limit


def test_shard_shuffle_is_shared_across_ranks_and_changes_per_epoch(tmp_path, tokenizer):
    infos = write_packed(tmp_path, {"train": [3] * 8})["train"]
    shards = [f"s{i}" for i in range(8)]
    assert epoch_shard_order(shards, 0, 0) != epoch_shard_order(shards, 0, 1)
    for epoch in range(3):
        parts = [rank_shards(shards, 0, epoch, r, 2) for r in range(2)]
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == shards
    # the real loaders read exactly that split: disjoint per rank, covering everything, changing with the epoch
    shard_of = {i["key"]: i["shard"] for i in infos}
    names = sorted({i["shard"] for i in infos})
    cfg = make_cfg(tmp_path, "train.batch_size=3", "data.num_workers=1")
    seen = {}
    for epoch in (0, 2):
        for rank in range(2):
            info = build_train_loader(cfg, tokenizer, rank=rank, world_size=2, epoch=epoch)
            seen[epoch, rank] = {shard_of[k] for k in keys_of(info.loader)}
            assert seen[epoch, rank] == set(rank_shards(names, cfg.seed, epoch, rank, 2))
        assert not seen[epoch, 0] & seen[epoch, 1] and len(seen[epoch, 0] | seen[epoch, 1]) == 8
    assert seen[0, 0] != seen[2, 0]


def test_train_stream_is_deterministic_and_sample_order_differs_per_epoch(tmp_path, tokenizer):
    write_packed(tmp_path, {"train": [6, 5, 7, 6]})
    cfg = make_cfg(tmp_path)
    runs = [[b for b in build_train_loader(cfg, tokenizer, 0, 1, epoch=e).loader] for e in (0, 0, 1)]
    assert keys_of(runs[0]) == keys_of(runs[1])
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(runs[0], runs[1]))
    assert keys_of(runs[0]) != keys_of(runs[2])


@pytest.mark.parametrize("num_workers, skip", [(2, 3), (2, 4), (0, 2)])
def test_skip_batches_gives_the_tail_of_a_full_pass(tmp_path, tokenizer, num_workers, skip, monkeypatch):
    write_packed(tmp_path, {"train": [7, 5, 6, 8]}, missing_every=5)
    cfg = make_cfg(tmp_path, "train.batch_size=3", f"data.num_workers={num_workers}")
    full = list(build_train_loader(cfg, tokenizer, rank=1, world_size=2, epoch=2).loader)
    resumed_info = build_train_loader(cfg, tokenizer, rank=1, world_size=2, epoch=2, skip_batches=skip)
    resumed = list(resumed_info.loader)
    assert resumed_info.batches_per_epoch == len(full) and len(resumed) == len(full) - skip
    for a, b in zip(full[skip:], resumed):
        assert a["keys"] == b["keys"]
        for name in ("pixel_values", "input_ids", "attention_mask", "has_image", "has_text", "labels"):
            assert torch.equal(a[name], b[name]), name  # augmentations included
    if num_workers == 0:  # the skipped samples were not decoded (decode runs in this process here)
        import mmcat.data.loader as loader_module

        calls = []
        real = loader_module.decode_image
        monkeypatch.setattr(loader_module, "decode_image", lambda *a: calls.append(1) or real(*a))
        kept = list(build_train_loader(cfg, tokenizer, rank=1, world_size=2, epoch=2, skip_batches=skip).loader)
        assert 0 < len(calls) <= sum(len(b["keys"]) for b in kept) + 1


def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer):
    bad = {"p00001": "corrupt_jpg", "p00004": "no_cls", "p00006": "empty"}
    infos = write_split(tmp_path, "val", [5, 4], bad=bad)
    good = sorted(i["key"] for i in infos if not i["bad"])
    cfg = make_cfg(tmp_path)
    batches = list(build_eval_loader(cfg.data, "val", tokenizer, batch_size=4, num_workers=2))
    assert sorted(keys_of(batches)) == good
    assert sum(b["skipped"] for b in batches) == 3
    # in training too: no bad sample reaches a batch and the counts arrive with the batches
    write_split(tmp_path, "train", [5, 4], bad=bad)
    train = list(build_train_loader(make_cfg(tmp_path, "data.num_workers=1"), tokenizer, 0, 1, 0).loader)
    assert set(keys_of(train)) == set(good) and sum(b["skipped"] for b in train) >= 3  # every good sample


def test_truncated_tar_is_counted_not_fatal(tmp_path, tokenizer):
    infos = write_split(tmp_path, "val", [6, 3])
    shard = tmp_path / "val" / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a killed writer leaves a truncated tar
    batches = list(build_eval_loader(make_cfg(tmp_path).data, "val", tokenizer, batch_size=4, num_workers=0))
    keys = keys_of(batches)
    assert {i["key"] for i in infos if i["shard"] == "shard-000001.tar"} <= set(keys)
    assert 0 < len([k for k in keys if k <= "p00005"]) < 6  # the readable head of the broken shard is kept
    assert sum(b["skipped"] for b in batches) >= 1
    with tarfile.open(shard) as tar, pytest.raises(tarfile.ReadError):
        tar.getmembers()  # make sure the shard really is broken


@pytest.mark.parametrize("num_workers", [0, 1])
def test_strict_mode_fails_with_a_clear_message(tmp_path, tokenizer, num_workers):
    write_split(tmp_path, "val", [4], bad={"p00002": "corrupt_jpg"})
    cfg = make_cfg(tmp_path, "data.strict=true")
    loader = build_eval_loader(cfg.data, "val", tokenizer, batch_size=2, num_workers=num_workers)
    with pytest.raises(Exception) as err, iterate_batches(loader) as batches:  # stops the workers on error
        list(batches)
    assert "p00002" in str(err.value) and "data.strict=true" in str(err.value)
    if num_workers == 0:
        assert isinstance(err.value, BadSampleError)


def test_reads_img2dataset_style_shards_with_json_labels(tmp_path, tokenizer):
    infos = write_img2dataset(tmp_path / "i2d", [5, 4, 6, 3])
    labels_file = tmp_path / "meta" / "labels.json"  # not next to the shards: found only via data.labels_file
    labels_file.parent.mkdir()
    labels_file.write_text('["shoes", "bags", "hats"]')
    pattern = str(tmp_path / "i2d" / "{00000..00003}.tar")
    cfg = make_cfg(pattern, "data.label_key=json:category", f"data.labels_file={labels_file}")
    want = {i["key"]: i["label"] for i in infos}
    batches = list(build_eval_loader(cfg.data, "train", tokenizer, batch_size=4, num_workers=2))
    got = {k: b["labels"][j].item() for b in batches for j, k in enumerate(b["keys"])}
    assert got == want and all(b["has_image"].all() and b["has_text"].all() for b in batches)
    info = build_train_loader(cfg, tokenizer, rank=0, world_size=1, epoch=0)  # sizes from *_stats.json
    assert info.samples_per_epoch == 18 and len(list(info.loader)) == info.batches_per_epoch == 6
    bad = make_cfg(pattern, "data.label_key=json:category")  # string labels need a labels file
    with pytest.raises(DataError, match="data.labels_file"):
        build_eval_loader(bad.data, "train", tokenizer, batch_size=4, num_workers=0)


def test_resampled_mode_with_root_weights(tmp_path, tokenizer):
    a = write_packed(tmp_path / "a", {"train": [4, 4]})["train"]
    write_packed(tmp_path / "b", {"train": [4, 4]}, labels=LABELS)
    cfg = make_cfg(f"{tmp_path / 'a'},{tmp_path / 'b'}", "data.resampled=true", "data.weights=[1.0,0.0]",
                   "data.samples_per_epoch=40", "data.num_workers=1")
    info = build_train_loader(cfg, tokenizer, rank=0, world_size=2, epoch=0)
    assert info.batches_per_epoch == 5 and info.samples_per_epoch == 40
    keys = keys_of(info.loader)
    assert len(keys) == 20 and set(keys) <= {i["key"] for i in a}  # root b has weight 0
    again = keys_of(build_train_loader(cfg, tokenizer, rank=0, world_size=2, epoch=0).loader)
    other_rank = keys_of(build_train_loader(cfg, tokenizer, rank=1, world_size=2, epoch=0).loader)
    assert keys == again and keys != other_rank
    with pytest.raises(DataError, match="data.resampled=true"):
        build_train_loader(make_cfg(f"{tmp_path / 'a'},{tmp_path / 'b'}", "data.weights=[1.0,1.0]"), tokenizer, 0, 1, 0)


def test_missing_split_and_bad_root_are_clear_errors(tmp_path, tokenizer):
    write_packed(tmp_path, {"train": [2]})
    with pytest.raises(DataError, match="no 'val' split"):
        build_eval_loader(make_cfg(tmp_path).data, "val", tokenizer, 2, 0)
    with pytest.raises(DataError, match="not a directory or a shard pattern"):
        build_eval_loader(make_cfg(Path(tmp_path) / "nope").data, "val", tokenizer, 2, 0)


def test_uint8_pixels_mode_feeds_the_model_the_same_input(tmp_path, tokenizer):
    """data.uint8_pixels=true (the default with CUDA) ships uint8; the model's normalisation matches the loader's."""
    from mmcat.models.image import ImageEncoder

    write_packed(tmp_path, {"val": [5, 4]}, missing_every=4)
    floats = list(build_eval_loader(make_cfg(tmp_path).data, "val", tokenizer, batch_size=4, num_workers=0))
    uint8_cfg = make_cfg(tmp_path, "data.uint8_pixels=true")
    uint8s = list(build_eval_loader(uint8_cfg.data, "val", tokenizer, batch_size=4, num_workers=0))
    enc = ImageEncoder("resnet18", "none")
    for f, u in zip(floats, uint8s, strict=True):
        assert u["pixel_values"].dtype == torch.uint8 and f["pixel_values"].dtype == torch.float32
        has = f["has_image"]
        assert torch.allclose(enc.normalize(u["pixel_values"])[has], f["pixel_values"][has], atol=1e-5)


class _CollatedInWorker(torch.utils.data.IterableDataset):
    """Collate run where the loader runs it: in a DataLoader worker; yields what the worker saw of the batch."""

    def __init__(self, tokenizer, normalize: bool) -> None:
        self.tokenizer, self.normalize = tokenizer, normalize

    def __iter__(self):
        import numpy as np

        from mmcat.data.loader import Collate
        from mmcat.data.samples import BadSampleCounter

        collate = Collate(self.tokenizer, 16, 8, BadSampleCounter(strict=False), normalize=self.normalize)
        photo = np.full((8, 8, 3), 200, np.uint8)
        samples = [{"pixels": photo if i != 1 else None, "text": "a red mug", "label": i, "key": f"k{i}"}
                   for i in range(3)]
        batch = collate(samples)
        yield batch["pixel_values"], batch["pixel_values"].is_shared()


@pytest.mark.parametrize("normalize", [False, True])
def test_worker_batch_pixels_are_built_in_shared_memory(tokenizer, normalize):
    """The pixel batch a worker builds is in shared memory already, so handing it to the training process copies
    nothing (uint8: the GPU default; float32: normalised in the worker, the CPU default); the content is intact."""
    ((pixels, shared),) = list(torch.utils.data.DataLoader(_CollatedInWorker(tokenizer, normalize), batch_size=None,
                                                           num_workers=1))
    assert shared
    assert torch.all(pixels[1] == 0) and pixels.shape == (3, 3, 8, 8)
    if normalize:
        assert torch.allclose(pixels[0, :, 0, 0], (200 / 255 - torch.tensor([0.485, 0.456, 0.406]))
                              / torch.tensor([0.229, 0.224, 0.225]), atol=1e-5)
    else:
        assert pixels.dtype == torch.uint8 and torch.all(pixels[[0, 2]] == 200)
