"""``MultimodalClassifier``: image encoder + text encoder + one fusion head, in a single ``nn.Module``.

Fusion heads (``model.fusion``):
  concat     projected image and text features, concatenated, then an MLP (MMF's concat_bert);
  late       one classifier per modality, logits averaged over the modalities a sample has (decision level);
  gated      per-sample modality weights (softmax over the available modalities) mix the projected features;
  attention  text token states attend to the ResNet's spatial feature map (cross-attention), pooled over the
             text mask, then an MLP over [attended text, image, text].

A missing modality (``has_image`` / ``has_text`` false) is replaced by a learned "missing" embedding, so one model
predicts from image only, text only, or both (late and gated fusion leave a missing modality out of the average /
softmax; they fall back to the missing embeddings only for a sample with neither). In train mode, modality dropout hides one modality (chosen at random)
of a sample that has both, with probability ``modality_dropout``. Both encoders always run on the whole batch so
every parameter takes part in every step (DDP / DeepSpeed need no unused-parameter search).

``forward_batch(model, batch, mode)`` is the one forward pass over a loader batch that training, evaluation and
prediction share; ``mode`` (fused / image_only / text_only) hides a modality through the same masks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Union

import torch
from torch import nn

from mmcat.config import Fusion
from mmcat.models.text import masked_mean

Mask = Union[torch.Tensor, bool]


def mode_masks(batch: Dict[str, Any], mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(has_image, has_text) of ``batch`` with the modality that ``mode`` hides switched off."""
    has_image, has_text = batch["has_image"], batch["has_text"]
    if mode == "image_only":
        has_text = torch.zeros_like(has_text)
    elif mode == "text_only":
        has_image = torch.zeros_like(has_image)
    return has_image, has_text


def forward_batch(model: nn.Module, batch: Dict[str, Any], mode: str = "fused") -> torch.Tensor:
    """Logits of a loader batch. ``model`` is a ``MultimodalClassifier`` or its DDP / DeepSpeed wrapper: it is
    called, never unwrapped, so the wrapper's hooks (gradient sync, ZeRO-3 parameter gathering) run."""
    # pixels may be uint8 or normalised float: the image encoder normalises/casts to its weights' dtype (which is
    # bf16 under DeepSpeed bf16, where no autocast runs)
    has_image, has_text = mode_masks(batch, mode)
    return model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], has_image, has_text)


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, d_out))


class MultimodalClassifier(nn.Module):
    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, num_labels: int, fusion: str = "gated",
                 hidden_dim: int = 256, dropout: float = 0.1, modality_dropout: float = 0.0) -> None:
        super().__init__()
        fusion = Fusion(fusion)  # a plain string from Python callers; the config already holds a Fusion
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"model.modality_dropout must be in [0, 1], got {modality_dropout}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion, self.modality_dropout, self.num_labels = fusion, float(modality_dropout), int(num_labels)
        h = int(hidden_dim)
        self.image_proj = nn.Sequential(nn.Linear(image_encoder.out_dim, h), nn.LayerNorm(h))
        self.text_proj = nn.Sequential(nn.Linear(text_encoder.out_dim, h), nn.LayerNorm(h))
        self.missing_image = nn.Parameter(torch.randn(h) * 0.02)
        self.missing_text = nn.Parameter(torch.randn(h) * 0.02)
        if fusion == Fusion.concat:
            self.head = _mlp(2 * h, h, num_labels, dropout)
        elif fusion == Fusion.late:
            self.image_head = _mlp(h, h, num_labels, dropout)
            self.text_head = _mlp(h, h, num_labels, dropout)
        elif fusion == Fusion.gated:
            self.gate = nn.Linear(2 * h, 2)
            self.head = _mlp(h, h, num_labels, dropout)
        else:
            heads = 4 if h % 4 == 0 else 1
            self.cross_attention = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
            self.cross_norm = nn.LayerNorm(h)
            self.head = _mlp(3 * h, h, num_labels, dropout)

    # ------------------------------------------------------------------------------------------------- masks
    @staticmethod
    def _mask(value: Mask, batch: int, device: torch.device) -> torch.Tensor:
        """A per-sample bool mask; a Python bool applies to the whole batch (eval ablations)."""
        if isinstance(value, bool):
            return torch.full((batch,), value, dtype=torch.bool, device=device)
        return value.to(device=device, dtype=torch.bool).reshape(batch)

    def _modality_dropout(self, has_image: torch.Tensor, has_text: torch.Tensor):
        if not self.training or self.modality_dropout <= 0:
            return has_image, has_text
        both = has_image & has_text
        drop = both & (torch.rand(both.shape, device=both.device) < self.modality_dropout)
        hide_image = torch.rand(both.shape, device=both.device) < 0.5
        return has_image & ~(drop & hide_image), has_text & ~(drop & ~hide_image)

    @staticmethod
    def _availability(has_image: torch.Tensor, has_text: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, 2] weights of (image, text); a sample with neither falls back to both missing embeddings."""
        avail = torch.stack([has_image, has_text], dim=1)
        avail = avail | ~avail.any(dim=1, keepdim=True)
        return avail.to(dtype)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                has_image: Mask = True, has_text: Mask = True) -> torch.Tensor:
        batch, device = input_ids.shape[0], input_ids.device
        has_image, has_text = self._modality_dropout(self._mask(has_image, batch, device),
                                                     self._mask(has_text, batch, device))
        image_pooled, image_tokens = self.image_encoder(pixel_values)
        text_pooled, text_tokens = self.text_encoder(input_ids, attention_mask)
        img = self.image_proj(image_pooled)
        txt = self.text_proj(text_pooled.to(img.dtype))
        img = torch.where(has_image[:, None], img, self.missing_image.to(img.dtype).expand_as(img))
        txt = torch.where(has_text[:, None], txt, self.missing_text.to(txt.dtype).expand_as(txt))

        if self.fusion == Fusion.concat:
            return self.head(torch.cat([img, txt], dim=1))
        if self.fusion == Fusion.late:
            w = self._availability(has_image, has_text, img.dtype)
            logits = w[:, :1] * self.image_head(img) + w[:, 1:] * self.text_head(txt)
            return logits / w.sum(dim=1, keepdim=True)
        if self.fusion == Fusion.gated:
            avail = self._availability(has_image, has_text, img.dtype) > 0
            scores = self.gate(torch.cat([img, txt], dim=1)).masked_fill(~avail, float("-inf"))
            g = torch.softmax(scores.float(), dim=1).to(img.dtype)
            return self.head(g[:, :1] * img + g[:, 1:] * txt)
        return self._attention(img, txt, image_tokens, text_tokens, attention_mask, has_image, has_text)

    def _attention(self, img, txt, image_tokens, text_tokens, attention_mask, has_image, has_text) -> torch.Tensor:
        kv = self.image_proj(image_tokens.to(img.dtype))  # [B, h*w, H]
        kv = torch.where(has_image[:, None, None], kv, self.missing_image.to(kv.dtype).expand_as(kv))
        q = self.text_proj(text_tokens.to(img.dtype))  # [B, L, H]
        q = torch.where(has_text[:, None, None], q, self.missing_text.to(q.dtype).expand_as(q))
        attended, _ = self.cross_attention(q, kv, kv, need_weights=False)
        x = self.cross_norm(q + attended)
        return self.head(torch.cat([masked_mean(x, attention_mask), img, txt], dim=1))

    # ------------------------------------------------------------------------------------------- optimisation
    def param_groups(self, lr_image: float, lr_text: float, lr_head: float, weight_decay: float) -> List[Dict]:
        """Optimizer groups named image / text / head; biases, norms and embeddings vectors get no weight decay.
        Frozen parameters are included so that unfreezing later needs no new optimizer."""
        encoders = {"image": self.image_encoder, "text": self.text_encoder}
        seen = {id(p) for m in encoders.values() for p in m.parameters()}
        parts = [("image", list(self.image_encoder.parameters()), lr_image),
                 ("text", list(self.text_encoder.parameters()), lr_text),
                 ("head", [p for p in self.parameters() if id(p) not in seen], lr_head)]
        groups = []
        for name, params, lr in parts:
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            if decay:
                groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
            if no_decay:
                groups.append({"name": name, "params": no_decay, "lr": lr, "weight_decay": 0.0})
        return groups
