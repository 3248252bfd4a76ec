"""The whole product against real Pebble: the ``synapse-acme`` CLI and the running service.

Every test runs the real command line in a subprocess (real reactor, real sockets, real CA) and
checks what an operator would: exit code, the stored chain verifying to Pebble's root, names,
key match, file modes, and, for ``run``, renewals that happen by themselves.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from synapse_acme import crypto
from synapse_acme.account import load_or_create_account_key
from synapse_acme.model import CertificateBundle
from synapse_acme.names import names_key
from synapse_acme.store import FileStore
from synapse_acme.testing.pebble import PebbleCA
from synapse_acme.testing.ports import handover, listening_socket, systemd_endpoint
from tests.certs import TestCA

CLI = [sys.executable, "-m", "synapse_acme"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def stored(tmp: Path, names: Sequence[str]) -> tuple[Path, CertificateBundle]:
    d = tmp / "store" / "certificates" / names_key(names)
    bundle = CertificateBundle(
        key_pem=(d / "privkey.pem").read_bytes(),
        chain_pem=(d / "fullchain.pem").read_bytes(),
        metadata=json.loads((d / "metadata.json").read_text()),
    )
    return d, bundle


def check_issued(ca: PebbleCA, tmp: Path, names: Sequence[str]) -> x509.Certificate:
    """The stored bundle verifies to Pebble's root, covers ``names``, matches its key; modes."""
    d, bundle = stored(tmp, names)
    ca.verify_chain(bundle.chain_pem, names)
    now = datetime.datetime.now(datetime.timezone.utc)
    chain = crypto.validate_bundle(bundle, names, now)
    assert sorted(crypto.certificate_names(chain[0])) == sorted(names)
    assert stat.S_IMODE(os.stat(d / "privkey.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp / "store").st_mode) == 0o700
    return chain[0]


def test_issue_one_name(pebble: PebbleCA, tmp_path: Path) -> None:
    names = ["one.example.test"]
    cfg = pebble.write_acme_config(tmp_path, names)
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "OK      one.example.test" in r.stdout
    check_issued(pebble, tmp_path, names)
    # Private keys never reach the log.
    key_pem = stored(tmp_path, names)[1].key_pem
    body = b"".join(key_pem.splitlines()[1:-1]).decode()
    assert body[:40] not in r.stderr + r.stdout
    status = cli("status", "-c", str(cfg), "--json")
    assert status.returncode == 0, status.stderr
    [entry] = json.loads(status.stdout)
    assert entry["state"] == "valid" and entry["names"] == names
    assert entry["last_success"] is not None and entry.get("last_error") is None
    # A second `issue` has nothing to do and keeps the certificate.
    before = stored(tmp_path, names)[1].chain_pem
    again = cli("issue", "-c", str(cfg))
    assert again.returncode == 0 and "Nothing to do" in again.stdout
    assert stored(tmp_path, names)[1].chain_pem == before


def test_issue_ten_sans(pebble: PebbleCA, tmp_path: Path) -> None:
    names = [f"n{i}.ten.example.test" for i in range(10)]
    cfg = pebble.write_acme_config(tmp_path, names)
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    leaf = check_issued(pebble, tmp_path, names)
    assert len(crypto.certificate_names(leaf)) == 10


def test_three_certificates_concurrently_and_forced_renewal(
    pebble: PebbleCA, tmp_path: Path
) -> None:
    first = ["a.three.example.test"]
    others = [["b.three.example.test"], ["c.three.example.test", "www.c.three.example.test"]]
    cfg = pebble.write_acme_config(
        tmp_path,
        first,
        certificates=[{"domains": n} for n in others],
        key_type="rsa-2048",
    )
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    leaves = {}
    for names in [first, *others]:
        leaves[tuple(names)] = check_issued(pebble, tmp_path, names)
    # The three orders ran side by side: each was placed before any certificate was issued.
    order_lines = [i for i, line in enumerate(r.stderr.splitlines()) if "order https" in line]
    issued_lines = [
        i for i, line in enumerate(r.stderr.splitlines()) if "certificate issued" in line
    ]
    assert len(order_lines) == 3 and len(issued_lines) == 3
    assert max(order_lines) < min(issued_lines), r.stderr
    # Without --force, nothing is due; with --force, every certificate is replaced by a new one.
    assert "Nothing to do" in cli("renew", "-c", str(cfg)).stdout
    old_key = stored(tmp_path, first)[1].key_pem
    r = cli("renew", "-c", str(cfg), "--force", "--name", first[0])
    assert r.returncode == 0, r.stderr
    new_leaf = check_issued(pebble, tmp_path, first)
    assert new_leaf.serial_number != leaves[tuple(first)].serial_number
    assert stored(tmp_path, first)[1].key_pem != old_key
    # The other two were not touched.
    assert check_issued(pebble, tmp_path, others[0]).serial_number == (
        leaves[tuple(others[0])].serial_number
    )


def test_sixty_certificates_at_once_through_the_default_connection_caps(
    pebble: PebbleCA, tmp_path: Path
) -> None:
    # One validator address (Pebble on 127.0.0.1) validating 60 names at once, plus the
    # preflight's own probes from the same address: more connections than the per-address cap
    # used to allow, accepted in bursts before any is read. None may be dropped for another.
    names = [[f"n{i}.burst.example.test"] for i in range(60)]
    cfg = pebble.write_acme_config(
        tmp_path,
        names[0],
        certificates=[{"domains": n} for n in names[1:]],
        max_requests_per_minute=100000,
    )
    r = cli("issue", "-c", str(cfg), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "connection reset" not in r.stdout + r.stderr
    for group in (names[0], names[29], names[59]):
        check_issued(pebble, tmp_path, group)


def test_bad_nonce_storm(pebble_factory: Callable[..., PebbleCA], tmp_path: Path) -> None:
    ca = pebble_factory(env={"PEBBLE_WFE_NONCEREJECT": "50"})
    first = ["s0.storm.example.test"]
    rest = [[f"s{i}.storm.example.test"] for i in range(1, 5)]
    cfg = ca.write_acme_config(tmp_path, first, certificates=[{"domains": n} for n in rest])
    r = cli("-v", "issue", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    for names in [first, *rest]:
        check_issued(ca, tmp_path, names)
    assert "badNonce" in r.stderr  # the storm happened and was ridden out


def test_ca_problem_is_reported_with_its_type(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    ca = pebble_factory(blocklist=["blocked.example.test"])
    cfg = ca.write_acme_config(tmp_path, ["blocked.example.test"])
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 1
    # Reported once, by the command's FAILED line, with the type and what happens next.
    [line] = [x for x in (r.stdout + r.stderr).splitlines() if "rejectedIdentifier" in x]
    assert line.startswith("FAILED  blocked.example.test: ACME error rejectedIdentifier")
    assert "(error type rejectedIdentifier); there is still no certificate" in line
    assert "nothing will retry it" in line and "next attempt" not in r.stderr
    assert not (tmp_path / "store" / "certificates" / "blocked.example.test").exists()
    status = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
    assert status[0]["state"] == "missing"
    assert status[0]["last_error_type"] == "rejectedIdentifier"
    assert "next_attempt" not in status[0]


def test_config_error_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "acme.yaml"
    cfg.write_text(
        yaml.safe_dump({"acme": {"enabled": True, "domain": "x.example.test", "port": "eighty"}})
    )
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 2
    assert "acme.port" in r.stderr and "'eighty'" in r.stderr


def _served_serial(port: int) -> int | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            with ctx.wrap_socket(sock, server_hostname="live.example.test") as tls:
                der = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_running_service_renews_short_certificates_by_itself(
    pebble_factory: Callable[..., PebbleCA], tmp_path: Path
) -> None:
    """Pebble issues 30-second certificates; `synapse-acme run` renews them twice on its own,
    each new one reaching the store and the TLS listener before the old one expires."""
    ca = pebble_factory(validity=30)
    names = ["live.example.test"]
    # The TLS listener's socket is bound here and handed over (systemd socket activation).
    tls_socket = listening_socket()
    tls_port = tls_socket.getsockname()[1]
    cfg = ca.write_acme_config(tmp_path, names, check_interval=1, tls_listen=[systemd_endpoint(0)])
    argv, fds = handover([*CLI, "run", "-c", str(cfg)], [tls_socket])
    with tls_socket:  # the child's copy is the only one left
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=fds
        )
    seen: dict[int, tuple[datetime.datetime, float]] = {}  # serial -> (notAfter, first seen)
    served: set[int] = set()
    handshakes = failed_handshakes = 0
    try:
        deadline = time.monotonic() + 70
        while time.monotonic() < deadline and len(seen) < 3:
            try:
                _, bundle = stored(tmp_path, names)
                leaf = crypto.parse_chain(bundle.chain_pem)[0]
                if leaf.serial_number not in seen:
                    seen[leaf.serial_number] = (crypto.not_after(leaf), time.time())
                    ca.verify_chain(bundle.chain_pem, names)
            except (FileNotFoundError, ValueError, json.JSONDecodeError):
                pass
            serial = _served_serial(tls_port)
            if serial is not None:
                served.add(serial)
                handshakes += 1
            elif served:
                failed_handshakes += 1  # the listener was up: this one failed
            time.sleep(0.2)
        assert proc.poll() is None, "synapse-acme run exited"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert len(seen) >= 3, f"saw only {len(seen)} certificates; log:\n{out[-3000:]}"
    ordered = sorted(seen.items(), key=lambda kv: kv[1][1])
    for (_, (old_not_after, _)), (_, (_, new_seen)) in itertools.pairwise(ordered):
        assert new_seen < old_not_after.timestamp(), "renewal arrived after the old one expired"
    # The hot-swapping listener served the renewed certificates without a restart.
    assert len(served & set(seen)) >= 2, (served, set(seen))
    assert failed_handshakes == 0, f"{failed_handshakes} of {handshakes} handshakes failed"
    assert handshakes > 50
    assert proc.returncode is not None


def test_one_manager_per_store_and_renew_force_hands_over(pebble: PebbleCA, tmp_path: Path) -> None:
    """While `run` manages a store, a second `run` or `issue` is refused naming its pid (no
    recovery or order beside it), and `renew --force` asks the running one to renew."""
    names = ["managed.example.test"]
    cfg = pebble.write_acme_config(tmp_path, names)
    proc = subprocess.Popen(
        [*CLI, "run", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        first = None
        while first is None and time.monotonic() < deadline:
            try:
                first = crypto.parse_chain(stored(tmp_path, names)[1].chain_pem)[0]
            except (FileNotFoundError, ValueError, json.JSONDecodeError):
                time.sleep(0.1)
        assert first is not None, "run did not issue"
        orders_before = len(list((tmp_path / "store").rglob("metadata.json")))
        for argv in (["issue"], ["renew"], ["run"]):
            r = cli(*argv, "-c", str(cfg), timeout=30)
            assert r.returncode == 1, (argv, r.stdout, r.stderr)
            assert f"is managed by another synapse-acme process (pid {proc.pid}" in r.stderr
        # Nothing was ordered or saved by the refused commands.
        assert crypto.parse_chain(stored(tmp_path, names)[1].chain_pem)[0] == first
        assert len(list((tmp_path / "store").rglob("metadata.json"))) == orders_before
        r = cli("renew", "--force", "-c", str(cfg), timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"HANDED OVER  {tmp_path / 'store'} is managed by pid {proc.pid}" in r.stdout
        renewed = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                leaf = crypto.parse_chain(stored(tmp_path, names)[1].chain_pem)[0]
            except (FileNotFoundError, ValueError):
                leaf = first
            if leaf.serial_number != first.serial_number:
                renewed = leaf
                break
            time.sleep(0.1)
        assert renewed is not None, "the running process did not renew"
        check_issued(pebble, tmp_path, names)
        assert not (tmp_path / "store" / "renew-request").exists()
        assert proc.poll() is None
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "renew-request found: renewing every certificate now" in out, out[-3000:]
    # Once it has stopped, the store is free for a one-shot command again.
    r = cli("issue", "-c", str(cfg))
    assert r.returncode == 0 and "Nothing to do" in r.stdout, r.stderr


# -- a CA that accepts connections and never answers ------------------------------------------

SILENT_TIMEOUT = 3  # acme.request_timeout for these tests (seconds)


@pytest.fixture
def silent_ca() -> Iterator[str]:
    """The directory URL of a "CA" on 127.0.0.1 (port 0) that accepts every TCP connection,
    reads nothing and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed at teardown
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/directory"
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(timeout=5)
        for conn in held:
            conn.close()


def _silent_config(tmp: Path, url: str, names: Sequence[str]) -> Path:
    block = {
        "enabled": True,
        "url": url,
        "domain": names[0],
        "storage": str(tmp / "store"),
        "terms_of_service_agreed": True,
        "port": 0,  # no HTTP-01 listener: no challenge is ever reached
        "request_timeout": SILENT_TIMEOUT,
        "testing_allow_http": True,  # the silent "CA" is a plain TCP listener on loopback
        "preflight": False,  # the name resolves nowhere: this test is about the CA's silence
        "check_interval": 1,  # a running service would check every second; one-shot never
    }
    path = tmp / "acme.yaml"
    path.write_text(yaml.safe_dump({"acme": block}))
    return path


def _run_timed(*args: str, limit: float = 30) -> tuple[int, list[tuple[float, str]], float]:
    """Run the CLI; its exit code, each line of stdout+stderr with the seconds since the start
    at which it arrived, and the seconds until it exited (killed after ``limit``)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killer = threading.Timer(limit, proc.kill)
    killer.start()
    lines: list[tuple[float, str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
        code = proc.wait()
    finally:
        killer.cancel()
    return code, lines, time.monotonic() - start


def _check_one_failure_and_prompt_exit(
    code: int, lines: list[tuple[float, str]], took: float, names: str
) -> str:
    text = "\n".join(line for _, line in lines)
    assert code == 1, text
    assert "Traceback" not in text
    # Exactly one line about the failure, and it is the command's own FAILED line.
    about = [(t, line) for t, line in lines if f"no answer within {SILENT_TIMEOUT} s" in line]
    assert len(about) == 1, text
    failed_at, failed = about[0]
    assert failed.startswith(f"FAILED  {names}: cannot reach the ACME server at "), failed
    assert "(error type AcmeTransportError)" in failed
    assert (
        "nothing will retry it: run `synapse-acme " in failed
        and "or let `synapse-acme run` / the homeserver module retry" in failed
    )
    assert "next attempt" not in text and "ARI" not in text
    # One request timeout, then out: from the first request (the "Obtaining" line; Python's
    # start-up before it depends on the machine's load) the process ended well before a second
    # timeout could have run, and right after saying FAILED.
    [asked_at] = [t for t, line in lines if "Obtaining a certificate" in line]
    assert took - asked_at < 2 * SILENT_TIMEOUT, (took, asked_at, text)
    assert took - failed_at < SILENT_TIMEOUT, (took, failed_at, text)
    return failed


def _last_status(tmp: Path) -> dict[str, object]:
    [entry] = json.loads((tmp / "store" / "status.json").read_text())
    assert isinstance(entry, dict)
    return entry


def test_issue_against_a_silent_ca_fails_once_and_exits(silent_ca: str, tmp_path: Path) -> None:
    names = ["silent.example.test"]
    cfg = _silent_config(tmp_path, silent_ca, names)
    code, lines, took = _run_timed("issue", "-c", str(cfg))
    failed = _check_one_failure_and_prompt_exit(code, lines, took, names[0])
    assert "there is still no certificate" in failed and "`synapse-acme issue` again" in failed
    entry = _last_status(tmp_path)
    assert entry["last_error_type"] == "AcmeTransportError"
    assert f"no answer within {SILENT_TIMEOUT} s" in str(entry["last_error"])
    assert entry["failures"] == 1 and entry["next_attempt"] is None
    status = cli("status", "-c", str(cfg))
    assert status.returncode == 1 and "state:        missing" in status.stdout
    assert "last error:" in status.stdout and "next attempt" not in status.stdout


def test_renew_force_against_a_silent_ca_fails_once_and_exits(
    silent_ca: str, tmp_path: Path
) -> None:
    """With a stored certificate (which a running service would also ask the CA's ARI about)."""
    names = ["silent.example.test"]
    cfg = _silent_config(tmp_path, silent_ca, names)
    now = datetime.datetime.now(datetime.timezone.utc)
    old = TestCA(now=now).issue(
        names,
        not_before=now - datetime.timedelta(days=10),
        not_after=now + datetime.timedelta(days=80),
    )
    FileStore(str(tmp_path / "store")).save(names_key(names), old)
    # The account that certificate was issued to (without it the store's evidence of an
    # account makes the command refuse to create a new key, before any request).
    load_or_create_account_key(str(tmp_path / "store" / "account.key"))
    code, lines, took = _run_timed("renew", "--force", "-c", str(cfg))
    failed = _check_one_failure_and_prompt_exit(code, lines, took, names[0])
    assert "the previous certificate is kept" in failed
    assert "`synapse-acme renew --force` again" in failed
    assert stored(tmp_path, names)[1].chain_pem == old.chain_pem
    entry = _last_status(tmp_path)
    assert entry["last_error_type"] == "AcmeTransportError" and entry["next_attempt"] is None
