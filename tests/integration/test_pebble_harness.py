"""The Pebble harness itself: real pebble + pebble-challtestsrv processes.

An issued chain for ``verify_chain`` comes from certbot's blocking ``acme.client.ClientV2`` (an
independent client, fine in a test) with ``PEBBLE_VA_ALWAYS_VALID=1``, so no responder is needed.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import josepy
import pytest
from acme import challenges, client, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from synapse_acme.testing.pebble import PebbleCA, PebbleError

QUIET_VALID = {"PEBBLE_VA_ALWAYS_VALID": "1", "PEBBLE_WFE_NONCEREJECT": "0"}


def _opener(ca: PebbleCA) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ca.ssl_context())
    )


def _issue(ca: PebbleCA, names: Sequence[str], eab: tuple[str, str] | None = None) -> bytes:
    """Get a certificate from ``ca`` with certbot's acme client; returns the PEM chain."""
    from synapse_acme.acme.csr import make_csr_pem
    from synapse_acme.crypto import generate_private_key_pem

    account_key = josepy.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = client.ClientNetwork(account_key, alg=josepy.ES256, verify_ssl=ca.ca_bundle)  # type: ignore[arg-type]
    directory = client.ClientV2.get_directory(ca.directory_url, net)
    acme = client.ClientV2(directory, net)
    binding = None
    if eab is not None:
        binding = messages.ExternalAccountBinding.from_data(
            account_public_key=account_key.public_key(),
            kid=eab[0],
            hmac_key=eab[1],
            directory=directory,
        )
    acme.new_account(
        messages.NewRegistration.from_data(
            terms_of_service_agreed=True, external_account_binding=binding
        )
    )
    csr = make_csr_pem(generate_private_key_pem(), list(names))
    order = acme.new_order(csr)
    for authz in order.authorizations:
        for chall in authz.body.challenges:
            if isinstance(chall.chall, challenges.HTTP01):
                acme.answer_challenge(chall, chall.chall.response(account_key))
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=30)
    order = acme.poll_and_finalize(order, deadline=deadline)
    return order.fullchain_pem.encode()


def test_directory_answers_over_tls_trusting_only_the_api_ca(pebble: PebbleCA) -> None:
    assert pebble.directory_url.startswith("https://127.0.0.1:")
    with _opener(pebble).open(pebble.directory_url, timeout=5) as resp:
        directory = json.load(resp)
    assert {"newNonce", "newAccount", "newOrder"} <= set(directory)
    assert directory["meta"]["externalAccountRequired"] is False
    # The throw-away API CA is not in the system store: trusting it explicitly is required.
    default = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
    )
    with pytest.raises(urllib.error.URLError) as info:
        default.open(pebble.directory_url, timeout=5)
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)


def test_roots_and_intermediates_are_ca_certificates(pebble: PebbleCA) -> None:
    roots = pebble.roots()
    intermediates = pebble.intermediates()
    assert len(roots) >= 1
    assert len(intermediates) == len(roots)
    for pem in roots + intermediates:
        cert = x509.load_pem_x509_certificate(pem)
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    root = x509.load_pem_x509_certificate(roots[0])
    assert root.issuer == root.subject  # self-signed
    assert x509.load_pem_x509_certificate(intermediates[0]).issuer == root.subject


def test_made_up_names_resolve_to_loopback_and_can_be_changed(pebble: PebbleCA) -> None:
    assert pebble.resolve_a("x.example.test") == ["127.0.0.1"]
    assert pebble.resolve_a("deep.sub.x.example.test") == ["127.0.0.1"]
    pebble.add_a("moved.example.test", "10.9.8.7")
    try:
        assert pebble.resolve_a("moved.example.test") == ["10.9.8.7"]
    finally:
        pebble.clear_a("moved.example.test")
    assert pebble.resolve_a("moved.example.test") == ["127.0.0.1"]
    pebble.set_servfail("broken.example.test")
    try:
        with pytest.raises(PebbleError, match="rcode 2"):
            pebble.resolve_a("broken.example.test")
    finally:
        pebble.clear_servfail("broken.example.test")
    assert pebble.resolve_a("broken.example.test") == ["127.0.0.1"]


def test_verify_chain_accepts_real_issuance_and_rejects_wrong_names_and_roots(
    pebble_factory: Callable[..., PebbleCA],
) -> None:
    ca = pebble_factory(env=QUIET_VALID, validity=600)
    names = ["a.example.test", "b.a.example.test"]
    chain = _issue(ca, names)
    ca.verify_chain(chain, names)
    ca.verify_chain(chain, ["b.a.example.test"])
    leaf = x509.load_pem_x509_certificate(chain)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= datetime.timedelta(seconds=601)

    with pytest.raises(AssertionError, match=r"do not include \['c.example.test'\]"):
        ca.verify_chain(chain, ["a.example.test", "c.example.test"])
    with pytest.raises(AssertionError, match="no certificate"):
        ca.verify_chain(b"", names)
    with pytest.raises(AssertionError, match="not PEM certificates"):
        ca.verify_chain(b"-----BEGIN CERTIFICATE-----\ngarbage\n", names)
    # After expiry the chain must no longer verify.
    later = leaf.not_valid_after_utc + datetime.timedelta(minutes=1)
    with pytest.raises(AssertionError, match="does not verify"):
        ca.verify_chain(chain, names, at=later)
    # Each Pebble start has a fresh issuing root: another instance must reject this chain.
    other = pebble_factory(env=QUIET_VALID)
    with pytest.raises(AssertionError, match="does not verify against Pebble's roots"):
        other.verify_chain(chain, names)


def test_blocklist_and_eab_options_reach_pebble(pebble_factory: Callable[..., PebbleCA]) -> None:
    hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    ca = pebble_factory(
        env=QUIET_VALID, blocklist=["blocked.example.test"], eab={"kid-1": hmac_key}
    )
    assert ca.directory()["meta"]["externalAccountRequired"] is True
    with pytest.raises(messages.Error) as info:
        _issue(ca, ["ok.example.test"])  # no EAB
    assert info.value.code == "externalAccountRequired"
    chain = _issue(ca, ["ok.example.test"], eab=("kid-1", hmac_key))
    ca.verify_chain(chain, ["ok.example.test"])
    with pytest.raises(messages.Error) as info:
        _issue(ca, ["blocked.example.test"], eab=("kid-1", hmac_key))
    assert info.value.code == "rejectedIdentifier"


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    ca = PebbleCA(str(tmp_path), http_port=5002, pebble_bin="no-such-pebble-binary")
    with pytest.raises(RuntimeError, match="apt-get install -y pebble"):
        ca.start()
    assert not ca.running


def test_program_dying_at_start_reports_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "fake-pebble"
    fake.write_text("#!/bin/sh\necho 'boom: bad config' >&2\nexit 3\n")
    fake.chmod(0o755)
    ca = PebbleCA(str(tmp_path / "w"), http_port=5002, pebble_bin=str(fake))
    with pytest.raises(PebbleError, match=r"(?s)exited with status 3.*boom: bad config"):
        ca.start()
    assert not ca.running


def test_stop_closes_the_ports_and_is_idempotent(tmp_path: Path) -> None:
    ca = PebbleCA(str(tmp_path), http_port=5002).start()
    port = ca.api_port
    assert ca.running
    ca.stop()
    ca.stop()
    assert not ca.running
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_serve_command_prints_json_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "synapse_acme.testing.pebble", "serve"),
            *("--workdir", str(tmp_path / "p"), "--http-port", "5002", "--validity", "900"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["http_port"] == 5002
        assert info["directory_url"].startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=info["ca_bundle"])
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
        )
        with opener.open(info["directory_url"], timeout=5) as resp:
            assert "newOrder" in json.load(resp)
        config = json.loads((tmp_path / "p" / "pebble-config.json").read_text())
        assert config["pebble"]["certificateValidityPeriod"] == 900
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    port = int(info["directory_url"].rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_start_retries_when_a_picked_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from synapse_acme.testing import ports

    real_reserve = ports.reserve_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        calls: list[int] = []

        def first_one_taken(*args: Any, **kwargs: Any) -> ports.PortReservation:
            calls.append(1)
            if len(calls) == 1:
                return ports.PortReservation(taken, None)
            return real_reserve(*args, **kwargs)

        monkeypatch.setattr(ports, "reserve_port", first_one_taken)
        ca = PebbleCA(str(tmp_path), http_port=5002)
        try:
            ca.start()
            assert ca.api_port != taken
            assert "address already in use" in (tmp_path / "pebble.log").read_text()
            assert "newOrder" in ca.directory()
        finally:
            ca.stop()


def test_http_port_is_reserved_until_stop(tmp_path: Path) -> None:
    from synapse_acme.testing import ports

    ca = PebbleCA(str(tmp_path)).start()
    try:
        assert ca.http_port != 0 and ca.config()["pebble"]["httpPort"] == ca.http_port
        low = ports._ephemeral_low()
        assert ports.RESERVED_LOW <= ca.http_port < low  # never an ephemeral port
        # Held against every other user of reserve_port until stop().
        others = [ports.reserve_port() for _ in range(20)]
        assert ca.http_port not in {r.port for r in others}
        for r in others:
            r.release()
    finally:
        ca.stop()


def test_dump_goroutines_keeps_pebbles_stacks(tmp_path: Path) -> None:
    ca = PebbleCA(str(tmp_path / "w"), http_port=5002).start()
    try:
        dest = tmp_path / "dump.log"
        assert ca.dump_goroutines(str(dest))
        text = dest.read_text(errors="replace")
        assert "goroutine " in text and "SIGQUIT" in text  # Go's stack dump
        assert not ca.dump_goroutines(str(tmp_path / "again.log"))  # Pebble has exited
    finally:
        ca.stop()
