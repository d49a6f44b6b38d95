"""Training: one Accelerate loop for CPU, DDP, DeepSpeed and SLURM (see loop.py)."""
from mmcat.train.preempt import REQUEUE_EXIT_CODE


def train(cfg) -> int:
    from mmcat.train.loop import train as _train

    return _train(cfg)


__all__ = ["REQUEUE_EXIT_CODE", "train"]
