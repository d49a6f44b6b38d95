"""Stop requests: SIGUSR1/SIGTERM (preemption) and SIGINT (Ctrl-C) ask the trainer to checkpoint and exit.

The handler only records the signal: checkpointing (or even logging) inside a signal handler could interrupt a
collective, a half-written file or the logging lock itself. The trainer polls the flag at every optimizer-step
boundary and between evaluation batches, all ranks agree on it in one collective, and then every rank saves
together. A second Ctrl-C raises ``KeyboardInterrupt`` at once, for a user who does not want to wait for the step.
"""
from __future__ import annotations

import signal
import types
from typing import Dict, Optional

# EX_TEMPFAIL from sysexits.h: "try again later" — launchers (slurm/train.sbatch) treat it as "requeue me".
REQUEUE_EXIT_CODE = 75
# 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C: not a failure, not a requeue either.
INTERRUPT_EXIT_CODE = 130
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Records that a stop was asked for; ``requested`` is polled by the loop."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        for sig in (*PREEMPT_SIGNALS, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without the checkpoint
        if self.signum is None or signum == signal.SIGINT:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """Ctrl-C is the user's own stop (no requeue); any other signal means "requeue me"."""
        return INTERRUPT_EXIT_CODE if self.signum == signal.SIGINT else REQUEUE_EXIT_CODE

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"
