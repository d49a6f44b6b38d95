"""``MultimodalClassifier``: the encoders of its modalities + one fusion head, in a single ``nn.Module``.

Fusion heads (``model.fusion``) over N modalities (image, text, then the plug-in modalities of
``mmcat.modalities``, e.g. attributes; any non-empty subset, so a one-modality model is a unimodal baseline),
each projected to ``hidden_dim``:
  concat     the projected features, concatenated, then an MLP (MMF's concat_bert);
  late       one classifier per modality, logits averaged over the modalities a sample has (decision level);
  gated      per-sample modality weights (softmax over the available modalities) mix the projected features;
  attention  text token states attend to the ResNet's spatial feature map (cross-attention), pooled over the
             text mask, then an MLP over [attended text, image, text, other modalities' pooled features].

A missing modality (``has_<name>`` false) is replaced by a learned "missing" embedding, so one model predicts from
any subset (late and gated fusion leave a missing modality out of the average / softmax; they fall back to the
missing embeddings only for a sample with none). In train mode, modality dropout hides one modality (chosen at
random among those present, or biased: :mod:`mmcat.models.balance`) of a sample that has at least two, with
probability ``modality_dropout`` (optionally scheduled). Auxiliary heads and OGM-GE (also
:mod:`mmcat.models.balance`) keep every encoder learning when one modality is the easier signal. Every encoder
always runs on the whole batch so every parameter takes part in every step (DDP / DeepSpeed need no
unused-parameter search).

``forward_batch(model, batch, mode)`` is the one forward pass over a loader batch that training, evaluation and
prediction share; ``mode`` (fused, ``<m>_only``, ``without_<m>``: :func:`mmcat.modalities.modes_for`) hides
modalities through the same masks. ``forward_modes`` gives evaluation every mode's logits from one pass of the
encoders.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mmcat.config import Fusion
from mmcat.models import balance
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


def forward_batch(model: nn.Module, batch: Dict[str, Any], mode: str = "fused", with_aux: bool = False) -> Any:
    """Logits of a loader batch; with ``with_aux`` (training) ``(logits, aux)``: see ``MultimodalClassifier.forward``.
    ``model`` is a ``MultimodalClassifier`` or its DDP / DeepSpeed wrapper: it is called, never unwrapped, so the
    wrapper's hooks (gradient sync, ZeRO-3 parameter gathering) run."""
    # pixels may be uint8 or normalised float: the image encoder normalises/casts to its weights' dtype (which is
    # bf16 under DeepSpeed bf16, where no autocast runs)
    masks = mode_masks(batch, mode)
    extra = [n for n in masks if n not in ("image", "text")]
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], masks["image"], masks["text"])
    kwargs = {"labels": batch["labels"]} if with_aux else {}
    if not extra:
        return model(*args, **kwargs)
    return model(*args, {n: batch[n] for n in extra}, {n: masks[n] for n in extra}, **kwargs)


def forward_modes(model: nn.Module, batch: Dict[str, Any], modes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Logits of ``batch`` under each evaluation mode, from one forward pass: the modes differ only in which
    modalities' features are swapped for their "missing" embeddings, so the encoders (nearly all of the cost) run
    once and only the fusion head runs once per mode. Equal, bit for bit, to ``forward_batch`` per mode. Called
    through ``model`` (a wrapper's hooks run), in eval mode only: in train mode modality dropout would apply."""
    per_mode = [mode_masks(batch, mode) for mode in modes]
    extra = [n for n in per_mode[0] if n not in ("image", "text")]
    kwargs = {"extra_inputs": {n: batch[n] for n in extra}} if extra else {}
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], modes_present=per_mode,
                   **kwargs)
    return dict(zip(modes, logits))


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, d_out))


class MultimodalClassifier(nn.Module):
    """The encoders of the modalities it has (``modalities``: any non-empty subset of image, text and the plug-ins,
    in that order), one projection per modality to ``hidden_dim``, a fusion head and, with ``aux_weights``, one
    auxiliary classifier per modality (:mod:`mmcat.models.balance`). A one-modality model is a plain unimodal
    classifier trained by the same pipeline: the separately trained baselines that fused models are compared with."""

    def __init__(self, image_encoder: Optional[nn.Module], text_encoder: Optional[nn.Module], num_labels: int,
                 fusion: str = "gated", hidden_dim: int = 256, dropout: float = 0.1, modality_dropout: float = 0.0,
                 extra_encoders: Optional[Dict[str, nn.Module]] = None, balance: Optional[Dict[str, Any]] = None
                 ) -> None:
        super().__init__()
        fusion = Fusion(fusion)  # a plain string from Python callers; the config already holds a Fusion
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"model.modality_dropout must be in [0, 1], got {modality_dropout}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion, self.modality_dropout, self.num_labels = fusion, float(modality_dropout), int(num_labels)
        extra_encoders = dict(extra_encoders or {})
        self.extra_names = list(extra_encoders)
        builtin = {"image": image_encoder, "text": text_encoder}
        self.names = [*(k for k, e in builtin.items() if e is not None), *self.extra_names]
        if not self.names:
            raise ValueError("the model needs at least one modality")
        if fusion == Fusion.attention and (image_encoder is None or text_encoder is None):
            raise ValueError("model.fusion=attention needs both image and text (text tokens attend to the image)")
        n, h = len(self.names), int(hidden_dim)
        if image_encoder is not None:
            self.image_proj = nn.Sequential(nn.Linear(image_encoder.out_dim, h), nn.LayerNorm(h))
            self.missing_image = nn.Parameter(torch.randn(h) * 0.02)
        if text_encoder is not None:
            self.text_proj = nn.Sequential(nn.Linear(text_encoder.out_dim, h), nn.LayerNorm(h))
            self.missing_text = nn.Parameter(torch.randn(h) * 0.02)
        if fusion == Fusion.concat:
            self.head = _mlp(n * h, h, num_labels, dropout)
        elif fusion == Fusion.late:
            if image_encoder is not None:
                self.image_head = _mlp(h, h, num_labels, dropout)
            if text_encoder is not None:
                self.text_head = _mlp(h, h, num_labels, dropout)
        elif fusion == Fusion.gated:
            self.gate = nn.Linear(n * h, n)
            self.head = _mlp(h, h, num_labels, dropout)
        else:
            heads = 4 if h % 4 == 0 else 1
            self.cross_attention = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
            self.cross_norm = nn.LayerNorm(h)
            self.head = _mlp((n + 1) * h, h, num_labels, dropout)
        if extra_encoders:  # created after the built-ins: an image+text model draws the same initial weights as before
            self._build_extras(extra_encoders, h, num_labels, dropout)
        self._build_balance(dict(balance or {}), h, num_labels)

    def _build_extras(self, encoders: Dict[str, nn.Module], h: int, num_labels: int, dropout: float) -> None:
        self.extra_encoders = nn.ModuleDict(encoders)
        self.extra_proj = nn.ModuleDict({k: nn.Sequential(nn.Linear(e.out_dim, h), nn.LayerNorm(h))
                                         for k, e in encoders.items()})
        self.missing_extra = nn.ParameterDict({k: nn.Parameter(torch.randn(h) * 0.02) for k in encoders})
        if self.fusion == Fusion.late:
            self.extra_heads = nn.ModuleDict({k: _mlp(h, h, num_labels, dropout) for k in encoders})

    def _build_balance(self, b: Dict[str, Any], h: int, num_labels: int) -> None:
        """Auxiliary heads and the modality-dropout / OGM-GE settings (:mod:`mmcat.models.balance`). A one-modality
        model has nothing to balance: its fused loss already is its unimodal loss."""
        multi = len(self.names) > 1
        weights = balance.aux_weights(self.names, float(b.get("aux_loss_weight", 0.0)),
                                      dict(b.get("aux_loss_weights") or {})) if multi else {}
        self.aux_weights = {k: w for k, w in weights.items() if w > 0}
        # late fusion already has one classifier per modality: those are its auxiliary heads
        if self.aux_weights and self.fusion != Fusion.late:
            self.aux_heads = nn.ModuleDict({k: nn.Linear(h, num_labels) for k in self.aux_weights})
        self.modality_dropout_final = b.get("modality_dropout_final")
        self.dropout_target = str(b.get("modality_dropout_target", "uniform"))
        odds = dict(b.get("modality_dropout_weights") or {})
        self.register_buffer("dropout_odds", torch.tensor([float(odds.get(k, 1.0)) for k in self.names]),
                             persistent=False)
        # running aux-head accuracy per modality (modality_dropout_target=stronger); saved with the weights so a
        # resumed run continues with the same values
        self.register_buffer("modality_strength", torch.full((len(self.names),), 1.0 / num_labels))
        self.ogm_alpha, self.ogm_noise = float(b.get("ogm_alpha", 0.0)), bool(b.get("ogm_noise", True))
        self.training_progress = 0.0  # set by the trainer before each step: drives the modality-dropout schedule
        needs_aux = self.dropout_target == "stronger" or self.ogm_alpha > 0
        if multi and needs_aux and len(self.aux_weights) != len(self.names):
            raise ValueError("model.modality_dropout_target=stronger and model.ogm_alpha need an auxiliary head for "
                             "every modality (model.aux_loss_weight > 0)")

    def _heads_by_name(self) -> Dict[str, nn.Module]:
        if self.fusion == Fusion.late:
            return {n: (self.extra_heads[n] if n in self.extra_names else getattr(self, f"{n}_head"))
                    for n in self.names}
        return dict(self.aux_heads.items()) if self.aux_weights else {}

    # ------------------------------------------------------------------------------------------------- masks
    @staticmethod
    def _mask(value: Mask, batch: int, device: torch.device) -> torch.Tensor:
        """A per-sample bool mask; a Python bool applies to the whole batch (eval ablations)."""
        if isinstance(value, bool):
            return torch.full((batch,), value, dtype=torch.bool, device=device)
        return value.to(device=device, dtype=torch.bool).reshape(batch)

    def current_modality_dropout(self) -> float:
        return balance.scheduled_rate(self.modality_dropout, self.modality_dropout_final, self.training_progress)

    def _modality_dropout(self, *masks: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """With probability ``modality_dropout`` (scheduled), hide one modality of a sample that has at least two:
        chosen among those present uniformly, by fixed odds, or in proportion to their running strength. A sample
        never loses all of its modalities."""
        rate = self.current_modality_dropout()
        if not self.training or rate <= 0:
            return masks
        avail = torch.stack(masks, dim=1)
        drop = (avail.sum(dim=1) >= 2) & (torch.rand(avail.shape[0], device=avail.device) < rate)
        odds = self.modality_strength if self.dropout_target == "stronger" else self.dropout_odds
        choice = balance.hide_choice(avail, odds)
        hide = torch.nn.functional.one_hot(choice, avail.shape[1]).bool() & drop[:, None]
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
                extra_present: Optional[Dict[str, Mask]] = None, labels: Optional[torch.Tensor] = None,
                modes_present: Optional[Sequence[Dict[str, Mask]]] = None) -> Any:
        """Logits ``[B, num_labels]``. ``extra_inputs[name]``: the collated tensors of each non-built-in modality;
        ``extra_present[name]`` its presence mask (default: present). With ``labels`` (training), returns
        ``(logits, aux)`` where ``aux`` maps each modality with an auxiliary head to ``(its logits, its presence
        mask)``; the labels also drive OGM-GE and the running modality strengths. With ``modes_present`` (eval
        only: a list of ``{modality: mask}``), returns one logits tensor per entry, the encoders run once
        (:func:`forward_modes`)."""
        batch = (pixel_values if self.image_encoder is not None else input_ids).shape[0]
        device = pixel_values.device
        if sorted(extra_inputs or {}) != sorted(self.extra_names):
            raise ValueError(f"the model takes the modalities {self.extra_names} besides image and text, "
                             f"got {sorted(extra_inputs or {})}")
        if modes_present is not None:
            if self.training:
                raise RuntimeError("modes_present is for evaluation (model.eval()): training hides modalities")
            feats, tokens = self._encode(pixel_values, input_ids, attention_mask, extra_inputs or {})
            return [self._fuse_present(feats, [self._mask(p.get(k, True), batch, device) for k in self.names],
                                       tokens, attention_mask) for p in modes_present]
        given = {"image": has_image, "text": has_text, **(extra_present or {})}
        present = [self._mask(given.get(k, True), batch, device) for k in self.names]
        masks = self._modality_dropout(*present)  # before the encoders: the order of random draws, as always
        feats, tokens = self._encode(pixel_values, input_ids, attention_mask, extra_inputs or {})
        aux = None
        if labels is not None and self.training:
            aux = self._aux(feats, dict(zip(self.names, present)), labels)
            feats = self._modulate(feats, aux, labels)
        logits = self._fuse_present(feats, masks, tokens, attention_mask)
        return logits if labels is None else (logits, aux or {})

    def _fuse_present(self, feats: List[torch.Tensor], masks: Sequence[torch.Tensor], tokens: Dict[str, torch.Tensor],
                      attention_mask: torch.Tensor) -> torch.Tensor:
        """The fusion head over the features, each absent modality (mask false) swapped for its missing embedding."""
        missing = [self._missing(k) for k in self.names]
        feats = [torch.where(m[:, None], f, e.to(f.dtype).expand_as(f)) for f, m, e in zip(feats, masks, missing)]
        return self._fuse(feats, masks, tokens, attention_mask)

    def _missing(self, name: str) -> torch.Tensor:
        return self.missing_extra[name] if name in self.extra_names else getattr(self, f"missing_{name}")

    def _encode(self, pixel_values, input_ids, attention_mask, extra_inputs) -> Tuple[List[torch.Tensor], Dict]:
        """Projected pooled features per modality (in ``self.names`` order) and the token/spatial states that
        cross-attention needs."""
        feats, tokens = [], {}
        if self.image_encoder is not None:
            image_pooled, tokens["image"] = self.image_encoder(pixel_values)
            feats.append(self.image_proj(image_pooled))
        dtype = feats[0].dtype if feats else None
        if self.text_encoder is not None:
            text_pooled, tokens["text"] = self.text_encoder(input_ids, attention_mask)
            feats.append(self.text_proj(text_pooled if dtype is None else text_pooled.to(dtype)))
        dtype = feats[0].dtype if feats else None
        for k in self.extra_names:
            f = self.extra_encoders[k](extra_inputs[k])
            feats.append(self.extra_proj[k](f if dtype is None else f.to(dtype)))
            dtype = feats[0].dtype
        return feats, tokens

    def _aux(self, feats: List[torch.Tensor], present: Dict[str, torch.Tensor],
             labels: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Each auxiliary head on its modality's own features (before modality dropout: the encoder saw the input),
        and the running strengths updated from the batch."""
        heads = self._heads_by_name()
        by_name = dict(zip(self.names, feats))
        aux = {k: (heads[k](by_name[k]), present[k]) for k in self.aux_weights}
        if aux and self.dropout_target == "stronger":
            scores = balance.true_class_scores({k: v[0] for k, v in aux.items()}, present, labels)
            with torch.no_grad():
                now = torch.stack([scores[k] for k in self.names]).to(self.modality_strength.dtype)
                self.modality_strength.mul_(balance.STRENGTH_MOMENTUM).add_((1 - balance.STRENGTH_MOMENTUM) * now)
        return aux

    def _modulate(self, feats: List[torch.Tensor], aux: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                  labels: torch.Tensor) -> List[torch.Tensor]:
        """OGM-GE: scale the dominant modality's gradient along the fusion path (its auxiliary head, trained on the
        same features, is not modulated)."""
        if self.ogm_alpha <= 0 or len(self.names) < 2:
            return feats
        scores = balance.true_class_scores({k: v[0] for k, v in aux.items()}, {k: v[1] for k, v in aux.items()},
                                           labels)
        factors = balance.ogm_factors(scores, self.ogm_alpha)
        return [balance.scale_grad(f, factors[k].expand(f.shape[0]), self.ogm_noise)
                for k, f in zip(self.names, feats)]

    def _fuse(self, feats: List[torch.Tensor], masks: Sequence[torch.Tensor], tokens: Dict[str, torch.Tensor],
              attention_mask: torch.Tensor) -> torch.Tensor:
        dtype = feats[0].dtype
        if self.fusion == Fusion.concat:
            return self.head(torch.cat(feats, dim=1))
        if self.fusion == Fusion.late:
            w = self._availability(masks, dtype)
            heads = self._heads_by_name()
            logits = sum(w[:, i:i + 1] * heads[k](f) for i, (k, f) in enumerate(zip(self.names, feats)))
            return logits / w.sum(dim=1, keepdim=True)
        if self.fusion == Fusion.gated:
            avail = self._availability(masks, dtype) > 0
            scores = self.gate(torch.cat(feats, dim=1)).masked_fill(~avail, float("-inf"))
            g = torch.softmax(scores.float(), dim=1).to(dtype)
            return self.head(sum(g[:, i:i + 1] * f for i, f in enumerate(feats)))
        return self._attention(feats, tokens["image"], tokens["text"], attention_mask, masks[0], masks[1])

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
    def enable_grad_checkpointing(self) -> None:
        """train.grad_checkpointing: recompute the backbones' activations in backward instead of keeping them
        (the image trunk stage by stage, the text encoder layer by layer through Hugging Face's own switch)."""
        if self.image_encoder is not None:
            self.image_encoder.set_grad_checkpointing(True)
        if self.text_encoder is not None:
            backbone, kwargs = self.text_encoder.backbone, {"use_reentrant": False}
            if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def param_groups(self, lr_image: float, lr_text: float, lr_head: float, weight_decay: float) -> List[Dict]:
        """Optimizer groups named image / text / head; biases, norms and embeddings vectors get no weight decay.
        Parameters frozen by learning rate (``train.freeze_backbones_steps``) are included so that unfreezing later
        needs no new optimizer; locked ones (``requires_grad=False``: ``model.text.trainable_layers``) are not: they
        never train, so they get no optimizer state."""
        encoders = {"image": self.image_encoder, "text": self.text_encoder}
        seen = {id(p) for m in encoders.values() if m is not None for p in m.parameters()}
        parts = [(name, [p for p in m.parameters() if p.requires_grad] if m is not None else [], lr)
                 for (name, m), lr in zip(encoders.items(), (lr_image, lr_text))]
        parts.append(("head", [p for p in self.parameters() if id(p) not in seen], lr_head))
        groups = []
        for name, params, lr in parts:
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            if decay:
                groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
            if no_decay:
                groups.append({"name": name, "params": no_decay, "lr": lr, "weight_decay": 0.0})
        return groups
