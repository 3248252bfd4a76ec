"""Run a real, throw-away PostgreSQL server for the tests (Debian's ``postgresql`` package).

Why: the PostgreSQL store (:mod:`synapse_acme.pgstore`) must be proven against the real thing,
and each test run must be able to start a private server that leaves nothing behind. This module
is the one place that knows how.

The server listens on a unix socket in its own temporary directory and on no TCP port at all, so
two test runs on one machine never race for a port. PostgreSQL refuses to run as root, so when
the tests run as root (CI does) ``initdb`` and ``postgres`` run as an unprivileged system user
(``nobody``, or one created for the tests), which owns the data directory. Durability is switched
off (``fsync=off``): the data dies with the test anyway.

Like :mod:`synapse_acme.testing.pebble` the harness is blocking (``subprocess``) and runs in test
processes, never inside the reactor. Usage::

    with PostgresServer() as pg:
        dsn = pg.create_database("contract_1")   # a libpq connection string
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import attrs
from twisted.internet import defer

log = logging.getLogger(__name__)

#: Where Debian's ``postgresql`` package puts its programs (not on PATH): one directory per
#: major version; the newest wins.
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
#: The superuser initdb creates; connections come through the socket with ``trust`` auth.
SUPERUSER = "synapse_acme"
#: Only names the socket file (``.s.PGSQL.<port>``): the server opens no TCP port.
SOCKET_PORT = 5432
#: How long ``pg_ctl start`` waits for the server to accept connections (it needs ~0.5 s).
START_TIMEOUT = 60
_INSTALL_HINT = "install it with: apt-get install -y postgresql (Debian/Ubuntu)"
_TEST_USER = "synapse-acme-test"
_SAFE_DBNAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_R = TypeVar("_R")


class PostgresError(RuntimeError):
    """PostgreSQL is missing, did not start, or a management command failed."""


def _version_of(directory: str) -> tuple[int, ...]:
    parts = os.path.basename(os.path.dirname(directory)).split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def find_binary(name: str) -> str:
    """Absolute path of PostgreSQL's program ``name`` (``initdb``, ``pg_ctl``): the newest
    version under :data:`DEBIAN_BIN_GLOB`, else on PATH; PostgresError naming the package to
    install when there is none (the tests then fail, never skip)."""
    for directory in sorted(glob.glob(DEBIAN_BIN_GLOB), key=_version_of, reverse=True):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise PostgresError(f"{name!r} not found in {DEBIAN_BIN_GLOB} or on PATH; {_INSTALL_HINT}")
    return found


def unprivileged_user() -> pwd.struct_passwd | None:
    """Who runs the server: ``None`` (this user) unless we are root; then ``nobody``, or a
    system user created for the tests when the system has none."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", _TEST_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _TEST_USER],
        check=True,
    )
    return pwd.getpwnam(_TEST_USER)


@attrs.define(eq=False)
class PostgresServer:
    """One PostgreSQL server in a temporary directory (see the module docstring).

    ``parent``: where the temporary directory goes (default: the system's temporary directory;
    it must be reachable by the unprivileged user, which a pytest ``tmp_path`` of root is not).
    """

    parent: str | None = None
    root: str | None = attrs.field(default=None, init=False)
    _user: pwd.struct_passwd | None = attrs.field(default=None, init=False)
    _started: bool = attrs.field(default=False, init=False)
    _names: itertools.count[int] = attrs.field(factory=itertools.count, init=False)

    @property
    def socket_dir(self) -> str:
        assert self.root is not None, "PostgresServer is not started"
        return self.root

    @property
    def data_dir(self) -> str:
        return os.path.join(self.socket_dir, "data")

    @property
    def log_file(self) -> str:
        return os.path.join(self.socket_dir, "postgres.log")

    def dsn(self, dbname: str = "postgres") -> str:
        """The libpq connection string for database ``dbname`` (through the socket)."""
        return f"host={self.socket_dir} port={SOCKET_PORT} user={SUPERUSER} dbname={dbname}"

    def _run(self, argv: Sequence[str], what: str) -> None:
        prefix: list[str] = []
        if self._user is not None:
            setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
            prefix = [
                setpriv,
                f"--reuid={self._user.pw_uid}",
                f"--regid={self._user.pw_gid}",
                "--clear-groups",
            ]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        result = subprocess.run(
            [*prefix, *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.socket_dir,
            timeout=START_TIMEOUT + 30,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{what} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as f:
                return "server log:\n" + "".join(f.readlines()[-20:]).rstrip()
        except OSError:
            return "(no server log)"

    def start(self) -> PostgresServer:
        """initdb, then start the server and wait until it accepts connections."""
        initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        self._user = unprivileged_user()
        self.root = tempfile.mkdtemp(prefix="synapse-acme-pg-", dir=self.parent)
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.root, 0o700)
        self._run(
            [
                initdb,
                "--pgdata",
                self.data_dir,
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            "initdb",
        )
        options = (
            f"-k {self.socket_dir} -p {SOCKET_PORT} -c listen_addresses='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            [pg_ctl, "start", "-w", "-t", str(START_TIMEOUT), "-D", self.data_dir,
             "-l", self.log_file, "-o", options],
            "pg_ctl start",
        )  # fmt: skip
        self._started = True
        log.info("PostgreSQL started in %s", self.root)
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if self.root is None:
            return
        try:
            if self._started:
                self._run(
                    [find_binary("pg_ctl"), "stop", "-w", "-m", "fast", "-D", self.data_dir],
                    "pg_ctl stop",
                )
        finally:
            self._started = False
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def restart(self) -> None:
        """Stop and start the server on the same data (connections are cut)."""
        pg_ctl = find_binary("pg_ctl")
        self._run(
            [pg_ctl, "restart", "-w", "-m", "fast", "-D", self.data_dir, "-l", self.log_file],
            "pg_ctl restart",
        )

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database (named ``name``, or the next ``db_<n>``) and return its
        connection string."""
        dbname = name if name is not None else f"db_{next(self._names)}"
        if not _SAFE_DBNAME.match(dbname):
            raise ValueError(f"not a plain database name: {dbname!r}")
        import psycopg2  # the `postgres` extra

        conn = psycopg2.connect(self.dsn())
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {dbname}")
        finally:
            conn.close()
        return self.dsn(dbname)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class InlineDatabase:
    """A :class:`synapse_acme.pgstore.Database` that runs everything at once on the calling
    thread, on one connection: for tests on a :class:`~twisted.internet.task.Clock`, where
    Deferreds must fire synchronously. Same transaction rule as adbapi (commit when the
    interaction returns, roll back when it raises). Never for a running reactor: it blocks."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: Any = None
        self.closed = False

    def interaction(self, f: Callable[[Any], _R]) -> defer.Deferred[_R]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self.connect()
            try:
                with self._conn.cursor() as cur:
                    result = f(cur)
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise
            return defer.succeed(result)
        except Exception:
            return defer.fail()

    def blocking(self, f: Callable[[], _R]) -> defer.Deferred[_R]:
        return defer.maybeDeferred(f)

    def connect(self) -> Any:
        import psycopg2  # the `postgres` extra

        return psycopg2.connect(self._dsn)

    def close(self) -> None:
        self.closed = True
        if self._conn is not None and not self._conn.closed:
            self._conn.close()


def stored_certificate(dsn: str, key: str) -> tuple[int, float] | None:
    """(leaf serial, ``updated_at``) of the certificate the PostgreSQL store at ``dsn`` holds
    under ``key``, read directly with psycopg2; None if there is none yet (nor a schema)."""
    import psycopg2

    from synapse_acme import crypto

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT chain_pem, updated_at FROM synapse_acme_certificates WHERE key = %s",
                (key,),
            )
            row = cur.fetchone()
    except psycopg2.errors.UndefinedTable:  # no process has created the schema yet
        return None
    finally:
        conn.close()
    if row is None:
        return None
    return crypto.parse_chain(bytes(row[0]))[0].serial_number, float(row[1])
