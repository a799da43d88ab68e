"""Ctrl-C and typed keys while a reply streams to a terminal: shared by `run` and `chat`."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator, Optional


class StopOnInterrupt:
    """While a reply streams: the first Ctrl-C asks it to stop after the current token, a second
    one interrupts at once (KeyboardInterrupt). Call the object to ask whether to stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _terminal_fd() -> Optional[int]:
    """A descriptor of the terminal the person types at: stdin's, or stdout's when stdin is piped."""
    for stream in (sys.stdin, sys.stdout):
        try:
            if stream is not None and stream.isatty():
                return stream.fileno()
        except (OSError, ValueError, AttributeError):  # closed or replaced streams
            continue
    return None


@contextmanager
def keys_not_echoed() -> Iterator[None]:
    """While a reply streams on a terminal: typed keys (and ^C) are not echoed into it, and Ctrl-C
    does not flush output in flight; either would leave the live view's cursor out of step (an
    echoed ^C at the end of a full line moves the cursor a row down, and the redraw lands there).
    Keys typed meanwhile stay queued for whoever reads the terminal next."""
    saved = None
    fd = _terminal_fd()
    try:
        import termios

        if fd is not None:
            saved = termios.tcgetattr(fd)
    except ImportError:  # not a POSIX system: keys echo as they always do there
        pass
    except (termios.error, OSError):  # termios.error is not an OSError
        pass
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] = (quiet[3] & ~termios.ECHO) | termios.NOFLSH
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
