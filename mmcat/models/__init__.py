"""Models: ResNet image encoder + Hugging Face text encoder + fusion head, as one ``MultimodalClassifier``;
``forward_batch`` runs it on a loader batch."""
from __future__ import annotations

from typing import Any, Sequence

from mmcat.errors import ModelLoadError
from mmcat.models.fusion import MultimodalClassifier, forward_batch
from mmcat.models.image import ImageEncoder, build_image_encoder
from mmcat.models.text import TextEncoder, build_text_encoder, load_tokenizer


def build_model(model_cfg: Any, num_labels: int, modalities: Sequence[Any] = ()) -> MultimodalClassifier:
    """``modalities``: the non-built-in ``mmcat.modalities.Modality`` instances (each builds its encoder)."""
    h, dropout = int(model_cfg.hidden_dim), float(model_cfg.dropout)
    return MultimodalClassifier(
        build_image_encoder(model_cfg.image), build_text_encoder(model_cfg.text), num_labels,
        fusion=model_cfg.fusion, hidden_dim=h, dropout=dropout, modality_dropout=float(model_cfg.modality_dropout),
        extra_encoders={m.name: m.build_encoder(h, dropout) for m in modalities})


__all__ = ["build_model", "MultimodalClassifier", "forward_batch", "ImageEncoder", "TextEncoder", "load_tokenizer",
           "ModelLoadError"]
