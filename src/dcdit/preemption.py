"""Pre-emption: SIGTERM (how clusters stop jobs) and SIGINT (Ctrl-C) end a training run cleanly.

While :class:`StopSignals` is active a signal only sets a flag; the training loop asks
:meth:`StopSignals.agreed` at every step boundary, which reduces the flag over all ranks (a rank that
got the signal stops every rank at the same step, so rank 0's checkpoint holds the state all ranks
share). The loop then writes a checkpoint and raises :class:`TrainingInterrupted`; ``dcdit train``
exits with 128 + the signal number and prints the command that resumes the run. A second signal
while the step finishes acts at once (the default action: SIGINT raises KeyboardInterrupt, SIGTERM
ends the process), for when the checkpoint is not worth waiting for.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

from . import distributed as D

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; ``signum``, ``step``, ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} after step {step}: checkpoint {checkpoint} written; "
                         f"continue with the same command and --resume")


class StopSignals:
    """Context manager: SIGTERM / SIGINT set :attr:`signum` instead of ending the process. Outside the
    main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: act now
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, device) -> int:
        """The signal number any rank received (0 if none): a collective, called by every rank at the same step."""
        flag = torch.tensor(float(self.signum or 0), device=device)
        D.all_reduce_(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag)
