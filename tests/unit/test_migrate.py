"""migrate-store's rules (synapse_acme/migrate.py) between two in-memory stores: copy, copy
nothing twice, keep a newer certificate unless forced, never replace an account key; and
connection strings printed without their password. The real thing (file store -> PostgreSQL ->
file store, Pebble's certificate, the CLI) is tests/integration/test_migrate_store.py."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from twisted.internet import defer

from synapse_acme import migrate
from synapse_acme.crypto import generate_private_key_pem
from synapse_acme.model import AccountRecord
from synapse_acme.testing.store import MemoryStore
from tests.certs import TestCA
from tests.deferreds import result_of

NOW = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
RECORD = AccountRecord("https://ca.test/acct/1", "https://ca.test/dir", "thumb")


def run(source: MemoryStore, target: MemoryStore, force: bool = False) -> migrate.Summary:
    return result_of(defer.ensureDeferred(migrate.migrate(source, target, force=force)))


def words(summary: migrate.Summary) -> dict[str, str]:
    """What happened to each entry, the account's parts left out when there is none."""
    return {line.what: line.word for line in summary.lines if line.word != migrate.NONE}


@pytest.fixture
def ca() -> TestCA:
    return TestCA(now=NOW)


def test_copies_everything_then_nothing_twice(ca: TestCA) -> None:
    source, target = MemoryStore(), MemoryStore()
    a, b = ca.issue(["a.example"]), ca.issue(["b.example"], not_before=NOW - DAY)
    result_of(source.save("a.example", a))
    result_of(source.save("b.example", b))
    account_key = generate_private_key_pem()
    result_of(source.create_account_key(account_key))
    result_of(source.save_account_record(RECORD))
    first = run(source, target)
    assert words(first) == {
        "a.example": "COPIED",
        "b.example": "COPIED",
        "account key": "COPIED",
        "account record": "COPIED",
    }
    assert first.ok and str(first).startswith("certificates: 2 copied, 0 replaced, 0 unchanged")
    assert result_of(target.load("a.example")) == a and result_of(target.load("b.example")) == b
    assert result_of(target.load_account_key()) == account_key
    assert result_of(target.load_account_record()) == RECORD
    saves = target.saves
    again = run(source, target)
    assert set(words(again).values()) == {"UNCHANGED"} and again.ok
    assert target.saves == saves  # nothing written
    assert b"PRIVATE KEY" not in "".join(str(line) for line in first.lines).encode()


def test_keeps_a_newer_certificate_unless_forced(ca: TestCA) -> None:
    source, target = MemoryStore(), MemoryStore()
    old, new = ca.issue(["a.example"], not_before=NOW - DAY), ca.issue(["a.example"])
    result_of(source.save("a.example", old))
    result_of(target.save("a.example", new))
    kept = run(source, target)
    assert words(kept) == {"a.example": "KEPT"} and not kept.ok
    assert "--force replaces it" in kept.lines[0].detail
    assert result_of(target.load("a.example")) == new
    forced = run(source, target, force=True)
    assert words(forced) == {"a.example": "REPLACED"} and forced.ok
    assert result_of(target.load("a.example")) == old
    # An older certificate in the target is replaced without --force.
    result_of(source.save("a.example", new))
    assert words(run(source, target)) == {"a.example": "REPLACED"}


def test_a_failed_save_is_reported_and_the_rest_goes_on(ca: TestCA) -> None:
    source, target = MemoryStore(), MemoryStore()
    for name in ("a.example", "b.example"):
        result_of(source.save(name, ca.issue([name])))
    target.fail_next_save()
    summary = run(source, target)
    assert words(summary) == {"a.example": "FAILED", "b.example": "COPIED"} and not summary.ok
    assert summary.lines[-2:] == [
        migrate.Line("NONE", "account key", "none in the source"),
        migrate.Line("NONE", "account record", "none in the source"),
    ]
    assert "ENOSPC" in summary.lines[0].detail
    assert str(summary).startswith(
        "certificates: 1 copied, 0 replaced, 0 unchanged, 0 kept, 1 failed"
    )


def test_an_account_key_is_never_replaced() -> None:
    source, target = MemoryStore(), MemoryStore()
    result_of(source.create_account_key(generate_private_key_pem()))
    result_of(source.save_account_record(RECORD))
    theirs = generate_private_key_pem()
    result_of(target.create_account_key(theirs))
    summary = run(source, target, force=True)
    assert words(summary) == {"account key": "KEPT", "account record": "FAILED"}
    assert result_of(target.load_account_key()) == theirs
    assert result_of(target.load_account_record()) is None


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://acme:s3cret@db.example:5432/synapse", "postgresql://acme:***@db.example:5432/synapse"),
        ("postgres://acme@db/synapse?sslmode=require&password=s3cret", "postgres://acme@db/synapse?sslmode=require&password=***"),
        ("host=db user=u password=s3cret dbname=s", "host=db user=u password=*** dbname=s"),
        ("host=db password = 's3 cret' dbname=x", "host=db password = *** dbname=x"),
        ("postgresql:///synapse", "postgresql:///synapse"),
    ],
)  # fmt: skip
def test_connection_strings_are_shown_without_their_password(dsn: str, shown: str) -> None:
    assert migrate.is_postgres_dsn(dsn)
    assert migrate.redact_dsn(dsn) == shown
    assert migrate.password_of(dsn) in (None, "s3cret", "s3 cret")


@pytest.mark.parametrize("bad", ["/var/lib/acme", "mysql://x@y/z", "https://db.example/"])
def test_what_is_not_a_connection_string(bad: Any) -> None:
    assert not migrate.is_postgres_dsn(bad)


def test_an_empty_source_is_no_success() -> None:
    summary = run(MemoryStore(), MemoryStore())
    assert summary.empty and not summary.ok
    assert str(summary) == "the source holds no certificate and no account: is it the right store?"
