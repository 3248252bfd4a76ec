"""The PostgreSQL backend of the whole storage contract (:class:`~.interfaces.IStorageBackend`).

Every process on one database (on any host) shares the certificates, the ACME account, the
challenge answers, the issuance leases and change notification. Tables (prefixed, since the
database may well be the homeserver's own)::

    synapse_acme_schema        one row: the schema version this code wrote (SCHEMA_VERSION)
    synapse_acme_certificates  key, chain PEM, the encrypted private key and its key id,
                               metadata JSON (ARI state included), version, updated_at
    synapse_acme_account_key   one row: the encrypted account key and its key id
    synapse_acme_account       one row: the account record (JSON)
    synapse_acme_challenges    token -> key authorization
    synapse_acme_leases        name -> holder, expires_at (seconds on the backend's clock)

**Driver: psycopg2 through a thread pool** (:class:`twisted.enterprise.adbapi.ConnectionPool`),
what Synapse itself does: psycopg2 is the driver every Synapse deployment on PostgreSQL already
has installed and operates, it blocks, and adbapi runs each interaction on a pool thread, in one
transaction (committed when the function returns, rolled back when it raises), reconnecting
after a lost connection. The reactor thread never waits on the database. psycopg 3's async mode
would need an asyncio loop (or a second reactor integration) inside Synapse's Twisted reactor:
more moving parts for no gain at this store's load (a few queries a minute).

**Private keys at rest** are encrypted (AES-256-GCM, :class:`KeyRing`) with a key read from a
file, never the database: a dump or a read-only replica of the database gives no private key.
Each ciphertext carries the id of the key that sealed it, so the key can be rotated: put the new
key first, keep the old ones listed until every row was re-saved (a renewal re-saves it); a row
sealed with a key no longer listed fails to load with StoreError naming the key id. The row's
identity is the AES-GCM associated data, so a ciphertext copied into another row fails too.

**The issuance lock** (:mod:`synapse_acme.pglock`) is a lease row changed by conditional
statements, each atomic in PostgreSQL, expressing :mod:`synapse_acme.lease`'s rules with times
read from the backend's clock (not the database's ``now()``), so it behaves like the file and
in-memory backends; and an advisory lock held on a dedicated connection per lock, so that a
holder that dies (even by SIGKILL) frees the lock at once instead of at the lease's expiry.

**Change notification**: a save sends ``pg_notify`` in its own transaction, so a notification
exists if and only if the save committed. A dedicated connection (not from the pool) listens;
every ``notify_interval`` seconds one round trip on it (in the thread pool) collects what arrived
and proves the connection alive. When it is lost it is reopened on the next tick, and keys whose
version changed meanwhile (notifications sent while nobody listened are gone) are reported from a
re-read of the versions. Subscribers are called on the reactor thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from synapse_acme.errors import StoreError
from synapse_acme.interfaces import IBatchLoad, IStorageBackend
from synapse_acme.model import AccountRecord, CertificateBundle
from synapse_acme.names import check_challenge, is_safe_token
from synapse_acme.pglock import AdvisoryLocks
from synapse_acme.store import (
    check_bundle,
    check_intact,
    check_key,
    decode_metadata,
    encode_metadata,
)

logger = logging.getLogger(__name__)

#: The schema this code creates and understands. A database written by a newer release (a
#: higher version) is refused rather than misread.
SCHEMA_VERSION = 1
#: The LISTEN/NOTIFY channel; each payload is ``"<key> <version>"``.
CHANNEL = "synapse_acme_certificates"
#: How often the listening connection is read (one round trip): a save reaches every other
#: process's subscribers within this delay (plus the round trip).
NOTIFY_INTERVAL = 1.0
#: Serialises the schema creation of processes starting together (CREATE TABLE IF NOT EXISTS
#: alone may still collide in the catalogue); an arbitrary constant, "sacm" in ASCII.
_SCHEMA_LOCK_ID = 0x7361636D
_KEY_BYTES = 32
_NONCE_BYTES = 12
_R = TypeVar("_R")

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS synapse_acme_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS synapse_acme_certificates (
        key TEXT PRIMARY KEY,
        chain_pem BYTEA NOT NULL,
        key_sealed BYTEA NOT NULL,
        key_id TEXT NOT NULL,
        metadata TEXT NOT NULL,
        version BIGINT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS synapse_acme_account_key (
        id SMALLINT PRIMARY KEY CHECK (id = 1),
        key_sealed BYTEA NOT NULL,
        key_id TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS synapse_acme_account (
        id SMALLINT PRIMARY KEY CHECK (id = 1),
        record TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS synapse_acme_challenges (
        token TEXT PRIMARY KEY,
        key_authorization TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS synapse_acme_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    )""",
    # The session holding the advisory lock (synapse_acme.pglock); NULL in rows of releases
    # before it, which other processes then honour by their lease alone.
    "ALTER TABLE synapse_acme_leases ADD COLUMN IF NOT EXISTS locker_pid INTEGER",
    "ALTER TABLE synapse_acme_leases ADD COLUMN IF NOT EXISTS locked_at TIMESTAMPTZ",
]


# -- keys at rest -----------------------------------------------------------------------------


def key_id_of(key: bytes) -> str:
    """A short public name for an encryption key (a digest of it; reveals nothing usable)."""
    return hashlib.sha256(b"synapse-acme key id\0" + key).hexdigest()[:16]


def read_key_file(path: str) -> bytes:
    """The 32-byte key in ``path`` (base64, as :func:`generate_key_file` writes it); StoreError
    naming the file, never its content, if it is not one."""
    try:
        with open(path, "rb") as f:
            text = f.read(4096)
    except OSError as e:
        raise StoreError(f"cannot read the store encryption key {path}: {e.strerror}") from None
    try:
        key = base64.b64decode(text.strip(), altchars=b"-_", validate=True)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise StoreError(
            f"the store encryption key {path} is not {_KEY_BYTES} bytes in base64 "
            "(make one with: head -c 32 /dev/urandom | base64 > FILE)"
        )
    return key


def generate_key_file(path: str) -> str:
    """Create ``path`` (0600, must not exist) holding a new random key; returns its key id."""
    key = AESGCM.generate_key(bit_length=_KEY_BYTES * 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(key) + b"\n")
    return key_id_of(key)


@attrs.frozen
class KeyRing:
    """The keys that seal private keys at rest: the first seals, every one listed opens.

    Rotation: generate a new key, list it first and keep the old ones after it; once every
    sealed row was saved again (each renewal does that), drop the old ones.
    """

    keys: tuple[bytes, ...] = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.keys or any(len(k) != _KEY_BYTES for k in self.keys):
            raise ValueError(f"a key ring needs one or more keys of {_KEY_BYTES} bytes")

    @classmethod
    def from_files(cls, paths: Sequence[str]) -> KeyRing:
        """The keys in ``paths``, the first being the current one."""
        return cls(tuple(read_key_file(p) for p in paths))

    @property
    def current_id(self) -> str:
        return key_id_of(self.keys[0])

    def seal(self, plaintext: bytes, context: str) -> tuple[bytes, str]:
        """``(nonce + ciphertext, key id)``; ``context`` (the row) is authenticated with it."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(self.keys[0]).encrypt(nonce, plaintext, context.encode("utf-8"))
        return nonce + sealed, self.current_id

    def open(self, sealed: bytes, key_id: str, context: str) -> bytes:
        """The plaintext; StoreError naming ``context`` if the key is not listed or the
        ciphertext was altered or belongs to another row."""
        for key in self.keys:
            if key_id_of(key) == key_id:
                try:
                    return AESGCM(key).decrypt(
                        sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], context.encode("utf-8")
                    )
                except (InvalidTag, ValueError):
                    raise StoreError(
                        f"the private key of {context} does not decrypt with key {key_id}: "
                        "altered, or copied from another row"
                    ) from None
        raise StoreError(
            f"the private key of {context} was sealed with key {key_id}, which is not "
            "among the store's encryption keys (list the old key after the new one)"
        )


# -- how the store reaches the database --------------------------------------------------------


class Cursor(Protocol):
    """What an interaction uses of a DB-API cursor (adbapi's Transaction is one)."""

    def execute(self, sql: str, args: Any = ...) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Database(Protocol):
    """The store's way to the database: transactions on pooled connections, blocking calls
    off the reactor, and new dedicated connections (for LISTEN)."""

    def interaction(self, f: Callable[[Cursor], _R]) -> defer.Deferred[_R]:
        """Run ``f(cursor)`` in one transaction; Deferred firing with its result."""

    def blocking(self, f: Callable[[], _R]) -> defer.Deferred[_R]:
        """Run ``f()`` where it may block; Deferred firing with its result."""

    def connect(self) -> Any:
        """A new DB-API connection (psycopg2), not from the pool. Called in :meth:`blocking`."""

    def close(self) -> None:
        """Close the pooled connections."""


class ThreadedDatabase:
    """psycopg2 through :class:`~twisted.enterprise.adbapi.ConnectionPool`: production's
    :class:`Database` (why: the module docstring). ``dsn`` is a libpq connection string or URI
    and is never logged (it may hold a password)."""

    def __init__(
        self,
        dsn: str,
        reactor: IReactorFromThreads,
        min_connections: int = 1,
        max_connections: int = 5,
    ) -> None:
        from twisted.enterprise import adbapi

        self._dsn = dsn
        self._reactor = reactor
        self._pool = adbapi.ConnectionPool(
            "psycopg2",
            dsn,
            cp_min=min_connections,
            cp_max=max_connections,
            cp_reconnect=True,
            cp_noisy=False,
            cp_reactor=reactor,
        )

    def start(self) -> None:
        """Start the pool's threads now (it otherwise starts when the reactor does)."""
        self._pool.start()

    def interaction(self, f: Callable[[Cursor], _R]) -> defer.Deferred[_R]:
        return self._pool.runInteraction(f)  # type: ignore[no-any-return]

    def blocking(self, f: Callable[[], _R]) -> defer.Deferred[_R]:
        return threads.deferToThreadPool(self._reactor, self._pool.threadpool, f)  # type: ignore[arg-type]

    def connect(self) -> Any:
        import psycopg2

        return psycopg2.connect(self._dsn)

    def close(self) -> None:
        self._pool.close()


def _db_errors() -> tuple[type[BaseException], ...]:
    import psycopg2

    return (psycopg2.Error, OSError)


# -- the backend -------------------------------------------------------------------------------


@implementer(IStorageBackend, IBatchLoad)
@attrs.define(eq=False)
class PostgresBackend:
    """The storage contract on PostgreSQL (see the module docstring).

    ``database``: how it reaches the database (:class:`ThreadedDatabase` in production).
    ``clock``: measures leases and stamps saves, and drives change notification (the reactor
    in production). ``keyring``: the keys sealing private keys at rest. ``notify_interval``:
    see :data:`NOTIFY_INTERVAL`. Call :meth:`setup` once (it creates the schema) before use,
    :meth:`close` at the end.
    """

    database: Database
    clock: IReactorTime
    keyring: KeyRing
    notify_interval: float = NOTIFY_INTERVAL
    _subscribers: list[Callable[[str], object]] = attrs.field(factory=list, init=False)
    _poll: LoopingCall | None = attrs.field(default=None, init=False)
    _listener: Any = attrs.field(default=None, init=False)
    _versions: dict[str, int] | None = attrs.field(default=None, init=False)
    _listener_down: bool = attrs.field(default=False, init=False)
    _locks: AdvisoryLocks = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._locks = AdvisoryLocks(self.database, self.clock)

    def setup(self) -> defer.Deferred[None]:
        """Create the tables if they do not exist (idempotent, safe for processes starting
        together); StoreError for a database written by a newer schema."""
        return self._run(_create_schema)

    def close(self) -> defer.Deferred[None]:
        """Stop change notification and close every connection."""
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        self._subscribers.clear()
        d = self._locks.close()
        d.addBoth(lambda _: self.database.blocking(self._close_listener))
        d.addBoth(lambda _: self.database.close())
        return d

    def _run(self, f: Callable[[Cursor], _R]) -> defer.Deferred[_R]:
        """``f`` in one transaction; database errors become StoreError (without the DSN)."""
        d = self.database.interaction(f)

        def translate(failure: Any) -> Any:
            if failure.check(*_db_errors()):
                raise StoreError(f"PostgreSQL store: {failure.value}".strip())
            return failure

        d.addErrback(translate)
        return d

    # -- ICertificateStore, IStoreAdmin ---------------------------------------------------------

    def load(self, key: str) -> defer.Deferred[CertificateBundle | None]:
        """Deferred firing with the bundle under ``key`` (its private key decrypted), or
        ``None``; StoreError if the row is damaged or its key cannot be decrypted."""
        try:
            check_key(key)
        except StoreError:
            return defer.fail()

        def load(cur: Cursor) -> Any:
            cur.execute(
                "SELECT chain_pem, key_sealed, key_id, metadata "
                "FROM synapse_acme_certificates WHERE key = %s",
                (key,),
            )
            return cur.fetchone()

        d = self._run(load)
        d.addCallback(self._bundle_from_row, key)
        return d

    def load_many(
        self, keys: Sequence[str]
    ) -> defer.Deferred[dict[str, CertificateBundle | StoreError | None]]:
        """Deferred firing with each of ``keys`` mapped to what :meth:`load` gives for it: its
        bundle (decrypted, checked intact), ``None``, or the StoreError (unsafe key, damaged
        row, key not decryptable). One query for them all instead of a round trip per key;
        the rows are decrypted and checked in the pool thread, off the reactor. Fails as a
        whole only when the database does (StoreError)."""
        out: dict[str, CertificateBundle | StoreError | None] = {}
        wanted = []
        for key in keys:
            try:
                wanted.append(check_key(key))
            except StoreError as e:
                out[key] = e
        if not wanted:
            return defer.succeed(out)

        def load_many(cur: Cursor) -> dict[str, CertificateBundle | StoreError | None]:
            cur.execute(
                "SELECT key, chain_pem, key_sealed, key_id, metadata "
                "FROM synapse_acme_certificates WHERE key = ANY(%s)",
                (wanted,),
            )
            rows = {row[0]: row[1:] for row in cur.fetchall()}
            for key in wanted:
                try:
                    out[key] = self._bundle_from_row(rows.get(key), key)
                except StoreError as e:
                    out[key] = e
            return out

        return self._run(load_many)

    def chain_digests(self, keys: Sequence[str]) -> defer.Deferred[dict[str, str]]:
        """Deferred firing with the SHA-256 (hex) of each stored chain among ``keys``,
        computed by the server: one short query, nothing decrypted."""
        try:
            wanted = [check_key(key) for key in keys]
        except StoreError:
            return defer.fail()

        def digests(cur: Cursor) -> dict[str, str]:
            cur.execute(
                "SELECT key, encode(sha256(chain_pem), 'hex') "
                "FROM synapse_acme_certificates WHERE key = ANY(%s)",
                (wanted,),
            )
            return {key: digest for key, digest in cur.fetchall()}

        return self._run(digests)

    def _bundle_from_row(self, row: Any, key: str) -> CertificateBundle | None:
        if row is None:
            return None
        chain_pem, sealed, key_id, metadata = row
        where = _where("certificates", key)
        bundle = CertificateBundle(
            key_pem=self.keyring.open(bytes(sealed), key_id, where),
            chain_pem=bytes(chain_pem),
            metadata=decode_metadata(metadata.encode("utf-8"), where),
        )
        check_intact(bundle, where)
        return bundle

    def save(self, key: str, bundle: CertificateBundle) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once the bundle (its key sealed) is committed, with
        its change notification in the same transaction."""
        try:
            check_key(key)
            check_bundle(bundle)
            where = _where("certificates", key)
            check_intact(bundle, where)
            metadata = encode_metadata(bundle.metadata).decode("utf-8")
        except StoreError:
            return defer.fail()
        sealed, key_id = self.keyring.seal(bundle.key_pem, where)
        now = self.clock.seconds()

        def save(cur: Cursor) -> None:
            cur.execute(
                """INSERT INTO synapse_acme_certificates
                       (key, chain_pem, key_sealed, key_id, metadata, version, updated_at)
                   VALUES (%s, %s, %s, %s, %s, 1, %s)
                   ON CONFLICT (key) DO UPDATE SET
                       chain_pem = EXCLUDED.chain_pem, key_sealed = EXCLUDED.key_sealed,
                       key_id = EXCLUDED.key_id, metadata = EXCLUDED.metadata,
                       version = synapse_acme_certificates.version + 1,
                       updated_at = EXCLUDED.updated_at
                   RETURNING version""",
                (key, _binary(bundle.chain_pem), _binary(sealed), key_id, metadata, now),
            )
            (version,) = cur.fetchone()
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{key} {version}"))

        return self._run(save)

    def keys(self) -> defer.Deferred[list[str]]:
        """Deferred firing with the sorted keys that hold a bundle."""

        def keys(cur: Cursor) -> list[str]:
            cur.execute('SELECT key FROM synapse_acme_certificates ORDER BY key COLLATE "C"')
            return [row[0] for row in cur.fetchall()]

        return self._run(keys)

    def reseal(self) -> defer.Deferred[tuple[list[str], int]]:
        """Seal again with the current key every private key sealed with another one: the
        last step of a key rotation, after which the old keys can go. One transaction (a row
        no listed key opens fails it all, naming the row). The plaintext is unchanged, so
        versions stay and nobody is notified. Deferred firing with ``(what was resealed, how
        many rows already were sealed with the current key)``."""
        current = self.keyring.current_id

        def reseal(cur: Cursor) -> tuple[list[str], int]:
            done: list[str] = []
            cur.execute(
                "SELECT count(*) FROM synapse_acme_certificates WHERE key_id = %s", (current,)
            )
            (already,) = cur.fetchone()
            cur.execute(
                "SELECT count(*) FROM synapse_acme_account_key WHERE key_id = %s", (current,)
            )
            already += cur.fetchone()[0]
            for table, column in (("certificates", "key"), ("account_key", "id")):
                cur.execute(
                    f"SELECT {column}, key_sealed, key_id FROM synapse_acme_{table} "
                    f"WHERE key_id <> %s ORDER BY {column} FOR UPDATE",
                    (current,),
                )
                for ident, sealed, key_id in cur.fetchall():
                    where = _where(table, str(ident))
                    plain = self.keyring.open(bytes(sealed), key_id, where)
                    new, new_id = self.keyring.seal(plain, where)
                    cur.execute(
                        f"UPDATE synapse_acme_{table} SET key_sealed = %s, key_id = %s "
                        f"WHERE {column} = %s",
                        (_binary(new), new_id, ident),
                    )
                    done.append(f"{table}/{ident}")
            return done, int(already)

        return self._run(reseal)

    # -- IAccountStore --------------------------------------------------------------------------

    def load_account_key(self) -> defer.Deferred[bytes | None]:
        """Deferred firing with the decrypted account key, ``None`` if there is none."""

        def load(cur: Cursor) -> Any:
            cur.execute("SELECT key_sealed, key_id FROM synapse_acme_account_key WHERE id = 1")
            return cur.fetchone()

        def open_(row: Any) -> bytes | None:
            if row is None:
                return None
            return self.keyring.open(bytes(row[0]), row[1], _where("account_key", "1"))

        return self._run(load).addCallback(open_)

    def create_account_key(self, key: bytes) -> defer.Deferred[bool]:
        """Deferred firing with True once ``key`` (sealed) is the account key, False if there
        was one (the first writer wins: ``INSERT ... ON CONFLICT DO NOTHING``)."""
        if not isinstance(key, bytes) or not key:
            return defer.fail(StoreError("an account key must be non-empty bytes"))
        sealed, key_id = self.keyring.seal(key, _where("account_key", "1"))

        def create(cur: Cursor) -> bool:
            cur.execute(
                "INSERT INTO synapse_acme_account_key (id, key_sealed, key_id) VALUES (1, %s, %s) "
                "ON CONFLICT (id) DO NOTHING RETURNING id",
                (_binary(sealed), key_id),
            )
            return cur.fetchone() is not None

        return self._run(create)

    def load_account_record(self) -> defer.Deferred[AccountRecord | None]:
        """Deferred firing with the saved record, ``None`` if there is none."""

        def load(cur: Cursor) -> Any:
            cur.execute("SELECT record FROM synapse_acme_account WHERE id = 1")
            return cur.fetchone()

        return self._run(load).addCallback(_record_from_row)

    def save_account_record(self, record: AccountRecord) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``record`` replaced the previous one."""
        if not isinstance(record, AccountRecord):
            return defer.fail(StoreError(f"expected an AccountRecord, got {record!r}"))
        data = record.to_json().decode("utf-8")

        def save(cur: Cursor) -> None:
            cur.execute(
                "INSERT INTO synapse_acme_account (id, record) VALUES (1, %s) "
                "ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                (data,),
            )

        return self._run(save)

    # -- IChallengeStore ------------------------------------------------------------------------

    def put_challenge(self, token: str, key_authorization: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once every process on the database answers it."""
        try:
            check_challenge(token, key_authorization)
        except ValueError:
            return defer.fail()

        def put(cur: Cursor) -> None:
            cur.execute(
                "INSERT INTO synapse_acme_challenges (token, key_authorization) VALUES (%s, %s) "
                "ON CONFLICT (token) DO UPDATE SET key_authorization = EXCLUDED.key_authorization",
                (token, key_authorization),
            )

        return self._run(put)

    def get_challenge(self, token: str) -> defer.Deferred[str | None]:
        """Deferred firing with the answer for ``token``, ``None`` if there is none."""
        if not is_safe_token(token):
            return defer.succeed(None)

        def get(cur: Cursor) -> str | None:
            cur.execute(
                "SELECT key_authorization FROM synapse_acme_challenges WHERE token = %s", (token,)
            )
            row = cur.fetchone()
            return row[0] if row is not None else None

        return self._run(get)

    def remove_challenge(self, token: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``token`` is answered no more."""
        if not is_safe_token(token):
            return defer.succeed(None)

        def remove(cur: Cursor) -> None:
            cur.execute("DELETE FROM synapse_acme_challenges WHERE token = %s", (token,))

        return self._run(remove)

    # -- IIssuanceLock --------------------------------------------------------------------------

    def acquire(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        """Deferred firing with True if ``holder`` now holds ``name`` (free, expired, its own,
        or its holder's session died), else False (:class:`~synapse_acme.pglock.AdvisoryLocks`)."""
        return self._locks.acquire(name, holder, lease_seconds)

    def renew(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        """Deferred firing with True if ``holder``'s lease in force was extended, else False
        (also when the connection holding its advisory lock was lost)."""
        return self._locks.renew(name, holder, lease_seconds)

    def release(self, name: str, holder: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``holder``'s lease on ``name`` (if any) is gone,
        and its advisory lock and dedicated connection with it."""
        return self._locks.release(name, holder)

    # -- ICertificateChanges --------------------------------------------------------------------

    def subscribe(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(key)`` on the reactor thread within about ``notify_interval``
        seconds of a save through any handle on this database; returns the unsubscribe
        function."""
        self._subscribers.append(callback)
        if self._poll is None:
            self._poll = LoopingCall(self._tick)
            self._poll.clock = self.clock
            self._poll.start(self.notify_interval, now=True)  # LISTEN at once

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
            if not self._subscribers and self._poll is not None:
                if self._poll.running:
                    self._poll.stop()
                self._poll = None
                self.database.blocking(self._close_listener).addErrback(
                    lambda f: logger.warning("Closing the LISTEN connection: %s", f.value)
                )

        return unsubscribe

    def _tick(self) -> defer.Deferred[None]:
        """One read of the listening connection; never fails (that would stop the loop)."""
        d = self.database.blocking(self._read_notifications)
        return d.addCallbacks(self._report, self._listener_lost)

    def _read_notifications(self) -> list[str]:
        """In a thread: (re)connect and LISTEN if needed, then one round trip; the keys that
        changed (from notifications, or from the versions after a reconnect)."""
        changed: list[str] = []
        if self._listener is None or self._listener.closed:
            conn = self.database.connect()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {CHANNEL}")
                cur.execute("SELECT key, version FROM synapse_acme_certificates")
                versions = {key: int(version) for key, version in cur.fetchall()}
            if self._versions is not None:  # a reconnect: what changed while nobody listened
                changed = sorted(
                    k for k in versions.keys() | self._versions.keys()
                    if versions.get(k) != self._versions.get(k)
                )  # fmt: skip
            self._listener, self._versions = conn, versions
        else:
            with self._listener.cursor() as cur:
                cur.execute("SELECT 1")  # notifications arrive before its answer
        for notify in self._listener.notifies:
            key, _, version = notify.payload.rpartition(" ")
            if self._versions is not None and version.isdigit():
                self._versions[key] = int(version)
            if key not in changed:
                changed.append(key)
        self._listener.notifies.clear()
        return changed

    def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.closed:
            conn.close()

    def _listener_lost(self, failure: Any) -> None:
        if not self._listener_down:
            logger.warning(
                "Lost the PostgreSQL store's LISTEN connection (%s); retrying every %s s",
                failure.getErrorMessage(),
                self.notify_interval,
            )
        self._listener_down = True
        conn, self._listener = self._listener, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _report(self, keys: list[str]) -> None:
        if self._listener_down:
            logger.info("The PostgreSQL store's LISTEN connection is back")
            self._listener_down = False
        for key in keys:
            for callback in list(self._subscribers):
                try:
                    callback(key)
                except Exception:
                    logger.exception("A certificate change subscriber failed for %s", key)


def _create_schema(cur: Cursor) -> None:
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
    for statement in _SCHEMA:
        cur.execute(statement)
    cur.execute("SELECT version FROM synapse_acme_schema")
    rows = cur.fetchall()
    if not rows:
        cur.execute("INSERT INTO synapse_acme_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
    elif max(r[0] for r in rows) > SCHEMA_VERSION:
        raise StoreError(
            f"the PostgreSQL store has schema version {max(r[0] for r in rows)}, newer than "
            f"this synapse-acme understands ({SCHEMA_VERSION}): upgrade synapse-acme"
        )


def _where(table: str, key: str) -> str:
    return f"postgresql:synapse_acme_{table}/{key}"


def _binary(data: bytes) -> Any:
    import psycopg2

    return psycopg2.Binary(data)


def _record_from_row(row: Any) -> AccountRecord | None:
    if row is None:
        return None
    try:
        value = json.loads(row[0])
        fields = {name: value[name] for name in ("url", "directory", "thumbprint")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise ValueError("url, directory and thumbprint must be non-empty strings")
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(
            f"the account record in {_where('account', '1')} is damaged: {e}"
        ) from None
    return AccountRecord(**fields)
