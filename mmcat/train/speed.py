"""Speed settings of a training run that depend on the device: TF32, cuDNN autotuning, fused AdamW.

Each choice is a pure function of (device type, config, engine), so it is unit-tested on CPU; ``apply_backend_flags``
sets the chosen torch.backends flags. On CPU every choice is "off": the flags only affect CUDA kernels, and fused
AdamW exists for CUDA tensors only.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import torch

log = logging.getLogger(__name__)


def backend_flags(device_type: str, cfg: Any) -> Dict[str, bool]:
    """{"tf32": ..., "cudnn_benchmark": ...} for a run on ``device_type`` ("cuda", "cpu", ...)."""
    on_cuda = device_type == "cuda"
    return {"tf32": on_cuda and bool(cfg.train.tf32), "cudnn_benchmark": on_cuda and bool(cfg.train.cudnn_benchmark)}


def apply_backend_flags(device: torch.device, cfg: Any) -> Dict[str, bool]:
    """Set torch's TF32 / cuDNN-benchmark flags for this run on CUDA (left as they are elsewhere); returns the choice."""
    flags = backend_flags(torch.device(device).type, cfg)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = flags["tf32"]
        torch.backends.cudnn.allow_tf32 = flags["tf32"]
        torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    return flags


def adamw_kwargs(device_type: str, use_deepspeed: bool) -> Dict[str, Any]:
    """Extra ``torch.optim.AdamW`` arguments: ``fused=True`` (one kernel for all parameters instead of a loop of
    small ones) when the parameters live on CUDA. Not under DeepSpeed: its ZeRO optimizer takes the client
    optimizer apart (flat fp32 partitions, its own step), so the fused kernel would bring nothing and is untested
    there."""
    if device_type == "cuda" and not use_deepspeed:
        return {"fused": True}
    return {}
