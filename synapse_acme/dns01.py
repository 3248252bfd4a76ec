"""The DNS-01 challenge responder: TXT records added and removed by RFC 2136 dynamic updates.

For each challenge the responder adds one TXT record, ``_acme-challenge.<name>`` with the value
``base64url(SHA-256(key authorization))`` (RFC 8555 section 8.4; a wildcard ``*.example.org``
is validated at ``_acme-challenge.example.org``), signed with a TSIG key, at the zone's primary
server. Its Deferred fires only once every authoritative server of the zone answers with the
value, so the CA is never told to look before the record can be seen. Then
:meth:`~DNS01Responder.stop_responding` deletes that record again.

Invariants:

- **Only our own value is touched.** A wildcard and its base name share one
  ``_acme-challenge`` name and are validated at the same time with two values; every update adds
  or deletes one exact TXT value, never the whole RRset, so neither removes the other (nor a
  record someone else put there).
- **Nothing is left behind.** A failure after the record was added (the propagation check timed
  out, the issuance was cancelled, the update's answer was lost) deletes it before the failure is
  passed on; :meth:`~DNS01Responder.stop_responding` deletes it after the CA has looked. A record
  that cannot be deleted is logged as an error naming it, so an operator can remove it.
- **The reactor never waits on DNS.** dnspython is blocking, so every update and query runs in a
  thread (``run``); the propagation polling sleeps on the injected clock.
- **The TSIG secret is never logged** (``repr`` of the settings leaves it out).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_acme.errors import Dns01Error
from synapse_acme.interfaces import IResponder

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The label RFC 8555 section 8.4 puts in front of the validated name.
LABEL = "_acme-challenge"
#: TXT TTL: short, so a CA's resolver that cached an old answer asks again soon.
DEFAULT_TTL = 60
#: How long the record may take to be visible at every authoritative server. Secondaries
#: usually follow their primary's NOTIFY within seconds; a slow zone transfer needs minutes.
DEFAULT_PROPAGATION_TIMEOUT = 120.0
#: Between two rounds of the propagation check (the first round is at once).
POLL_INTERVAL = 2.0
#: One DNS update or query.
QUERY_TIMEOUT = 5.0
#: The TSIG algorithms a key may use (BIND's names; synapse_acme.rfc2136 maps each to
#: dnspython's). Names only here: the configuration checks them without importing dnspython.
TSIG_ALGORITHMS = (
    "hmac-sha256",
    "hmac-sha384",
    "hmac-sha512",
    "hmac-sha224",
    "hmac-sha1",
    "hmac-md5",
)

Server = tuple[str, int]  # (IP address, port)
#: Runs a blocking callable off the reactor thread: ``run(f, *args)`` -> Deferred of its result.
Runner = Callable[..., Deferred[Any]]


def txt_value(key_authorization: str) -> str:
    """The TXT value that answers a DNS-01 challenge: base64url (no padding) of the SHA-256 of
    the key authorization (RFC 8555 section 8.4)."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def record_name(identifier: str) -> str:
    """Where the TXT record for ``identifier`` goes: ``_acme-challenge.<name>``, the ``*.``
    of a wildcard dropped (RFC 8555 section 8.4; RFC 8659 for the wildcard)."""
    name = identifier.rstrip(".").lower()
    if name.startswith("*."):
        name = name[2:]
    return f"{LABEL}.{name}"


def format_server(server: Server) -> str:
    host, port = server
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}"


@attrs.frozen
class Dns01Settings:
    """``dns01:``: where and how to update the zone (see docs/challenge-dns-01.md).

    ``server`` is the primary that accepts the updates; ``propagation_servers`` the servers the
    record must be visible at before the CA is told (None: the zone's NS servers, port 53, as
    listed at ``server``, plus ``server`` itself). ``config_path`` is the key path of the block,
    for messages.
    """

    server: Server
    zone: str  # absolute, lower-case, no trailing dot
    tsig_key_name: str
    tsig_algorithm: str  # one of TSIG_ALGORITHMS
    tsig_secret: bytes = attrs.field(repr=False)  # decoded; never printed
    tsig_secret_file: str = ""
    ttl: int = DEFAULT_TTL
    propagation_timeout: float = DEFAULT_PROPAGATION_TIMEOUT
    propagation_servers: tuple[Server, ...] | None = None
    config_path: str = "acme.dns01"

    def covers(self, identifier: str) -> bool:
        """True if ``identifier``'s TXT record lies inside :attr:`zone`."""
        name = record_name(identifier)
        return name == self.zone or name.endswith("." + self.zone)


class DnsBackend(Protocol):
    """The blocking DNS operations the responder needs
    (:class:`~synapse_acme.rfc2136.Rfc2136Backend`; tests pass a fake). Each raises
    :class:`~synapse_acme.errors.Dns01Error` on failure."""

    def add(self, name: str, value: str) -> None: ...

    def delete(self, name: str, value: str) -> None: ...

    def authoritative_servers(self) -> list[Server]: ...

    def txt_values(self, server: Server, name: str) -> set[str]: ...


@attrs.frozen
class _Record:
    name: str
    value: str
    added: Deferred[None]  # the add, as run in its thread; never cancelled


def _settled(d: Deferred[_T]) -> Deferred[None]:
    """A Deferred firing with None once ``d`` has a result (success or failure), which it does
    not consume; cancelling it leaves ``d`` running (a thread cannot be stopped halfway)."""
    out: Deferred[None] = Deferred()

    def done(result: object) -> object:
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(done)
    return out


@implementer(IResponder)
@attrs.define(eq=False)
class DNS01Responder:
    """Answers ``dns-01`` challenges with TXT records through ``backend``.

    ``run`` runs the backend's blocking calls off the reactor thread; ``clock`` paces the
    propagation check, which gives up after ``propagation_timeout`` seconds.
    """

    challenge_type = "dns-01"
    backend: DnsBackend
    clock: IReactorTime
    run: Runner
    propagation_timeout: float = DEFAULT_PROPAGATION_TIMEOUT
    poll_interval: float = POLL_INTERVAL
    zone_check: Callable[[str], bool] | None = None
    _live: dict[tuple[str, str], _Record] = attrs.field(factory=dict, init=False)

    def start_responding(
        self, identifier: str, token: str, key_authorization: str
    ) -> Deferred[None]:
        """Add the TXT record for ``identifier``; the Deferred fires with None once every
        authoritative server answers with it, or fails (with the record removed again)."""
        return Deferred.fromCoroutine(self._start(identifier, token, txt_value(key_authorization)))

    async def _start(self, identifier: str, token: str, value: str) -> None:
        name = record_name(identifier)
        if self.zone_check is not None and not self.zone_check(identifier):
            raise Dns01Error(f"{name} (for {identifier}) is outside the configured dns01 zone")
        key = (identifier, token)
        if key in self._live:
            await self._remove(key)
        record = _Record(name, value, self.run(self.backend.add, name, value))
        self._live[key] = record
        try:
            await _settled(record.added)
            await record.added  # its failure, if any (already settled: no wait)
            logger.info("Added the DNS-01 TXT record %s for %s", name, identifier)
            await self._wait_visible(name, value)
        except BaseException:
            # Cancelled, timed out or failed: the CA will not look, so the record goes now.
            await self._remove(key)
            raise

    async def _wait_visible(self, name: str, value: str) -> None:
        servers = await self.run(self.backend.authoritative_servers)
        started = self.clock.seconds()
        waiting: dict[Server, str] = {server: "not asked yet" for server in servers}
        while True:
            for server in list(waiting):
                try:
                    values = await self.run(self.backend.txt_values, server, name)
                except Dns01Error as e:
                    waiting[server] = str(e)
                    continue
                if value in values:
                    del waiting[server]
                else:
                    waiting[server] = "the value is not there yet"
            if not waiting:
                logger.info(
                    "The TXT record %s is visible at %s after %.1f s",
                    name,
                    ", ".join(format_server(s) for s in servers),
                    self.clock.seconds() - started,
                )
                return
            elapsed = self.clock.seconds() - started
            if elapsed >= self.propagation_timeout:
                reasons = "; ".join(f"{format_server(s)}: {why}" for s, why in waiting.items())
                raise Dns01Error(
                    f"the TXT record {name} was not visible at every authoritative server within "
                    f"{self.propagation_timeout:g} s (dns01.propagation_timeout): {reasons}"
                )
            logger.debug("Waiting for the TXT record %s at %d server(s)", name, len(waiting))
            await task.deferLater(
                self.clock,
                min(self.poll_interval, self.propagation_timeout - elapsed),
                lambda: None,
            )

    def stop_responding(self, identifier: str, token: str) -> Deferred[None]:
        """Delete the TXT value added for ``token``; an unknown token is not an error, and a
        failed delete is logged (naming the record), never raised."""
        return Deferred.fromCoroutine(self._remove((identifier, token)))

    async def _remove(self, key: tuple[str, str]) -> None:
        record = self._live.pop(key, None)
        if record is None:
            return
        await _settled(record.added)  # an add still in flight would re-create the record
        record.added.addErrback(lambda _: None)  # its failure was reported by start_responding
        deleted = self.run(self.backend.delete, record.name, record.value)

        def failed(failure: Failure) -> None:
            logger.error(
                "Could not delete the DNS-01 TXT record %s (value %s); remove it by hand: %s",
                record.name,
                record.value,
                failure.getErrorMessage(),
            )

        # Logged from the delete itself: a caller that stops waiting (cancels) does not stop
        # the update already on its way, nor hide how it ended.
        deleted.addCallbacks(
            lambda _: logger.info("Deleted the DNS-01 TXT record %s", record.name), failed
        )
        await _settled(deleted)

    def pending(self) -> list[tuple[str, str]]:
        """``(record name, value)`` of every TXT record added and not yet deleted."""
        return [(r.name, r.value) for r in self._live.values()]


def dns01_responder(settings: Dns01Settings, clock: IReactorTime, run: Runner) -> DNS01Responder:
    """The responder for ``settings``: RFC 2136 updates at ``settings.server``."""
    # dnspython is loaded only by a setup that answers DNS-01 (it is most of an import of
    # this package otherwise, and `synapse-acme issue` for HTTP-01 never needs it).
    from synapse_acme.rfc2136 import Rfc2136Backend

    return DNS01Responder(
        backend=Rfc2136Backend(settings),
        clock=clock,
        run=run,
        propagation_timeout=settings.propagation_timeout,
        zone_check=settings.covers,
    )


def thread_runner(reactor: Any) -> Runner:
    """A :data:`Runner` on ``reactor``'s thread pool (``IReactorThreads``)."""
    from twisted.internet import threads

    def run(f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run
