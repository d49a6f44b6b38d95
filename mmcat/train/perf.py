"""Throughput figures of a training run, nanoGPT style: model FLOPs per sample, samples/s per device, and MFU (the
share of the device's peak that the model's FLOPs reach).

FLOPs per sample are counted, not estimated by formula: ``torch.utils.flop_counter.FlopCounterMode`` over one
forward of a real batch (matmuls, convolutions, attention), x3 for forward + backward (backward costs about twice
the forward). MFU needs the device's dense peak, from a small table of known GPUs; on CPU or an unknown GPU it is
left out and only samples/s and FLOPs/s are logged.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

# dense (no sparsity) peak FLOP/s by GPU name fragment: (bf16/fp16, tf32); the first fragment found wins
PEAK_FLOPS = (
    ("H200", 989e12, 494.5e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.5e12),  # SXM / HBM3
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("A10G", 70e12, 35e12),  # AWS g5
    ("L4", 121e12, 60e12),
)


def peak_flops(device_name: str, precision: str, tf32: bool) -> Optional[float]:
    """Peak FLOP/s of ``device_name`` for a run at ``precision`` (bf16 / fp16 / no), or None when unknown (CPU,
    another GPU, or fp32 without TF32, whose peak is not what such runs are measured against)."""
    for fragment, half, tf32_peak in PEAK_FLOPS:
        if fragment in device_name:
            if precision in ("bf16", "fp16"):
                return half
            return tf32_peak if tf32 else None
    return None


def forward_flops(forward: Callable[[], Any]) -> int:
    """FLOPs of one call of ``forward`` (no gradients), as counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return int(counter.get_total_flops())


def training_flops_per_sample(forward: Callable[[], Any], batch_size: int) -> float:
    """Forward + backward FLOPs per sample: 3x the counted forward of a batch of ``batch_size``."""
    return 3.0 * forward_flops(forward) / max(batch_size, 1)


def perf_scalars(flops_per_sample: float, samples_per_s: float, world_size: int,
                 peak: Optional[float]) -> Dict[str, float]:
    """The ``perf/*`` TensorBoard scalars of one logging interval; ``samples_per_s`` is over all devices."""
    per_device = samples_per_s / max(world_size, 1)
    out = {"perf/samples_per_s_per_device": per_device, "perf/flops_per_sample": flops_per_sample,
           "perf/flops_per_s_per_device": flops_per_sample * per_device}
    if peak:
        out["perf/mfu"] = flops_per_sample * per_device / peak
    return out
