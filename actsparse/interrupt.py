"""Stopping a run cleanly on SIGINT, SIGTERM and SIGHUP.

While a run's loop is going, these signals do not stop the process where it stands: the handler
only notes the signal, the loop finishes the step it is in, writes a checkpoint at that step (the
same resumable checkpoint a scheduled one is, so ``--resume`` continues bit for bit), and raises
:class:`RunInterrupted`. A second Ctrl-C stops at once (``KeyboardInterrupt``), keeping the last
checkpoint written. Under torchrun every rank gets the signal and the ranks agree on the step at
the next logged step, so they stop together.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

__all__ = ["RunInterrupted", "StopSignals", "SIGNALS", "signal_name"]

#: The signals a run stops on cleanly (SIGHUP where the platform has it).
SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class RunInterrupted(KeyboardInterrupt):
    """A run stopped on a signal after a complete step.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it. Attributes: ``signum``, the
    signal; ``step``, the last step done; ``checkpoint``, the checkpoint written at that step
    (``None`` when the run has no folder)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint {checkpoint} written at that step" if checkpoint is not None else ""
        super().__init__(f"stopped by {signal_name(signum)} after step {step}{where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(self.signum)


class StopSignals:
    """Context manager: while it is active, :data:`SIGNALS` set :attr:`signum` instead of stopping
    the process (a second SIGINT raises ``KeyboardInterrupt`` at once). Outside the main thread,
    where Python cannot install handlers, it does nothing. A signal whose handler is the caller's
    own (neither the default nor Python's Ctrl-C handler) is left to that handler. The handlers
    that were there are restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the person does not want to wait for the step
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                current = signal.getsignal(sig)
                if current in (signal.SIG_DFL, signal.default_int_handler) or getattr(current, "actsparse", False):
                    self._saved[sig] = current
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
