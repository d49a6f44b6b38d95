"""Open modality set: the attribute modality (encoding, training, ablations, artifact) and a toy fourth modality
defined only in this file, registered through ``model.plugins`` (this module is itself the plug-in)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import pytest
import torch
import webdataset as wds
from torch import nn

from mmcat.modalities import Modality, modes_for, register, sample_json
from train_helpers import child_env, metrics, mmcat_cmd, run, torchrun_cmd, write_config

LABELS = ["shoes", "bags", "hats", "toys"]
BRANDS = ["acme", "zed", "orb", "kite"]  # brand i sells class i, mostly
SPEC = {"version": 1, "columns": [
    {"name": "brand", "kind": "categorical", "vocab": BRANDS, "rare": ["tiny"], "min_count": 5},
    {"name": "colour", "kind": "categorical", "vocab": ["red", "blue"], "rare": [], "min_count": 5},
    {"name": "price", "kind": "numeric", "mean": 2.0, "std": 1.0, "log1p": True}]}


# ------------------------------------------------------------------------------------- the toy plug-in modality
class ScalarEncoder(nn.Module):
    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.out_dim = hidden_dim
        self.linear = nn.Linear(1, hidden_dim)

    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.relu(self.linear(inputs["x"].to(self.linear.weight.dtype)[:, None]))


@register
class Scalar(Modality):
    """One number from the json member ("weight"); no dataset files."""
    name = "scalar"
    members = ("json",)

    @classmethod
    def present(cls, find_file) -> bool:
        return False  # only when named in model.modalities

    def read(self, raw: Dict[str, Any]) -> Optional[float]:
        value = (sample_json(raw) or {}).get("weight")
        return None if value is None else float(value)

    def collate(self, values: Sequence[Optional[float]]) -> Dict[str, torch.Tensor]:
        return {"x": torch.tensor([0.0 if v is None else v for v in values])}

    def build_encoder(self, hidden_dim: int, dropout: float) -> nn.Module:
        return ScalarEncoder(hidden_dim)


# ------------------------------------------------------------------------------------------------- tiny shards
def _jpeg(rng: random.Random) -> bytes:
    import cv2
    import numpy as np

    img = np.full((40, 40, 3), rng.randrange(256), np.uint8)  # uninformative photo
    return cv2.imencode(".jpg", img)[1].tobytes()


def _sample(i: int, split: str, rng: random.Random) -> Dict[str, Any]:
    label = rng.randrange(len(LABELS))
    brand = BRANDS[label] if rng.random() < 0.9 else rng.choice(BRANDS)
    if split == "test" and i % 5 == 0:
        brand = "never-seen"  # unseen at eval: token 0
    text = f"{LABELS[label]} item" if rng.random() < 0.5 else "an item"  # text tells the class half the time
    attrs = {"brand": brand, "colour": rng.choice(["red", "blue", None, "teal"]),
             "price": None if i % 7 == 0 else rng.uniform(1, 50)}
    return {"__key__": f"{split}{i:04d}", "cls": str(label).encode(), "jpg": _jpeg(rng), "txt": text.encode(),
            "json": json.dumps({"id": f"{split}{i:04d}", "attributes": attrs, "weight": float(label)}).encode()}


def write_attribute_shards(root: Path, sizes: Dict[str, Sequence[int]]) -> Path:
    rng = random.Random(0)
    for split, shard_sizes in sizes.items():
        (root / split).mkdir(parents=True)
        table, i = {}, 0
        for s, n in enumerate(shard_sizes):
            name = f"shard-{s:06d}.tar"
            with wds.TarWriter(str(root / split / name), mtime=0) as sink:
                for _ in range(n):
                    sink.write(_sample(i, split, rng))
                    i += 1
            table[name] = n
        (root / split / "sizes.json").write_text(json.dumps(table))
    (root / "labels.json").write_text(json.dumps(LABELS))
    (root / "attributes.json").write_text(json.dumps(SPEC))
    return root


@pytest.fixture(scope="module")
def attr_data(tmp_path_factory) -> Path:
    return write_attribute_shards(tmp_path_factory.mktemp("attrs"), {"train": [48] * 4, "val": [48], "test": [60]})


# --------------------------------------------------------------------------------------------------- unit tests
def test_attribute_encoding_follows_the_contract(tmp_path):
    from mmcat.modalities.attributes import Attributes

    (tmp_path / "attributes.json").write_text(json.dumps(SPEC))
    m = Attributes({"attributes.json": tmp_path / "attributes.json"})

    def raw(attrs):
        return {"json": json.dumps({"attributes": attrs}).encode()}

    ids, ids_mask, values, values_mask = m.read(raw({"brand": "zed", "colour": "teal", "price": 1e9}))
    assert ids == [3, 0] and ids_mask == [True, True]  # vocab[1] -> 2 + 1; never-seen "teal" -> unknown (0)
    assert values == [5.0] and values_mask == [True]  # log1p, standardised, clipped to +5
    ids, ids_mask, values, values_mask = m.read(raw({"brand": "tiny", "colour": None, "price": 0.0}))
    assert ids == [1, 0] and ids_mask == [True, False] and values == [pytest.approx(-2.0)]  # rare -> other (1)
    assert m.read(raw({"brand": None, "colour": None, "price": None})) is None  # nothing: the modality is missing
    assert m.read({"json": b'{"id": 1}'}) is None and m.read({}) is None
    batch = m.collate([m.read(raw({"brand": "acme", "colour": "red", "price": None})), None])
    assert batch["ids"].tolist() == [[2, 2], [0, 0]] and batch["values_mask"].tolist() == [[False], [False]]
    enc = m.build_encoder(8, 0.0)
    out = enc(batch)
    out.sum().backward()
    assert out.shape == (2, 8) and enc.missing.grad[2].abs().sum() > 0  # masked price used its missing vector


def test_modes_and_masks_generalise_to_n_modalities():
    from mmcat.models.fusion import mode_masks

    assert modes_for(["image", "text"]) == ["fused", "image_only", "text_only"]  # as before: no leave-one-out
    assert modes_for(["image", "text", "attributes"])[-3:] == ["without_image", "without_text", "without_attributes"]
    t = torch.tensor([True, False])
    batch = {"has_image": t, "has_text": ~t, "has_attributes": torch.tensor([True, True])}
    got = mode_masks(batch, "without_text")
    assert got["image"].tolist() == [True, False] and not got["text"].any() and got["attributes"].all()
    got = mode_masks(batch, "attributes_only")
    assert not got["image"].any() and not got["text"].any() and got["attributes"].all()
    with pytest.raises(ValueError):
        mode_masks(batch, "scalar_only")


def test_modality_dropout_never_hides_every_present_modality(tiny_text):
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.models import build_model

    cfg = load_config(TrainRunConfig, None, ["model.image.name=resnet18", f"model.text.name={tiny_text}",
                                             "model.hidden_dim=8", "model.modality_dropout=1.0"],
                      require_complete=False).model
    model = build_model(cfg, 3, modalities=[Scalar({})]).train()
    masks = tuple(torch.rand(3, 256) < 0.6)
    out = torch.stack(model._modality_dropout(*masks), dim=1)
    before = torch.stack(masks, dim=1)
    assert not (out & ~before).any()  # nothing absent becomes present
    hidden = (before & ~out).sum(dim=1)
    assert torch.equal(hidden, (before.sum(dim=1) >= 2).long())  # exactly one hidden where >= 2 present, else none
    assert set(torch.nonzero(before & ~out)[:, 1].tolist()) == {0, 1, 2}  # any modality may be the hidden one


def test_every_mode_of_three_modalities_from_one_encoder_pass(tiny_text):
    """fused, each <m>_only and each without_<m> (7 modes) from one pass of the three encoders: the same logits,
    bit for bit, as a forward per mode."""
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.models import build_model, forward_batch, load_tokenizer
    from mmcat.models.fusion import forward_modes

    cfg = load_config(TrainRunConfig, None, ["model.image.name=resnet18", f"model.text.name={tiny_text}",
                                             "model.hidden_dim=8"], require_complete=False).model
    model = build_model(cfg, 3, modalities=[Scalar({})]).eval()
    tok = load_tokenizer(cfg.text)(["red shoe", "", "blue bag"], padding=True, return_tensors="pt",
                                   return_token_type_ids=False)
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": tok["input_ids"],
             "attention_mask": tok["attention_mask"], "has_image": torch.tensor([True, True, False]),
             "has_text": torch.tensor([True, False, True]), "scalar": {"x": torch.tensor([0.5, 1.0, 2.0])},
             "has_scalar": torch.tensor([True, True, True])}
    modes = modes_for(["image", "text", "scalar"])
    with torch.no_grad():
        together = forward_modes(model, batch, modes)
        assert list(together) == modes and len({tuple(v.flatten().tolist()) for v in together.values()}) == 7
        for mode in modes:
            assert torch.equal(together[mode], forward_batch(model, batch, mode)), mode


# ---------------------------------------------------------------------------------------------- end to end
def _train(tmp: Path, tiny_text: str, data: Path, name: str, *overrides: str, env=None) -> Path:
    cfg = write_config(tmp / f"{name}.yaml", tiny_text, data, tmp / name, train__epochs=4, model__fusion="concat",
                       model__modality_dropout=0.1)
    run(mmcat_cmd("train", "--config", str(cfg), *overrides), env=env or child_env())
    return tmp / name


def test_attributes_train_evaluate_and_add_what_image_and_text_lack(attr_data, tiny_text, tmp_path):
    three = _train(tmp_path, tiny_text, attr_data, "three")
    two = _train(tmp_path, tiny_text, attr_data, "two", "model.modalities=[image,text]")
    m3, m2 = metrics(three)["test"], metrics(two)["test"]
    assert list(m3) == modes_for(["image", "text", "attributes"]) and list(m2) == ["fused", "image_only", "text_only"]
    assert m3["attributes_only"]["accuracy"] > 0.6  # chance: 0.25; brand tells the class 90 % of the time
    assert m3["fused"]["accuracy"] > m2["fused"]["accuracy"] + 0.1  # text alone tells it half the time
    assert m3["without_attributes"]["accuracy"] < m3["fused"]["accuracy"]
    # the artifact carries the encoding; mmcat eval reproduces the run's numbers, unseen brands (1 in 5) included
    assert json.loads((three / "best" / "attributes.json").read_text()) == SPEC
    out = tmp_path / "eval.json"
    proc = run(mmcat_cmd("eval", "--model", str(three / "best"), "--data", str(attr_data), "--split", "test",
                         "--out", str(out)))
    assert "without_attributes" in proc.stdout and "attributes_only" in proc.stdout
    got = json.loads(out.read_text())
    for mode in modes_for(["image", "text", "attributes"]):
        assert got[mode]["accuracy"] == pytest.approx(m3[mode]["accuracy"]) and got[mode]["num_samples"] == 60
    # three modalities: hiding one is its without_<m> mode; the run and eval agree, and the brand is used
    assert got["modality_influence"] == metrics(three)["modality_influence"]["test"]
    assert list(got["modality_influence"]) == ["image", "text", "attributes"]
    assert got["modality_influence"]["attributes"]["changed"] > 0


def test_a_modality_from_a_plugin_module_trains_end_to_end(attr_data, tiny_text, tmp_path):
    """The toy Scalar above, registered by importing this file by name: no change to mmcat/."""
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run_dir = _train(tmp_path, tiny_text, attr_data, "plugin", "model.plugins=[test_modalities]",
                     "model.modalities=[image,text,scalar]", env=env)
    test = metrics(run_dir)["test"]
    assert list(test) == modes_for(["image", "text", "scalar"])
    assert test["scalar_only"]["accuracy"] > 0.5  # the scalar is the class index: chance is 0.25
    assert "scalar" in (run_dir / "best" / "config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("deepspeed_zero2", marks=pytest.mark.deepspeed)])
def test_three_modalities_on_two_processes_use_every_parameter(launcher, attr_data, tiny_text, tmp_path):
    """DDP raises when a parameter gets no gradient in a step, and ZeRO-2 reduces every gradient bucket: both
    finish with the attribute encoder, its projection and its missing embedding in every step."""
    from test_deepspeed import accelerate_cmd

    cfg = write_config(tmp_path / "cfg.yaml", tiny_text, attr_data, tmp_path / "run", train__epochs=1,
                       model__fusion="gated", model__modality_dropout=0.5)
    args = ("train", "--config", str(cfg))
    run(torchrun_cmd(2, *args) if launcher == "torchrun" else accelerate_cmd(f"{launcher}.yaml", 2, *args))
    m = metrics(tmp_path / "run")
    assert m["world_size"] == 2 and list(m["test"]) == modes_for(["image", "text", "attributes"])
    assert m["test"]["fused"]["num_samples"] == 60


def test_synth_pack_train_eval_with_attribute_columns(tiny_text, tmp_path):
    """The real pipeline: `mmcat synth` (brand informative for half the products, colour for 40 %) → `mmcat pack
    --attribute-columns` → `mmcat train` (modalities from the data) → `mmcat eval`."""
    raw, packed = tmp_path / "raw", tmp_path / "packed"
    run(mmcat_cmd("synth", "--out", str(raw), "--num-products", "240", "--num-classes", "4", "--min-side", "64",
                  "--max-side", "96", "--seed", "5"))
    run(mmcat_cmd("pack", str(raw / "products.csv"), "--out", str(packed), "--image-size", "40",
                  "--max-samples-per-shard", "32", "--splits", "train=0.6,val=0.2,test=0.2",
                  "--attribute-columns", "brand,colour,price", "--attribute-min-count", "3"))
    kinds = {c["name"]: c["kind"] for c in json.loads((packed / "attributes.json").read_text())["columns"]}
    assert kinds == {"brand": "categorical", "colour": "categorical", "price": "numeric"}
    run_dir = _train(tmp_path, tiny_text, packed, "synth")  # model.modalities=null: what the data has
    test = metrics(run_dir)["test"]
    assert list(test) == modes_for(["image", "text", "attributes"])
    assert test["attributes_only"]["accuracy"] > 0.4, test["attributes_only"]  # chance is 0.25
    out = tmp_path / "eval.json"
    run(mmcat_cmd("eval", "--model", str(run_dir / "best"), "--data", str(packed), "--split", "test", "--out",
                  str(out)))
    assert json.loads(out.read_text())["attributes_only"]["accuracy"] == pytest.approx(
        test["attributes_only"]["accuracy"])
