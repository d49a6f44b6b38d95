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


# ------------------------------------------------------------------------------------------------ torch.compile
TEXT_BUCKET = 16  # train.compile pads text batches to a multiple of this many tokens


def bucket_length(length: int, max_length: int, multiple: int = TEXT_BUCKET) -> int:
    """The padded text length of a batch whose longest text has ``length`` tokens: the next multiple of
    ``multiple``, but never past ``max(length, max_length)`` (the tokenizer's cap is a bucket of its own), so a
    run sees at most ``ceil(max_length / multiple)`` text shapes instead of one per distinct longest text."""
    return min(-(-length // multiple) * multiple, max(length, max_length))


def pad_text_to_bucket(batch: Dict[str, Any], pad_id: int, max_length: int,
                       multiple: int = TEXT_BUCKET) -> Dict[str, Any]:
    """``batch`` with ``input_ids`` / ``attention_mask`` right-padded to :func:`bucket_length` (pad tokens with
    mask 0, which the encoder ignores, as the tokenizer's own dynamic padding does)."""
    ids = batch.get("input_ids")
    if ids is None:
        return batch
    extra = bucket_length(ids.shape[1], max_length, multiple) - ids.shape[1]
    if extra <= 0:
        return batch
    pad = torch.nn.functional.pad
    return {**batch, "input_ids": pad(ids, (0, extra), value=pad_id),
            "attention_mask": pad(batch["attention_mask"], (0, extra), value=0)}


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """train.compile: compile ``model`` in place (``nn.Module.compile``: the same module, so its state dict keys,
    checkpoints and artifacts are unchanged). Shapes are static first; a dimension seen with a second size (eval's
    last, smaller batch; unbucketed eval text) becomes dynamic in one recompile (PyTorch's automatic dynamic
    shapes), so recompiles stay bounded; ``compiled_graphs`` counts them."""
    model.compile(backend=backend)
    return model


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (the first compile and each recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
