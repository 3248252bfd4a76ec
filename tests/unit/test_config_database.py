"""The ``database:`` block: how to reach PostgreSQL, the key files, and its clashes with other
keys; errors name the key and never show a password."""

from __future__ import annotations

from typing import Any

import pytest

from synapse_acme.config import DatabaseConfig, parse_acme_config
from synapse_acme.errors import ConfigError


def parse(database: Any, **more: Any) -> DatabaseConfig | None:
    config = parse_acme_config(
        {"domain": "a.example.org", "database": database, **more}, base_dir="/etc/acme"
    )
    return config.database


def error(database: Any, **more: Any) -> str:
    with pytest.raises(ConfigError) as e:
        parse(database, **more)
    return str(e.value)


def test_url_and_relative_key_files() -> None:
    db = parse({"url": "postgresql://acme:pw@db.example.org:5433/synapse", "key_files": "s.key"})
    assert db is not None
    assert db.dsn == "postgresql://acme:pw@db.example.org:5433/synapse"
    assert db.where == "db.example.org:5433/synapse"
    assert db.key_files == ("/etc/acme/s.key",)
    assert (db.connect_timeout, db.lease) == (10.0, 60.0)
    assert "pw" not in repr(db)


def test_args_in_the_style_of_synapse() -> None:
    db = parse(
        {
            "args": {
                "user": "synapse",
                "password": "it's \\ secret",
                "database": "synapse",
                "host": "/run/postgresql",
                "port": 5432,
                "cp_min": 5,
                "cp_max": 10,
            },
            "key_files": ["/k/new.key", "/k/old.key"],
            "connect_timeout": "3s",
            "lease": "2m",
        }
    )
    assert db is not None
    assert db.dsn == (
        "user='synapse' password='it\\'s \\\\ secret' dbname='synapse' host='/run/postgresql' "
        "port='5432'"
    )
    assert db.where == "/run/postgresql:5432/synapse"
    assert db.key_files == ("/k/new.key", "/k/old.key")
    assert (db.connect_timeout, db.lease) == (3.0, 120.0)


@pytest.mark.parametrize(
    ("block", "key", "shown"),
    [
        ({"url": "mysql://u:hunter2@h/d", "key_files": "k"}, "acme.database.url", "u:***@h"),
        ({"url": "postgresql://u:hunter2@h", "key_files": "k"}, "acme.database.url", "u:***@h"),
        ({"url": "postgresql://u:hunter2@h:99999/d", "key_files": "k"}, "acme.database.url", ""),
        ({"url": "postgresql://h/d"}, "acme.database.key_files", ""),
        ({"url": "postgresql://h/d", "key_files": []}, "acme.database.key_files", ""),
        (
            {"url": "postgresql://h/d", "args": {"dbname": "d"}, "key_files": "k"},
            "acme.database",
            "",
        ),
        ({"key_files": "k"}, "acme.database", ""),
        ({"args": {"user": "u", "password": "hunter2"}, "key_files": "k"}, "args.database", ""),
        ({"args": {"database": "d", "password": ["hunter2"]}, "key_files": "k"}, "password", ""),
        ({"args": {"Bad Key": "x", "database": "d"}, "key_files": "k"}, "acme.database.args", ""),
        ({"url": "postgresql://h/d", "key_files": "k", "lease": 2}, "acme.database.lease", "2"),
        ({"url": "postgresql://h/d", "key_files": "k", "pasword": "x"}, "pasword", "unknown key"),
        ("postgresql://u:hunter2@h/d", "acme.database", "got str"),
    ],
)
def test_bad_values_name_the_key_and_hide_passwords(block: Any, key: str, shown: str) -> None:
    text = error(block)
    assert key in text and shown in text
    assert "hunter2" not in text


def test_clashes_with_other_keys() -> None:
    db = {"url": "postgresql://h/d", "key_files": "k"}
    assert "acme.account_key_file" in error(db, account_key_file="/a.key")
    assert "acme.database" in error(
        db,
        external_certificates=True,
        tls_certificate_path="/c.pem",
        tls_private_key_path="/k.pem",
    )
    issuers = [{"url": "https://a.example/dir"}, {"url": "https://b.example/dir"}]
    assert "acme.issuers" in error(db, issuers=issuers)
    assert parse(db, issuers=issuers[:1]) is not None


def test_the_file_store_stays_the_default() -> None:
    assert parse_acme_config({"domain": "a.example.org"}).database is None
