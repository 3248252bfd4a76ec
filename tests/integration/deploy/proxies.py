"""Real nginx and Apache on loopback, in a temp dir, with the shipped sample site rendered in.

Each runs in the foreground (``daemon off`` / ``-DFOREGROUND``) with its pid, logs and temp
files under the test's directory, so nothing touches the system's own configuration.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import attrs

from synapse_acme.testing.ports import port_in_use
from tests.integration.deploy.common import (
    APACHE_MODULES,
    Proc,
    program,
    render,
    wait_for,
    wait_listening,
)


class PortTaken(AssertionError):
    """The proxy could not bind a port it was told: another program has it (start again
    with other ports)."""


def _start(argv: list[str], log: Path, pid_file: Path, error_log: Path, ports: Ports) -> Proc:
    """Start a proxy and wait until it has bound its ports. Both write their pid file only
    after binding every listener, and exit if one cannot be bound (nginx after retrying for
    2.5 s); only then is "something listens on the port" known to be the proxy."""
    proc = Proc(argv, log)
    wait_for(lambda: pid_file.exists() or not proc.alive(), 30, f"{argv[0]} to start")
    if not proc.alive():
        text = proc.output() + (error_log.read_text(errors="replace") if error_log.exists() else "")
        proc.stop()
        kind = PortTaken if port_in_use(text) else AssertionError
        raise kind(f"{argv[0]} exited at start:\n{text[-3000:]}")
    for port in (ports.http, ports.tls):
        wait_listening(port)
    return proc


@attrs.define
class Ports:
    http: int  # the front door: Pebble's httpPort
    tls: int
    responder: int  # synapse-acme's HTTP-01 listener (8009 in the samples)
    homeserver: int  # 8008 in the samples


def site_replacements(ports: Ports, name: str, tls_dir: Path) -> list[tuple[str, str]]:
    return [
        ("matrix.example.com", name),
        ("http://127.0.0.1:8009", f"http://127.0.0.1:{ports.responder}"),
        ("http://127.0.0.1:8008", f"http://127.0.0.1:{ports.homeserver}"),
        ("/var/lib/synapse-acme/tls/", f"{tls_dir}/"),
    ]


def nginx_site(ports: Ports, name: str, tls_dir: Path) -> str:
    return render(
        "nginx-synapse-acme.conf",
        [
            *site_replacements(ports, name, tls_dir),
            ("listen 80;", f"listen 127.0.0.1:{ports.http};"),
            ("listen [::]:80;", "# listen [::]:80; (loopback only in tests)"),
            ("listen 443 ssl;", f"listen 127.0.0.1:{ports.tls} ssl;"),
            ("listen [::]:443 ssl;", "# listen [::]:443 ssl;"),
            ("listen 8448 ssl;", "# listen 8448 ssl;"),
            ("listen [::]:8448 ssl;", "# listen [::]:8448 ssl;"),
        ],
    )


def apache_site(ports: Ports, name: str, tls_dir: Path) -> str:
    return render(
        "apache-synapse-acme.conf",
        [
            *site_replacements(ports, name, tls_dir),
            ("<VirtualHost *:80>", f"<VirtualHost 127.0.0.1:{ports.http}>"),
            ("<VirtualHost *:443>", f"<VirtualHost 127.0.0.1:{ports.tls}>"),
        ],
    )


class Nginx:
    name = "nginx"

    def __init__(self, directory: Path, site: str, ports: Ports) -> None:
        self.ports = ports
        self.dir = directory / "nginx"
        (self.dir / "tmp").mkdir(parents=True)
        (self.dir / "site.conf").write_text(site)
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        temps = "\n".join(
            f"    {kind}_temp_path {self.dir}/tmp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(
            f"""worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 64; }}
http {{
    log_format probe '$remote_addr "$request" $status host=$host';
    access_log {self.access_log} probe;
{temps}
    include {self.dir}/site.conf;
}}
"""
        )
        self.binary = program("nginx")
        self.proc: Proc | None = None

    def base(self) -> list[str]:
        return [self.binary, "-c", str(self.conf), "-e", str(self.error_log)]

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base(), "-t"], capture_output=True, text=True, check=False)

    def start(self) -> None:
        """Start; PortTaken if a port was taken (see :func:`_start`)."""
        self.proc = _start(
            [*self.base(), "-g", "daemon off;"],
            self.dir / "stdout.log",
            self.dir / "nginx.pid",
            self.error_log,
            self.ports,
        )

    def reload(self) -> None:
        subprocess.run([*self.base(), "-s", "reload"], check=True, capture_output=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class Apache:
    name = "apache"

    def __init__(self, directory: Path, site: str, ports: Ports) -> None:
        self.ports = ports
        self.dir = directory / "apache"
        (self.dir / "run").mkdir(parents=True)
        (self.dir / "site.conf").write_text(site)
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        modules = "\n".join(
            f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so"
            for m in (
                "mpm_event",
                "authz_core",
                "alias",
                "headers",
                "proxy",
                "proxy_http",
                "socache_shmcb",
                "ssl",
            )
        )
        self.conf = self.dir / "apache2.conf"
        self.conf.write_text(
            f"""ServerRoot {self.dir}
ServerName localhost
DefaultRuntimeDir {self.dir}/run
PidFile {self.dir}/apache2.pid
Mutex file:{self.dir}/run default
ErrorLog {self.error_log}
LogLevel warn
{modules}
User nobody
Group nogroup
Listen 127.0.0.1:{ports.http}
Listen 127.0.0.1:{ports.tls}
LogFormat "%h \\"%r\\" %>s host=%{{Host}}i" probe
CustomLog {self.access_log} probe
Include {self.dir}/site.conf
"""
        )
        self.binary = program("apache2")
        self.proc: Proc | None = None

    def base(self) -> list[str]:
        return [self.binary, "-f", str(self.conf)]

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base(), "-t"], capture_output=True, text=True, check=False)

    def start(self) -> None:
        """Start; PortTaken if a port was taken (see :func:`_start`)."""
        self.proc = _start(
            [*self.base(), "-DFOREGROUND"],
            self.dir / "stdout.log",
            self.dir / "apache2.pid",
            self.error_log,
            self.ports,
        )

    def reload(self) -> None:
        subprocess.run([*self.base(), "-k", "graceful"], check=True, capture_output=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
