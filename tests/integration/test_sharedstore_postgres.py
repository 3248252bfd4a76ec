"""Database mode's start-up work (:func:`synapse_acme.sharedstore.open_shared_store`) against
a real PostgreSQL: the account key is created once and then loaded by every process, a key file
that cannot be used is a ConfigError naming ``database.key_files``, an unreachable database a
StoreError naming it without its password, and nothing is left waiting on the way out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from synapse_acme.account import key_thumbprint
from synapse_acme.config import AcmeConfig, parse_acme_config
from synapse_acme.errors import ConfigError, StoreError
from synapse_acme.pgstore import generate_key_file
from synapse_acme.sharedstore import dsn_for, open_shared_store
from synapse_acme.testing.postgres import InlineDatabase, PostgresServer
from tests.deferreds import result_of


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


def config_for(tmp_path: Path, database: dict[str, object]) -> AcmeConfig:
    return parse_acme_config(
        {"domain": "a.example.test", "storage": str(tmp_path / "state"), "database": database},
        base_dir=str(tmp_path),
    )


def args_of(dsn: str) -> dict[str, str]:
    words = dict(part.split("=", 1) for part in dsn.split())
    return {"user": words["user"], "host": words["host"], "port": words["port"],
            "database": words["dbname"]}  # fmt: skip


def test_account_key_created_once_then_loaded_by_every_process(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    dsn = postgres.create_database()
    generate_key_file(str(tmp_path / "s.key"))
    config = config_for(tmp_path, {"args": args_of(dsn), "key_files": "s.key"})
    first = open_shared_store(config, MemoryReactorClock(), ["a.example.test"])
    second = open_shared_store(config, MemoryReactorClock(), ["a.example.test"])
    try:
        assert key_thumbprint(first.account_key) == key_thumbprint(second.account_key)
        assert first.bundles == {"a.example.test": None}
        assert first.where == f"{args_of(dsn)['host']}:5432/{args_of(dsn)['database']}"
        # The key is sealed at rest, never in the database in plain text.
        inline = InlineDatabase(dsn)
        rows = result_of(inline.interaction(lambda c: (c.execute(
            "SELECT key_sealed FROM synapse_acme_account_key"), c.fetchall())[1]))  # fmt: skip
        inline.close()
        assert len(rows) == 1 and b"PRIVATE KEY" not in bytes(rows[0][0])
    finally:
        for shared in (first, second):
            shared.backend.database.close()


def test_a_key_file_that_cannot_be_used_names_database_key_files(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    dsn = postgres.create_database()
    (tmp_path / "short.key").write_text("c2hvcnQ=\n")
    for files in (["missing.key"], ["short.key"]):
        config = config_for(tmp_path, {"args": args_of(dsn), "key_files": files})
        with pytest.raises(ConfigError) as e:
            open_shared_store(config, MemoryReactorClock(), ["a.example.test"])
        assert str(e.value).startswith("acme.database.key_files: ")


def test_an_unreachable_database_is_a_store_error_without_the_password(tmp_path: Path) -> None:
    generate_key_file(str(tmp_path / "s.key"))
    url = f"postgresql://acme:hunter2@/db?host={tmp_path}/nothing-here"
    config = config_for(tmp_path, {"url": url, "key_files": "s.key", "connect_timeout": 2})
    assert config.database is not None and "connect_timeout=2" in dsn_for(config.database)
    with pytest.raises(StoreError) as e:
        open_shared_store(config, MemoryReactorClock(), ["a.example.test"])
    text = str(e.value)
    assert text.startswith("cannot reach the PostgreSQL store ") and "acme.database" in text
    assert "hunter2" not in text


def test_a_newer_schema_is_refused(postgres: PostgresServer, tmp_path: Path) -> None:
    dsn = postgres.create_database()
    generate_key_file(str(tmp_path / "s.key"))
    config = config_for(tmp_path, {"args": args_of(dsn), "key_files": "s.key"})
    open_shared_store(config, MemoryReactorClock(), []).backend.database.close()
    inline = InlineDatabase(dsn)
    result_of(
        inline.interaction(lambda c: c.execute("UPDATE synapse_acme_schema SET version = 99"))
    )
    inline.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_shared_store(config, MemoryReactorClock(), [])
