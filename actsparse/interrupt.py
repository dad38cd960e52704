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

__all__ = ["RunInterrupted", "Stopped", "StopSignals", "SIGNALS", "signal_name", "note_pending", "take_pending",
           "raise_if_pending", "in_import"]

# Signals that arrived outside a run's loop. The command line's handler raises an exception for
# them, but a library being imported at that moment may swallow it (a bare ``except:`` around an
# optional import): the signal is kept here too, so the next run loop, or the command's end,
# still acts on it. Process-wide by nature, as signal handlers are.
_pending: list[int] = []


def note_pending(signum: int) -> None:
    _pending.append(int(signum))


class Stopped(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) that stops a command outside a run's loop; ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)


def raise_if_pending() -> None:
    """Raise :class:`Stopped` for a signal noted while it could not be raised (during an import),
    at a point where stopping is safe (e.g. after the data are loaded, before training)."""
    signum = take_pending()
    if signum is not None:
        raise Stopped(signum)


def in_import(frame: FrameType | None) -> bool:
    """Whether ``frame`` (a signal handler's) is inside an import: an exception raised there can
    leave a half-initialised extension module behind (torch, numpy), so the signal waits."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def take_pending() -> int | None:
    """The first signal noted since the last call (and forget them all), or None."""
    first = _pending[0] if _pending else None
    _pending.clear()
    return first

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
        pending = take_pending()
        if pending is not None:  # arrived before the loop and was swallowed: stop after the first step
            self.signum = pending
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
