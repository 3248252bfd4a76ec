"""``synapse-acme migrate-store`` as an operator runs it: a certificate issued by real Pebble
into the file store, copied into a real PostgreSQL, then back into a new file store; the same
bundles and the same account key come out, a second run copies nothing, a newer certificate in
the target is kept unless --force, a running manager's store is never written, and neither keys
nor the connection string's password are ever printed."""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from twisted.internet.task import Clock

from synapse_acme.account import key_thumbprint, parse_account_key
from synapse_acme.interprocess import StoreLock
from synapse_acme.names import names_key
from synapse_acme.pgstore import KeyRing, PostgresBackend
from synapse_acme.store import FileStore
from synapse_acme.testing.pebble import PebbleCA
from synapse_acme.testing.postgres import InlineDatabase, PostgresServer
from tests.certs import TestCA
from tests.deferreds import result_of

CLI = [sys.executable, "-m", "synapse_acme"]
NAMES = ["migrate.example.test"]
KEY = names_key(NAMES)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, check=False)
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "PRIVATE KEY" not in out, out
    return r


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def issued(pebble: PebbleCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose file store holds a certificate Pebble issued, and its account."""
    directory = tmp_path_factory.mktemp("issued")
    cfg = pebble.write_acme_config(directory, NAMES)
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    return Path(cfg)


@pytest.fixture
def migrated(issued: Path, postgres: PostgresServer, tmp_path: Path) -> tuple[str, Path, list[str]]:
    """A new database into which ``issued``'s store was migrated: its DSN, the key file, and
    the arguments that migrated it (without --new-key-file)."""
    dsn, key_file = postgres.create_database(), tmp_path / "store.key"
    args = ["migrate-store", "-c", str(issued), "--to", dsn, "--key-file", str(key_file)]
    r = cli(*args, "--new-key-file")
    assert r.returncode == 0, r.stdout + r.stderr
    return dsn, key_file, args


def _thumbprint(path: Path) -> str:
    return key_thumbprint(parse_account_key(path.read_bytes(), str(path)))


def test_file_store_to_postgresql_and_back(
    issued: Path, postgres: PostgresServer, tmp_path: Path
) -> None:
    store = issued.parent / "store"
    dsn = postgres.create_database() + " password=hunter2-not-shown"
    key_file = tmp_path / "store.key"
    r = cli("migrate-store", "-c", str(issued), "--to", dsn, "--key-file", str(key_file),
            "--new-key-file")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"KEY FILE   created {key_file} (mode 0600, key id ")
    assert lines[2].startswith(f"Copying {store} -> ") and "password=***" in lines[2]
    assert lines[3].startswith(f"COPIED     {KEY}: serial ")
    assert lines[4].startswith("COPIED     account key: thumbprint ")
    assert lines[5].startswith("COPIED     account record: https://")
    assert lines[6] == (
        "Done: certificates: 1 copied, 0 replaced, 0 unchanged, 0 kept, 0 failed; "
        "account key copied; account record copied"
    )
    assert "hunter2" not in r.stdout + r.stderr

    # Again: nothing is copied twice.
    r = cli("migrate-store", "-c", str(issued), "--to", dsn, "--key-file", str(key_file))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == (
        "Done: certificates: 0 copied, 0 replaced, 1 unchanged, 0 kept, 0 failed; "
        "account key unchanged; account record unchanged"
    )

    # Back into a new file store: identical bundle, the same account key and record.
    back = tmp_path / "back"
    r = cli("migrate-store", "--from", dsn, "--key-file", str(key_file), "--to-dir", str(back))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"COPIED     {KEY}: serial " in r.stdout
    original = result_of(FileStore(str(store)).load(KEY))
    assert original is not None and result_of(FileStore(str(back)).load(KEY)) == original
    assert (back / "account.key").read_bytes() == (store / "account.key").read_bytes()
    assert _thumbprint(back / "account.key") == _thumbprint(store / "account.key")
    assert yaml.safe_load((back / "account.json").read_text()) == yaml.safe_load(
        (store / "account.json").read_text()
    )
    for private in (back / "account.key", back / "certificates" / KEY / "privkey.pem"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    # Without the key file the database is no use: nothing decrypts.
    other_key = tmp_path / "other.key"
    other_key.write_text("QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n")
    r = cli("migrate-store", "--from", dsn, "--key-file", str(other_key), "--to-dir",
            str(tmp_path / "nope"))  # fmt: skip
    assert r.returncode == 1
    assert "FAILED" in r.stderr and "not among the store's encryption keys" in r.stderr
    assert not (tmp_path / "nope" / "certificates").exists()


def test_a_newer_certificate_in_the_target_is_kept_unless_forced(
    issued: Path, migrated: tuple[str, Path, list[str]]
) -> None:
    dsn, key_file, args = migrated
    # Another process on the database renewed it meanwhile (a newer certificate).
    newer = TestCA().issue(NAMES, not_before=datetime.datetime.now(datetime.timezone.utc))
    pg = PostgresBackend(InlineDatabase(dsn), Clock(), KeyRing.from_files([str(key_file)]))
    try:
        result_of(pg.save(KEY, newer))
        r = cli(*args)
        assert r.returncode == 1
        assert f"KEPT       {KEY}: the target holds another certificate" in r.stderr
        assert "--force replaces it" in r.stderr and r.stdout.splitlines()[-1].startswith(
            "NOT DONE: certificates: 0 copied, 0 replaced, 0 unchanged, 1 kept"
        )
        assert result_of(pg.load(KEY)) == newer
        r = cli(*args, "--force")
        assert r.returncode == 0 and f"REPLACED   {KEY}: serial " in r.stdout
        assert result_of(pg.load(KEY)) == result_of(
            FileStore(str(issued.parent / "store")).load(KEY)
        )
    finally:
        result_of(pg.close())


def test_a_store_a_manager_holds_is_not_written(
    migrated: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    dsn, key_file, _ = migrated
    target = tmp_path / "busy"
    os.makedirs(target, mode=0o700)
    lock = StoreLock.acquire(str(target))  # as `synapse-acme run` holds it
    try:
        r = cli("migrate-store", "--from", dsn, "--key-file", str(key_file), "--to-dir",
                str(target))  # fmt: skip
    finally:
        lock.release()
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: {target} is in use by pid {os.getpid()}")
    assert "stop it first" in r.stderr
    assert sorted(p.name for p in target.iterdir()) == ["lock"]


def test_usage_errors_name_the_flag(issued: Path, tmp_path: Path) -> None:
    key = str(tmp_path / "k")
    for args, flag in (
        (["-c", str(issued), "--to", "/var/lib/acme", "--key-file", key], "--to"),
        (["--to", "postgresql:///x", "--key-file", key], "-c"),
        (["-c", str(issued), "--to", "postgresql:///x"], "--key-file"),
        (["--from", "postgresql:///x", "--key-file", key, "--new-key-file", "--to-dir", key],
         "--new-key-file"),
        (["-c", str(issued), "--to", "postgresql:///x", "--to-dir", key, "--key-file", key],
         "--to-dir"),
    ):  # fmt: skip
        r = cli("migrate-store", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith(f"configuration error: {flag}"), r.stderr
    assert not (tmp_path / "k").exists()


def test_key_rotation_then_reseal_leaves_the_old_key_unneeded(
    issued: Path, migrated: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    dsn, old, _ = migrated
    new = tmp_path / "new.key"
    # Rotation: the new key first (created here), the old one after it; then reseal.
    rotate = ["migrate-store", "--reseal", dsn, "--key-file", str(new)]
    r = cli(*rotate, "--new-key-file", "--key-file", str(old))
    assert r.returncode == 0, r.stdout + r.stderr
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("RESEALED")] == [
        f"RESEALED   certificates/{KEY}",
        "RESEALED   account_key/1",
    ]
    assert r.stdout.splitlines()[-1].startswith("Done: 2 private keys resealed, 0 already were")
    # The old key is no longer needed: everything opens with the new one alone.
    r = cli(*rotate)
    assert r.returncode == 0 and "Done: 0 private keys resealed, 2 already were" in r.stdout
    back = tmp_path / "back"
    r = cli("migrate-store", "--from", dsn, "--key-file", str(new), "--to-dir", str(back))
    assert r.returncode == 0, r.stdout + r.stderr
    assert result_of(FileStore(str(back)).load(KEY)) == result_of(
        FileStore(str(issued.parent / "store")).load(KEY)
    )


def test_an_empty_source_is_reported_not_done(postgres: PostgresServer, tmp_path: Path) -> None:
    key = tmp_path / "k"
    r = cli("migrate-store", "--from", postgres.create_database(), "--key-file", str(key),
            "--to-dir", str(tmp_path / "out"), "--new-key-file")  # fmt: skip
    assert r.returncode == 2 and "--new-key-file" in r.stderr  # reading needs an existing key
    r = cli("migrate-store", "--reseal", postgres.create_database(), "--key-file", str(key),
            "--new-key-file")  # fmt: skip
    assert r.returncode == 0 and "Done: 0 private keys resealed, 0 already were" in r.stdout
    r = cli("migrate-store", "--from", postgres.create_database(), "--key-file", str(key),
            "--to-dir", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 1
    assert r.stdout.splitlines()[-1] == (
        "NOT DONE: the source holds no certificate and no account: is it the right store?"
    )
