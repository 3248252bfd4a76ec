"""runtime.build_runtime's wiring: what the service may do before its challenge listener is up,
who gets the certificates, and what is checked before anything is written."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from synapse_acme.acme.issuer import AcmeIssuer
from synapse_acme.config import AcmeConfig, parse_acme_config
from synapse_acme.errors import ConfigError, ListenError
from synapse_acme.http01 import HTTP01Responder
from synapse_acme.limits import ConnectionLimits, HandshakeDeadlineFactory, LimitedFactory
from synapse_acme.runtime import (
    Runtime,
    build_runtime,
    challenge_preferences,
    challenge_responders,
)
from synapse_acme.tls import HotSwapTLS
from synapse_acme.tlsalpn01 import TLSALPN01Responder


class _RecordingHTTP:
    """Stands for treq at the CA: records every request and never answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        self.requests.append((method, url))
        return defer.Deferred()


class _PortTakenReactor(MemoryReactorClock):
    """A reactor on which every TCP port is taken (the kernel's EADDRINUSE)."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))


def _config(tmp_path: Path, **block: Any) -> AcmeConfig:
    return parse_acme_config(
        {
            "enabled": True,
            "domain": "gate.example.test",
            "url": "https://ca.example.test/dir",
            **block,
        },
        base_dir=str(tmp_path),
        path="modules[0].config",
    )


def _stop(runtime: Runtime) -> None:
    runtime.service.stopService()


def test_nothing_reaches_the_ca_while_the_challenge_listener_cannot_be_bound(
    tmp_path: Path,
) -> None:
    # The module's way: startService only (no privileged start), the service starts at once.
    reactor = _PortTakenReactor()
    http = _RecordingHTTP()
    config = _config(tmp_path, port=8009, bind_addresses=["127.0.0.1"])
    runtime = build_runtime(config, reactor, http_client=http, host_serves_tls=True)
    runtime.service.startService()
    try:
        reactor.advance(0)
        reactor.advance(3 * 86400)  # every retry of the back-off table meanwhile
        assert http.requests == []  # no directory, no account, no order
        assert runtime.acme is not None
        [status] = runtime.acme.status()
        assert status.last_error_type == "ListenError"
        # In plain words, with the key as the module's config names it.
        assert "port 8009 on 127.0.0.1 (in use, EADDRINUSE)" in status.last_error
        assert "modules[0].config.port (8009)" in status.last_error
    finally:
        _stop(runtime)


def test_the_ca_is_asked_once_the_listener_is_bound(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    http = _RecordingHTTP()
    # No preflight here: it would probe gate.example.test first (tests/unit/test_preflight.py).
    config = _config(tmp_path, port=8009, preflight={"enabled": False})
    runtime = build_runtime(config, reactor, http_client=http)
    runtime.service.startService()
    try:
        reactor.advance(0)
        assert http.requests and http.requests[0][1] == "https://ca.example.test/dir"
    finally:
        _stop(runtime)


def test_certificates_go_to_the_tls_creator_only_when_something_serves_it(
    tmp_path: Path,
) -> None:
    # A one-shot `issue` with no TLS listener must not claim to serve (the status's served
    # serial stays empty); a host that installs the creator, or tls_listen, gets them.
    for kwargs, block, serves in (
        ({}, {}, False),
        ({"host_serves_tls": True}, {}, True),
        ({}, {"tls_listen": ["tcp:0:interface=127.0.0.1"]}, True),
    ):
        runtime = build_runtime(
            _config(tmp_path, port=0, **block),
            MemoryReactorClock(),
            http_client=_RecordingHTTP(),
            **kwargs,
        )
        try:
            assert runtime.acme is not None
            assert (runtime.tls in runtime.acme._consumers) is serves, (kwargs, block)
        finally:
            for child in runtime.service:
                if hasattr(child, "lock"):
                    child.lock.release()


def test_an_account_key_directory_outside_the_store_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    key = tmp_path / "path" / "to" / "acme_account.key"
    config = _config(tmp_path, port=0, storage="store", account_key_file=str(key))
    with pytest.raises(ConfigError) as info:
        build_runtime(config, MemoryReactorClock(), http_client=_RecordingHTTP())
    assert str(info.value).startswith(
        f"modules[0].config.account_key_file: its directory {key.parent} does not exist"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_connection_limits_from_the_config_reach_every_standalone_listener(
    tmp_path: Path,
) -> None:
    reactor = MemoryReactorClock()
    limits = {
        "max_connections": 7,
        "max_per_address": 3,
        "handshake_timeout": "4s",
        "header_timeout": "2s",
    }
    config = _config(
        tmp_path,
        port=8009,
        bind_addresses=["127.0.0.1"],
        tls_listen=["tcp:8448:interface=127.0.0.1"],
        connection_limits=limits,
    )
    runtime = build_runtime(config, reactor, http_client=_RecordingHTTP())
    runtime.service.startService()
    try:
        by_port = {port: factory for port, factory, _, _ in reactor.tcpServers}
        assert set(by_port) == {8009, 8448}
        for factory in by_port.values():
            assert isinstance(factory, LimitedFactory)
            assert factory.limits == ConnectionLimits(7, 3, 4.0, 2.0)
        # The HTTP-01 protocol drops a slow request head after header_timeout...
        assert by_port[8009].wrappedFactory.idle_timeout == 2.0
        # ...and the TLS listener a handshake after handshake_timeout.
        deadline = by_port[8448].wrappedFactory.wrappedFactory
        assert isinstance(deadline, HandshakeDeadlineFactory) and deadline.timeout == 4.0
    finally:
        _stop(runtime)


def test_when_ready_waits_for_every_listener_and_names_a_tls_one_that_fails(
    tmp_path: Path,
) -> None:
    reactor = _PortTakenReactor()
    listen = "tcp:8448:interface=127.0.0.1"
    config = _config(tmp_path, port=0, tls_listen=[listen])
    runtime = build_runtime(config, reactor, http_client=_RecordingHTTP())
    assert runtime.http01_listener is None and len(runtime.listeners) == 1
    runtime.service.privilegedStartService()
    outcome: list[Any] = []
    runtime.when_ready().addBoth(outcome.append)
    [failure] = outcome
    assert failure.check(ListenError)
    assert str(failure.value) == (
        "could not open any TLS listener: port 8448 on 127.0.0.1 (in use, EADDRINUSE). "
        f"These come from modules[0].config.tls_listen ({listen})"
    )
    _stop(runtime)


def test_when_ready_fires_once_the_http01_and_tls_listeners_are_bound(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    config = _config(tmp_path, port=8009, bind_addresses=["127.0.0.1"], tls_listen=["tcp:8448"])
    runtime = build_runtime(config, reactor, http_client=_RecordingHTTP())
    assert runtime.listeners[0] is runtime.http01_listener and len(runtime.listeners) == 2
    outcome: list[Any] = []
    runtime.when_ready().addBoth(outcome.append)
    assert outcome == []  # nothing bound before the (privileged) start
    runtime.service.privilegedStartService()
    assert outcome == [None]
    assert sorted(port for port, *_ in reactor.tcpServers) == [8009, 8448]
    _stop(runtime)


def test_dns01_is_preferred_and_needs_neither_a_listener_nor_the_http_preflight(
    tmp_path: Path,
) -> None:
    (tmp_path / "tsig.key").write_text('key "k" { algorithm hmac-sha256; secret "c2VjcmV0"; };')
    reactor = MemoryReactorClock()
    http = _RecordingHTTP()
    dns01 = {"server": "192.0.2.53", "zone": "example.test", "tsig_secret_file": "tsig.key"}
    config = _config(tmp_path, port=0, dns01=dns01)  # preflight left enabled
    runtime = build_runtime(config, reactor, http_client=http)
    runtime.service.startService()
    try:
        assert runtime.preflight is None and runtime.listeners == []
        assert runtime.acme is not None
        issuer = runtime.acme._issuer
        assert [r.challenge_type for r in issuer.responders] == ["dns-01", "http-01"]  # type: ignore[attr-defined]
        reactor.advance(0)
        assert http.requests and http.requests[0][1] == "https://ca.example.test/dir"
    finally:
        _stop(runtime)


# -- challenge choice --------------------------------------------------------------------------


def _preferences(tmp_path: Path, *, http01: bool, tls: bool, **block: Any) -> dict[str, Any]:
    """What build_runtime would give the issuer for ``block`` in a setup that serves HTTP-01
    (its listener or the host's) and/or TLS."""
    config = _config(tmp_path, **block)
    responders = challenge_responders(
        HTTP01Responder(),
        TLSALPN01Responder(tls=HotSwapTLS(clock=Clock()), clock=Clock()) if tls else None,
    )
    return challenge_preferences(config, responders, http01_served=http01)


def test_default_challenges_are_what_the_setup_can_answer(tmp_path: Path) -> None:
    key = "gate.example.test"
    assert _preferences(tmp_path, http01=True, tls=False) == {key: ("http-01",)}
    assert _preferences(tmp_path, http01=True, tls=True) == {key: ("http-01", "tls-alpn-01")}
    # TLS only (port 0 and tls_listen, or Synapse's TLS listener with no HTTP-01 listener
    # reaching it): no port 80 needed.
    assert _preferences(tmp_path, http01=False, tls=True) == {key: ("tls-alpn-01",)}
    # Nothing here answers: http-01, answered elsewhere, as before there was a choice.
    assert _preferences(tmp_path, http01=False, tls=False) == {key: ("http-01",)}


def test_challenges_per_certificate_override_the_block(tmp_path: Path) -> None:
    block = {
        "challenges": ["tls-alpn-01", "http-01"],
        "certificates": [
            {"domains": ["a.example.test"]},
            {"domains": ["b.example.test"], "challenges": "http-01"},
        ],
    }
    assert _preferences(tmp_path, http01=True, tls=True, **block) == {
        "gate.example.test": ("tls-alpn-01", "http-01"),
        "a.example.test": ("tls-alpn-01", "http-01"),
        "b.example.test": ("http-01",),
    }


def test_a_challenge_type_the_setup_cannot_answer_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _preferences(tmp_path, http01=True, tls=False, challenges=["tls-alpn-01"])
    assert str(e.value).startswith("modules[0].config.challenges: tls-alpn-01 cannot be answered")
    assert "modules[0].config.tls_listen" in str(e.value)
    block = {"certificates": [{"domains": ["a.example.test"], "challenges": ["tls-alpn-01"]}]}
    with pytest.raises(ConfigError, match=r"config\.certificates\[0\]\.challenges: tls-alpn-01"):
        _preferences(tmp_path, http01=True, tls=False, **block)


def test_the_tls_alpn_01_responder_answers_through_the_runtimes_tls_creator(
    tmp_path: Path,
) -> None:
    runtime = build_runtime(
        _config(tmp_path, port=0, tls_listen=["tcp:0:interface=127.0.0.1"]),
        MemoryReactorClock(),
        http_client=_RecordingHTTP(),
    )
    try:
        assert runtime.acme is not None
        issuer = runtime.acme._issuer
        assert isinstance(issuer, AcmeIssuer)
        [alpn] = [r for r in issuer.responders if isinstance(r, TLSALPN01Responder)]
        assert alpn.tls is runtime.tls
        assert issuer.challenge_preferences == {"gate.example.test": ("tls-alpn-01",)}
    finally:
        for child in runtime.service:
            if hasattr(child, "lock"):
                child.lock.release()
