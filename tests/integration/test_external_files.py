"""Externally managed certificates (certbot keeps the files): `synapse-acme run` with
``external_certificates: true`` serves them on its TLS listener and hot-swaps each renewal
without a restart, for both ways certbot replaces files (symlink flip and plain rewrite)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from synapse_acme.model import CertificateBundle
from synapse_acme.testing.ports import handover, listening_socket, systemd_endpoint
from tests.certs import TestCA, leaf_serial
from tests.integration.test_service_pebble import _served_serial

NAME = "external.example.test"


def _archive(tmp: Path, n: int, bundle: CertificateBundle) -> tuple[Path, Path]:
    d = tmp / "archive"
    d.mkdir(exist_ok=True)
    cert, key = d / f"fullchain{n}.pem", d / f"privkey{n}.pem"
    cert.write_bytes(bundle.chain_pem)
    key.write_bytes(bundle.key_pem)
    os.chmod(key, 0o600)
    return cert, key


def _flip(link: Path, target: Path) -> None:
    """certbot's way: a new symlink renamed over the old one (atomic)."""
    tmp = link.with_suffix(".new")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _wait_for_serial(port: int, serial: int, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _served_serial(port) == serial:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"serial {serial:x} not served within {timeout} s")


def test_run_hot_swaps_certbot_managed_files(tmp_path: Path) -> None:
    ca = TestCA()
    live = tmp_path / "live"
    live.mkdir()
    cert_link, key_link = live / "fullchain.pem", live / "privkey.pem"
    first = ca.issue([NAME])
    c1, k1 = _archive(tmp_path, 1, first)
    os.symlink(c1, cert_link)
    os.symlink(k1, key_link)
    # The TLS listener's socket is bound here and handed over (systemd socket activation).
    tls_socket = listening_socket()
    port = tls_socket.getsockname()[1]
    cfg = tmp_path / "acme.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "acme": {
                    "enabled": True,
                    "domain": NAME,
                    "external_certificates": True,
                    "watch_interval": 0.2,
                    "tls_certificate_path": str(cert_link),
                    "tls_private_key_path": str(key_link),
                    "storage": str(tmp_path / "state"),
                    "port": 0,
                    "tls_listen": [systemd_endpoint(0)],
                }
            }
        )
    )
    # One-shot commands refuse: another tool issues.
    refused = subprocess.run(
        [sys.executable, "-m", "synapse_acme", "issue", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "acme.external_certificates" in refused.stderr
    run = [sys.executable, "-m", "synapse_acme", "run", "-c", str(cfg)]
    argv, fds = handover(run, [tls_socket])
    with tls_socket:  # the child's copy is the only one left
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=fds
        )
    try:
        _wait_for_serial(port, leaf_serial(first), timeout=20)
        pid = proc.pid
        # certbot renew: new archive files, then the live/ symlinks flipped one after the other.
        second = ca.issue([NAME])
        c2, k2 = _archive(tmp_path, 2, second)
        _flip(cert_link, c2)
        time.sleep(0.3)  # a window where only the certificate is new: nothing breaks
        assert _served_serial(port) == leaf_serial(first)
        _flip(key_link, k2)
        _wait_for_serial(port, leaf_serial(second))
        # An operator rewriting the files in place (key first, then certificate).
        third = ca.issue([NAME])
        Path(c2).unlink()
        Path(k2).write_bytes(third.key_pem)
        Path(c2).write_bytes(third.chain_pem)
        _wait_for_serial(port, leaf_serial(third))
        # SIGHUP triggers a reload too, and does not stop the process.
        fourth = ca.issue([NAME])
        Path(k2).write_bytes(fourth.key_pem)
        Path(c2).write_bytes(fourth.chain_pem)
        proc.send_signal(signal.SIGHUP)
        _wait_for_serial(port, leaf_serial(fourth))
        assert proc.poll() is None and proc.pid == pid  # the same process throughout
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "external_certificates" in out
