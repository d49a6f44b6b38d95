"""Remedies for modality competition: when one modality (usually the text) is the easier signal, the fused loss is
minimised through it first and the other encoders get almost no gradient, so "the image half learns nothing".

Three mechanisms, each configured in ``model.*`` and measured in the README ("Both halves learn"):

- **auxiliary heads** (``aux_loss_weight``): a linear classifier per modality on its own projected features, trained
  with its own cross-entropy next to the fused loss, so every encoder is trained as if it were alone (late fusion
  reuses its per-modality heads; MMF / the Rakuten'20 multimodal winners do the same with unimodal branches);
- **modality dropout** (``modality_dropout``, ``modality_dropout_final``, ``modality_dropout_target``,
  ``modality_dropout_weights``): hiding a modality of a training sample, with a linear schedule and a choice of
  *which* one to hide: uniform, fixed odds, or in proportion to each modality's running aux-head accuracy (the
  stronger one is hidden more, so the fusion head learns to use the weaker one);
- **OGM-GE** (``ogm_alpha``, Peng et al., CVPR 2022, "Balanced Multimodal Learning via On-the-fly Gradient
  Modulation"): per batch, the modality whose aux head is more confident on the true class than the others' gets
  its fusion-path gradient scaled by ``1 - tanh(alpha * (ratio - 1))``, plus Gaussian noise of the gradient's own
  scale (the "generalisation enhancement"). Applied to the features where they enter the fusion head, so every
  encoder parameter's gradient is scaled alike and it works unchanged under DDP and DeepSpeed (no hooks on
  gradients that ZeRO partitions).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

# a modality's running aux-head strength is an exponential moving average over training batches
STRENGTH_MOMENTUM = 0.9


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a per-sample factor and optionally adds Gaussian noise
    with the gradient's own standard deviation (OGM-GE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: torch.Tensor, noise: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(factor)
        ctx.noise = noise
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (factor,) = ctx.saved_tensors
        modulated = factor[:, None].to(grad.dtype) < 1
        out = grad * factor[:, None].to(grad.dtype)
        if ctx.noise and bool(modulated.any()):
            out = out + torch.randn_like(grad) * grad.float().std().to(grad.dtype) * modulated
        return out, None, None


def scale_grad(x: torch.Tensor, factor: torch.Tensor, noise: bool) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor, noise)


def true_class_scores(aux_logits: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor],
                      labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per modality, the mean softmax probability of the true class over the samples that have it (a scalar; 0 when
    no sample has it). OGM-GE's discrepancy score and the strength that ``modality_dropout_target=stronger`` uses."""
    out = {}
    for name, logits in aux_logits.items():
        p = logits.detach().float().softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)
        m = masks[name].float()
        out[name] = (p * m).sum() / m.sum().clamp(min=1.0)
    return out


def ogm_factors(scores: Dict[str, torch.Tensor], alpha: float) -> Dict[str, torch.Tensor]:
    """OGM's coefficient per modality: ``1 - tanh(alpha * (ratio - 1))`` where ratio = its score over the mean score of
    the others is above 1 (the dominant modality), else 1. Generalises the paper's two-modality rule to N."""
    names = list(scores)
    out = {}
    for name in names:
        others = torch.stack([scores[o] for o in names if o != name]).mean()
        ratio = scores[name] / others.clamp(min=1e-6)
        out[name] = torch.where(ratio > 1, 1 - torch.tanh(alpha * (ratio - 1)), torch.ones_like(ratio))
    return out


def hide_choice(avail: torch.Tensor, odds: torch.Tensor) -> torch.Tensor:
    """Index of the modality to hide per sample, drawn among the available ones with probability proportional to
    ``odds`` ([N], positive): the Gumbel-max trick over log-odds."""
    gumbel = -torch.log(-torch.log(torch.rand(avail.shape, device=avail.device).clamp(1e-9, 1 - 1e-9)))
    scores = (torch.log(odds.to(avail.device).float().clamp(min=1e-6)) + gumbel).masked_fill(~avail, float("-inf"))
    return scores.argmax(dim=1)


def scheduled_rate(start: float, final: Optional[float], progress: float) -> float:
    """Linear schedule from ``start`` (first step) to ``final`` (last step); constant when ``final`` is None."""
    if final is None:
        return start
    return start + (float(final) - start) * min(max(progress, 0.0), 1.0)


def aux_losses(aux_logits: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor], labels: torch.Tensor,
               loss_fn: nn.Module) -> Dict[str, torch.Tensor]:
    """Per modality, the cross-entropy of its own head averaged over the samples that have the modality (class
    weights and label smoothing as the fused loss)."""
    kw = {"weight": getattr(loss_fn, "weight", None), "label_smoothing": getattr(loss_fn, "label_smoothing", 0.0)}
    out = {}
    for name, logits in aux_logits.items():
        per_sample = F.cross_entropy(logits.float(), labels, reduction="none", **kw)
        m = masks[name].float()
        out[name] = (per_sample * m).sum() / m.sum().clamp(min=1.0)
    return out


def aux_loss(aux_logits: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor], labels: torch.Tensor,
             weights: Dict[str, float], loss_fn: nn.Module) -> torch.Tensor:
    """The weighted sum of :func:`aux_losses`: what is added to the fused loss."""
    losses = aux_losses(aux_logits, masks, labels, loss_fn)
    return sum((weights[k] * v for k, v in losses.items()), torch.zeros((), device=labels.device))


def aux_weights(names: Sequence[str], default: float, overrides: Dict[str, float]) -> Dict[str, float]:
    """Per-modality aux-loss weight: ``overrides[name]`` else ``default``; modalities with weight 0 get no head."""
    return {n: float(overrides.get(n, default)) for n in names}

