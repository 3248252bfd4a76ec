"""Reading Deferreds that fire synchronously (fakes, Clock, StubTreq already flushed)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure


def outcome_of(d: defer.Deferred[Any]) -> Any:
    """What ``d`` fired with: its value, or the Failure itself (not raised)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def result_of(d: defer.Deferred[Any]) -> Any:
    """The value ``d`` fired with, re-raising its failure."""
    out = outcome_of(d)
    if isinstance(out, Failure):
        out.raiseException()
    return out


def failure_of(d: defer.Deferred[Any], kind: type[BaseException]) -> BaseException:
    """The exception ``d`` failed with, which must be a ``kind``."""
    out = outcome_of(d)
    assert isinstance(out, Failure), f"expected a failure, got {out!r}"
    assert out.check(kind), f"expected {kind.__name__}, got {out.value!r}"
    return out.value
