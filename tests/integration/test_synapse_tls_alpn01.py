"""tls-alpn-01 inside a real Synapse: Pebble's validator dials Synapse's own ``tls: true``
listener (``tlsPort``), and its HTTP-01 port points at nothing (Synapse's plain listener is on
another port). The module's hot-swapping creator answers the challenge; the federation API keeps
answering over TLS with the normal certificate throughout.
"""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator

import pytest
from cryptography import x509

from synapse_acme import crypto
from synapse_acme.testing import ports
from synapse_acme.testing.pebble import PebbleCA
from tests.integration.test_synapse import (
    ISSUE_TIMEOUT,
    SERVER_NAME,
    Synapse,
    federation_version,
    fetch_chain,
    module_config,
    serial,
    verified_leaf,
    wait_for,
)
from tests.integration.test_tls_alpn01_pebble import is_validation, tls_handshake

#: Pebble validates after a random pause of up to 3 s (so the challenge is pending long enough
#: for normal handshakes to happen meanwhile), and validates every order anew.
VA_SLEEP = {"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": "3", "PEBBLE_AUTHZREUSE": "0"}


@pytest.fixture
def setup(tmp_path: pathlib.Path) -> Iterator[tuple[Synapse, PebbleCA]]:
    tls_reserved = ports.reserve_port()  # Synapse's TLS port, known before Pebble starts
    ca = PebbleCA(str(tmp_path / "pebble"), tls_port=tls_reserved.port, env=VA_SLEEP)
    ca.start()
    plain = ports.reserve_port()  # Synapse's plain listener: not where Pebble dials HTTP-01

    def moved(port: int) -> None:  # Synapse had to take another TLS port: Pebble follows
        ca.stop()
        ca.tls_port = port
        ca.start()

    config = module_config(ca) + "challenges: [tls-alpn-01]\n"
    hs = Synapse(
        tmp_path / "hs",
        ca,
        config,
        tls_reserved=tls_reserved,
        http_port=plain.port,
        on_tls_port_moved=moved,
    )
    try:
        yield hs, ca
    finally:
        hs.stop()
        ca.stop()
        plain.release()


def test_synapse_answers_tls_alpn_01_on_its_tls_listener(setup: tuple[Synapse, PebbleCA]) -> None:
    hs, ca = setup
    assert ca.http_port != hs.http_port  # HTTP-01 would reach nothing
    failures: list[str] = []
    seen: list[int] = []  # serials normal clients got
    answers = [0]
    probes_answered = [0]  # acme-tls/1-only handshakes that got a validation certificate
    normal_during_challenge = [0]  # normal handshakes between two such probes
    stop = threading.Event()

    def hammer() -> None:
        """A normal client the whole time: the federation API over TLS, and the chain."""
        last_saw = False
        while not stop.is_set():
            try:
                assert federation_version(hs.tls_port)["server"]
                leaf = fetch_chain(hs.tls_port)[0]
                if is_validation(leaf):
                    failures.append("a normal client got the validation certificate")
                seen.append(serial(leaf))
                answers[0] += 1
            except Exception as e:
                failures.append(repr(e))
                continue
            probe = tls_handshake(hs.tls_port, [b"acme-tls/1"], SERVER_NAME)
            saw = probe is not None and is_validation(probe[0]) and probe[1] == b"acme-tls/1"
            probes_answered[0] += saw
            normal_during_challenge[0] += saw and last_saw
            last_saw = saw
            time.sleep(0.02)

    hs.start()
    poller = threading.Thread(target=hammer, daemon=True)
    poller.start()
    try:

        def issued() -> x509.Certificate | None:
            chain = fetch_chain(hs.tls_port)
            if crypto.is_placeholder(chain[0]):
                return None
            return verified_leaf(ca, chain)

        first = wait_for(issued, ISSUE_TIMEOUT, "the certificate issued over tls-alpn-01", hs.log)
        (hs.storage / "renew-request").write_text("")

        def renewed() -> x509.Certificate | None:
            leaf = verified_leaf(ca, fetch_chain(hs.tls_port))
            return leaf if serial(leaf) != serial(first) else None

        second = wait_for(renewed, ISSUE_TIMEOUT, "the renewal over tls-alpn-01", hs.log)
        assert hs.proc is not None and hs.proc.poll() is None
    finally:
        stop.set()
        poller.join(timeout=10)
    log = hs.log()
    assert not failures, failures[:5]
    # How many depends on the machine's load (Synapse's start, two issuances): at least one
    # before, during and after the challenges; the checks below say what they saw.
    assert answers[0] >= 3, answers
    # Normal clients saw the placeholder, then each issued certificate, never anything else.
    assert {serial(first), serial(second)} <= set(seen)
    # The challenges were served by Synapse's own TLS listener, and normal clients were
    # answered (with the normal certificate) while they were.
    assert probes_answered[0] >= 2, log[-4000:]
    assert normal_during_challenge[0] >= 1, (normal_during_challenge, log[-4000:])
