"""Real sockets: certificates rotate under continuous handshakes, and watched files reload.

The listener runs in a subprocess with a real reactor (``tls_server.py``); clients here use the
standard library's ``ssl`` in threads.
"""

from __future__ import annotations

import datetime
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.certs import TestCA, leaf_serial

pytestmark = pytest.mark.integration

SERVER = Path(__file__).with_name("tls_server.py")


class Server:
    """``tls_server.py`` in a subprocess; stdout is read by a thread so waits can time out,
    stderr (its log) goes to ``log_path``."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(SERVER), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.expect("PORT").split()[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.strip())
        self._queue.put(None)

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        for seen in self.lines:
            if seen.startswith(prefix):
                return seen
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line within {timeout} s") from None
            if line is None:
                raise AssertionError(f"server exited (rc={self.proc.poll()}) before {prefix!r}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def client_context(root_pem_path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=root_pem_path)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def fetch_serial(ctx: ssl.SSLContext, port: int, name: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number


def test_rotate_100_times_under_continuous_handshakes(tmp_path: Path) -> None:
    server = Server(
        ["--rotate", "100", "--rotate-interval", "0.02", "--workdir", str(tmp_path)],
        tmp_path / "server.log",
    )
    try:
        initial = int(server.expect("INITIAL").split()[1])
        ctx = client_context(str(tmp_path / "root.pem"))
        results: list[tuple[float, float, int | None, str | None]] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    serial: int | None = fetch_serial(ctx, server.port, "rot.example.test")
                    error = None
                except Exception as e:  # every failure counts
                    serial, error = None, repr(e)
                results.append((t0, time.monotonic(), serial, error))

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        server.send("go")
        server.expect("DONE", timeout=60)
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        server.close()

    swaps = [line.split() for line in server.lines if line.startswith("SWAP")]
    assert len(swaps) == 100
    # (serial, current from, current until): a snapshot may be live from just before its swap
    # started until the next swap finished.
    periods = [(initial, float("-inf"), float(swaps[0][4]))]
    for i, (_, _n, serial, before, _after) in enumerate(swaps):
        until = float(swaps[i + 1][4]) if i + 1 < len(swaps) else float("inf")
        periods.append((int(serial), float(before), until))

    failures = [r for r in results if r[3] is not None]
    assert failures == [], f"{len(failures)} failed handshakes of {len(results)}: {failures[:3]}"
    wrong = []
    for t0, t1, serial, _ in results:
        allowed = {s for s, start, end in periods if start <= t1 and end >= t0}
        if serial not in allowed:
            wrong.append((t0, t1, serial, allowed))
    assert wrong == [], f"{len(wrong)} connections got a certificate not live at the time"
    seen = {r[2] for r in results}
    assert initial in seen and periods[-1][0] in seen
    assert len(seen) >= 30, f"only {len(seen)} distinct certificates seen in {len(results)}"
    print(f"{len(results)} handshakes, 0 failures, {len(seen)} distinct certificates")


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


def _certbot_renew(live: Path, archive: Path, n: int, chain: bytes, key: bytes) -> None:
    (archive / f"fullchain{n}.pem").write_bytes(chain)
    (archive / f"privkey{n}.pem").write_bytes(key)
    for name, target in (
        ("fullchain.pem", f"fullchain{n}.pem"),
        ("privkey.pem", f"privkey{n}.pem"),
    ):
        tmp = live / (name + ".new")
        os.symlink(os.path.join("..", "..", "archive", archive.name, target), tmp)
        os.replace(tmp, live / name)


@pytest.fixture
def certbot_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    live, archive = tmp_path / "live" / "w.example.test", tmp_path / "archive" / "w.example.test"
    live.mkdir(parents=True)
    archive.mkdir(parents=True)
    yield live, archive


def _wait_for_serial(ctx: ssl.SSLContext, port: int, serial: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if fetch_serial(ctx, port, "w.example.test") == serial:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"serial {serial:x} not served within {timeout} s")


def test_watched_files_reload_within_interval(
    tmp_path: Path, ca: TestCA, certbot_dirs: tuple[Path, Path]
) -> None:
    live, archive = certbot_dirs
    first = ca.issue(["w.example.test"])
    _certbot_renew(live, archive, 1, first.chain_pem, first.key_pem)
    (tmp_path / "root.pem").write_bytes(ca.root_pem)
    interval = 0.5
    server = Server(
        [
            "--pair", "w", str(live / "fullchain.pem"), str(live / "privkey.pem"),
            "--watch-interval", str(interval),
        ],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        ctx = client_context(str(tmp_path / "root.pem"))
        _wait_for_serial(ctx, server.port, leaf_serial(first), 5)
        # certbot-style symlink flip
        second = ca.issue(["w.example.test"])
        _certbot_renew(live, archive, 2, second.chain_pem, second.key_pem)
        took = _wait_for_serial(ctx, server.port, leaf_serial(second), 5)
        assert took <= interval + 0.5
        # plain rewrite in place
        third = ca.issue(["w.example.test"])
        (archive / "privkey2.pem").write_bytes(third.key_pem)
        (archive / "fullchain2.pem").write_bytes(third.chain_pem)
        took = _wait_for_serial(ctx, server.port, leaf_serial(third), 5)
        assert took <= interval + 0.5
    finally:
        server.close()


def test_sighup_reloads_now(tmp_path: Path, ca: TestCA, certbot_dirs: tuple[Path, Path]) -> None:
    live, archive = certbot_dirs
    first = ca.issue(["w.example.test"])
    _certbot_renew(live, archive, 1, first.chain_pem, first.key_pem)
    (tmp_path / "root.pem").write_bytes(ca.root_pem)
    server = Server(
        [
            "--pair", "w", str(live / "fullchain.pem"), str(live / "privkey.pem"),
            "--watch-interval", "3600",
        ],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        ctx = client_context(str(tmp_path / "root.pem"))
        _wait_for_serial(ctx, server.port, leaf_serial(first), 5)
        second = ca.issue(["w.example.test"])
        _certbot_renew(live, archive, 2, second.chain_pem, second.key_pem)
        time.sleep(0.3)
        assert fetch_serial(ctx, server.port, "w.example.test") == leaf_serial(first)
        server.proc.send_signal(signal.SIGHUP)
        took = _wait_for_serial(ctx, server.port, leaf_serial(second), 5)
        assert took < 2
        assert server.proc.poll() is None  # SIGHUP did not kill it
    finally:
        server.close()


def test_expired_file_refused_over_the_wire(
    tmp_path: Path, ca: TestCA, certbot_dirs: tuple[Path, Path]
) -> None:
    live, archive = certbot_dirs
    first = ca.issue(["w.example.test"])
    _certbot_renew(live, archive, 1, first.chain_pem, first.key_pem)
    (tmp_path / "root.pem").write_bytes(ca.root_pem)
    server = Server(
        ["--pair", "w", str(live / "fullchain.pem"), str(live / "privkey.pem")],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        ctx = client_context(str(tmp_path / "root.pem"))
        _wait_for_serial(ctx, server.port, leaf_serial(first), 5)
        now = datetime.datetime.now(datetime.timezone.utc)
        expired = ca.issue(
            ["w.example.test"],
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
        _certbot_renew(live, archive, 2, expired.chain_pem, expired.key_pem)
        time.sleep(1.0)
        assert fetch_serial(ctx, server.port, "w.example.test") == leaf_serial(first)
    finally:
        server.close()
    log = server.log_path.read_text()
    assert "refusing the new certificate for w: certificate expired" in log
    assert "PRIVATE KEY" not in log
