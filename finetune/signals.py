"""SIGINT/SIGTERM: the first asks the loop to stop at the next step boundary; a second exits at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """Installed for the duration of training (main thread only); `received` is the first signal.

    `repeat_grace_s`: a signal within that many seconds of the first is taken as the same request
    (under DDP a launcher may forward a signal that its workers got directly too)."""

    def __init__(self, repeat_grace_s: float = 0.0) -> None:
        self.received: int | None = None
        self.repeat_grace_s = repeat_grace_s
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.received is not None and time.monotonic() - self._received_at < self.repeat_grace_s:
            return
        if self.received is not None:
            # Second signal: the user insists. Die of it now, with the default action.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self._received_at = time.monotonic()
        log.warning("%s received: stopping after the current step and writing a checkpoint (send again to exit at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1) if self.received else 0
