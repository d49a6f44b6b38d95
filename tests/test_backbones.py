"""Image backbones from torchvision's registry (``model.image.name``): the smallest model of each supported family
builds, is cut at the same feature map torchvision's own classifier pools, trains through gated and attention
fusion, and round-trips through ``best/``; models without a convolutional feature map and unknown names are refused
in one line."""
from __future__ import annotations

import pytest
import torch
import torchvision

from mmcat.artifact import export_artifact, load_artifact
from mmcat.config import ConfigError, TrainRunConfig, load_config
from mmcat.errors import ModelLoadError
from mmcat.models import MultimodalClassifier, build_model, load_tokenizer
from mmcat.models.image import ImageEncoder, imagenet_weights_path

LABELS = ["bags", "hats", "shoes"]
# the smallest model of each family the issue lists
SMALLEST = ["resnet18", "resnext50_32x4d", "convnext_tiny", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf",
            "mobilenet_v3_small"]
FAMILIES = "resnet, resnext, wide_resnet, convnext, efficientnet, efficientnet_v2, regnet, mobilenet_v2, mobilenet_v3"


def run_cfg(tiny_text, *overrides):
    return load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", f"model.text.name={tiny_text}",
                                              "model.hidden_dim=16", "model.dropout=0.0",
                                              "model.modality_dropout=0.0", *overrides])


def batch(tokenizer):
    gen = torch.Generator().manual_seed(0)
    tok = tokenizer(["red running shoes", "wool hat"], padding=True, return_tensors="pt", return_token_type_ids=False)
    return {"pixel_values": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=gen),
            "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
            "has_image": torch.tensor([True, True]), "has_text": torch.tensor([True, False])}


def torchvision_pooled(name: str, encoder: ImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """What torchvision's own ``name`` with the encoder's weights feeds its classifier: its global average pool."""
    net = torchvision.models.get_model(name, weights=None).eval()
    missing, unexpected = net.load_state_dict(encoder.backbone.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("fc.", "classifier.")) for k in missing)
    seen = []
    net.avgpool.register_forward_hook(lambda module, args, out: seen.append(out.flatten(1)))
    with torch.no_grad():
        net(encoder.normalize(pixels))
    return seen[0]


@pytest.mark.parametrize("name", SMALLEST)
def test_backbone_trains_with_gated_and_attention_fusion_and_round_trips_through_best(name, tiny_text, tmp_path):
    cfg = run_cfg(tiny_text, f"model.image.name={name}", "model.fusion=attention")
    attention = build_model(cfg.model, len(LABELS))
    image = attention.image_encoder
    gated = MultimodalClassifier(image, attention.text_encoder, len(LABELS), fusion="gated", hidden_dim=16)
    b = batch(load_tokenizer(cfg.model.text))
    for model in (attention, gated):
        model.train().zero_grad()
        torch.nn.functional.cross_entropy(model(**b), torch.tensor([2, 1])).backward()
        # every backbone parameter takes part (DDP / DeepSpeed need no unused-parameter search)
        grads = [p.grad for p in image.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert {g["name"] for g in gated.param_groups(1e-4, 5e-5, 1e-3, 0.01)} == {"image", "text", "head"}
    conv = next(p for p in image.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)

    attention.eval()
    with torch.no_grad():
        pooled, tokens = image(b["pixel_values"])
        want = attention(**b)
    assert tokens.shape == (2, 4, image.out_dim)  # 64 px / stride 32 -> a 2x2 map with out_dim channels
    assert torch.allclose(pooled, torchvision_pooled(name, image, b["pixel_values"]), atol=1e-5)

    export_artifact(tmp_path / "best", attention.state_dict(), attention, cfg, LABELS, load_tokenizer(cfg.model.text))
    art = load_artifact(tmp_path / "best")
    assert art.cfg.model.image.name == name and art.model.image_encoder.out_dim == image.out_dim
    with torch.no_grad():
        assert torch.equal(art.model(**b), want)


@pytest.mark.parametrize("name, message", [
    ("vit_b_16", "config key 'model.image.name': 'vit_b_16' is a vision transformer without a convolutional feature "
                 f"map (not supported); supported families: {FAMILIES}"),
    ("swin_t", "config key 'model.image.name': 'swin_t' is a vision transformer without a convolutional feature "
               f"map (not supported); supported families: {FAMILIES}"),
    ("resnet5", "config key 'model.image.name': 'resnet5' is not a supported torchvision classification model "
                f"(did you mean resnet50?); supported families: {FAMILIES}"),
    ("alexnet", "config key 'model.image.name': 'alexnet' is not a supported torchvision classification model; "
                f"supported families: {FAMILIES}"),
])
def test_names_without_a_spatial_map_or_unknown_are_refused_in_one_line(name, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", f"model.image.name={name}"])
    assert str(err.value) == message
    with pytest.raises(ConfigError) as err:  # Python callers, and a best/config.yaml edited by hand
        ImageEncoder(name, "none")
    assert str(err.value) == message


def test_weights_of_a_family_whose_head_is_not_fc(tmp_path, monkeypatch):
    """A full torchvision state dict (its ``classifier.*`` head included) loads from a path and from the hub
    cache (weights=imagenet); another model's weights are refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    source = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    first = "features.0.0.weight"
    assert torch.equal(ImageEncoder("mobilenet_v3_small", str(path)).backbone.state_dict()[first],
                       source.state_dict()[first])
    cache = imagenet_weights_path("mobilenet_v3_small")[0]
    (tmp_path / "torch_home" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), cache)
    loaded = ImageEncoder("mobilenet_v3_small", "imagenet").backbone.state_dict()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())
    with pytest.raises(ModelLoadError, match="does not match efficientnet_b0") as err:
        ImageEncoder("efficientnet_b0", str(path))
    assert "\n" not in str(err.value)
