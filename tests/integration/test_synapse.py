"""The module inside a real Synapse process, against a real Pebble CA.

Synapse runs as a subprocess (``python -m synapse.app.homeserver``) with SQLite, a TLS federation
listener and a bare plain-HTTP listener (``resources: []``) on the port Pebble validates HTTP-01
against; the module is the only thing answering challenges. The test process only uses blocking
clients (pyOpenSSL / http.client), never a reactor.
"""

from __future__ import annotations

import http.client
import os
import pathlib
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from synapse_acme import crypto
from synapse_acme.testing import ports
from synapse_acme.testing.pebble import PebbleCA

# The interpreter that runs Synapse: this one, or (scripts/test.sh) a venv with the oldest
# Synapse release of the declared range, so both ends of the range run the same test.
SYNAPSE_PYTHON = os.environ.get("SYNAPSE_ACME_SYNAPSE_PYTHON", sys.executable)

HERE = pathlib.Path(__file__).parent / "synapse"
SERVER_NAME = "a.example.test"
START_TIMEOUT = 60.0
#: Starts of Synapse with a newly reserved TLS port when its port was taken after all.
START_ATTEMPTS = 3
ISSUE_TIMEOUT = 60.0


# -- blocking helpers ---------------------------------------------------------------------------


def fetch_chain(port: int, sni: str = SERVER_NAME) -> list[x509.Certificate]:
    """The chain the TLS listener sends (leaf first), via a pyOpenSSL handshake."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    # pyOpenSSL wants a blocking socket (a Python timeout makes it non-blocking: WantReadError);
    # the kernel-level receive timeout still bounds a stalled server.
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
    try:
        conn = SSL.Connection(ctx, sock)
        conn.set_tlsext_host_name(sni.encode())
        conn.set_connect_state()
        conn.do_handshake()
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        conn.shutdown()
        return list(chain)
    finally:
        sock.close()


def federation_version(port: int) -> dict[str, Any]:
    """GET /_matrix/federation/v1/version over TLS (certificate not checked: liveness only)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", "/_matrix/federation/v1/version")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body[:200])
        import json

        return json.loads(body)
    finally:
        conn.close()


def wait_for(check: Callable[[], Any], timeout: float, what: str, log: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # not ready yet
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})\n{log()[-6000:]}")


class Synapse:
    """One homeserver directory and the Synapse processes started on it."""

    def __init__(
        self,
        workdir: pathlib.Path,
        ca: PebbleCA,
        module_config: str,
        *,
        metrics: bool = False,
        tls_reserved: ports.PortReservation | None = None,
        http_port: int | None = None,
        on_tls_port_moved: Callable[[int], None] | None = None,
    ) -> None:
        """``metrics`` adds Synapse's ``metrics`` listener (and ``enable_metrics``) on a
        reserved port, :attr:`metrics_port`, moved with the TLS port when it was taken."""
        self.dir = workdir
        # Synapse must be told its ports in homeserver.yaml and cannot take a socket: the TLS
        # port is reserved (synapse_acme.testing.ports; ``tls_reserved`` if the caller reserved
        # it, e.g. to point Pebble's tlsPort at it first), and start() retries with another if
        # it was taken anyway (``on_tls_port_moved`` is told the new one). The HTTP port is
        # where Pebble validates HTTP-01 (reserved by PebbleCA) unless ``http_port`` is given.
        self._tls_reserved: ports.PortReservation | None = tls_reserved or ports.reserve_port()
        self.tls_port = self._tls_reserved.port
        self._metrics_reserved = ports.reserve_port() if metrics else None
        self.metrics_port = self._metrics_reserved.port if self._metrics_reserved else 0
        self.http_port = ca.http_port if http_port is None else http_port
        self._on_tls_port_moved = on_tls_port_moved
        self.config_path = workdir / "homeserver.yaml"
        self.log_path = workdir / "synapse.log"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "tls").mkdir(mode=0o700, exist_ok=True)
        (workdir / "log.yaml").write_text(
            (HERE / "log.yaml").read_text().replace("{app_log}", str(workdir / "app.log"))
        )
        indented = "\n".join("      " + line for line in module_config.strip().splitlines())
        self.config_path.write_text(
            (HERE / "homeserver.yaml.tmpl")
            .read_text()
            .format(
                server_name=SERVER_NAME,
                dir=workdir,
                tls_port=self.tls_port,
                http_port=self.http_port,
                module_config=indented,
            )
        )
        if metrics:
            text = self.config_path.read_text()
            listener = (
                f"  - port: {self.metrics_port}\n"
                '    bind_addresses: ["127.0.0.1"]\n'
                "    type: metrics\n"
                "enable_metrics: true\n"
            )
            self.config_path.write_text(
                text.replace("tls_certificate_path:", listener + "tls_certificate_path:", 1)
            )
        keys = subprocess.run(
            [
                SYNAPSE_PYTHON,
                "-m",
                "synapse.app.homeserver",
                "-c",
                str(self.config_path),
                "--generate-keys",
            ],
            cwd=workdir,
            capture_output=True,
            timeout=120,
        )
        assert (workdir / "signing.key").exists(), keys.stdout + keys.stderr

    @property
    def cert_path(self) -> pathlib.Path:
        return self.dir / "tls" / "fullchain.pem"

    @property
    def key_path(self) -> pathlib.Path:
        return self.dir / "tls" / "privkey.pem"

    @property
    def storage(self) -> pathlib.Path:
        return self.dir / "acme"

    def log(self) -> str:
        """Synapse's log (file handler) followed by its stdout/stderr."""
        text = []
        for path in (self.dir / "app.log", self.log_path):
            try:
                text.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(text)

    def start(self) -> int:
        """Start Synapse and wait for its TLS listener. If it exits saying its port was taken,
        start it again on another reserved TLS port (at most START_ATTEMPTS times)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            marks = self._log_sizes()
            try:
                pid = self._start_once()
            except AssertionError:
                if attempt == START_ATTEMPTS or not ports.port_in_use(self._log_since(marks)):
                    raise
                self._move_tls_port()
                continue
            self._release_tls_port()  # Synapse holds it now
            return pid
        raise AssertionError("not reached")

    def _log_paths(self) -> list[pathlib.Path]:
        return [self.dir / "app.log", self.log_path]

    def _log_sizes(self) -> list[int]:
        return [p.stat().st_size if p.exists() else 0 for p in self._log_paths()]

    def _log_since(self, marks: list[int]) -> str:
        text = []
        for path, mark in zip(self._log_paths(), marks, strict=True):
            try:
                with open(path, "rb") as f:
                    f.seek(mark)
                    text.append(f.read().decode(errors="replace"))
            except OSError:
                pass
        return "\n".join(text)

    def _move_tls_port(self) -> None:
        """Another reserved TLS port (and metrics port), written into homeserver.yaml in place
        (a test may have edited the rest of it)."""
        metrics = self._metrics_reserved is not None or self.metrics_port != 0
        self._release_tls_port()
        self._tls_reserved = ports.reserve_port()
        old, self.tls_port = self.tls_port, self._tls_reserved.port
        text = self.config_path.read_text()
        assert f"- port: {old}\n" in text
        text = text.replace(f"- port: {old}\n", f"- port: {self.tls_port}\n")
        if metrics:
            self._metrics_reserved = ports.reserve_port()
            old, self.metrics_port = self.metrics_port, self._metrics_reserved.port
            assert f"- port: {old}\n" in text
            text = text.replace(f"- port: {old}\n", f"- port: {self.metrics_port}\n")
        self.config_path.write_text(text)
        if self._on_tls_port_moved is not None:
            self._on_tls_port_moved(self.tls_port)

    def _release_tls_port(self) -> None:
        if self._tls_reserved is not None:
            self._tls_reserved.release()
            self._tls_reserved = None
        if self._metrics_reserved is not None:
            self._metrics_reserved.release()
            self._metrics_reserved = None

    def _start_once(self) -> int:
        self.stop()  # a previous attempt that exited
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [SYNAPSE_PYTHON, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.dir,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        logf.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"Synapse exited with {self.proc.returncode}\n{self.log()}")
            return bool(federation_version(self.tls_port))

        wait_for(ready, START_TIMEOUT, "Synapse's TLS listener", self.log)
        return self.proc.pid

    def run_to_exit(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        self._release_tls_port()  # for a config that does not parse: nothing listens
        return subprocess.run(
            [SYNAPSE_PYTHON, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def pebble_ca(tmp_path: pathlib.Path) -> Iterator[PebbleCA]:
    with PebbleCA(str(tmp_path / "pebble")) as ca:  # reserves its http_port until it stops
        yield ca


def module_config(ca: PebbleCA) -> str:
    return f"""
url: "{ca.directory_url}"
ca_bundle: "{ca.ca_bundle}"
issuer_roots: "{ca.issuer_roots}"
terms_of_service_agreed: true
contact: admin@example.test
poll_interval: 0.1
preflight: {{port: {ca.http_port}, resolver: "127.0.0.1:{ca.dns_port}"}}
"""


@pytest.fixture
def synapse(tmp_path: pathlib.Path, pebble_ca: PebbleCA) -> Iterator[Synapse]:
    hs = Synapse(tmp_path / "hs", pebble_ca, module_config(pebble_ca))
    try:
        yield hs
    finally:
        hs.stop()


def serial(cert: x509.Certificate) -> int:
    return cert.serial_number


def verified_leaf(ca: PebbleCA, chain: list[x509.Certificate]) -> x509.Certificate:
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    ca.verify_chain(pem, [SERVER_NAME])
    return chain[0]


def disk_leaf(hs: Synapse) -> x509.Certificate:
    chain = crypto.parse_chain(hs.cert_path.read_bytes())
    key = crypto.load_private_key(hs.key_path.read_bytes())
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*pub) == chain[0].public_key().public_bytes(*pub), (
        "key file does not match the certificate file"
    )
    return chain[0]


# -- the tests ----------------------------------------------------------------------------------


def test_synapse_issues_and_hot_swaps_without_restart(
    synapse: Synapse, pebble_ca: PebbleCA
) -> None:
    hs = synapse
    assert not hs.cert_path.exists() and not hs.key_path.exists()

    # Keep asking the federation API over TLS the whole time; every answer must be 200.
    failures: list[str] = []
    answers = [0]
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                assert federation_version(hs.tls_port)["server"]
                answers[0] += 1
            except Exception as e:
                failures.append(repr(e))
            time.sleep(0.05)

    pid = hs.start()  # starts although no certificate files existed
    running = federation_version(hs.tls_port)["server"]["version"]
    expected = os.environ.get("SYNAPSE_ACME_EXPECT_SYNAPSE_VERSION")
    if expected:  # scripts/test.sh runs this test again with the oldest supported Synapse
        assert running.startswith(expected), (running, expected)
    assert hs.cert_path.exists() and hs.key_path.exists()
    assert oct(hs.key_path.stat().st_mode & 0o777) == oct(0o600)
    poller = threading.Thread(target=hammer, daemon=True)
    poller.start()
    try:
        # The placeholder is replaced by the Pebble-issued chain, same process.
        def issued() -> x509.Certificate | None:
            chain = fetch_chain(hs.tls_port)
            if crypto.is_placeholder(chain[0]):
                return None
            return verified_leaf(pebble_ca, chain)

        first = wait_for(issued, ISSUE_TIMEOUT, "the issued certificate", hs.log)
        assert hs.proc is not None and hs.proc.pid == pid and hs.proc.poll() is None
        assert serial(disk_leaf(hs)) == serial(first), "files on disk differ from what is served"
        # Pebble dialled Synapse's own plain listener for the challenge.
        assert "Loaded module" in hs.log()

        # A forced renewal, requested through the documented file, swaps it again.
        (hs.storage / "renew-request").write_text("")

        def renewed() -> x509.Certificate | None:
            leaf = verified_leaf(pebble_ca, fetch_chain(hs.tls_port))
            return leaf if serial(leaf) != serial(first) else None

        second = wait_for(renewed, ISSUE_TIMEOUT, "the renewed certificate", hs.log)
        assert hs.proc.pid == pid and hs.proc.poll() is None
        wait_for(
            lambda: serial(disk_leaf(hs)) == serial(second), 10, "files on disk updated", hs.log
        )
        assert not (hs.storage / "renew-request").exists()

        # SIGHUP: Synapse's own handler re-reads the files and puts its own TLS factory back;
        # the module re-installs the hot-swapping one after it, so renewals keep arriving.
        hs.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "Context factories updated" in hs.log(), 10, "Synapse's SIGHUP reload", hs.log
        )
        assert serial(verified_leaf(pebble_ca, fetch_chain(hs.tls_port))) == serial(second)
        (hs.storage / "renew-request").write_text("")

        def renewed_again() -> x509.Certificate | None:
            leaf = verified_leaf(pebble_ca, fetch_chain(hs.tls_port))
            return leaf if serial(leaf) not in (serial(first), serial(second)) else None

        second = wait_for(renewed_again, ISSUE_TIMEOUT, "a renewal after SIGHUP", hs.log)
        assert hs.proc.pid == pid and hs.proc.poll() is None
        wait_for(
            lambda: serial(disk_leaf(hs)) == serial(second), 10, "files on disk updated", hs.log
        )
        # Renewals hand over within a quarter of a second now: give the poller (slow on a
        # loaded machine) time for a few answers, all of which must be good.
        wait_for(lambda: answers[0] > 5, 30, "answers from the TLS listener", hs.log)
    finally:
        stop.set()
        poller.join(timeout=10)
    assert not failures, failures[:5]
    assert answers[0] > 5

    # A restart serves the issued certificate at once (no placeholder, no re-issue needed).
    hs.stop()
    hs.start()
    leaf = verified_leaf(pebble_ca, fetch_chain(hs.tls_port))
    assert serial(leaf) == serial(second)


def test_module_config_error_is_a_synapse_config_error(
    tmp_path: pathlib.Path, pebble_ca: PebbleCA
) -> None:
    bad = module_config(pebble_ca) + "port: eighty\n"
    hs = Synapse(tmp_path / "bad", pebble_ca, bad)
    result = hs.run_to_exit()
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Error in configuration at 'modules.<item 0>.config.port'" in out, out[-3000:]
    assert "expected an integer" in out and "eighty" in out
    assert not hs.cert_path.exists(), "no placeholder for a config that does not parse"


def test_old_top_level_acme_block_is_used_with_advice(
    tmp_path: pathlib.Path, pebble_ca: PebbleCA
) -> None:
    """Synapse 1.16x silently ignores a top-level acme: block; with the module listed and no
    module config, the module reads it and says how to move it."""
    hs = Synapse(tmp_path / "legacy", pebble_ca, "{}")
    text = hs.config_path.read_text().replace("    config:\n      {}\n", "")
    legacy = "\n".join("  " + line for line in module_config(pebble_ca).strip().splitlines())
    text += f"acme:\n  enabled: true\n{legacy}\n"
    hs.config_path.write_text(text)
    try:
        hs.start()
        assert "Move its keys under the module" in hs.log()

        def issued() -> x509.Certificate | None:
            chain = fetch_chain(hs.tls_port)
            return None if crypto.is_placeholder(chain[0]) else verified_leaf(pebble_ca, chain)

        wait_for(issued, ISSUE_TIMEOUT, "the issued certificate", hs.log)
    finally:
        hs.stop()
