"""Remedies for modality competition (mmcat.models.balance) inside the model: auxiliary heads and their loss, biased
and scheduled modality dropout, OGM-GE gradient modulation, one-modality models; the competition warning's rule."""
from __future__ import annotations

import pytest
import torch

from mmcat.config import Fusion
from mmcat.models import build_model, load_tokenizer
from mmcat.models.balance import aux_loss, ogm_factors, scale_grad, scheduled_rate, true_class_scores
from mmcat.train import competition
from train_helpers import model_cfg

NUM_LABELS = 5
LABELS = torch.tensor([0, 1, 2, 3])


def batch(tokenizer, n=4):
    torch.manual_seed(0)
    tok = tokenizer(["red running shoes", "blue mug", "leather bag with strap", "wool hat"][:n], padding=True,
                    return_tensors="pt", return_token_type_ids=False)
    return {"pixel_values": torch.randn(n, 3, 32, 32), "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"], "has_image": torch.tensor([True, True, False, True][:n]),
            "has_text": torch.ones(n, dtype=torch.bool)}


@pytest.mark.parametrize("fusion", [f.value for f in Fusion])
def test_aux_heads_give_each_modality_its_own_loss(tiny_text, fusion):
    cfg = model_cfg(tiny_text, f"model.fusion={fusion}", "model.modality_dropout=0", "model.aux_loss_weight=0.5",
                    "model.aux_loss_weights={text: 2.0}")
    model = build_model(cfg, NUM_LABELS).train()
    b = batch(load_tokenizer(cfg.text))
    logits, aux = model(**b, labels=LABELS)
    assert set(aux) == {"image", "text"} and model.aux_weights == {"image": 0.5, "text": 2.0}
    assert torch.equal(aux["image"][1], b["has_image"])  # the loss covers the samples that have the modality
    expected = sum(w * torch.nn.functional.cross_entropy(aux[k][0][aux[k][1]], LABELS[aux[k][1]])
                   for k, w in model.aux_weights.items())
    got = aux_loss({k: v[0] for k, v in aux.items()}, {k: v[1] for k, v in aux.items()}, LABELS, model.aux_weights,
                   torch.nn.CrossEntropyLoss())
    assert torch.allclose(got, expected)
    # the image's aux loss alone reaches the image encoder, through no fusion head
    model.zero_grad()
    torch.nn.functional.cross_entropy(aux["image"][0], LABELS).backward()
    assert model.image_encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("text_encoder."))
    # evaluation returns plain logits, as before: the aux heads are a training device
    model.eval()
    with torch.no_grad():
        assert model(**b).shape == logits.shape


def test_aux_weight_zero_builds_no_head_and_late_fusion_reuses_its_heads(tiny_text):
    off = build_model(model_cfg(tiny_text, "model.aux_loss_weight=0"), NUM_LABELS)
    assert off.aux_weights == {} and not any(n.startswith("aux_heads") for n, _ in off.named_parameters())
    one = build_model(model_cfg(tiny_text, "model.aux_loss_weights={image: 0.0}"), NUM_LABELS)
    assert list(one.aux_heads) == ["text"]
    late = build_model(model_cfg(tiny_text, "model.fusion=late"), NUM_LABELS)
    assert not any(n.startswith("aux_heads") for n, _ in late.named_parameters())
    plain = build_model(model_cfg(tiny_text, "model.fusion=late", "model.aux_loss_weight=0"), NUM_LABELS)
    assert set(late.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("names", [["image"], ["text"]])
def test_one_modality_model_is_a_plain_classifier(tiny_text, names):
    cfg = model_cfg(tiny_text, f"model.modalities=[{names[0]}]")
    model = build_model(cfg, NUM_LABELS).train()
    other = "text" if names == ["image"] else "image"
    assert model.names == names and getattr(model, f"{other}_encoder") is None
    assert not any(n.startswith(f"{other}_") or n.startswith("aux_") for n in model.state_dict())
    b = batch(load_tokenizer(cfg.text))
    logits, aux = model(**b, labels=LABELS)
    assert logits.shape == (4, NUM_LABELS) and aux == {}
    groups = {g["name"] for g in model.param_groups(1e-3, 1e-3, 1e-3, 0.0)}
    assert groups == {names[0], "head"}


def test_dropout_odds_and_target_stronger_pick_what_is_hidden(tiny_text):
    n = 20000
    both = (torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))
    torch.manual_seed(0)
    odds = build_model(model_cfg(tiny_text, "model.modality_dropout=1.0", "model.modality_dropout_weights={text: 3}"),
                       NUM_LABELS).train()
    img, txt = odds._modality_dropout(*both)
    assert (img ^ txt).all()  # exactly one hidden per sample
    assert abs((~txt).float().mean().item() - 0.75) < 0.02
    stronger = build_model(model_cfg(tiny_text, "model.modality_dropout=1.0", "model.modality_dropout_target=stronger"),
                           NUM_LABELS).train()
    stronger.modality_strength.copy_(torch.tensor([0.8, 0.2]))  # the image is the stronger one
    img, txt = stronger._modality_dropout(*both)
    assert abs((~img).float().mean().item() - 0.8) < 0.02


def test_target_stronger_tracks_the_aux_heads_accuracy(tiny_text):
    cfg = model_cfg(tiny_text, "model.modality_dropout_target=stronger")
    model = build_model(cfg, NUM_LABELS).train()
    b = batch(load_tokenizer(cfg.text))
    before = model.modality_strength.clone()
    _, aux = model(**b, labels=LABELS)
    scores = true_class_scores({k: v[0] for k, v in aux.items()}, {k: v[1] for k, v in aux.items()}, LABELS)
    now = torch.stack([scores["image"], scores["text"]])
    assert torch.allclose(model.modality_strength, 0.9 * before + 0.1 * now, atol=1e-6)
    assert "modality_strength" in model.state_dict()  # saved with checkpoints: resume continues the same values


def test_modality_dropout_schedule_is_linear_in_progress(tiny_text):
    model = build_model(model_cfg(tiny_text, "model.modality_dropout=0.6", "model.modality_dropout_final=0.1"),
                        NUM_LABELS)
    rates = []
    for progress in (0.0, 0.5, 1.0):
        model.training_progress = progress
        rates.append(model.current_modality_dropout())
    assert rates == pytest.approx([0.6, 0.35, 0.1])
    assert scheduled_rate(0.3, None, 0.7) == 0.3


def test_ogm_scales_the_dominant_modalitys_fusion_gradient(tiny_text):
    """With noise off, each encoder's gradient from the fused loss is its OGM factor times the unmodulated one."""
    b = batch(load_tokenizer(model_cfg(tiny_text).text))
    grads, factors = {}, None
    for alpha in (0.0, 3.0):
        torch.manual_seed(1)
        cfg = model_cfg(tiny_text, "model.modality_dropout=0", f"model.ogm_alpha={alpha}", "model.ogm_noise=false",
                        "model.fusion=concat")
        model = build_model(cfg, NUM_LABELS).train()
        logits, aux = model(**{**b, "has_image": torch.ones(4, dtype=torch.bool)}, labels=LABELS)
        torch.nn.functional.cross_entropy(logits, LABELS).backward()  # the fused loss only
        grads[alpha] = {"image": model.image_proj[0].weight.grad.clone(),
                        "text": model.text_proj[0].weight.grad.clone()}
        scores = true_class_scores({k: v[0] for k, v in aux.items()}, {k: v[1] for k, v in aux.items()}, LABELS)
        factors = ogm_factors(scores, 3.0)
    assert sorted(round(float(f), 6) < 1 for f in factors.values()) == [False, True]  # one dominant modality
    for name in ("image", "text"):
        assert torch.allclose(grads[3.0][name], factors[name] * grads[0.0][name], rtol=1e-4, atol=1e-7)


def test_scale_grad_noise_only_where_modulated():
    x = torch.ones(3, 4, requires_grad=True)
    torch.manual_seed(0)
    scale_grad(x, torch.tensor([1.0, 0.5, 1.0]), True).sum().backward()
    assert torch.equal(x.grad[0], torch.ones(4)) and torch.equal(x.grad[2], torch.ones(4))
    x.grad = None
    scale_grad(x, torch.tensor([1.0, 0.5, 1.0]), False).sum().backward()
    assert torch.equal(x.grad[1], torch.full((4,), 0.5))


def test_competition_rule_names_the_starved_modality():
    history = {}
    for fused, image, text in [(0.3, 0.1, 0.3), (0.5, 0.12, 0.5), (0.7, 0.1, 0.7)]:
        competition.record(history, {"fused": {"macro_f1": fused}, "image_only": {"macro_f1": image},
                                     "text_only": {"macro_f1": text}}, ["fused", "image_only", "text_only"])
    assert competition.starved(history, num_labels=6) == ["image"]  # 0.12 < 1.5 / 6
    assert competition.starved(history, num_labels=13) == []  # 0.12 is not below 1.5 / 13 = 0.115
    msg = competition.message("image", history, 6)
    assert "'image'" in msg and "model.aux_loss_weight" in msg and "\n" not in msg
    saturated = {"fused": [1.0, 1.0, 1.0], "image_only": [0.1, 0.1, 0.1]}
    assert competition.starved(saturated, 6) == ["image"]  # the text alone already gives every answer
    assert competition.starved({"fused": [0.9, 0.8, 0.7], "image_only": [0.1] * 3}, 6) == []  # fused got worse
    assert competition.starved({"fused": [0.2, 0.25, 0.3], "image_only": [0.1] * 3}, 6) == []  # nothing learned
    assert competition.ablation_gaps({"fused": {"macro_f1": 0.8}, "image_only": {"macro_f1": 0.5}}) == {"image": 0.3}


def test_a_slow_starter_is_warned_about_then_declared_recovered_and_a_relapse_warned_again():
    """The CPU recipe on `market` (12 classes, limit 1.5 / 12 = 0.125): the from-scratch image half sits near chance
    for three epochs, then learns. The warning fires at the third evaluation, the recovery after three in a row at
    or above the limit (one lucky evaluation is noise), and weak_modalities (the list left at the end) names only a
    modality still starved."""
    history, warned, events = {}, [], []
    image_f1 = [0.041, 0.029, 0.045, 0.130, 0.110, 0.214, 0.30, 0.35, 0.05, 0.04, 0.03]
    for i, image in enumerate(image_f1):
        fused = 0.3 + 0.04 * i
        competition.record(history, {"fused": {"macro_f1": fused}, "image_only": {"macro_f1": image},
                                     "text_only": {"macro_f1": fused}}, ["fused", "image_only", "text_only"])
        warn, recovered = competition.update(history, warned, num_labels=12)
        events += [(i, "warn", m) for m in warn] + [(i, "recovered", m) for m in recovered]
        if i == 7:
            assert warned == []  # a run ending here reports no weak modality
    assert events == [(2, "warn", "image"), (7, "recovered", "image"), (10, "warn", "image")]
    assert warned == ["image"]
    msg = competition.recovery_message("image", {"image_only": [0.214, 0.30, 0.35]}, 12)
    assert "'image'" in msg and "0.214, 0.300, 0.350" in msg and "weak_modalities" in msg and "\n" not in msg


def test_an_artifact_from_before_the_aux_heads_loads_and_predicts_the_same(tiny_text, tmp_path):
    """best/ written before auxiliary heads existed: no aux weights, and a config.yaml without the balance keys (so
    the schema default aux_loss_weight=0.5 asks for heads). The training-only parts are not needed to predict."""
    from mmcat.artifact import export_artifact, load_artifact
    from mmcat.config import TrainRunConfig, load_config

    cfg = load_config(TrainRunConfig, None, ["output_dir=x", "data.root=x", "model.image.name=resnet18",
                                             f"model.text.name={tiny_text}", "model.hidden_dim=16",
                                             "model.aux_loss_weight=0"])
    old = build_model(cfg.model, NUM_LABELS).eval()
    export_artifact(tmp_path / "best", old.state_dict(), old, cfg, [f"c{i}" for i in range(NUM_LABELS)],
                    load_tokenizer(cfg.model.text))
    config = tmp_path / "best" / "config.yaml"
    config.write_text("".join(ln for ln in config.read_text().splitlines(keepends=True)
                              if "aux_loss_weight" not in ln and "modality_dropout_" not in ln and "ogm_" not in ln))
    art = load_artifact(tmp_path / "best")
    assert art.model.aux_weights == {"image": 0.5, "text": 0.5}  # the schema default: heads built, not loaded
    b = batch(load_tokenizer(cfg.model.text))
    with torch.no_grad():
        assert torch.equal(art.model(**b), old(**b))
