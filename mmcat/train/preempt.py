"""Preemption: SIGUSR1/SIGTERM ask the trainer to finish the current step, checkpoint and exit for a requeue."""
from __future__ import annotations

import logging
import signal
import types
from typing import Optional

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "try again later" — launchers (slurm/train.sbatch) treat it as "requeue me".
REQUEUE_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Records that a preemption signal arrived; the loop polls it at optimizer-step boundaries.

    The handler only sets a flag: checkpointing inside a signal handler could interrupt a collective or a
    half-written file, so the loop finishes the step first and then saves on every rank together.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
        if self.signum is None:
            log.warning("received %s: will checkpoint after the current step and exit %d",
                        signal.Signals(signum).name, REQUEUE_EXIT_CODE)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
