"""Optimizer (AdamW, one param group per model part), warmup + cosine schedule, loss."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mmcat.train.speed import adamw_kwargs

BACKBONE_GROUPS = ("image", "text")


def build_optimizer(model: nn.Module, cfg: Any, device_type: str = "cpu",
                    use_deepspeed: bool = False) -> torch.optim.Optimizer:
    """One optimizer for the one module (DeepSpeed needs that); per-part learning rates via param groups; fused
    AdamW when the parameters will live on CUDA (``mmcat.train.speed.adamw_kwargs``)."""
    t = cfg.train
    groups = model.param_groups(lr_image=t.lr_image, lr_text=t.lr_text, lr_head=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, **adamw_kwargs(device_type, use_deepspeed))


def _lr_factor(step: int, warmup: int, total: int, frozen_until: int) -> float:
    if step < frozen_until:
        return 0.0
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> LambdaLR:
    """Linear warmup then cosine decay; backbone groups get factor 0 for ``train.freeze_backbones_steps`` steps.

    Freezing by learning rate, not ``requires_grad``: DDP and DeepSpeed fix which parameters take gradients when the
    model is wrapped, so the set cannot change mid-run; with lr 0 AdamW leaves the weights (and decay) untouched.
    """
    t = cfg.train
    lambdas = [
        partial(_lr_factor, warmup=t.warmup_steps, total=total_steps,
                frozen_until=t.freeze_backbones_steps if g.get("name") in BACKBONE_GROUPS else 0)
        for g in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lambdas)


def total_optimizer_steps(cfg: Any, batches_per_epoch: int) -> int:
    """Full accumulation windows only: windows run across epoch ends, and a trailing partial window is not run."""
    steps = max(1, batches_per_epoch * cfg.train.epochs // cfg.train.grad_accum)
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps


def build_loss(cfg: Any, label_counts: Optional[Sequence[int]]) -> nn.Module:
    """Cross-entropy with optional label smoothing and inverse-frequency class weights (from the manifest)."""
    weight = None
    if cfg.train.class_weights and label_counts:
        counts = torch.tensor([max(int(c), 1) for c in label_counts], dtype=torch.float32)
        weight = counts.sum() / (len(counts) * counts)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
