"""Cooperative stopping: SIGINT and SIGTERM only raise flags, which the training loop reads between steps.

A signal handler that raises (Python's own `KeyboardInterrupt`) can land anywhere, including inside JAX's
garbage-collection callback, where the exception is swallowed and printed as "Exception ignored in:
_xla_gc_callback ... KeyboardInterrupt", and the program goes on as if nothing happened. So while training,
the handlers raise nothing:

1. The first signal asks for a stop: the loop finishes the step in flight, does what is due at that step
    (logging, a scheduled evaluation), writes a checkpoint and returns `status="interrupted"`.
2. The second asks for a stop at once: the loop skips the evaluations and the checkpoint it has not begun
    (the run resumes from its last checkpoint), and the handlers that were there before are put back.
3. So a third signal goes to those handlers (Python's default for SIGINT raises `KeyboardInterrupt`), for a
    program stuck somewhere the loop never looks.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["StopSignals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager under which SIGINT and SIGTERM only set flags (`requested`, `received`, `urgent`).

    `fit` enters one for its loop (`handle_signals=True`). A program that trains and then does more work
    (saving the final model, plotting) can enter one around all of it and pass it to `fit(..., stop=...)`
    and `train_run(..., stop=...)`, so that a signal during that work is a flag too, not an exception.
    Handlers can only be installed from the main thread; elsewhere (or with `enabled=False`) nothing is
    installed and the flags change only through `request()`.

    **Arguments:**

    - `enabled`: install the handlers. (Keyword only argument.)
    """

    def __init__(self, *, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        #: The first signal received (or passed to `request`), `None` before: a stop is asked for.
        self.received: int | None = None
        #: A second one came: stop without further evaluations or checkpoints.
        self.urgent = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop has been asked for."""
        return self.received is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop as a signal would (the second call asks for an urgent one)."""
        if self.received is None:
            self.received = signum
        else:
            self.urgent = True

    def _handle(self, signum: int, frame: Any) -> None:
        # Only flags, never an exception (see the module's docstring); the second signal hands the signals
        # back to the handlers that were there before.
        self.request(signum)
        if self.urgent:
            self.restore()

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were installed before `__enter__` (done on exit too)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: Any) -> bool:
        self.restore()
        return False
