"""Database mode: the wiring of a PostgreSQL store shared by several processes (``database:``).

:func:`open_shared_store` does the start-up work before anything is served: it reads the key
files, connects once (bounded by ``database.connect_timeout``), creates the schema, loads the
ACME account key from the database or creates it (two processes starting together end up with
one key: the loser of the race loads the winner's), and reads what the store holds for the
exported files. It runs synchronously on the calling thread, like the file store's recovery:
the runtime is built before the reactor serves anything, and a start that cannot reach its
database should fail there, loudly, rather than serve nothing in the background. The cost is
bounded: at most ``connect_timeout`` (10 s by default) when the database does not answer.

:class:`SharedStoreService` then keeps the running process following the store: every change
notification (and every periodic check, see :mod:`synapse_acme.service`) makes the service
adopt what another process saved, and the backend's connections are closed at stop.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
import josepy as jose
from twisted.application.service import Service
from twisted.internet import defer

from synapse_acme import crypto
from synapse_acme.account import DEFAULT_ACCOUNT_KEY_TYPE, key_thumbprint, parse_account_key
from synapse_acme.config import AcmeConfig, DatabaseConfig
from synapse_acme.errors import ConfigError, StoreError
from synapse_acme.interfaces import IReactor
from synapse_acme.model import AccountRecord, CertificateBundle
from synapse_acme.pgstore import Cursor, KeyRing, PostgresBackend, ThreadedDatabase
from synapse_acme.service import AcmeService
from synapse_acme.threaded import _result_of

logger = logging.getLogger(__name__)

_R = TypeVar("_R")


def holder_id() -> str:
    """This process's name in the issuance lock: host, pid and a random part (a pid is reused
    after a restart, and containers on several hosts may share a host name)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def dsn_for(database: DatabaseConfig) -> str:
    """The configured DSN with ``connect_timeout`` added (libpq counts whole seconds)."""
    from psycopg2.extensions import make_dsn

    return make_dsn(database.dsn, connect_timeout=max(1, math.ceil(database.connect_timeout)))


class _OneConnection:
    """:class:`synapse_acme.pgstore.Database` on one blocking connection, on the calling
    thread: each interaction is one transaction, and its Deferred has fired on return."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def interaction(self, f: Callable[[Cursor], _R]) -> defer.Deferred[_R]:
        try:
            with self._conn.cursor() as cur:
                result = f(cur)
            self._conn.commit()
        except Exception:
            self._conn.rollback()
            return defer.fail()
        return defer.succeed(result)

    def blocking(self, f: Callable[[], _R]) -> defer.Deferred[_R]:
        return defer.maybeDeferred(f)

    def connect(self) -> Any:
        raise NotImplementedError("start-up work needs no second connection")

    def close(self) -> None:
        self._conn.close()


#: How many times an interaction is tried when its connection turns out dead (after a database
#: restart each pooled connection fails once before adbapi replaces it).
CONNECTION_ATTEMPTS = 6


class ReconnectingDatabase:
    """:class:`~synapse_acme.pgstore.ThreadedDatabase` whose interactions are tried again, at
    once, when they fail because their pooled connection was dead (the database restarted or
    a proxy dropped it): adbapi reconnects only after such a failure. Every statement of the
    store is safe to run again (upserts, conditional updates, the first writer winning), so a
    failure whose commit is in doubt may be repeated."""

    def __init__(self, inner: ThreadedDatabase) -> None:
        self._inner = inner

    def interaction(self, f: Callable[[Cursor], _R]) -> defer.Deferred[_R]:
        import psycopg2

        async def attempt() -> _R:
            for left in range(CONNECTION_ATTEMPTS - 1, -1, -1):
                try:
                    return await self._inner.interaction(f)
                except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                    if left == 0:
                        raise
                    logger.info("PostgreSQL connection lost (%s); trying again", str(e).strip())
            raise AssertionError("unreachable")

        return defer.ensureDeferred(attempt())

    def blocking(self, f: Callable[[], _R]) -> defer.Deferred[_R]:
        return self._inner.blocking(f)

    def connect(self) -> Any:
        return self._inner.connect()

    def close(self) -> None:
        self._inner.close()


@attrs.define(eq=False)
class SharedStore:
    """What :func:`open_shared_store` made: the running backend, the account key, and the
    bundles the store held at start (by key; for the repair of the exported files)."""

    backend: PostgresBackend
    account_key: jose.JWK
    where: str
    bundles: dict[str, CertificateBundle | None] = attrs.Factory(dict)

    def account_recorder(self, directory: str) -> Callable[[str], object]:
        """Records the ACME account URL (each time the CA tells it) in the database."""
        thumbprint = key_thumbprint(self.account_key)
        last: list[AccountRecord] = []

        def record(url: str) -> object:
            new = AccountRecord(url=url, directory=directory, thumbprint=thumbprint)
            if last and last[0] == new:
                return None
            last[:] = [new]
            d = self.backend.save_account_record(new)
            return d.addErrback(
                lambda f: logger.error("Could not record the ACME account: %s", f.value)
            )

        return record


def open_shared_store(config: AcmeConfig, reactor: IReactor, keys: Sequence[str]) -> SharedStore:
    """Connect to ``config.database`` and prepare it (see the module docstring); ConfigError
    naming ``database.key_files`` for a key file that cannot be used, StoreError naming the
    database (never its password) when it cannot be reached or read."""
    database = config.database
    assert database is not None
    try:
        keyring = KeyRing.from_files(database.key_files)
    except StoreError as e:
        raise ConfigError(
            config.key("database.key_files"), str(e), list(database.key_files)
        ) from None
    import psycopg2

    dsn = dsn_for(database)
    try:
        conn = psycopg2.connect(dsn)
    except psycopg2.Error as e:
        raise StoreError(
            f"cannot reach the PostgreSQL store {database.where} "
            f"({config.key('database')}): {str(e).strip()}"
        ) from None
    try:
        boot = PostgresBackend(_OneConnection(conn), reactor, keyring)
        try:
            _result_of(boot.setup())
            account_key = _account_key(boot, database.where)
            bundles: dict[str, CertificateBundle | None] = {}
            for key in keys:
                try:
                    bundles[key] = _result_of(boot.load(key))
                except StoreError as e:  # the service reports it when it loads the store
                    logger.debug("Stored certificate %s unreadable at start: %s", key, e)
                    bundles[key] = None
        except psycopg2.Error as e:
            raise StoreError(f"PostgreSQL store {database.where}: {str(e).strip()}") from None
    finally:
        conn.close()
    backend = PostgresBackend(
        ReconnectingDatabase(ThreadedDatabase(dsn, reactor)), reactor, keyring
    )
    logger.info("Using the shared PostgreSQL store %s", database.where)
    return SharedStore(backend, account_key, database.where, bundles)


def _account_key(boot: PostgresBackend, where: str) -> jose.JWK:
    """The account key in the database, created if there is none (the first writer wins)."""
    pem = _result_of(boot.load_account_key())
    if pem is None:
        new = crypto.generate_private_key_pem(DEFAULT_ACCOUNT_KEY_TYPE)
        if _result_of(boot.create_account_key(new)):
            logger.info("Created a new ACME account key in the PostgreSQL store %s", where)
            pem = new
        else:  # another process created one meanwhile: use theirs
            pem = _result_of(boot.load_account_key())
            if pem is None:
                raise StoreError(f"the account key in the PostgreSQL store {where} vanished")
    return parse_account_key(pem, f"the account key in the PostgreSQL store {where}")


class SharedStoreService(Service):
    """Follows the shared store while running: on each change notification the provisioning
    service adopts what another process saved. Stopped last (added first), it then closes the
    backend's connections."""

    def __init__(self, backend: PostgresBackend, acme: AcmeService) -> None:
        self._backend = backend
        self._acme = acme
        self._unsubscribe: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self._backend.subscribe(self._acme.store_changed)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        d = self._backend.close()
        return d.addErrback(
            lambda f: logger.warning("Closing the PostgreSQL store: %s", f.getErrorMessage())
        )
