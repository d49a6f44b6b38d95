"""Models: ResNet image encoder + Hugging Face text encoder + fusion head, as one ``MultimodalClassifier``;
``forward_batch`` runs it on a loader batch."""
from __future__ import annotations

from typing import Any, Dict, Sequence

from mmcat.errors import ModelLoadError
from mmcat.models.fusion import MultimodalClassifier, forward_batch
from mmcat.models.image import ImageEncoder, build_image_encoder
from mmcat.models.text import TextEncoder, build_text_encoder, load_tokenizer


def build_model(model_cfg: Any, num_labels: int, modalities: Sequence[Any] = ()) -> MultimodalClassifier:
    """``modalities``: the non-built-in ``mmcat.modalities.Modality`` instances (each builds its encoder)."""
    h, dropout = int(model_cfg.hidden_dim), float(model_cfg.dropout)
    names = list(model_cfg.get("modalities") or ["image", "text"])  # resolved by the trainer / the artifact
    return MultimodalClassifier(
        build_image_encoder(model_cfg.image) if "image" in names else None,
        build_text_encoder(model_cfg.text) if "text" in names else None, num_labels,
        fusion=model_cfg.fusion, hidden_dim=h, dropout=dropout, modality_dropout=float(model_cfg.modality_dropout),
        extra_encoders={m.name: m.build_encoder(h, dropout) for m in modalities}, balance=balance_settings(model_cfg))


def balance_settings(model_cfg: Any) -> Dict[str, Any]:
    """The ``model.*`` settings of :mod:`mmcat.models.balance` as plain values."""
    keys = ("aux_loss_weight", "aux_loss_weights", "modality_dropout_final", "modality_dropout_target",
            "modality_dropout_weights", "ogm_alpha", "ogm_noise")
    out = {k: model_cfg.get(k) for k in keys if model_cfg.get(k) is not None}
    for k in ("aux_loss_weights", "modality_dropout_weights"):
        out[k] = {str(n): float(w) for n, w in (out.get(k) or {}).items()}
    if "modality_dropout_target" in out:
        out["modality_dropout_target"] = str(out["modality_dropout_target"])
    return out


__all__ = ["build_model", "MultimodalClassifier", "forward_batch", "ImageEncoder", "TextEncoder", "load_tokenizer",
           "ModelLoadError"]
