"""Run Debian's real Pebble ACME test CA (and its DNS stub) on reserved loopback ports.

Why: the integration tests, the CI and the demo all need a real RFC 8555 server, and each must be
able to start a private, throw-away one (Pebble keeps no state across restarts, and its issuing root
changes at every start). This module is the one place that knows how to do that.

The harness is deliberately *blocking* (``subprocess`` + stdlib ``ssl``/``urllib``): it runs in
test processes and in a small command line (``python -m synapse_acme.testing.pebble serve``), never
inside the Twisted reactor.

Usage::

    with PebbleCA(str(tmp_path), http_port=5002) as ca:
        ca.directory_url   # https://127.0.0.1:<port>/dir
        ca.ca_bundle       # PEM path the ACME client must trust for Pebble's API
        ca.verify_chain(chain_pem, ["a.example.test"])
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from synapse_acme.testing import ports
from synapse_acme.testing.certificates import ca_certificate

log = logging.getLogger(__name__)

#: How long :meth:`PebbleCA.start` waits for both programs to answer (they need ~0.1 s).
START_TIMEOUT = 15.0
#: Starts with newly reserved ports when a program says its port was taken (see
#: :mod:`synapse_acme.testing.ports`: a reserved port is not bound, so another program can
#: still take it; Pebble and its DNS stub must be told their ports and cannot take a socket).
START_ATTEMPTS = 3
#: Environment Pebble always gets: no random 0-15 s sleep before each validation.
BASE_ENV = {"PEBBLE_VA_NOSLEEP": "1"}

_INSTALL_HINT = (
    "install it with: apt-get install -y pebble (Debian/Ubuntu; gives pebble-challtestsrv too)"
)


class PebbleError(RuntimeError):
    """Pebble or its DNS stub is missing, did not start, or a management call failed."""


def _which(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise PebbleError(f"{binary!r} not found on PATH; {_INSTALL_HINT}")
    return found


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "<no output>"


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_api_certificate(workdir: str) -> tuple[str, str, str]:
    """Write a throw-away CA and a cert for localhost/127.0.0.1/::1 signed by it.

    Debian's pebble ships no certificate for its own HTTPS API. Returns
    ``(ca_pem_path, cert_pem_path, key_pem_path)``.
    """
    # Not-before a day back so clock skew between host and test fakes never matters.
    start = datetime.datetime.fromtimestamp(_wall_seconds() - 86400, datetime.timezone.utc)
    end = start + datetime.timedelta(days=30)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "synapse-acme test Pebble API CA")]
    )
    ca_cert = ca_certificate(ca_name, ca_key, ca_name, ca_key, start, end, path_length=0)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = os.path.join(workdir, "api-ca.pem")
    cert_path = os.path.join(workdir, "api-cert.pem")
    key_path = os.path.join(workdir, "api-key.pem")
    with open(ca_path, "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return ca_path, cert_path, key_path


def _wall_seconds() -> float:
    # A test harness that signs a real certificate needs the real time; kept in one place.
    return time.time()


@attrs.define(eq=False)
class PebbleCA:
    """A private Pebble + pebble-challtestsrv pair on loopback ports.

    ``http_port`` is where Pebble's validator connects for HTTP-01 (point it at the responder);
    0 (the default) reserves one until :meth:`stop`
    (:func:`~synapse_acme.testing.ports.reserve_port`: no other user of that function gets
    it, nor the kernel as an ephemeral port; the listener under test binds it by number, and
    fails loudly with EADDRINUSE in the rare case that an unrelated program took it first);
    every name resolves to 127.0.0.1 through the DNS stub unless changed with :meth:`add_a`.
    ``env`` is merged over :data:`BASE_ENV` (e.g. ``{"PEBBLE_WFE_NONCEREJECT": "0"}``; Pebble's
    own default rejects 5% of nonces, which exercises badNonce retries for free).
    ``validity`` is ``certificateValidityPeriod`` in seconds; ``blocklist`` is
    ``domainBlocklist``; ``eab`` maps key id -> base64url HMAC key and makes EAB mandatory.
    ``dns_server`` (``"IP:PORT"``) is the resolver Pebble validates with instead of its DNS
    stub (e.g. a test BIND9 that holds the DNS-01 TXT records; the stub still runs).
    """

    workdir: str
    http_port: int = attrs.field(default=0, kw_only=True)
    env: Mapping[str, str] | None = attrs.field(default=None, kw_only=True)
    validity: int | None = attrs.field(default=None, kw_only=True)
    blocklist: Sequence[str] = attrs.field(default=(), kw_only=True)
    eab: Mapping[str, str] | None = attrs.field(default=None, kw_only=True)
    tls_port: int = attrs.field(default=5001, kw_only=True)
    strict: bool = attrs.field(default=False, kw_only=True)
    pebble_bin: str = attrs.field(default="pebble", kw_only=True)
    challtestsrv_bin: str = attrs.field(default="pebble-challtestsrv", kw_only=True)
    dns_server: str | None = attrs.field(default=None, kw_only=True)

    api_port: int = attrs.field(default=0, init=False)
    management_port: int = attrs.field(default=0, init=False)
    dns_port: int = attrs.field(default=0, init=False)
    challtestsrv_port: int = attrs.field(default=0, init=False)
    ca_bundle: str = attrs.field(default="", init=False)
    #: PEM of the roots Pebble issues from (new at every start): ``acme.issuer_roots``.
    issuer_roots: str = attrs.field(default="", init=False)
    _cert_path: str = attrs.field(default="", init=False)
    _key_path: str = attrs.field(default="", init=False)
    _procs: list[subprocess.Popen[bytes]] = attrs.field(factory=list, init=False)
    _reserved: list[ports.PortReservation] = attrs.field(factory=list, init=False)
    _http_reserved: ports.PortReservation | None = attrs.field(default=None, init=False)

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def directory_url(self) -> str:
        """The ACME directory URL (``https://127.0.0.1:<port>/dir``)."""
        return f"https://127.0.0.1:{self.api_port}/dir"

    @property
    def management_url(self) -> str:
        """Pebble's own management API (roots, intermediates, cert status)."""
        return f"https://127.0.0.1:{self.management_port}"

    @property
    def challtestsrv_url(self) -> str:
        """The DNS stub's management API (plain HTTP)."""
        return f"http://127.0.0.1:{self.challtestsrv_port}"

    @property
    def running(self) -> bool:
        """True while both programs are alive."""
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def start(self) -> PebbleCA:
        """Start both programs and block until Pebble's directory answers.

        Raises :class:`PebbleError` (a ``RuntimeError``) naming the binary to install, or with the
        tail of the program's output if it died.
        """
        if self._procs:
            raise PebbleError("this PebbleCA is already started")
        pebble = _which(self.pebble_bin)
        challtestsrv = _which(self.challtestsrv_bin)
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        self.ca_bundle, self._cert_path, self._key_path = make_api_certificate(self.workdir)
        if self.http_port == 0:
            self._http_reserved = ports.reserve_port()
            self.http_port = self._http_reserved.port
        last: PebbleError | None = None
        for attempt in range(START_ATTEMPTS):
            try:
                self._start_once(pebble, challtestsrv)
                return self
            except PebbleError as e:
                self._stop_programs()
                last = e
                if not ports.port_in_use(str(e)):
                    self.stop()
                    raise
                log.info("port conflict starting Pebble (attempt %d), retrying", attempt + 1)
        self.stop()
        assert last is not None
        raise last

    def _start_once(self, pebble: str, challtestsrv: str) -> None:
        # Told to the programs in their command line and config; a port taken anyway makes a
        # program exit with EADDRINUSE in its log, and start() tries again with new ones.
        self.api_port = self._reserve().port
        self.management_port = self._reserve().port
        self.challtestsrv_port = self._reserve().port
        self.dns_port = self._reserve(udp=True).port  # the DNS stub listens on TCP and UDP
        config_path = os.path.join(self.workdir, "pebble-config.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(self.config(), f, indent=2)
        dns_log = os.path.join(self.workdir, "challtestsrv.log")
        pebble_log = os.path.join(self.workdir, "pebble.log")
        self._procs.append(
            _spawn(
                [
                    challtestsrv,
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-dns01",
                    f"127.0.0.1:{self.dns_port}",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    f"127.0.0.1:{self.challtestsrv_port}",
                ],
                dns_log,
                dict(os.environ),
            )
        )
        _wait_until(
            lambda: _http_ok(self.challtestsrv_url + "/set-default-ipv6", None, b'{"ip": ""}'),
            self._procs[0],
            dns_log,
            "pebble-challtestsrv",
        )
        env = dict(os.environ)
        env.update(BASE_ENV)
        env.update(self.env or {})
        resolver = self.dns_server or f"127.0.0.1:{self.dns_port}"
        cmd = [pebble, "-config", config_path, "-dnsserver", resolver]
        if self.strict:
            cmd.append("-strict")
        self._procs.append(_spawn(cmd, pebble_log, env))
        context = self.ssl_context()
        _wait_until(
            lambda: (
                _http_ok(self.directory_url, context)
                and _http_ok(self.management_url + "/roots/0", context)
            ),
            self._procs[1],
            pebble_log,
            "pebble",
        )
        self._write_issuer_roots()
        log.info("Pebble up at %s (DNS stub 127.0.0.1:%d)", self.directory_url, self.dns_port)

    def _write_issuer_roots(self) -> None:
        """Write :attr:`issuer_roots`: the roots this start of Pebble issues from."""
        path = os.path.join(self.workdir, "issuer-roots.pem")
        with open(path + ".tmp", "wb") as f:
            f.write(b"".join(self.roots()))
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)
        self.issuer_roots = path

    def orders_created(self) -> int:
        """Orders Pebble created: its log says "Added order ... to the db" once per order (a
        newOrder request it answered with badNonce, which the client retries, creates none)."""
        with open(
            os.path.join(self.workdir, "pebble.log"), encoding="utf-8", errors="replace"
        ) as f:
            log = f.read()
        return len(re.findall(r'Added order "[^"]+" to the db', log))

    def dump_goroutines(self, dest: str) -> bool:
        """Make Pebble print every goroutine's stack and exit (Go does this on SIGQUIT), then
        copy its log, stacks included, to ``dest``: the evidence when Pebble stops answering.
        False if Pebble was not running. Call :meth:`stop` afterwards as usual."""
        if len(self._procs) < 2 or self._procs[1].poll() is not None:
            return False
        self._procs[1].send_signal(signal.SIGQUIT)
        try:
            self._procs[1].wait(timeout=10)
        except subprocess.TimeoutExpired:
            return False
        shutil.copyfile(os.path.join(self.workdir, "pebble.log"), dest)
        return True

    def pause(self) -> None:
        """Freeze Pebble (SIGSTOP): the kernel still accepts connections on its port, and
        nothing answers. A CA that stopped answering, which :meth:`resume` brings back with
        the same roots and accounts (a restart would change both)."""
        self._pebble_proc().send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a :meth:`pause`-d Pebble run again (SIGCONT); the requests queued meanwhile
        are answered then (their clients have usually given up)."""
        self._pebble_proc().send_signal(signal.SIGCONT)

    def _pebble_proc(self) -> subprocess.Popen[bytes]:
        if len(self._procs) < 2 or self._procs[1].poll() is not None:
            raise PebbleError("Pebble is not running")
        return self._procs[1]

    def _reserve(self, udp: bool = False) -> ports.PortReservation:
        reservation = ports.reserve_port(udp=udp)
        self._reserved.append(reservation)
        return reservation

    def stop(self) -> None:
        """Terminate both programs, wait for them and release their ports (idempotent)."""
        self._stop_programs()
        if self._http_reserved is not None:
            self._http_reserved.release()
            self._http_reserved = None

    def _stop_programs(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused program would not see SIGTERM
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for reservation in self._reserved:
            reservation.release()
        self._reserved.clear()

    def __enter__(self) -> PebbleCA:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def config(self) -> dict[str, Any]:
        """The Pebble configuration document this instance runs with."""
        cfg: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.api_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": self._cert_path,
            "privateKey": self._key_path,
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(self.eab),
        }
        if self.eab:
            cfg["externalAccountMACKeys"] = dict(self.eab)
        if self.validity is not None:
            cfg["certificateValidityPeriod"] = int(self.validity)
        if self.blocklist:
            cfg["domainBlocklist"] = list(self.blocklist)
        return {"pebble": cfg}

    # -- talking to it ---------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A stdlib client context trusting only the API CA (not the system store)."""
        ctx = ssl.create_default_context(cafile=self.ca_bundle)
        return ctx

    def get(self, url: str) -> bytes:
        """GET a Pebble URL (API or management), trusting the API CA."""
        with _urlopen(url, self.ssl_context()) as resp:
            return bytes(resp.read())

    def directory(self) -> dict[str, Any]:
        """The parsed ACME directory document."""
        result: dict[str, Any] = json.loads(self.get(self.directory_url))
        return result

    def roots(self) -> list[bytes]:
        """PEM of every issuing root (``/roots/0`` plus ``PEBBLE_ALTERNATE_ROOTS`` ones).

        These change at every start. Intermediates are in :meth:`intermediates`.
        """
        return self._numbered("roots")

    def intermediates(self) -> list[bytes]:
        """PEM of each root's issuing intermediate (``/intermediates/<n>``)."""
        return self._numbered("intermediates")

    def _numbered(self, kind: str) -> list[bytes]:
        found: list[bytes] = []
        for index in range(100):
            try:
                found.append(self.get(f"{self.management_url}/{kind}/{index}"))
            except urllib.error.HTTPError as e:
                if e.code == 404 and found:
                    break
                raise PebbleError(f"GET /{kind}/{index} failed: HTTP {e.code}") from e
        return found

    def write_acme_config(
        self, directory: Any, names: Sequence[str], *, listener: bool = True, **extra: Any
    ) -> Any:
        """Write ``<directory>/acme.yaml``: an ``acme:`` block for this Pebble and ``names``.

        The store goes to ``<directory>/store``; with ``listener`` the HTTP-01 listener binds
        127.0.0.1 on :attr:`http_port` (where Pebble validates). ``extra`` keys are added last.
        Returns the path (a ``pathlib.Path``).
        """
        import pathlib

        import yaml

        directory = pathlib.Path(directory)
        block: dict[str, Any] = {
            "enabled": True,
            "url": self.directory_url,
            "ca_bundle": self.ca_bundle,
            "issuer_roots": self.issuer_roots,
            "domain": names[0],
            "domains": list(names[1:]),
            "storage": str(directory / "store"),
            "terms_of_service_agreed": True,
            "contact": ["admin@example.test"],
            "poll_interval": 0.05,
            # The preflight probes the way Pebble validates: its DNS stub, its http_port.
            "preflight": {"port": self.http_port, "resolver": f"127.0.0.1:{self.dns_port}"},
        }
        if listener:
            block.update(port=self.http_port, bind_addresses=["127.0.0.1"])
        block.update(extra)
        path = directory / "acme.yaml"
        path.write_text(yaml.safe_dump({"acme": block}))
        path.chmod(0o644)
        return path

    def verify_chain(
        self,
        chain_pem: bytes,
        names: Sequence[str],
        at: datetime.datetime | None = None,
    ) -> None:
        """Assert ``chain_pem`` (leaf first) chains to one of Pebble's roots and covers ``names``.

        Uses ``cryptography.x509.verification`` (RFC 5280 path building, server-auth policy).
        ``at`` is the verification time (default: now). Raises ``AssertionError`` explaining what
        is wrong.
        """
        if b"-----BEGIN CERTIFICATE-----" not in chain_pem:
            raise AssertionError(f"chain holds no certificate: {chain_pem[:60]!r}")
        try:
            certs = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as e:
            raise AssertionError(f"chain is not PEM certificates: {e}") from e
        leaf, intermediates = certs[0], certs[1:]
        roots = [x509.load_pem_x509_certificate(pem) for pem in self.roots()]
        san = _san_dns_names(leaf)
        missing = [n for n in names if n.lower().rstrip(".") not in san]
        if missing:
            raise AssertionError(f"leaf SANs {sorted(san)} do not include {missing}")
        problems = verify_against_roots(leaf, intermediates, roots, names, at)
        if problems:
            raise AssertionError("chain does not verify against Pebble's roots: " + problems)

    def challtestsrv(self, path: str, body: Mapping[str, Any]) -> bytes:
        """POST a JSON body to the DNS stub's management API (e.g. ``/set-servfail``)."""
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.challtestsrv_url + path, data=data, method="POST")
        try:
            with _urlopen(req, None) as resp:
                return bytes(resp.read())
        except urllib.error.URLError as e:
            raise PebbleError(f"pebble-challtestsrv {path} failed: {e}") from e

    def add_a(self, name: str, ip: str | Sequence[str]) -> None:
        """Make ``name`` resolve to ``ip`` (one address or several) in the DNS stub."""
        addresses = [ip] if isinstance(ip, str) else list(ip)
        self.challtestsrv("/add-a", {"host": _fqdn(name), "addresses": addresses})

    def clear_a(self, name: str) -> None:
        """Drop a mock A record so ``name`` falls back to the default IPv4 answer."""
        self.challtestsrv("/clear-a", {"host": _fqdn(name)})

    def set_default_ipv4(self, ip: str) -> None:
        """Change the answer for every name without its own A record."""
        self.challtestsrv("/set-default-ipv4", {"ip": ip})

    def set_default_ipv6(self, ip: str = "") -> None:
        """Change the default AAAA answer ("" = none: Pebble then dials IPv4)."""
        self.challtestsrv("/set-default-ipv6", {"ip": ip})

    def set_servfail(self, name: str) -> None:
        """Make every DNS query for ``name`` answer SERVFAIL."""
        self.challtestsrv("/set-servfail", {"host": _fqdn(name)})

    def clear_servfail(self, name: str) -> None:
        """Undo :meth:`set_servfail`."""
        self.challtestsrv("/clear-servfail", {"host": _fqdn(name)})

    def resolve_a(self, name: str, timeout: float = 2.0) -> list[str]:
        """Ask the DNS stub for ``name``'s A records (what Pebble's validator sees)."""
        return query_a("127.0.0.1", self.dns_port, name, timeout)


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _san_dns_names(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return {n.lower() for n in ext.value.get_values_for_type(x509.DNSName)}


def verify_against_roots(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    names: Sequence[str],
    at: datetime.datetime | None = None,
) -> str:
    """Return "" if ``leaf`` chains to ``roots`` for every name, else what went wrong."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    builder = PolicyBuilder().store(Store(list(roots)))
    if at is not None:
        builder = builder.time(at)
    problems = []
    for name in names or [""]:
        # A wildcard is not a valid reference identity: check a name it covers instead.
        reference = "x" + name[1:] if name.startswith("*.") else name
        try:
            if reference:
                verifier = builder.build_server_verifier(x509.DNSName(reference))
                verifier.verify(leaf, list(intermediates))
            else:
                builder.build_client_verifier().verify(leaf, list(intermediates))
        except VerificationError as e:
            problems.append(f"{name or '<chain>'}: {e}")
    return "; ".join(problems)


def _spawn(cmd: list[str], log_path: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    out = open(log_path, "ab")  # handed to the child, closed below
    try:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    finally:
        out.close()


def _urlopen(
    req: urllib.request.Request | str, context: ssl.SSLContext | None, timeout: float = 10
) -> Any:
    """urlopen that ignores *_proxy variables: everything here is on loopback."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(req, timeout=timeout)


def _http_ok(url: str, context: ssl.SSLContext | None, post: bytes | None = None) -> bool:
    try:
        req = urllib.request.Request(url, data=post, method="POST" if post is not None else "GET")
        with _urlopen(req, context, timeout=2) as resp:
            return bool(200 <= resp.status < 300)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
        return False


def _wait_until(ready: Any, proc: subprocess.Popen[bytes], log_path: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise PebbleError(
                f"{what} exited with status {proc.returncode} during start-up; "
                f"last output ({log_path}):\n{_tail(log_path)}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise PebbleError(
                f"{what} did not answer within {START_TIMEOUT:.0f} s; "
                f"last output ({log_path}):\n{_tail(log_path)}"
            )
        try:
            # Doubles as the poll delay and as a prompt check that the child is still alive.
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass


def query_a(server: str, port: int, name: str, timeout: float = 2.0) -> list[str]:
    """Send one DNS A query over UDP and return the IPv4 answers (tiny, no dependency)."""
    qid = int.from_bytes(os.urandom(2), "big")
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(
        bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".")
    )
    packet = header + qname + b"\x00" + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, port))
        data, _ = sock.recvfrom(4096)
    rid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if rid != qid:
        raise PebbleError("DNS reply with the wrong id")
    rcode = flags & 0xF
    if rcode:
        raise PebbleError(f"DNS query for {name} failed with rcode {rcode}")
    offset = 12
    for _ in range(qd):
        offset = _skip_name(data, offset) + 4
    answers = []
    for _ in range(an):
        offset = _skip_name(data, offset)
        rtype, _rclass, _ttl, rdlen = struct.unpack("!HHIH", data[offset : offset + 10])
        offset += 10
        if rtype == 1 and rdlen == 4:
            answers.append(socket.inet_ntoa(data[offset : offset + 4]))
        offset += rdlen
    return answers


def _skip_name(data: bytes, offset: int) -> int:
    while True:
        length = data[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


# -- command line: python -m synapse_acme.testing.pebble serve ----------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``serve``: run a Pebble until SIGTERM/SIGINT, printing one JSON line once it is up."""
    parser = argparse.ArgumentParser(prog="python -m synapse_acme.testing.pebble")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a private Pebble + DNS stub until killed")
    serve.add_argument("--workdir", required=True, help="directory for config, API CA and logs")
    serve.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="port Pebble's validator dials for HTTP-01 (default: reserve one; see http_port)",
    )
    serve.add_argument("--validity", type=int, help="certificate lifetime in seconds")
    serve.add_argument(
        "--eab", action="append", default=[], metavar="KID=HMAC", help="require EAB with this key"
    )
    serve.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra PEBBLE_* setting"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    def pairs(items: list[str], what: str) -> dict[str, str]:
        result = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{what} expects NAME=VALUE, got {item!r}")
            result[key] = value
        return result

    ca = PebbleCA(
        os.path.abspath(args.workdir),
        http_port=args.http_port,
        validity=args.validity,
        eab=pairs(args.eab, "--eab") or None,
        env=pairs(args.env, "--env") or None,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        ca.start()
    except PebbleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(
            json.dumps(
                {
                    "directory_url": ca.directory_url,
                    "ca_bundle": ca.ca_bundle,
                    "issuer_roots": ca.issuer_roots,
                    "http_port": ca.http_port,
                    "management_url": ca.management_url,
                    "dns_port": ca.dns_port,
                }
            ),
            flush=True,
        )
        while not stop.is_set() and ca.running:
            stop.wait(0.5)
        return 0 if stop.is_set() else 1
    finally:
        ca.stop()


if __name__ == "__main__":
    sys.exit(main())
