"""Fault matrix: a connection flood under a 1024 open-files limit (row 14 of docs/RELIABILITY.md).

A real ``synapse-acme run`` (HTTP-01 listener and a TLS listener) runs with RLIMIT_NOFILE
1024/1024, so raising the soft limit cannot help it. The test holds 1,200 idle connections
against each listener (loopback only, bounded in count and time) and, meanwhile, asks for a
forced renewal: Pebble's real validation must go through the flooded HTTP-01 listener, the new
certificate must be saved and exported, status.json written, and a TLS handshake to the flooded
TLS listener must succeed and show the new certificate.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from synapse_acme import crypto
from synapse_acme.testing.pebble import PebbleCA
from synapse_acme.testing.ports import handover, listening_socket, systemd_endpoint
from tests.faults.cli_harness import CLI, ROOT, check_valid, load_bundle, save_figures

NAMES = ["flooded.example.test"]
FLOOD = 1200  # idle connections per listener, more than the whole descriptor limit
FD_LIMIT = 1024


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _open_idle(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that say nothing (non-blocking connects, so none waits on a drop)."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        out.append(s)
    return out


def _served_serial(port: int, ca: PebbleCA) -> int:
    ctx = ssl.create_default_context(cafile=None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the chain is verified separately; this is about serving
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAMES[0]) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_flood_of_idle_connections_under_1024_descriptors(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 2 * FLOOD + 256, f"the test itself needs more descriptors (hard limit {hard})"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ca = pebble_factory()
    # The TLS listener's socket is bound here and handed over (systemd socket activation).
    tls_socket = listening_socket()
    tls_port = tls_socket.getsockname()[1]
    store = tmp_path / "store"
    export = tmp_path / "tls"
    cfg = ca.write_acme_config(
        tmp_path,
        NAMES,
        tls_listen=[systemd_endpoint(0)],
        tls_certificate_path=str(export / "tls.crt"),
        tls_private_key_path=str(export / "tls.key"),
    )
    argv, fds = handover([*CLI, "run", "-c", str(cfg)], [tls_socket])
    with tls_socket:  # the child's copy is the only one left
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
            preexec_fn=_limit_fds,
            pass_fds=fds,
        )
    flood: list[socket.socket] = []
    figures: dict[str, object] = {}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (store / "status.json").exists():
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.1)
        first = load_bundle(store, NAMES)
        first_serial = crypto.parse_chain(first.chain_pem)[0].serial_number
        before_status = (store / "status.json").stat().st_mtime_ns

        started = time.monotonic()
        flood = _open_idle(ca.http_port, FLOOD) + _open_idle(tls_port, FLOOD)
        time.sleep(1.0)  # let the server accept (and drop) what it can
        peak_fds = _fds(proc.pid)
        assert peak_fds < FD_LIMIT, f"{peak_fds} descriptors open under the flood"

        r = subprocess.run(
            [*CLI, "renew", "--force", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=ROOT),
            check=False,
        )
        assert r.returncode == 0 and "HANDED OVER" in r.stdout, r.stdout + r.stderr
        renewed = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            bundle = load_bundle(store, NAMES)
            if crypto.parse_chain(bundle.chain_pem)[0].serial_number != first_serial:
                renewed = time.monotonic() - started
                break
            time.sleep(0.1)
        assert renewed is not None, "no renewal under the flood"
        new = check_valid(ca, store, NAMES)
        new_serial = crypto.parse_chain(new.chain_pem)[0].serial_number
        # status.json is rewritten at several steps of a renewal (the request taken, the
        # order, the save, the swap): wait for the one that reports the new certificate served.
        deadline = time.monotonic() + 10
        while True:
            status = json.loads((store / "status.json").read_text())
            served = status[0]["served_serial"] == f"{new_serial:x}"
            if (served and status[0]["export"]["state"] == "ok") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert (store / "status.json").stat().st_mtime_ns != before_status
        assert status[0]["served_serial"] == f"{new_serial:x}", status
        assert status[0]["export"]["state"] == "ok", status
        assert (export / "tls.crt").read_bytes() == new.chain_pem
        # The flooded TLS listener still completes a handshake, with the new certificate.
        assert _served_serial(tls_port, ca) == new_serial
        figures = {
            "idle_connections_per_listener": FLOOD,
            "fd_limit": FD_LIMIT,
            "server_descriptors_under_flood": peak_fds,
            "renewed_seconds_after_flood_start": round(renewed, 2),
        }
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "Too many open files" not in log and "EMFILE" not in log, log[-3000:]
    assert "connection cap reached" in log, log[-3000:]
    save_figures("test_flood_limits", figures)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
