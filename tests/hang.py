"""A deadline for code that must not block (a FIFO opened for reading waits for a writer).

If the code under test regresses and blocks, the test fails with ``Hung`` after ``seconds``
instead of hanging the whole run: SIGALRM's handler raises, which abandons the blocking call.
Main thread only (signals are delivered there), which is where pytest runs tests.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class Hung(AssertionError):
    """The code under test blocked past its deadline."""


@contextlib.contextmanager
def deadline(seconds: int = 10) -> Iterator[None]:
    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
