"""Database mode's helpers that need no database server (but psycopg2, the `postgres` extra, hence
not a unit test: the version matrix installs no extras): retrying an interaction whose pooled
connection was dead, and the holder name of the issuance lock."""

from __future__ import annotations

import os
import socket
from typing import Any

import psycopg2
import pytest
from twisted.internet import defer

from synapse_acme.sharedstore import CONNECTION_ATTEMPTS, ReconnectingDatabase, holder_id
from tests.deferreds import failure_of, result_of


class FlakyPool:
    """Fails the first ``failures`` interactions with ``error``, then runs them."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.closed = False

    def interaction(self, f: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.calls <= self.failures:
            return defer.fail(self.error)
        return defer.succeed(f("cursor"))

    def blocking(self, f: Any) -> defer.Deferred[Any]:
        return defer.succeed(f())

    def connect(self) -> str:
        return "connection"

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    "error",
    [
        psycopg2.OperationalError("server closed the connection unexpectedly"),
        psycopg2.InterfaceError("connection already closed"),
    ],
)
def test_a_dead_connection_is_tried_again(error: Exception) -> None:
    pool = FlakyPool(CONNECTION_ATTEMPTS - 1, error)
    db = ReconnectingDatabase(pool)  # type: ignore[arg-type]
    assert result_of(db.interaction(lambda cur: f"ran on {cur}")) == "ran on cursor"
    assert pool.calls == CONNECTION_ATTEMPTS


def test_a_database_that_stays_down_fails_after_the_last_attempt() -> None:
    pool = FlakyPool(100, psycopg2.OperationalError("connection refused"))
    db = ReconnectingDatabase(pool)  # type: ignore[arg-type]
    failure_of(db.interaction(lambda cur: None), psycopg2.OperationalError)
    assert pool.calls == CONNECTION_ATTEMPTS


def test_other_errors_are_not_repeated() -> None:
    pool = FlakyPool(1, psycopg2.IntegrityError("duplicate key"))
    db = ReconnectingDatabase(pool)  # type: ignore[arg-type]
    failure_of(db.interaction(lambda cur: None), psycopg2.IntegrityError)
    assert pool.calls == 1
    assert result_of(db.blocking(lambda: 7)) == 7 and db.connect() == "connection"
    db.close()
    assert pool.closed


def test_holder_names_host_and_process_and_differs_per_call() -> None:
    first, second = holder_id(), holder_id()
    host, pid, rand = first.rsplit(":", 2)
    assert host == socket.gethostname() and pid == str(os.getpid()) and len(rand) == 8
    assert first != second
