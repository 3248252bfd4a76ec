"""nginx and Apache in front, with the shipped sample site: challenges reach the responder
whatever the proxy does to headers and paths, and a real certificate is obtained through each.

Pebble's validator dials the proxy's port (its ``httpPort``); the proxy forwards
``/.well-known/acme-challenge`` to synapse-acme's listener exactly as the sample says.
"""

from __future__ import annotations

import datetime
import re
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from synapse_acme import crypto
from synapse_acme.export import FileExporter
from synapse_acme.names import names_key
from synapse_acme.testing.ports import (
    handover,
    listening_socket,
    reserve_port,
    systemd_endpoint,
)
from tests.integration.deploy.common import (
    Proc,
    check_issued,
    cli,
    http,
    responder_requests,
    start_fixed_responder,
    start_homeserver_stub,
    start_pebble,
    stored_bundle,
    wait_for,
    world_dir,
)
from tests.integration.deploy.proxies import (
    Apache,
    Nginx,
    Ports,
    PortTaken,
    apache_site,
    nginx_site,
)

TOKEN = "tok_EN-0123456789abcdefghijklmnopqrstuvwxyzAB"
KEY_AUTH = TOKEN + ".thumbprint_0123456789abcdefghijklmnopqrstuv"
PROXIES = ["nginx", "apache"]
#: Starts of a proxy on newly reserved ports when one of its ports was taken after all.
PROXY_ATTEMPTS = 3


def make_proxy(kind: str, directory: Path, ports: Ports, name: str) -> Nginx | Apache:
    tls_dir = directory / "tls"
    tls_dir.mkdir(exist_ok=True)
    if not (tls_dir / "fullchain.pem").exists():
        # The TLS site needs files before it starts; any self-signed pair will do here.
        now = datetime.datetime.now(datetime.timezone.utc)
        placeholder = crypto.make_placeholder_bundle([name], now)
        (tls_dir / "fullchain.pem").write_bytes(placeholder.chain_pem)
        (tls_dir / "privkey.pem").write_bytes(placeholder.key_pem)
    if kind == "nginx":
        return Nginx(directory, nginx_site(ports, name, tls_dir), ports)
    return Apache(directory, apache_site(ports, name, tls_dir), ports)


def start_proxy(
    kind: str, directory: Path, name: str, *, responder: int, homeserver: int
) -> Nginx | Apache:
    """The proxy in front of ``responder`` and ``homeserver``, listening on two reserved ports
    (``proxy.ports``: nginx and Apache must be told their ports and cannot take a socket). If
    one was taken anyway it exits saying so (PortTaken): started again on other ports, at
    most PROXY_ATTEMPTS times."""
    for attempt in range(1, PROXY_ATTEMPTS + 1):
        http, tls = reserve_port(), reserve_port()
        ports = Ports(http=http.port, tls=tls.port, responder=responder, homeserver=homeserver)
        proxy = make_proxy(kind, directory, ports, name)
        try:
            proxy.start()
            return proxy
        except PortTaken:
            if attempt == PROXY_ATTEMPTS:
                raise
            shutil.rmtree(proxy.dir)
        finally:
            http.release()  # the proxy holds them now, or they were given up
            tls.release()
    raise AssertionError("not reached")


@pytest.fixture
def workdir() -> Iterator[Path]:
    with world_dir("proxy") as d:
        yield d


@pytest.mark.parametrize("kind", PROXIES)
def test_challenge_path_through_proxy(kind: str, workdir: Path) -> None:
    """GET/HEAD, trailing slash, odd Host and spoofed X-Forwarded-* all reach the token."""
    name = f"{kind}.proxy.example.test"
    started: list[Proc | Nginx | Apache] = []
    try:
        # Each binds a port the kernel picks and reports it; the proxy is told those.
        homeserver, homeserver_port = start_homeserver_stub(workdir)
        started.append(homeserver)
        responder, responder_port = start_fixed_responder(workdir, TOKEN, KEY_AUTH)
        started.append(responder)
        proxy = start_proxy(
            kind, workdir, name, responder=responder_port, homeserver=homeserver_port
        )
        started.append(proxy)
        base = f"http://127.0.0.1:{proxy.ports.http}"
        path = f"/.well-known/acme-challenge/{TOKEN}"
        for url, headers in [
            (base + path, {"Host": name}),
            (base + path + "/", {"Host": name}),
            (base + path, {"Host": f"{name}:80"}),
            (base + path, {"Host": name.upper()}),
            (
                base + path,
                {
                    "Host": name,
                    "X-Forwarded-Host": "evil.example",
                    "X-Forwarded-Proto": "https",
                    "X-Forwarded-For": "203.0.113.9",
                },
            ),
        ]:
            status, _, body = http(url, headers=headers)
            assert (status, body) == (200, KEY_AUTH.encode()), (url, headers)
        status, hdrs, body = http(base + path, method="HEAD", headers={"Host": name})
        assert status == 200 and body == b""
        assert hdrs["content-length"] == str(len(KEY_AUTH))
        assert http(base + path[:-1] + "x", headers={"Host": name})[0] == 404
        assert http(base + path, method="POST", headers={"Host": name})[0] == 405
        # The rest of the sample: Matrix is proxied, everything else goes to HTTPS.
        status, _, body = http(base + "/_matrix/client/versions", headers={"Host": name})
        assert status == 200 and b"v1.11" in body
        status, hdrs, _ = http(base + "/index.html", headers={"Host": name})
        assert status == 301 and hdrs["location"] == f"https://{name}/index.html"
        # What the responder saw: the proxy's Host and X-Forwarded-For (the sample's headers).
        seen = [r for r in responder_requests(responder) if TOKEN in r["uri"]]
        assert len(seen) >= 7
        assert all(r["uri"].startswith("/.well-known/acme-challenge/") for r in seen)
        assert any(r["method"] == "HEAD" for r in seen)
        forwarded_for = [r["headers"].get("X-Forwarded-For", "") for r in seen]
        assert all("127.0.0.1" in v for v in forwarded_for), forwarded_for
    finally:
        for item in reversed(started):
            item.stop()


def served_certificate(port: int, name: str) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize("kind", PROXIES)
def test_certificate_through_proxy(kind: str, workdir: Path) -> None:
    """Pebble validates through the proxy; the proxy then serves the issued certificate."""
    names = [f"{kind}.example.test", f"www.{kind}.example.test"]
    # The listeners first, Pebble last: its validator is told the port the proxy has bound.
    # synapse-acme's challenge listener gets a socket bound here (systemd socket activation).
    responder = listening_socket()
    homeserver = reserve_port()  # nothing listens there in this test; the proxy is told it
    # synapse-acme's own placeholder (as the Synapse module writes one): files it wrote are
    # files it may replace; a file someone else wrote is never overwritten.
    FileExporter(
        key=names_key(names),
        cert_path=str(workdir / "tls" / "fullchain.pem"),
        key_path=str(workdir / "tls" / "privkey.pem"),
        storage=str(workdir / "store"),
    ).write_placeholder_if_missing(names, datetime.datetime.now(datetime.timezone.utc))
    proxy = start_proxy(
        kind,
        workdir,
        names[0],
        responder=responder.getsockname()[1],
        homeserver=homeserver.port,
    )
    ports = proxy.ports
    ca = start_pebble(workdir, ports.http)
    try:
        cfg = ca.write_acme_config(
            workdir,
            names,
            listener=False,
            listen=[systemd_endpoint(0)],
            tls_certificate_path=str(workdir / "tls" / "fullchain.pem"),
            tls_private_key_path=str(workdir / "tls" / "privkey.pem"),
        )
        prefix, fds = handover([], [responder])
        r = cli("issue", "-c", str(cfg), prefix=prefix, pass_fds=fds)
        assert r.returncode == 0, r.stdout + r.stderr
        check_issued(ca, workdir / "store", names)
        # Every validation went through the proxy (Pebble checks each token 3 times).
        log = proxy.access_log.read_text()
        validations = re.findall(r'"GET /\.well-known/acme-challenge/[\w-]+ HTTP/1\.1" 200', log)
        assert len(validations) >= 2 * 3, log
        for n in names:
            assert f"host={n}" in log
        # The proxy serves the certificate after a reload (what the .path unit sample does).
        _, bundle = stored_bundle(workdir / "store", names)
        issued = crypto.parse_chain(bundle.chain_pem)[0]
        assert (workdir / "tls" / "fullchain.pem").read_bytes() == bundle.chain_pem
        proxy.reload()
        wait_for(
            lambda: (
                served_certificate(ports.tls, names[0]).public_bytes(Encoding.DER)
                == issued.public_bytes(Encoding.DER)
            ),
            15,
            f"{kind} to serve the issued certificate after reload",
        )
    finally:
        proxy.stop()
        ca.stop()
        responder.close()
        homeserver.release()
