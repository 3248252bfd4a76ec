"""The issuance lock on PostgreSQL: a lease row, and an advisory lock that dies with its holder.

A lease alone (:mod:`synapse_acme.lease`) frees the lock of a crashed holder only when the lease
runs out. Here each lock a process holds also has its own **dedicated connection** (not one of
the pool's) holding a session-level advisory lock on a key derived from the name
(:func:`lock_key`). When the holder dies, even by SIGKILL, the kernel closes its socket, the
server ends that session and frees the advisory lock: the next acquirer takes over at once.

The row in ``synapse_acme_leases`` stays the record every process reads and writes (holder,
expiry on the backend's clock, the same rules as the file and in-memory backends), plus
``locker_pid``: the server process id of the session that held the advisory lock when the row
was written (NULL if it was written without it), and ``locked_at``, the server's time then.
The rules, each one conditional statement run on the dedicated connection (so a lost
connection fails the statement)::

    acquire, advisory lock obtained    take the row if free, expired, our own, or if it names
                                       a locker_pid locked since the server's start: a session
                                       that held the key no longer does, so that holder is
                                       gone (a server restart proves nothing: it ended every
                                       session, living holders' too)
    acquire, advisory lock busy        lease rules only (free, expired or our own); the row
                                       keeps the locker_pid only when the holder is the same
    renew                              lease rules on our own row; the dedicated connection
                                       lost, it retries once in a new session (the row decides:
                                       False only if the lease is no longer ours);
                                       a lease taken without the advisory lock tries for it
                                       again, so it upgrades once the key is free
    release                            unlock, close the dedicated connection, delete the row

**Collisions** (two names hashing to one 64-bit key; about 3e-12 for 10,000 names) are
harmless: the row decides who holds which name, and a name whose key is busy only loses the
fast hand-over and falls back to the lease's expiry, like a row written by an older release.

Limits: a holder whose session alone ends while it lives (``pg_terminate_backend``, a
connection cut between its host and the server) is taken over at once, and learns it only at
its next renewal (a third of the lease later at most), so both may work for that long, as with
a holder that stalls past its lease on any backend. A holder whose host vanishes without
closing its socket (power loss) is noticed when the server's TCP keepalive gives up (set on
the dedicated session: :data:`KEEPALIVE`) or at the lease's expiry, whichever comes first.
Session advisory locks need a real session: a pooler in transaction mode (PgBouncer
``pool_mode = transaction``) between the store and PostgreSQL breaks them; session mode, or a
direct connection, is fine.

Every call runs off the reactor (:meth:`Database.blocking <synapse_acme.pgstore.Database>`);
calls on one handle are serialised by a thread lock (there are a few per issuance).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from synapse_acme import lease
from synapse_acme.errors import StoreError
from synapse_acme.store import check_key

logger = logging.getLogger(__name__)

#: Server-side TCP keepalive of each dedicated session (idle seconds, interval, probes): a
#: holder whose host vanished is dropped after about 30 s. Ignored on a unix socket.
KEEPALIVE = (15, 5, 3)
_KEY_CONTEXT = b"synapse-acme issuance lock\0"

#: Taken while this session holds the name's advisory lock: a row naming a locker_pid belongs
#: to a session that lost the key (it died or let go), so it is taken over whatever its expiry;
#: unless the server restarted since it was locked (every session ended then, the living
#: holders' too, which only learn it at their next renewal): then the lease decides.
_TAKE_LOCKED = """
    INSERT INTO synapse_acme_leases (name, holder, expires_at, locker_pid, locked_at)
    VALUES (%(name)s, %(holder)s, %(expires)s, pg_backend_pid(), now())
    ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
        expires_at = EXCLUDED.expires_at, locker_pid = EXCLUDED.locker_pid,
        locked_at = EXCLUDED.locked_at
        WHERE synapse_acme_leases.holder = EXCLUDED.holder
           OR synapse_acme_leases.expires_at <= %(now)s
           OR (synapse_acme_leases.locker_pid IS NOT NULL
               AND synapse_acme_leases.locked_at > pg_postmaster_start_time())
    RETURNING 1"""
#: Taken while another session holds the key: the lease rules alone
#: (:func:`synapse_acme.lease.acquire`).
_TAKE_UNLOCKED = """
    INSERT INTO synapse_acme_leases (name, holder, expires_at, locker_pid)
    VALUES (%(name)s, %(holder)s, %(expires)s, NULL)
    ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
        expires_at = EXCLUDED.expires_at,
        locker_pid = CASE WHEN synapse_acme_leases.holder = EXCLUDED.holder
                          THEN synapse_acme_leases.locker_pid END
        WHERE synapse_acme_leases.holder = EXCLUDED.holder
           OR synapse_acme_leases.expires_at <= %(now)s
    RETURNING 1"""
#: :func:`synapse_acme.lease.renew`; records this session as the locker once it has the key.
_RENEW = """
    UPDATE synapse_acme_leases SET expires_at = %(expires)s,
        locker_pid = CASE WHEN %(locked)s THEN pg_backend_pid() ELSE locker_pid END,
        locked_at = CASE WHEN %(locked)s THEN now() ELSE locked_at END
    WHERE name = %(name)s AND holder = %(holder)s AND expires_at > %(now)s
    RETURNING 1"""
_RELEASE = "DELETE FROM synapse_acme_leases WHERE name = %(name)s AND holder = %(holder)s"


def lock_key(name: str) -> int:
    """The advisory lock key of lock ``name``: the first 8 bytes of a SHA-256 (with a context
    string of its own) as a signed bigint, the same in every process and release."""
    digest = hashlib.sha256(_KEY_CONTEXT + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Connector(Protocol):
    """What the lock needs of :class:`synapse_acme.pgstore.Database`."""

    def blocking(self, f: Callable[[], Any]) -> defer.Deferred[Any]:
        """Run ``f()`` where it may block."""

    def connect(self) -> Any:
        """A new psycopg2 connection, not from the pool."""


@attrs.define(eq=False)
class _Held:
    """A lock this handle holds: its dedicated connection, for whom, and whether that session
    has the advisory lock (False while another session has the key)."""

    conn: Any
    holder: str
    locked: bool


@attrs.define(eq=False)
class AdvisoryLocks:
    """:class:`~synapse_acme.interfaces.IIssuanceLock` for one
    :class:`~synapse_acme.pgstore.PostgresBackend` handle (see the module docstring).

    ``database``: where to run blocking work and open dedicated connections. ``clock``: the
    backend's clock, which lease times are read from. ``key_of``: the advisory key of a name
    (:func:`lock_key`; tests pass a colliding one).
    """

    database: Connector
    clock: IReactorTime
    key_of: Callable[[str], int] = lock_key
    _held: dict[str, _Held] = attrs.field(factory=dict, init=False)
    _mutex: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def acquire(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        """Deferred firing with True if ``holder`` now holds ``name`` (free, expired, its own,
        or its holder's session is gone), else False."""
        return self._call(name, holder, lease_seconds, self._acquire)

    def renew(self, name: str, holder: str, lease_seconds: float) -> defer.Deferred[bool]:
        """Deferred firing with True if ``holder``'s lease in force was extended; False if not,
        or if the dedicated connection holding it was lost."""
        return self._call(name, holder, lease_seconds, self._renew)

    def release(self, name: str, holder: str) -> defer.Deferred[None]:
        """Deferred firing with ``None`` once ``holder``'s row is gone and, if this handle
        held it, its advisory lock and connection too."""
        return self._call(name, holder, 1.0, lambda args: self._release(args))

    def close(self) -> defer.Deferred[None]:
        """Close every dedicated connection (the rows stay: their locker sessions are gone,
        so the next acquirer takes them over at once)."""

        def close_all() -> None:
            with self._mutex:
                held, self._held = self._held, {}
            for h in held.values():
                _let_go(h)

        return self.database.blocking(close_all)

    def _call(
        self,
        name: str,
        holder: str,
        lease_seconds: float,
        f: Callable[[dict[str, Any]], Any],
    ) -> defer.Deferred[Any]:
        try:
            check_key(name)
            lease.check_request(holder, lease_seconds)
        except (StoreError, ValueError):
            return defer.fail()
        now = self.clock.seconds()  # read here: the clock belongs to the reactor thread
        args = {"name": name, "holder": holder, "now": now, "expires": now + lease_seconds}

        def locked() -> Any:
            with self._mutex:
                return f(args)

        d = self.database.blocking(locked)

        def translate(failure: Any) -> Any:
            if failure.check(*_db_errors()):
                raise StoreError(f"PostgreSQL store: {failure.value}".strip())
            return failure

        return d.addErrback(translate)

    # -- in a thread, under the mutex ----------------------------------------------------------

    def _acquire(self, args: dict[str, Any]) -> bool:
        name, holder = args["name"], args["holder"]
        held = self._held.get(name)
        if held is not None and held.holder == holder:
            try:
                if self._take(held, args):
                    return True
                self._drop(name)
                return False
            except _db_errors() as e:  # the dedicated connection is gone: start afresh
                logger.info("Lost the connection holding the lock %s (%s)", name, e)
                self._drop(name)
        mine = _Held(self._connect(), holder, locked=False)
        try:
            if not self._take(mine, args):
                _let_go(mine)
                return False
        except BaseException:
            _let_go(mine)
            raise
        self._drop(name)  # another holder's stale connection on this handle, if any
        self._held[name] = mine
        return True

    def _take(self, held: _Held, args: dict[str, Any]) -> bool:
        """One conditional upsert on ``held.conn``, after trying for the advisory lock."""
        with held.conn.cursor() as cur:
            self._try_lock(cur, held, args["name"])
            cur.execute(_TAKE_LOCKED if held.locked else _TAKE_UNLOCKED, args)
            return cur.fetchone() is not None

    def _try_lock(self, cur: Any, held: _Held, name: str) -> None:
        """Try for the advisory lock if ``held``'s session does not have it yet (never twice:
        session locks stack, and each would need its own unlock)."""
        if not held.locked:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (self.key_of(name),))
            held.locked = bool(cur.fetchone()[0])

    def _renew(self, args: dict[str, Any]) -> bool:
        name, holder = args["name"], args["holder"]
        held = self._held.get(name)
        if held is None or held.holder != holder:
            # Not held through this handle (the same holder on another handle): the row's
            # rules alone.
            return self._once(_RENEW, {**args, "locked": False})
        try:
            renewed = self._renew_on(held, args)
        except _db_errors() as e:
            # The session is gone (a server restart, a cut connection): its advisory lock with
            # it. The row still decides: if it is ours and in force, nobody took over (a
            # restart hands nothing over early, see _TAKE_LOCKED), so carry on in a new
            # session; if another holder took it, False. The server unreachable is an error
            # (the caller tries again while the lease runs), never a lost lease.
            logger.info("Lost the connection holding the lock %s (%s); reconnecting", name, e)
            self._drop(name)
            fresh = _Held(self._connect(), holder, locked=False)
            try:
                renewed = self._renew_on(fresh, args)
            except BaseException:
                _let_go(fresh)
                raise
            if renewed:
                self._held[name] = fresh
            else:
                _let_go(fresh)
        if not renewed:
            logger.warning("The lease of the lock %s is no longer %s's", name, holder)
            self._drop(name)
        return renewed

    def _renew_on(self, held: _Held, args: dict[str, Any]) -> bool:
        """The renewal on ``held``'s session (trying for the advisory lock first if that
        session does not have it)."""
        with held.conn.cursor() as cur:
            self._try_lock(cur, held, args["name"])
            cur.execute(_RENEW, {**args, "locked": held.locked})
            return bool(cur.fetchone() is not None)

    def _release(self, args: dict[str, Any]) -> None:
        name, holder = args["name"], args["holder"]
        held = self._held.get(name)
        if held is not None and held.holder == holder:
            try:
                with held.conn.cursor() as cur:
                    cur.execute(_RELEASE, args)
                self._drop(name)  # unlocks at once, then closes
                return
            except _db_errors():
                self._drop(name)  # the session is gone, and its advisory lock with it
        self._once(_RELEASE, args)

    def _once(self, sql: str, args: dict[str, Any]) -> bool:
        """``sql`` on a short connection of its own; whether it returned a row. (Not the pool:
        this runs in a thread, and the pool is driven from the reactor.)"""
        conn = self.database.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.description is not None and cur.fetchone() is not None
        finally:
            _close_quietly(conn)

    def _drop(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
            _let_go(held)

    def _connect(self) -> Any:
        """A dedicated session: autocommit (each statement is its own transaction, the
        advisory lock is the session's), keepalive so the server notices a vanished host,
        and no idle timeout (it would end the session that holds the lock)."""
        conn = self.database.connect()
        try:
            conn.autocommit = True
            idle, interval, count = KEEPALIVE
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT set_config('tcp_keepalives_idle', %s, false), "
                    "set_config('tcp_keepalives_interval', %s, false), "
                    "set_config('tcp_keepalives_count', %s, false)",
                    (str(idle), str(interval), str(count)),
                )
                if conn.server_version >= 140000:
                    cur.execute("SET idle_session_timeout = 0")
        except BaseException:
            _close_quietly(conn)
            raise
        return conn


def _db_errors() -> tuple[type[BaseException], ...]:
    import psycopg2

    return (psycopg2.Error, OSError)


def _let_go(held: _Held) -> None:
    """Unlock (at once: the server frees a closed session's locks only when it notices the
    close, and the next acquirer may be quicker) and close ``held``'s connection."""
    if held.locked:
        try:
            with held.conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock_all()")
        except Exception:  # the session is gone already, and its lock with it
            pass
    _close_quietly(held.conn)


def _close_quietly(conn: Any) -> None:
    try:
        if not conn.closed:
            conn.close()
    except Exception:  # closing a broken connection: nothing left to free
        pass
