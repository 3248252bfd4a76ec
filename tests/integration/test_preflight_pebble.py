"""Preflight and dry runs against real parts: Pebble (its DNS stub is the resolver, as for the
CA), real nginx in front of synapse-acme's listener, the real command line.

What must hold: when the CA's validation would not reach synapse-acme (nginx does not forward
the path, the name resolves elsewhere, the port is closed, something else answers), no order
reaches Pebble (counted in Pebble's own log) and the verdict names the cause; with everything
right, the preflight passes and the order goes through. A dry run leaves the live store and
the exported files byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from synapse_acme.testing.pebble import PebbleCA
from synapse_acme.testing.ports import reserve_port
from tests.integration.deploy.common import check_issued, cli, start_pebble, world_dir
from tests.integration.deploy.proxies import Nginx, Ports

NAME = "pf.example.test"
FORWARD = "location /.well-known/acme-challenge/ {{ proxy_pass http://127.0.0.1:{responder}; }}"


def nginx_site(port: int, responder: int, forward: bool) -> str:
    """The front door on 127.0.0.1 (with or without the forward) and, on 127.0.0.3, another
    site that answers 200 to everything (what a name pointing at another host reaches)."""
    location = FORWARD.format(responder=responder) if forward else ""
    return f"""
server {{
    listen 127.0.0.1:{port};
    {location}
    location / {{ return 404; }}
}}
server {{
    listen 127.0.0.3:{port};
    location / {{ return 200 "another site\\n"; }}
}}
"""


def order_requests(ca: PebbleCA) -> int:
    """newOrder requests Pebble received, answered or not (one log line per request)."""
    log = Path(ca.workdir, "pebble.log").read_text(errors="replace")
    return len(re.findall(r"POST /order-plz ", log))


def validations(ca: PebbleCA) -> int:
    log = Path(ca.workdir, "pebble.log").read_text(errors="replace")
    return len(re.findall(r"Attempting to validate", log))


@pytest.fixture
def workdir() -> Iterator[Path]:
    with world_dir("preflight") as d:
        yield d


class Setup:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        # Reserved numbers (locked against other test runs, below the ephemeral range): nginx
        # and synapse-acme's listener must be told them in their configs up front.
        self._reserved = [reserve_port(), reserve_port()]
        self.port = self._reserved[0].port  # nginx: where Pebble's validator and the probe dial
        self.responder = self._reserved[1].port  # synapse-acme's HTTP-01 listener behind nginx
        self.ca = start_pebble(workdir, self.port)
        self.nginx: Nginx | None = None
        self.starts = 0
        self.tls_dir = workdir / "tls"
        self.tls_dir.mkdir()
        self.config = self.ca.write_acme_config(
            workdir,
            [NAME],
            listener=False,
            port=self.responder,
            bind_addresses=["127.0.0.1"],
            preflight={
                "port": self.port,
                "timeout": "5s",
                "resolver": f"127.0.0.1:{self.ca.dns_port}",
            },
            tls_certificate_path=str(self.tls_dir / "fullchain.pem"),
            tls_private_key_path=str(self.tls_dir / "privkey.pem"),
        )

    def start_nginx(self, forward: bool) -> None:
        self.stop_nginx()
        self.starts += 1
        sub = self.dir / f"nginx-{self.starts}"
        sub.mkdir()
        # No TLS here: the proxy is up once its one HTTP port listens (tls names it again).
        ports = Ports(http=self.port, tls=self.port, responder=self.responder, homeserver=0)
        self.nginx = Nginx(sub, nginx_site(self.port, self.responder, forward), ports)
        self.nginx.start()

    def stop_nginx(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
            self.nginx = None

    def close(self) -> None:
        self.stop_nginx()
        self.ca.stop()
        for reservation in self._reserved:
            reservation.release()


@pytest.fixture
def setup(workdir: Path) -> Iterator[Setup]:
    s = Setup(workdir)
    try:
        yield s
    finally:
        s.close()


def issue_fails_without_order(s: Setup, cause: str) -> str:
    before = order_requests(s.ca), s.ca.orders_created(), validations(s.ca)
    r = cli("issue", "-c", str(s.config))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "preflight failed, so nothing was ordered from the CA" in r.stderr, r.stderr
    assert cause in r.stderr, r.stderr
    # Not even a newOrder request reached Pebble.
    assert (order_requests(s.ca), s.ca.orders_created(), validations(s.ca)) == before
    c = cli("check", "-c", str(s.config))
    assert c.returncode == 1, c.stdout + c.stderr
    assert c.stdout.startswith(f"FAIL  {NAME}: "), c.stdout
    assert cause in c.stdout, c.stdout
    return c.stdout


def test_no_order_while_the_challenge_would_not_reach_us_then_the_order_goes_through(
    setup: Setup,
) -> None:
    s = setup
    # 1. nginx answers port 80 but does not forward /.well-known/acme-challenge/.
    s.start_nginx(forward=False)
    out = issue_fails_without_order(s, "[not-forwarded]")
    assert f"127.0.0.1 port {s.port} answered HTTP 404" in out
    # 2. The name resolves elsewhere: an address where nothing listens.
    s.start_nginx(forward=True)
    s.ca.add_a(NAME, "127.0.0.2")
    out = issue_fails_without_order(s, "[unreachable]")
    assert "resolves to 127.0.0.2" in out and "connection refused" in out
    # 3. ... or an address where another site answers.
    s.ca.clear_a(NAME)  # add_a adds to the records already there
    s.ca.add_a(NAME, "127.0.0.3")
    out = issue_fails_without_order(s, "[other-answer]")
    assert "'another site\\n'" in out
    s.ca.clear_a(NAME)
    # 4. Port 80 (the probe port) closed.
    s.stop_nginx()
    out = issue_fails_without_order(s, "[unreachable]")
    assert f"127.0.0.1 port {s.port} (connection refused" in out
    # 5. A name without any address.
    s.start_nginx(forward=True)
    s.ca.set_servfail(NAME)
    issue_fails_without_order(s, "[dns]")
    s.ca.clear_servfail(NAME)
    assert s.ca.orders_created() == 0
    # Everything right: check passes, and the order goes through.
    c = cli("check", "-c", str(s.config))
    assert c.returncode == 0, c.stdout + c.stderr
    assert c.stdout == f"PASS  {NAME}: [ok] synapse-acme answered at 127.0.0.1 port {s.port}\n"
    r = cli("issue", "-c", str(s.config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert s.ca.orders_created() == 1
    check_issued(s.ca, s.dir / "store", [NAME])


def tree_digest(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file (and symlink target) under each root, by path."""
    out = {}
    for root in roots:
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath, name)
                if path.is_symlink():
                    out[str(path)] = "-> " + os.readlink(path)
                else:
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        for link in root.iterdir() if root.is_dir() else ():
            if link.is_symlink():
                out[str(link)] = "-> " + os.readlink(link)
    return out


def test_dry_run_changes_nothing_and_says_so(setup: Setup) -> None:
    s = setup
    s.start_nginx(forward=True)
    r = cli("issue", "-c", str(s.config))
    assert r.returncode == 0, r.stdout + r.stderr
    text = s.config.read_text().replace("acme:\n", f"acme:\n  dry_run_url: {s.ca.directory_url}\n")
    s.config.write_text(text)
    before = tree_digest(s.dir / "store", s.tls_dir)
    assert any(p.endswith("fullchain.pem") for p in before)
    r = cli("renew", "-c", str(s.config), "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"DRY RUN OK  {NAME}: {s.ca.directory_url} issued a certificate")
    assert "nothing was saved, exported or served" in r.stdout
    assert s.ca.orders_created() == 2  # the real order and the dry run's
    assert tree_digest(s.dir / "store", s.tls_dir) == before
    # A dry run that fails says why, and still changes nothing.
    s.ca.set_servfail(NAME)
    r = cli("renew", "-c", str(s.config), "--dry-run")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"DRY RUN FAILED  {NAME}: preflight failed" in r.stderr, r.stderr
    assert tree_digest(s.dir / "store", s.tls_dir) == before
