"""The storage contract suite on the PostgreSQL store, against a real PostgreSQL, plus what only
that store promises (keys sealed at rest, key rotation, schema, the threaded driver on a real
reactor).

The contract tests are the ones in ``tests/unit/test_store_contract.py`` (every test there that
takes its ``store`` or ``backend`` fixture), collected again here with this module's fixtures:
one server per module, one fresh database per test, two handles on it (two processes), each on
its own connection, on a Clock. The server needs Debian's ``postgresql``: without it these tests
fail, never skip."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from synapse_acme.errors import StoreError
from synapse_acme.model import AccountRecord
from synapse_acme.pgstore import (
    NOTIFY_INTERVAL,
    SCHEMA_VERSION,
    KeyRing,
    PostgresBackend,
    generate_key_file,
    key_id_of,
    read_key_file,
)
from synapse_acme.testing.postgres import InlineDatabase, PostgresServer
from tests.deferreds import failure_of, result_of
from tests.unit import test_store_contract as contract
from tests.unit.test_store_contract import LEASE, Handles, bundle

# -- the contract suite, re-collected ---------------------------------------------------------

for _name, _test in vars(contract).items():
    if _name.startswith("test_") and callable(_test):
        if {"store", "backend"} & set(inspect.signature(_test).parameters):
            globals()[_name] = _test


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def keyring() -> KeyRing:
    return KeyRing((os.urandom(32),))


@pytest.fixture
def open_backend(postgres: PostgresServer, keyring: KeyRing) -> Iterator[Any]:
    """``open_backend(dsn, clock, keyring=None)``: a set-up handle, closed after the test."""
    opened: list[PostgresBackend] = []

    def open_(dsn: str, clock: Clock, ring: KeyRing | None = None) -> PostgresBackend:
        handle = PostgresBackend(InlineDatabase(dsn), clock, ring or keyring)
        result_of(handle.setup())
        opened.append(handle)
        return handle

    yield open_
    for handle in opened:
        result_of(handle.close())


@pytest.fixture
def store(postgres: PostgresServer, open_backend: Any) -> PostgresBackend:
    return open_backend(postgres.create_database(), Clock())  # type: ignore[no-any-return]


@pytest.fixture
def backend(postgres: PostgresServer, open_backend: Any) -> Handles:
    clock = Clock()
    clock.advance(1_000_000)
    dsn = postgres.create_database()
    return Handles(open_backend(dsn, clock), open_backend(dsn, clock), clock, NOTIFY_INTERVAL + 0.1)


# -- keys at rest ------------------------------------------------------------------------------


def _select(dsn: str, sql: str) -> list[Any]:
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def _execute(dsn: str, sql: str) -> None:
    conn = __import__("psycopg2").connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
        conn.commit()
    finally:
        conn.close()


def test_the_database_never_holds_a_private_key_in_plain_text(
    postgres: PostgresServer, open_backend: Any
) -> None:
    dsn = postgres.create_database()
    store = open_backend(dsn, Clock())
    b = bundle(1)
    result_of(store.save("a.example", b))
    account_key = b"-----BEGIN EC PRIVATE KEY-----\naccount\n-----END EC PRIVATE KEY-----\n"
    result_of(store.create_account_key(account_key))
    body = b"".join(b.key_pem.splitlines()[1:-1])
    dump = b""
    for table in ("certificates", "account_key"):
        for row in _select(dsn, f"SELECT * FROM synapse_acme_{table}"):
            dump += b"".join(
                bytes(v) if isinstance(v, memoryview) else str(v).encode() for v in row
            )
    assert b"PRIVATE KEY" not in dump and body[:24] not in dump and b"account" not in dump
    assert result_of(store.load("a.example")) == b
    assert result_of(store.load_account_key()) == account_key


def test_a_rotated_key_still_opens_old_rows(postgres: PostgresServer, open_backend: Any) -> None:
    dsn = postgres.create_database()
    old, new = os.urandom(32), os.urandom(32)
    result_of(open_backend(dsn, Clock(), KeyRing((old,))).save("a.example", bundle(1)))
    rotated = open_backend(dsn, Clock(), KeyRing((new, old)))
    assert result_of(rotated.load("a.example")) == bundle(1)  # sealed with the old key
    result_of(rotated.save("b.example", bundle(2)))
    assert dict(_select(dsn, "SELECT key, key_id FROM synapse_acme_certificates")) == {
        "a.example": key_id_of(old),
        "b.example": key_id_of(new),
    }
    # once the old key is dropped, what it sealed fails naming the key id (never loads garbage)
    only_new = open_backend(dsn, Clock(), KeyRing((new,)))
    err = failure_of(only_new.load("a.example"), StoreError)
    assert key_id_of(old) in str(err) and "not among" in str(err)
    assert result_of(only_new.load("b.example")) == bundle(2)


def test_a_sealed_key_moved_to_another_row_does_not_open(
    postgres: PostgresServer, open_backend: Any
) -> None:
    dsn = postgres.create_database()
    store = open_backend(dsn, Clock())
    result_of(store.save("a.example", bundle(1)))
    result_of(store.save("b.example", bundle(1)))
    _execute(
        dsn,
        "UPDATE synapse_acme_certificates SET key_sealed = "
        "(SELECT key_sealed FROM synapse_acme_certificates WHERE key = 'a.example') "
        "WHERE key = 'b.example'",
    )
    assert "does not decrypt" in str(failure_of(store.load("b.example"), StoreError))


def test_key_files(tmp_path: Any) -> None:
    path = str(tmp_path / "store.key")
    key_id = generate_key_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert key_id_of(read_key_file(path)) == key_id == KeyRing.from_files([path]).current_id
    (tmp_path / "short.key").write_text("c2hvcnQ=\n")
    err = failure_of_call(read_key_file, str(tmp_path / "short.key"))
    assert "not 32 bytes" in err and "c2hvcnQ" not in err
    assert "cannot read" in failure_of_call(read_key_file, str(tmp_path / "missing"))
    assert "key" not in repr(KeyRing((b"k" * 32,))).lower().replace("keyring", "")


def failure_of_call(f: Any, *args: Any) -> str:
    with pytest.raises(StoreError) as info:
        f(*args)
    return str(info.value)


# -- schema ------------------------------------------------------------------------------------


def test_schema_is_created_once_with_its_version(
    postgres: PostgresServer, open_backend: Any
) -> None:
    dsn = postgres.create_database()
    open_backend(dsn, Clock())
    open_backend(dsn, Clock())  # a second process: idempotent
    assert _select(dsn, "SELECT version FROM synapse_acme_schema") == [(SCHEMA_VERSION,)]
    _execute(dsn, f"UPDATE synapse_acme_schema SET version = {SCHEMA_VERSION + 1}")
    late = PostgresBackend(InlineDatabase(dsn), Clock(), KeyRing((os.urandom(32),)))
    assert "newer than" in str(failure_of(late.setup(), StoreError))
    result_of(late.close())


def test_lease_times_come_from_the_clock(postgres: PostgresServer, open_backend: Any) -> None:
    dsn = postgres.create_database()
    clock = Clock()
    clock.advance(500)
    result_of(open_backend(dsn, clock).acquire("a.example", "h1", LEASE))
    assert _select(dsn, "SELECT name, holder, expires_at FROM synapse_acme_leases") == [
        ("a.example", "h1", 500 + LEASE)
    ]


def test_account_record_damaged_in_the_database(
    postgres: PostgresServer, open_backend: Any
) -> None:
    dsn = postgres.create_database()
    store = open_backend(dsn, Clock())
    result_of(store.save_account_record(AccountRecord("https://ca/acct/1", "https://ca/d", "t")))
    _execute(dsn, "UPDATE synapse_acme_account SET record = '{}'")
    assert "damaged" in str(failure_of(store.load_account_record(), StoreError))


# -- the threaded driver, on a real reactor ----------------------------------------------------

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_REAL_REACTOR = """
import sys
from twisted.internet import defer, reactor, task
from synapse_acme.pgstore import KeyRing, PostgresBackend, ThreadedDatabase
from tests.unit.test_store_contract import bundle

ring = KeyRing((bytes.fromhex(sys.argv[2]),))

@defer.inlineCallbacks
def main():
    a = PostgresBackend(ThreadedDatabase(sys.argv[1], reactor), reactor, ring)
    b = PostgresBackend(ThreadedDatabase(sys.argv[1], reactor), reactor, ring)
    yield a.setup()
    yield b.setup()
    heard = defer.Deferred()
    a.subscribe(lambda key: heard.called or heard.callback(key))
    yield task.deferLater(reactor, 0.5, lambda: None)  # LISTEN is in place
    yield b.save("a.example", bundle(1))
    started = reactor.seconds()
    key = yield heard
    print("heard", key, "within", reactor.seconds() - started < 2.0)
    print("loaded", (yield a.load("a.example")) == bundle(1))
    took = yield a.acquire("a.example", "h1", 30)
    print("lease", took, (yield b.acquire("a.example", "h2", 30)))
    yield a.close()
    yield b.close()

def done(result):
    if isinstance(result, Exception) or hasattr(result, "printTraceback"):
        result.printTraceback()
    reactor.stop()

reactor.callWhenRunning(lambda: main().addBoth(done))
reactor.run()
"""


def test_threaded_driver_on_a_real_reactor(postgres: PostgresServer) -> None:
    """The production path: adbapi's thread pool and the LISTEN connection, on a running
    reactor, in another process (a test process cannot run a reactor twice)."""
    dsn = postgres.create_database()
    out = subprocess.run(
        [sys.executable, "-c", _REAL_REACTOR, dsn, os.urandom(32).hex()],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": _REPO},
    )
    assert out.stdout.split("\n")[:3] == [
        "heard a.example within True",
        "loaded True",
        "lease True False",
    ], out.stdout + out.stderr
