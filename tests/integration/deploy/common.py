"""Shared pieces of the deployment tests: real programs, rendered samples, unprivileged runs.

Everything here fails loudly: a missing program is a test failure naming the Debian package
(scripts/install-deps.sh installs them), never a skip.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from synapse_acme import crypto
from synapse_acme.model import CertificateBundle
from synapse_acme.names import names_key
from synapse_acme.testing.pebble import PebbleCA

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = ROOT / "sample_config"
CLI = [sys.executable, "-m", "synapse_acme"]
#: Debian package of each program the deployment tests run.
PACKAGES = {
    "nginx": "nginx",
    "apache2": "apache2",
    "authbind": "authbind",
    "systemd-socket-activate": "systemd",
    "systemd-analyze": "systemd",
    "setpriv": "util-linux",
}
APACHE_MODULES = Path("/usr/lib/apache2/modules")


def program(name: str) -> str:
    """Absolute path of ``name``; fails the test (not skips) when it is missing."""
    for directory in (None, "/usr/sbin:/sbin"):
        found = shutil.which(name, path=directory) if directory else shutil.which(name)
        if found:
            return found
    pytest.fail(
        f"{name} not found: apt-get install {PACKAGES.get(name, name)} "
        "(bash scripts/install-deps.sh installs everything the tests need)"
    )


def render(sample: str, replacements: Sequence[tuple[str, str]]) -> str:
    """The sample's text with each ``old`` replaced; each must occur, so samples cannot drift."""
    text = (SAMPLES / sample).read_text()
    for old, new in replacements:
        assert old in text, f"{sample} no longer contains {old!r}; update the test's rendering"
        text = text.replace(old, new)
    return text


@contextmanager
def world_dir(prefix: str) -> Iterator[Path]:
    """A temp dir that other users can traverse (pytest's tmp_path is 0700 root's)."""
    path = Path(tempfile.mkdtemp(prefix=f"synapse-acme-{prefix}-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        if os.environ.get("SYNAPSE_ACME_KEEP_TEST_DIRS") != "1":  # keep them to debug
            shutil.rmtree(path, ignore_errors=True)


def unprivileged_user() -> pwd.struct_passwd:
    """``nobody``, or a system user made for the tests when the system has none."""
    for name in ("nobody", "synapse-acme-test"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "synapse-acme-test",
        ],
        check=True,
    )
    return pwd.getpwnam("synapse-acme-test")


def as_user_argv(user: pwd.struct_passwd) -> list[str]:
    """Prefix running a command as ``user`` with no supplementary groups; setpriv execs (no
    fork), so the pid, and with it LISTEN_PID for socket activation, stays the same."""
    return [
        program("setpriv"),
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
    ]


def require_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Fail clearly when something already listens on ``port`` (the tests need it for real)."""
    for family, address in ((socket.AF_INET, host), (socket.AF_INET, "0.0.0.0")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError as e:
                who = subprocess.run(
                    ["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True
                ).stdout
                pytest.fail(f"port {port} is not free ({e}); stop what listens there:\n{who}")


def start_pebble(workdir: Path, http_port: int) -> PebbleCA:
    """A Pebble whose validator dials ``http_port``; its CA file readable by every user."""
    ca = PebbleCA(str(workdir / "pebble"), http_port=http_port)
    ca.start()
    (workdir / "pebble").chmod(0o755)
    Path(ca.ca_bundle).chmod(0o644)
    Path(ca.issuer_roots).chmod(0o644)
    return ca


def give_to(path: Path, user: pwd.struct_passwd) -> None:
    """An empty private directory for ``user`` (the store of an unprivileged runner)."""
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)


def stored_bundle(storage: Path, names: Sequence[str]) -> tuple[Path, CertificateBundle]:
    d = storage / "certificates" / names_key(names)
    return d, CertificateBundle(
        key_pem=(d / "privkey.pem").read_bytes(),
        chain_pem=(d / "fullchain.pem").read_bytes(),
        metadata=json.loads((d / "metadata.json").read_text()),
    )


def check_issued(ca: PebbleCA, storage: Path, names: Sequence[str]) -> Path:
    """The stored certificate chains to this Pebble's root and covers exactly ``names``."""
    d, bundle = stored_bundle(storage, names)
    ca.verify_chain(bundle.chain_pem, list(names))
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = crypto.validate_bundle(bundle, list(names), now)[0]
    assert sorted(crypto.certificate_names(leaf)) == sorted(names)
    return d


def owners(root: Path) -> set[int]:
    """The uids owning ``root`` and everything under it."""
    found = {root.stat().st_uid}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.lstat(os.path.join(dirpath, name)).st_uid)
    return found


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def wait_listening(port: int, timeout: float = 15, host: str = "127.0.0.1") -> None:
    def connects() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(connects, timeout, f"something to listen on {host}:{port}")


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request; (status, lower-cased headers, body), HTTP errors included."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    opener = urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Proc:
    """A program started in its own session, stopped (TERM, then KILL) by :meth:`stop`."""

    def __init__(self, argv: Sequence[str], log: Path, **kwargs: Any) -> None:
        self.argv = list(argv)
        self.log = log
        self._out = open(log, "ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._out.close()
        return self.popen.returncode


_HOMESERVER_STUB = """
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print("listening", server.server_address[1], flush=True)
server.serve_forever()
"""


def reported_port(proc: Proc, timeout: float = 15) -> int:
    """The port a program bound to port 0 reports (a ``listening <port>`` line)."""

    def port() -> int | None:
        for line in proc.output().splitlines():
            if line.startswith("listening "):
                return int(line.split()[1])
        if not proc.alive():
            raise AssertionError(f"{proc.argv} exited:\n{proc.output()[-3000:]}")
        return None

    found: int = wait_for(port, timeout, f"{proc.argv} to report its port")
    return found


def start_homeserver_stub(directory: Path) -> tuple[Proc, int]:
    """A static stand-in for Synapse's client API, to prove the proxies also forward /_matrix;
    it binds a port the kernel picks and says which: ``(proc, port)``."""
    root = directory / "homeserver"
    (root / "_matrix" / "client").mkdir(parents=True)
    (root / "_matrix" / "client" / "versions").write_text('{"versions": ["v1.11"]}')
    proc = Proc([sys.executable, "-c", _HOMESERVER_STUB, str(root)], directory / "homeserver.log")
    return proc, reported_port(proc)


def start_fixed_responder(directory: Path, token: str, key_auth: str) -> tuple[Proc, int]:
    """The real HTTP-01 listener serving one token (fixed_responder.py) on a port the kernel
    picks: ``(proc, port)``."""
    script = Path(__file__).with_name("fixed_responder.py")
    proc = Proc(
        [sys.executable, str(script), "tcp:0:interface=127.0.0.1", token, key_auth],
        directory / "responder.log",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return proc, reported_port(proc)


def responder_requests(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]


def cli(
    *args: str, prefix: Sequence[str] = (), timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


#: A virtualenv other users can run: this machine's interpreter may live under /root (0700).
SHARED_VENV = Path("/var/lib/synapse-acme-test-venv")


def unprivileged_python() -> str:
    """A Python with synapse-acme (a copy of this checkout) that any user can execute.

    Made once from the system's /usr/bin/python3 (Debian's python3-venv) and reused while
    pyproject.toml/setup.py are unchanged; the first run downloads the dependencies (~20 s).
    """
    import hashlib

    python = SHARED_VENV / "bin" / "python"
    # A copy (not editable): the checkout may live where other users cannot read (CI's clone).
    sources = [ROOT / "pyproject.toml", ROOT / "setup.py"]
    sources += sorted((ROOT / "synapse_acme").rglob("*.py"))
    sources += sorted((ROOT / "synapse_acme").rglob("*.yaml"))
    want = hashlib.sha256(b"".join(p.read_bytes() for p in sources if p.exists())).hexdigest()
    stamp = SHARED_VENV / ".stamp"
    if not (python.exists() and stamp.exists() and stamp.read_text() == want):
        base = shutil.which("python3", path="/usr/bin") or pytest.fail(
            "/usr/bin/python3 is missing: apt-get install python3 python3-venv"
        )
        subprocess.run([base, "-m", "venv", "--clear", str(SHARED_VENV)], check=True)
        r = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", str(ROOT)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, f"pip install into {SHARED_VENV} failed:\n{r.stderr[-3000:]}"
        stamp.write_text(want)
    SHARED_VENV.chmod(0o755)
    return str(python)


def unprivileged_argv(user: pwd.struct_passwd, *args: str, wrap: Sequence[str] = ()) -> list[str]:
    """``setpriv`` to ``user`` [+ ``wrap``, e.g. authbind] + the shared Python's CLI."""
    return [*as_user_argv(user), *wrap, unprivileged_python(), "-m", "synapse_acme", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """What an unprivileged service would have: no root HOME, no pytest variables."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the port-80 deployment tests run as root (they switch users and bind 80)")
