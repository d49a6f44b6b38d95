"""``MultimodalClassifier``: image encoder + text encoder + one fusion head, in a single ``nn.Module``.

Fusion heads (``model.fusion``) over N modalities (image, text, then the plug-in modalities of
``mmcat.modalities``, e.g. attributes), each projected to ``hidden_dim``:
  concat     the projected features, concatenated, then an MLP (MMF's concat_bert);
  late       one classifier per modality, logits averaged over the modalities a sample has (decision level);
  gated      per-sample modality weights (softmax over the available modalities) mix the projected features;
  attention  text token states attend to the ResNet's spatial feature map (cross-attention), pooled over the
             text mask, then an MLP over [attended text, image, text, other modalities' pooled features].

A missing modality (``has_<name>`` false) is replaced by a learned "missing" embedding, so one model predicts from
any subset (late and gated fusion leave a missing modality out of the average / softmax; they fall back to the
missing embeddings only for a sample with none). In train mode, modality dropout hides one modality (chosen at
random among those present) of a sample that has at least two, with probability ``modality_dropout``. Every encoder
always runs on the whole batch so every parameter takes part in every step (DDP / DeepSpeed need no
unused-parameter search).

``forward_batch(model, batch, mode)`` is the one forward pass over a loader batch that training, evaluation and
prediction share; ``mode`` (fused, ``<m>_only``, ``without_<m>``: :func:`mmcat.modalities.modes_for`) hides
modalities through the same masks.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mmcat.config import Fusion
from mmcat.models.text import masked_mean

Mask = Union[torch.Tensor, bool]


def batch_modalities(batch: Dict[str, Any]) -> List[str]:
    """The modalities of a loader batch, in order: image, text, then every ``has_<name>`` the loader added."""
    return [k[len("has_"):] for k in batch if k.startswith("has_")]


def mode_masks(batch: Dict[str, Any], mode: str) -> Dict[str, torch.Tensor]:
    """Presence mask per modality (``has_<name>``) of ``batch`` with what ``mode`` hides switched off: ``fused``
    hides nothing, ``<m>_only`` all but m, ``without_<m>`` only m."""
    masks = {name: batch[f"has_{name}"] for name in batch_modalities(batch)}
    if mode == "fused":
        return masks
    if mode.endswith("_only") and mode[:-len("_only")] in masks:
        keep = {mode[:-len("_only")]}
    elif mode.startswith("without_") and mode[len("without_"):] in masks:
        keep = set(masks) - {mode[len("without_"):]}
    else:
        raise ValueError(f"evaluation mode '{mode}' names no modality of the batch ({', '.join(masks)})")
    return {n: m if n in keep else torch.zeros_like(m) for n, m in masks.items()}


def forward_batch(model: nn.Module, batch: Dict[str, Any], mode: str = "fused") -> torch.Tensor:
    """Logits of a loader batch. ``model`` is a ``MultimodalClassifier`` or its DDP / DeepSpeed wrapper: it is
    called, never unwrapped, so the wrapper's hooks (gradient sync, ZeRO-3 parameter gathering) run."""
    # pixels may be uint8 or normalised float: the image encoder normalises/casts to its weights' dtype (which is
    # bf16 under DeepSpeed bf16, where no autocast runs)
    masks = mode_masks(batch, mode)
    extra = [n for n in masks if n not in ("image", "text")]
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], masks["image"], masks["text"])
    if not extra:
        return model(*args)
    return model(*args, {n: batch[n] for n in extra}, {n: masks[n] for n in extra})


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, d_out))


class MultimodalClassifier(nn.Module):
    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, num_labels: int, fusion: str = "gated",
                 hidden_dim: int = 256, dropout: float = 0.1, modality_dropout: float = 0.0,
                 extra_encoders: Optional[Dict[str, nn.Module]] = None) -> None:
        super().__init__()
        fusion = Fusion(fusion)  # a plain string from Python callers; the config already holds a Fusion
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"model.modality_dropout must be in [0, 1], got {modality_dropout}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion, self.modality_dropout, self.num_labels = fusion, float(modality_dropout), int(num_labels)
        extra_encoders = dict(extra_encoders or {})
        self.extra_names = list(extra_encoders)
        n = 2 + len(self.extra_names)
        h = int(hidden_dim)
        self.image_proj = nn.Sequential(nn.Linear(image_encoder.out_dim, h), nn.LayerNorm(h))
        self.text_proj = nn.Sequential(nn.Linear(text_encoder.out_dim, h), nn.LayerNorm(h))
        self.missing_image = nn.Parameter(torch.randn(h) * 0.02)
        self.missing_text = nn.Parameter(torch.randn(h) * 0.02)
        if fusion == Fusion.concat:
            self.head = _mlp(n * h, h, num_labels, dropout)
        elif fusion == Fusion.late:
            self.image_head = _mlp(h, h, num_labels, dropout)
            self.text_head = _mlp(h, h, num_labels, dropout)
        elif fusion == Fusion.gated:
            self.gate = nn.Linear(n * h, n)
            self.head = _mlp(h, h, num_labels, dropout)
        else:
            heads = 4 if h % 4 == 0 else 1
            self.cross_attention = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
            self.cross_norm = nn.LayerNorm(h)
            self.head = _mlp((n + 1) * h, h, num_labels, dropout)
        if extra_encoders:  # created last: an image+text model draws the same initial weights as before
            self._build_extras(extra_encoders, h, num_labels, dropout)

    def _build_extras(self, encoders: Dict[str, nn.Module], h: int, num_labels: int, dropout: float) -> None:
        self.extra_encoders = nn.ModuleDict(encoders)
        self.extra_proj = nn.ModuleDict({k: nn.Sequential(nn.Linear(e.out_dim, h), nn.LayerNorm(h))
                                         for k, e in encoders.items()})
        self.missing_extra = nn.ParameterDict({k: nn.Parameter(torch.randn(h) * 0.02) for k in encoders})
        if self.fusion == Fusion.late:
            self.extra_heads = nn.ModuleDict({k: _mlp(h, h, num_labels, dropout) for k in encoders})

    # ------------------------------------------------------------------------------------------------- masks
    @staticmethod
    def _mask(value: Mask, batch: int, device: torch.device) -> torch.Tensor:
        """A per-sample bool mask; a Python bool applies to the whole batch (eval ablations)."""
        if isinstance(value, bool):
            return torch.full((batch,), value, dtype=torch.bool, device=device)
        return value.to(device=device, dtype=torch.bool).reshape(batch)

    def _modality_dropout(self, *masks: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """With probability ``modality_dropout``, hide one modality (chosen at random among those present) of a
        sample that has at least two: a sample never loses all of its modalities."""
        if not self.training or self.modality_dropout <= 0:
            return masks
        avail = torch.stack(masks, dim=1)
        drop = (avail.sum(dim=1) >= 2) & (torch.rand(avail.shape[0], device=avail.device) < self.modality_dropout)
        scores = torch.rand(avail.shape, device=avail.device).masked_fill(~avail, -1.0)
        hide = torch.nn.functional.one_hot(scores.argmax(dim=1), avail.shape[1]).bool() & drop[:, None]
        return tuple((avail & ~hide).unbind(dim=1))

    @staticmethod
    def _availability(masks: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """[B, N] weights of the modalities; a sample with none falls back to all the missing embeddings."""
        avail = torch.stack(list(masks), dim=1)
        avail = avail | ~avail.any(dim=1, keepdim=True)
        return avail.to(dtype)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                has_image: Mask = True, has_text: Mask = True,
                extra_inputs: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
                extra_present: Optional[Dict[str, Mask]] = None) -> torch.Tensor:
        """``extra_inputs[name]``: the collated tensors of each non-built-in modality; ``extra_present[name]`` its
        presence mask (default: present)."""
        batch, device = input_ids.shape[0], input_ids.device
        if sorted(extra_inputs or {}) != sorted(self.extra_names):
            raise ValueError(f"the model takes the modalities {self.extra_names} besides image and text, "
                             f"got {sorted(extra_inputs or {})}")
        present = extra_present or {}
        masks = self._modality_dropout(self._mask(has_image, batch, device), self._mask(has_text, batch, device),
                                       *(self._mask(present.get(k, True), batch, device) for k in self.extra_names))
        image_pooled, image_tokens = self.image_encoder(pixel_values)
        text_pooled, text_tokens = self.text_encoder(input_ids, attention_mask)
        img = self.image_proj(image_pooled)
        feats = [img, self.text_proj(text_pooled.to(img.dtype))]
        feats += [self.extra_proj[k](self.extra_encoders[k](extra_inputs[k]).to(img.dtype)) for k in self.extra_names]
        missing = [self.missing_image, self.missing_text, *(self.missing_extra[k] for k in self.extra_names)]
        feats = [torch.where(m[:, None], f, e.to(f.dtype).expand_as(f)) for f, m, e in zip(feats, masks, missing)]

        if self.fusion == Fusion.concat:
            return self.head(torch.cat(feats, dim=1))
        if self.fusion == Fusion.late:
            w = self._availability(masks, img.dtype)
            heads = [self.image_head, self.text_head, *(self.extra_heads[k] for k in self.extra_names)]
            logits = sum(w[:, i:i + 1] * head(f) for i, (head, f) in enumerate(zip(heads, feats)))
            return logits / w.sum(dim=1, keepdim=True)
        if self.fusion == Fusion.gated:
            avail = self._availability(masks, img.dtype) > 0
            scores = self.gate(torch.cat(feats, dim=1)).masked_fill(~avail, float("-inf"))
            g = torch.softmax(scores.float(), dim=1).to(img.dtype)
            return self.head(sum(g[:, i:i + 1] * f for i, f in enumerate(feats)))
        return self._attention(feats, image_tokens, text_tokens, attention_mask, masks[0], masks[1])

    def _attention(self, feats, image_tokens, text_tokens, attention_mask, has_image, has_text) -> torch.Tensor:
        """Text tokens attend to the image's spatial map; the other modalities' pooled features join the head's
        input next to the attended text, the image and the text."""
        img = feats[0]
        kv = self.image_proj(image_tokens.to(img.dtype))  # [B, h*w, H]
        kv = torch.where(has_image[:, None, None], kv, self.missing_image.to(kv.dtype).expand_as(kv))
        q = self.text_proj(text_tokens.to(img.dtype))  # [B, L, H]
        q = torch.where(has_text[:, None, None], q, self.missing_text.to(q.dtype).expand_as(q))
        attended, _ = self.cross_attention(q, kv, kv, need_weights=False)
        x = self.cross_norm(q + attended)
        return self.head(torch.cat([masked_mean(x, attention_mask), *feats], dim=1))

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
