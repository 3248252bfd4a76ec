"""tls-alpn-01 against real Pebble: its validator dials the TLS listener that `synapse-acme run`
serves (``tlsPort``), while its HTTP-01 port points at nothing.

Pebble waits up to 3 s before validating (``PEBBLE_VA_SLEEPTIME``), so each challenge stays
pending long enough to be seen from outside: the test alternates a normal client's handshake
(SNI, ``h2``/``http/1.1``) with a validator-like one (``acme-tls/1`` only) and checks that the
normal client never gets a validation certificate, also while one is being served.
"""

from __future__ import annotations

import datetime
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from synapse_acme import crypto
from synapse_acme.acme.tlsalpn import ACME_IDENTIFIER_OID
from synapse_acme.model import CertificateBundle
from synapse_acme.names import names_key
from synapse_acme.testing.pebble import PebbleCA
from synapse_acme.testing.ports import handover, listening_socket, systemd_endpoint

CLI = [sys.executable, "-m", "synapse_acme"]
NAME = "alpn.example.test"
#: Pebble validates after a random pause of up to 3 s, and validates every order anew.
VA_SLEEP = {"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": "3", "PEBBLE_AUTHZREUSE": "0"}


def tls_handshake(
    port: int, alpn: list[bytes], sni: str = NAME
) -> tuple[x509.Certificate, bytes] | None:
    """One handshake with ``sni``: the leaf and the negotiated protocol (None if the listener
    is not up or the handshake failed)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    ctx.set_alpn_protos(alpn)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            conn = SSL.Connection(ctx, sock)
            conn.set_tlsext_host_name(sni.encode())
            conn.set_connect_state()
            # A socket with a timeout is non-blocking underneath: wait for it ourselves.
            end = time.monotonic() + 3
            while True:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    if not select.select([sock], [], [], max(0.0, end - time.monotonic()))[0]:
                        return None
            leaf = conn.get_peer_certificate(as_cryptography=True)
            proto = conn.get_alpn_proto_negotiated()
            try:
                conn.shutdown()
            except (OSError, SSL.Error):
                pass  # the server may close first (it does after a validation handshake)
    except (OSError, SSL.Error):
        return None
    return (leaf, proto) if leaf is not None else None


def is_validation(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        return False
    return True


def stored(tmp: Path) -> CertificateBundle | None:
    d = tmp / "store" / "certificates" / names_key([NAME])
    try:
        return CertificateBundle(
            key_pem=(d / "privkey.pem").read_bytes(),
            chain_pem=(d / "fullchain.pem").read_bytes(),
            metadata=json.loads((d / "metadata.json").read_text()),
        )
    except (FileNotFoundError, ValueError):
        return None


def test_runner_issues_and_renews_over_tls_alpn_01_without_port_80(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    # The TLS listener's socket is bound first, so Pebble can be told where to validate.
    tls_socket = listening_socket()
    tls_port = tls_socket.getsockname()[1]
    # http_port: reserved, and nothing ever listens there.
    ca = pebble_factory(tls_port=tls_port, validity=20, env=VA_SLEEP)
    cfg = ca.write_acme_config(
        tmp_path, [NAME], listener=False, port=0, check_interval=1, tls_listen=[systemd_endpoint(0)]
    )
    argv, fds = handover([*CLI, "run", "-c", str(cfg)], [tls_socket])
    with tls_socket:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=fds
        )
    issued: dict[int, datetime.datetime] = {}  # serial -> notAfter
    normal_serials: set[int] = set()
    probes_answered = 0  # acme-tls/1 probes that got a validation certificate
    normal_during_challenge = 0  # normal handshakes between two such probes
    wrong: list[str] = []
    try:
        deadline = time.monotonic() + 90
        last_probe_saw_challenge = False
        while time.monotonic() < deadline and (len(issued) < 3 or normal_during_challenge < 3):
            bundle = stored(tmp_path)
            if bundle is not None:
                leaf = crypto.parse_chain(bundle.chain_pem)[0]
                if leaf.serial_number not in issued:
                    ca.verify_chain(bundle.chain_pem, [NAME])
                    issued[leaf.serial_number] = crypto.not_after(leaf)
            normal = tls_handshake(tls_port, [b"h2", b"http/1.1"])
            probe = tls_handshake(tls_port, [b"acme-tls/1"])
            if normal is not None and issued:
                cert, proto = normal
                if is_validation(cert):
                    wrong.append(f"normal client got a validation certificate ({proto!r})")
                else:
                    normal_serials.add(cert.serial_number)
                    assert proto in (b"h2", b"http/1.1")
            saw = probe is not None and is_validation(probe[0])
            if saw:
                assert probe is not None and probe[1] == b"acme-tls/1"
                probes_answered += 1
                if last_probe_saw_challenge and normal is not None and issued:
                    normal_during_challenge += 1
            last_probe_saw_challenge = saw
            time.sleep(0.05)
        assert proc.poll() is None, "synapse-acme run exited"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    log_tail = out[-4000:]
    assert not wrong, wrong
    # Issued, then renewed by itself, every time over tls-alpn-01 (nothing answers HTTP-01).
    assert len(issued) >= 3, f"saw {len(issued)} certificates; log:\n{log_tail}"
    assert probes_answered >= 3, log_tail
    assert normal_during_challenge >= 3, (normal_during_challenge, log_tail)
    # The hot-swapping listener served the issued certificates without a restart.
    assert len(normal_serials & set(issued)) >= 2, (normal_serials, set(issued))
    assert normal_serials <= set(issued), "a normal client got something never issued"
