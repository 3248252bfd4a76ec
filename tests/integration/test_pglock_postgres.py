"""The PostgreSQL issuance lock dies with its holder (synapse_acme/pglock.py), against a real
PostgreSQL: a holder killed with SIGKILL, a holder whose connection the server ends, release,
one dedicated connection per lock, and two names sharing one advisory key.

The contract suite (lease semantics on the backend's clock) runs on this backend in
test_store_contract_postgres.py; here the leases are long (an hour) so that only the advisory
lock can explain a hand-over. Needs Debian's ``postgresql``: without it these tests fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from synapse_acme.pglock import lock_key
from synapse_acme.pgstore import KeyRing, PostgresBackend
from synapse_acme.testing.postgres import InlineDatabase, PostgresServer
from tests.deferreds import result_of

HOUR = 3600.0
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def handles(postgres: PostgresServer) -> Iterator[Callable[..., tuple[str, list[Any]]]]:
    """``handles(clock, count=2, key_of=None)``: a fresh database and ``count`` handles on it
    (processes) on ``clock``, closed after the test; ``key_of`` replaces the advisory key."""
    opened: list[PostgresBackend] = []

    def open_(
        clock: Any, count: int = 2, key_of: Callable[[str], int] | None = None
    ) -> tuple[str, list[Any]]:
        dsn, ring = postgres.create_database(), KeyRing((os.urandom(32),))
        made = [PostgresBackend(InlineDatabase(dsn), clock, ring) for _ in range(count)]
        opened.extend(made)
        for handle in made:
            if key_of is not None:
                handle._locks.key_of = key_of
            result_of(handle.setup())
        return dsn, made

    yield open_
    for handle in opened:
        result_of(handle.close())


def _query(dsn: str, sql: str, *args: Any) -> list[Any]:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall()) if cur.description is not None else []
    finally:
        conn.close()


def _advisory_holders(dsn: str, name: str) -> list[int]:
    """The server pids of the sessions holding ``name``'s advisory lock."""
    key = lock_key(name)
    classid, objid = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    rows = _query(
        dsn,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
        "AND classid::bigint = %s AND objid::bigint = %s",
        classid,
        objid,
    )
    return [r[0] for r in rows]


def _locker_pid(dsn: str, name: str) -> Any:
    rows = _query(dsn, "SELECT locker_pid FROM synapse_acme_leases WHERE name = %s", name)
    return rows[0][0] if rows else None


_HOLDER = """
import os, sys
from twisted.internet import defer, reactor
from synapse_acme.pgstore import KeyRing, PostgresBackend, ThreadedDatabase

store = PostgresBackend(ThreadedDatabase(sys.argv[1], reactor), reactor, KeyRing((os.urandom(32),)))

def report(results):
    print(" ".join(str(r) for r in results), flush=True)

async def start():
    await store.setup()
    took = await store.acquire("a.example", "doomed-process", 3600)
    renewed = await store.renew("a.example", "doomed-process", 3600)
    await store.release("b.example", "doomed-process")  # not held: nothing happens
    return took, renewed

def run():
    d = defer.ensureDeferred(start())
    d.addCallbacks(report, lambda f: print(f.getErrorMessage(), flush=True))

reactor.callWhenRunning(run)
reactor.run()
"""


def test_a_holder_killed_with_sigkill_frees_the_lock_at_once(handles: Any) -> None:
    """The production path in the holder (ThreadedDatabase on a running reactor, lease one
    hour on the wall clock); SIGKILL; another handle acquires within seconds, while the dead
    holder's lease has almost the whole hour to run."""
    dsn, (other,) = handles(_WallClock(), count=1)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": _REPO},
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "True True"  # acquired, renewed
        assert result_of(other.acquire("a.example", "survivor", HOUR)) is False  # alive: no
        assert len(_advisory_holders(dsn, "a.example")) == 1
        killed_at = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        took_after = None
        while time.monotonic() - killed_at < 30:
            if result_of(other.acquire("a.example", "survivor", HOUR)) is True:
                took_after = time.monotonic() - killed_at
                break
            time.sleep(0.05)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert took_after is not None and took_after < 5.0, took_after  # the lease had ~1 h left
    (expires,) = _query(dsn, "SELECT holder, expires_at FROM synapse_acme_leases")
    assert expires[0] == "survivor"
    assert _advisory_holders(dsn, "a.example") == [_locker_pid(dsn, "a.example")]
    assert result_of(other.renew("a.example", "survivor", HOUR)) is True


class _WallClock:
    """The clock of a process beside the killed one: time.time, as the reactor's is."""

    def seconds(self) -> float:
        return time.time()


def _terminate_and_wait(dsn: str, name: str) -> None:
    """End the session holding ``name``'s advisory lock (an administrator, or a failover) and
    wait until the server freed the lock."""
    _query(dsn, "SELECT pg_terminate_backend(%s)", _locker_pid(dsn, name))
    deadline = time.monotonic() + 10
    while _advisory_holders(dsn, name) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _advisory_holders(dsn, name) == []


def test_a_lost_connection_frees_the_lock_and_the_row_decides_who_goes_on(handles: Any) -> None:
    dsn, (a, b) = handles(Clock())
    assert result_of(a.acquire("a.example", "h1", HOUR)) is True
    assert result_of(a.renew("a.example", "h1", HOUR)) is True
    _terminate_and_wait(dsn, "a.example")
    # Nobody took it meanwhile: the holder goes on in a new session, which holds the key again
    # (a server restart mid-issuance must not cost a second order).
    assert result_of(a.renew("a.example", "h1", HOUR)) is True
    assert _advisory_holders(dsn, "a.example") == [_locker_pid(dsn, "a.example")]
    assert result_of(b.acquire("a.example", "h2", HOUR)) is False
    # Lost again, and this time another process is quicker: it takes over at once (not in an
    # hour), and the old holder learns at its next renewal that it must stop.
    _terminate_and_wait(dsn, "a.example")
    assert result_of(b.acquire("a.example", "h2", HOUR)) is True
    assert result_of(a.renew("a.example", "h1", HOUR)) is False
    assert result_of(a.acquire("a.example", "h1", HOUR)) is False  # h2 is alive and holds it


def test_release_unlocks_at_once_and_each_lock_has_one_connection(handles: Any) -> None:
    dsn, (a, b) = handles(Clock())

    def sessions() -> int:
        (row,) = _query(
            dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        )
        return int(row[0]) - 1  # not this query's own

    base = sessions()
    names = [f"n{i}.example" for i in range(3)]
    for name in names:
        assert result_of(a.acquire(name, "h1", HOUR)) is True
    assert sessions() == base + 3
    assert result_of(a.acquire(names[0], "h1", HOUR)) is True  # extending reuses it
    assert result_of(a.renew(names[0], "h1", HOUR)) is True
    assert sessions() == base + 3
    assert len({_locker_pid(dsn, n) for n in names}) == 3  # three sessions, one per lock
    for name in names:
        result_of(a.release(name, "h1"))
        assert _advisory_holders(dsn, name) == []  # synchronously: no wait for a close
    assert sessions() == base
    assert _query(dsn, "SELECT count(*) FROM synapse_acme_leases") == [(0,)]
    assert result_of(b.acquire(names[0], "h2", HOUR)) is True
    assert _advisory_holders(dsn, names[0]) == [_locker_pid(dsn, names[0])]


def test_names_sharing_one_advisory_key_fall_back_to_the_lease(handles: Any) -> None:
    """A hash collision (forced here with one key for every name): the rows still decide who
    holds which name, and the name that could not get the key upgrades once it is free."""
    clock = Clock()
    dsn, (a, b, c) = handles(clock, count=3, key_of=lambda name: 42)
    assert result_of(a.acquire("one.example", "h1", HOUR)) is True
    assert result_of(b.acquire("two.example", "h2", HOUR)) is True  # key busy: the lease
    assert _locker_pid(dsn, "two.example") is None
    assert result_of(c.acquire("two.example", "h3", HOUR)) is False
    assert result_of(c.acquire("one.example", "h3", HOUR)) is False
    result_of(a.release("one.example", "h1"))
    assert result_of(b.renew("two.example", "h2", HOUR)) is True  # now with the key
    assert _locker_pid(dsn, "two.example") is not None
    assert result_of(c.acquire("two.example", "h3", HOUR)) is False
    clock.advance(HOUR)  # lease rules still hold: expired is free, even with the key held
    assert result_of(c.acquire("two.example", "h3", HOUR)) is True
    assert result_of(b.renew("two.example", "h2", HOUR)) is False


def test_lock_keys_are_stable_signed_bigints() -> None:
    assert lock_key("a.example") == lock_key("a.example") != lock_key("b.example")
    keys = {lock_key(f"n{i}.example") for i in range(10_000)}
    assert len(keys) == 10_000
    assert all(-(2**63) <= k < 2**63 for k in keys)


def test_a_server_restart_is_no_proof_that_the_holder_died() -> None:
    """A restart ends every session, a living holder's too: its lease, not the lost advisory
    lock, keeps the others out, and at its next renewal it goes on in a new session (an
    issuance under way is not stopped, so the restart costs no second order)."""
    with PostgresServer() as server:
        dsn, clock = server.create_database(), Clock()
        a, b = (PostgresBackend(InlineDatabase(dsn), clock, KeyRing((bytes(32),))) for _ in "ab")
        try:
            result_of(a.setup())
            assert result_of(a.acquire("a.example", "h1", HOUR)) is True
            server.restart()
            assert result_of(b.acquire("a.example", "h2", HOUR)) is False
            assert result_of(a.renew("a.example", "h1", HOUR)) is True  # a goes on
            assert _advisory_holders(dsn, "a.example") == [_locker_pid(dsn, "a.example")]
            assert result_of(b.acquire("a.example", "h2", HOUR)) is False
            server.restart()
            clock.advance(HOUR)  # a stopped renewing: its lease ran out
            assert result_of(b.acquire("a.example", "h2", HOUR)) is True
            assert result_of(a.renew("a.example", "h1", HOUR)) is False
            assert _advisory_holders(dsn, "a.example") == [_locker_pid(dsn, "a.example")]
        finally:
            result_of(a.close())
            result_of(b.close())
