"""Training: one Accelerate loop for CPU, DDP, DeepSpeed and SLURM (setup.py builds a run, loop.py runs it)."""
from mmcat.train.preempt import REQUEUE_EXIT_CODE


def train(cfg) -> int:
    from mmcat.train.loop import train as _train

    return _train(cfg)


__all__ = ["REQUEUE_EXIT_CODE", "train"]
