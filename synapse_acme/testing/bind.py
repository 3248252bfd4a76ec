"""Run Debian's real BIND9 (``named``) on a reserved loopback port, primary for a test zone.

Why: DNS-01 is proven against the real thing: RFC 2136 updates signed with a TSIG key made by
``tsig-keygen``, accepted under an ``update-policy`` that allows exactly the
``_acme-challenge`` TXT records (the policy docs/challenge-dns-01.md recommends), and Pebble
validating against this server (``PebbleCA(dns_server=bind.server)``).

The zone has an SOA, an NS, and A records (127.0.0.1) for its apex and every name under it
(a wildcard), so Pebble can resolve any test name through it. Blocking, like
:mod:`synapse_acme.testing.pebble`: for test processes, never the reactor.

Usage::

    with Bind9(str(tmp_path)) as bind:
        bind.server      # "127.0.0.1:<port>" (TCP and UDP)
        bind.key_file    # tsig-keygen's output: the acme.dns01.tsig_secret_file
        bind.txt("_acme-challenge.example.test")  # TXT values there now
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import attrs
import dns.message
import dns.query
import dns.rdatatype

from synapse_acme.testing import ports

#: How long :meth:`Bind9.start` waits for named to answer (it needs well under a second).
START_TIMEOUT = 20.0
#: Starts with a newly reserved port when named says its port was taken.
START_ATTEMPTS = 3

_INSTALL_HINT = "install it with: apt-get install -y bind9 (Debian/Ubuntu)"


class BindError(RuntimeError):
    """named or tsig-keygen is missing, or named did not start."""


def _which(binary: str) -> str:
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if found is None:
        raise BindError(f"{binary!r} not found on PATH or in /usr/sbin; {_INSTALL_HINT}")
    return found


@attrs.define(eq=False)
class Bind9:
    """A private ``named`` on 127.0.0.1, primary for :attr:`zone`, updatable with
    :attr:`key_name` (``update-policy``: TXT records named ``_acme-challenge.<zone>``,
    nothing else)."""

    workdir: str
    zone: str = attrs.field(default="example.test", kw_only=True)
    key_name: str = attrs.field(default="synapse-acme", kw_only=True)
    algorithm: str = attrs.field(default="hmac-sha256", kw_only=True)

    port: int = attrs.field(default=0, init=False)
    key_file: str = attrs.field(default="", init=False)
    _proc: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)
    _reserved: ports.PortReservation | None = attrs.field(default=None, init=False)

    @property
    def server(self) -> str:
        """``127.0.0.1:<port>``, as ``acme.dns01.server`` and Pebble's ``-dnsserver`` take it."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "named.log")

    def start(self) -> Bind9:
        """Start named and block until it answers the zone's SOA over UDP and TCP.

        Raises :class:`BindError` naming the package to install, or with named's log tail."""
        if self._proc is not None:
            raise BindError("this Bind9 is already started")
        named = _which("named")
        keygen = _which("tsig-keygen")
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        key = subprocess.run(
            [keygen, "-a", self.algorithm, self.key_name],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        self.key_file = os.path.join(self.workdir, "tsig.key")
        with open(os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(key)
        self._write_zone()
        last = ""
        for _attempt in range(START_ATTEMPTS):
            self._reserved = ports.reserve_port(udp=True)  # named listens on TCP and UDP
            self.port = self._reserved.port
            conf = self._write_conf(key)
            log = open(self.log_path, "wb")
            try:
                self._proc = subprocess.Popen(
                    [named, "-g", "-4", "-n", "1", "-c", conf],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.workdir,
                )
            finally:
                log.close()
            if self._wait_ready():
                return self
            last = self._tail()
            self._stop_process()
            if "address in use" not in last.lower() and not ports.port_in_use(last):
                break
        self.stop()
        raise BindError(f"named did not start; its log ends with:\n{last}")

    def _write_zone(self) -> None:
        zone_text = (
            "$TTL 60\n"
            f"@ IN SOA ns.{self.zone}. hostmaster.{self.zone}. 1 3600 600 86400 60\n"
            f"@ IN NS ns.{self.zone}.\n"
            "ns IN A 127.0.0.1\n"
            "@ IN A 127.0.0.1\n"
            "* IN A 127.0.0.1\n"
        )
        with open(os.path.join(self.workdir, f"{self.zone}.zone"), "w") as f:
            f.write(zone_text)
        # A dynamic zone keeps a journal; a stale one from another run must not replay.
        journal = os.path.join(self.workdir, f"{self.zone}.zone.jnl")
        if os.path.exists(journal):
            os.unlink(journal)

    def _write_conf(self, key: str) -> str:
        d = self.workdir
        conf = f"""{key}
options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    listen-on port {self.port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    allow-query {{ any; }};
}};
controls {{ }};
zone "{self.zone}" {{
    type primary;
    file "{self.zone}.zone";
    update-policy {{
        grant {self.key_name} name _acme-challenge.{self.zone}. TXT;
    }};
}};
"""
        path = os.path.join(d, "named.conf")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(conf)
        return path

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if "address in use" in self._tail().lower():
                return False
            try:
                query = dns.message.make_query(self.zone + ".", dns.rdatatype.SOA)
                udp = dns.query.udp(query, "127.0.0.1", timeout=0.5, port=self.port)
                tcp = dns.query.tcp(query, "127.0.0.1", timeout=0.5, port=self.port)
                if udp.answer and tcp.answer:
                    return True
            except (OSError, dns.exception.DNSException):
                pass
            time.sleep(0.05)
        return False

    def _tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return ""

    def txt(self, name: str) -> set[str]:
        """The TXT values this server answers for ``name`` now (empty when none)."""
        query = dns.message.make_query(name.rstrip(".") + ".", dns.rdatatype.TXT)
        response = dns.query.tcp(query, "127.0.0.1", timeout=5, port=self.port)
        return {
            b"".join(rdata.strings).decode("ascii")
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for rdata in rrset
        }

    def challenge_records(self) -> set[str]:
        """Every TXT value at ``_acme-challenge.<zone>``: what DNS-01 must leave empty."""
        return self.txt(f"_acme-challenge.{self.zone}")

    def _stop_process(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._reserved is not None:
            self._reserved.release()
            self._reserved = None

    def stop(self) -> None:
        """Terminate named and release its port (idempotent)."""
        self._stop_process()

    def __enter__(self) -> Bind9:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
