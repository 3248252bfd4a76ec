"""The module's cost to Synapse: the same homeserver with and without synapse-acme.

    python bench/synapse_cost.py [--runs 5] [--settle 10] [--idle 60] [--hs-seconds 5]
                                 [--hs-clients 2]

One homeserver directory (SQLite, the federation listener with ``tls: true`` and a bare plain
listener, as the integration test runs it: tests/integration/synapse/) and two configs that
differ only in the ``modules:`` entry:

- ``without``: Synapse alone; its TLS listener uses its own context factory
  (``ServerContextFactory``) on the certificate files;
- ``with``: the synapse-acme module loaded; it installs its hot-swapping SNI connection
  creator (``HotSwapTLS``) on the same listener.

Both serve the same certificate and key (ECDSA P-256, issued by a local Pebble during a
warm-up start with the module, outside the timing), from the same database. So a measured
``with`` start is the steady state of a restart: a valid certificate in the store, nothing to
issue. Every listener binds port 0; the ports are read back from ``/proc``.

Each run starts one process and measures, in order:

1. start: from ``Popen`` to the first ``200`` of ``GET /_matrix/federation/v1/version`` over
   TLS (interpreter start, imports, config, database, module, listeners);
2. RSS: ``VmRSS`` after ``--settle`` seconds more;
3. idle CPU: the time its threads spent on a CPU (``/proc/PID/task/*/schedstat``) across
   ``--idle`` seconds of no traffic;
4. handshakes/s: ``--hs-clients`` client processes each open connections one after another for
   ``--hs-seconds`` and complete a full TLS handshake on each (SNI = the server name, no ALPN,
   no session offered, so never a resumption on either side), then close. Twice: with a client
   offering only P-256 (both servers then do the same key exchange; the goal row) and with the
   client's OpenSSL defaults (X25519 first: Synapse's own factory pins P-256, so it answers
   with a HelloRetryRequest). Besides handshakes per second, handshakes per second of the
   server's CPU time in the window: what one core sustains, which other load on a shared
   machine moves much less.

Runs alternate the order of the two cases (ABBA), so slow drift hits both alike. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml

from bench.common import PEBBLE_ENV, ROOT, summary
from synapse_acme import crypto
from synapse_acme.testing.pebble import PebbleCA
from tests.integration.test_synapse import (
    HERE,
    SERVER_NAME,
    SYNAPSE_PYTHON,
    fetch_chain,
    module_config,
)

log = logging.getLogger("bench.synapse_cost")

WITHOUT = "without"
WITH = "with"
CASES = (WITHOUT, WITH)
LABELS = {
    WITHOUT: "Synapse alone (its own context factory)",
    WITH: "Synapse + synapse-acme module (HotSwapTLS)",
}
#: Client key exchange offers: "p256" = only P-256 (what both servers then agree on: the fair,
#: like-for-like row), "default" = the client OpenSSL's default list.
GROUPS = ("p256", "default")
START_TIMEOUT = 120.0
ISSUE_TIMEOUT = 120.0


def _synapse_env() -> dict[str, str]:
    """Synapse imports the module from this checkout (not from wherever it is installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


# -- /proc ------------------------------------------------------------------------------------


def listening_ports(pid: int) -> list[int]:
    """TCP ports that process ``pid`` listens on (its socket inodes matched in /proc/net)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name (field 2) may contain spaces; the rest follows the last ")".
        rest = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def run_seconds(pid: int) -> float:
    """Time ``pid``'s live threads have spent on a CPU (``/proc/PID/task/*/schedstat``, in
    nanoseconds: finer than the clock ticks of ``/proc/PID/stat``, for short windows)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


# -- clients ----------------------------------------------------------------------------------


def _client_context(groups: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # liveness and handshakes only: the chain is checked elsewhere
    ctx.verify_mode = ssl.CERT_NONE
    if groups == "p256":
        ctx.set_ecdh_curve("prime256v1")  # OpenSSL 3: the client's whole group list
    return ctx


def federation_answer(port: int, ctx: ssl.SSLContext) -> bool:
    """True once ``GET /_matrix/federation/v1/version`` over TLS answers 200."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", "/_matrix/federation/v1/version")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    finally:
        conn.close()


def _handshake_loop(
    port: int, groups: str, start_at: float, stop_at: float, out: Connection
) -> None:
    """One client process: full handshakes back to back between two monotonic instants."""
    ctx = _client_context(groups)
    done = failed = resumed = 0
    while time.monotonic() < start_at:
        time.sleep(0.001)
    while time.monotonic() < stop_at:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                with ctx.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
                    resumed += bool(tls.session_reused)
            done += 1
        except OSError:
            failed += 1
    out.send((done, failed, resumed))
    out.close()


def handshakes_per_second(port: int, clients: int, seconds: float, groups: str) -> dict[str, Any]:
    """Completed full handshakes per second with ``clients`` concurrent client processes."""
    mp = multiprocessing.get_context("fork")
    start_at = time.monotonic() + 0.3  # every client forked and ready before the window opens
    pipes, procs = [], []
    for _ in range(clients):
        recv, send = mp.Pipe(duplex=False)
        proc = mp.Process(
            target=_handshake_loop, args=(port, groups, start_at, start_at + seconds, send)
        )
        proc.start()
        send.close()
        pipes.append(recv)
        procs.append(proc)
    totals = [0, 0, 0]
    for recv, proc in zip(pipes, procs, strict=True):
        for i, x in enumerate(recv.recv()):
            totals[i] += x
        proc.join(30)
    done, failed, resumed = totals
    return {"per_s": done / seconds, "handshakes": done, "failed": failed, "resumed": resumed}


def server_cpu_per_handshake(config_path: str, handshakes: int) -> dict[str, float]:
    """Median server-side CPU time of one full handshake (P-256 client, SNI, no ALPN), in
    this process over memory BIOs: Synapse's own ``ServerContextFactory`` built from the
    ``without`` config, against the module's ``HotSwapTLS`` holding the same files.

    Only the server's calls are timed (thread CPU time), alternately for the two, so neither
    the client's work nor other load on the machine enters: the precise, narrow view of what
    the listener rows measure in the open.
    """
    from OpenSSL import SSL
    from OpenSSL._util import lib
    from synapse.config.homeserver import HomeServerConfig
    from synapse.crypto.context_factory import ServerContextFactory
    from twisted.internet.task import Clock

    from synapse_acme.model import CertificateBundle
    from synapse_acme.tls import HotSwapTLS

    config = HomeServerConfig.load_config("", ["-c", config_path])
    config.tls.read_certificate_from_disk()  # what Synapse's start does before the factory
    synapse_ctx = ServerContextFactory(config).getContext()
    with open(config.tls.tls_certificate_file, "rb") as f:
        chain = f.read()
    with open(config.tls.tls_private_key_file, "rb") as f:
        key = f.read()
    clock = Clock()
    clock.advance(time.time())
    creator = HotSwapTLS(clock=clock, default_key=SERVER_NAME)
    creator.set_bundle(SERVER_NAME, CertificateBundle(chain_pem=chain, key_pem=key))
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    lib.SSL_CTX_set1_curves_list(client_ctx._context, b"P-256")  # type: ignore[attr-defined]

    def one(server: SSL.Connection) -> float:
        spent = 0.0
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        client.set_tlsext_host_name(SERVER_NAME.encode())
        t0 = time.thread_time()
        server.set_accept_state()
        spent += time.thread_time() - t0
        for _ in range(10):
            with contextlib.suppress(SSL.WantReadError):
                client.do_handshake()
            try:
                data = client.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            t0 = time.thread_time()
            if data:
                server.bio_write(data)
            with contextlib.suppress(SSL.WantReadError):
                server.do_handshake()
            try:
                out = server.bio_read(65536)
            except SSL.WantReadError:
                out = b""
            spent += time.thread_time() - t0
            if out:
                client.bio_write(out)
        return spent

    times: dict[str, list[float]] = {WITHOUT: [], WITH: []}
    for _ in range(handshakes):
        t0 = time.thread_time()
        conn = SSL.Connection(synapse_ctx, None)  # what Twisted does with an old-style factory
        times[WITHOUT].append(time.thread_time() - t0 + one(conn))
        t0 = time.thread_time()
        conn = creator.serverConnectionForTLS(None)
        times[WITH].append(time.thread_time() - t0 + one(conn))
    med = {case: sorted(v)[len(v) // 2] for case, v in times.items()}
    return {
        "without_us": med[WITHOUT] * 1e6,
        "with_us": med[WITH] * 1e6,
        "ratio": med[WITHOUT] / med[WITH],  # handshakes per server CPU-second, with/without
        "handshakes": handshakes,
    }


# -- the homeserver ---------------------------------------------------------------------------


class Homeserver:
    """One homeserver directory and a config per case (identical but for ``modules:``)."""

    def __init__(self, workdir: str, ca: PebbleCA) -> None:
        self.dir = workdir
        self.listening_s: float | None = None  # the last start: Popen to a listening socket
        self.start_cpu_s = 0.0  # the last start: CPU time used up to the first answer
        os.makedirs(os.path.join(workdir, "tls"), mode=0o700, exist_ok=True)
        with open(HERE / "log.yaml", encoding="utf-8") as f:
            log_yaml = f.read().replace("{app_log}", os.path.join(workdir, "app.log"))
        with open(os.path.join(workdir, "log.yaml"), "w", encoding="utf-8") as f:
            f.write(log_yaml)
        # Pebble validates nothing here (PEBBLE_VA_ALWAYS_VALID) and no listener serves its
        # HTTP-01 port, so the preflight, which would probe that port, is off.
        lines = [
            x for x in module_config(ca).strip().splitlines() if not x.startswith("preflight:")
        ]
        indented = "\n".join("      " + line for line in [*lines, "preflight: false"])
        with open(HERE / "homeserver.yaml.tmpl", encoding="utf-8") as f:
            text = f.read().format(
                server_name=SERVER_NAME,
                dir=workdir,
                tls_port=0,  # every listener on port 0: read back from /proc
                http_port=0,
                module_config=indented,
            )
        config = yaml.safe_load(text)
        # Only the federation listener: nothing is issued during the measured runs (the plain
        # port-80 stand-in of the template only serves challenges), and a TLS probe sent to a
        # plain HTTP listener would wait for its timeout.
        config["listeners"] = [item for item in config["listeners"] if item.get("tls")]
        self.configs = {}
        for case in CASES:
            if case == WITHOUT:
                config_case = {k: v for k, v in config.items() if k != "modules"}
            else:
                config_case = config
            path = os.path.join(workdir, f"homeserver-{case}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                yaml.safe_dump(config_case, f, sort_keys=False)
            self.configs[case] = path
        self.cert_path = os.path.join(workdir, "tls", "fullchain.pem")
        self.key_path = os.path.join(workdir, "tls", "privkey.pem")
        subprocess.run(
            [
                SYNAPSE_PYTHON,
                "-m",
                "synapse.app.homeserver",
                "-c",
                self.configs[WITH],
                "--generate-keys",
            ],
            cwd=workdir,
            env=_synapse_env(),
            capture_output=True,
            timeout=120,
            check=True,
        )

    def log_tail(self) -> str:
        out = []
        for name in ("app.log", "stdout.log"):
            with contextlib.suppress(OSError), open(os.path.join(self.dir, name)) as f:
                out.append(f.read()[-3000:])
        return "\n".join(out)

    @contextlib.contextmanager
    def running(self, case: str) -> Iterator[tuple[subprocess.Popen[bytes], int, float]]:
        """Start Synapse for ``case``; yields (process, TLS port, seconds to the first answer)."""
        probe = _client_context("default")
        with open(os.path.join(self.dir, "stdout.log"), "ab") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [SYNAPSE_PYTHON, "-m", "synapse.app.homeserver", "-c", self.configs[case]],
                cwd=self.dir,
                env=_synapse_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            port = None
            self.listening_s = None
            deadline = time.monotonic() + START_TIMEOUT
            while port is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"Synapse exited with {proc.returncode}\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Synapse did not answer\n{self.log_tail()}")
                ports = listening_ports(proc.pid)
                if ports and self.listening_s is None:
                    self.listening_s = time.perf_counter() - t0
                for candidate in ports:
                    with contextlib.suppress(OSError, http.client.HTTPException):
                        if federation_answer(candidate, probe):
                            port = candidate
                            break
                else:
                    time.sleep(0.01)
            started = time.perf_counter() - t0
            self.start_cpu_s = cpu_seconds(proc.pid)
            yield proc, port, started
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def warm_up(self) -> dict[str, Any]:
        """Start once with the module until it has issued and exported the certificate, and
        once without it: the database schema, the certificate and the page cache are then
        what every measured start finds."""
        with self.running(WITH) as (_, port, started):
            deadline = time.monotonic() + ISSUE_TIMEOUT
            while True:
                chain = fetch_chain(port)
                on_disk = None
                with contextlib.suppress(OSError, ValueError):
                    with open(self.cert_path, "rb") as f:
                        on_disk = crypto.parse_chain(f.read())[0]
                if (
                    not crypto.is_placeholder(chain[0])
                    and on_disk is not None
                    and on_disk.serial_number == chain[0].serial_number
                ):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no certificate issued\n{self.log_tail()}")
                time.sleep(0.2)
        leaf = chain[0]
        with self.running(WITHOUT) as (_, port, _started):
            served = fetch_chain(port)[0]
        if served.serial_number != leaf.serial_number:
            raise RuntimeError("Synapse alone serves another certificate than the module")
        return {
            "first_start_with_module_s": started,
            "certificate": {
                "key": type(leaf.public_key()).__name__,
                "curve": getattr(getattr(leaf.public_key(), "curve", None), "name", None),
                "chain_length": len(chain),
                "issuer": leaf.issuer.rfc4514_string(),
            },
        }


def measure_case(hs: Homeserver, case: str, args: argparse.Namespace) -> dict[str, Any]:
    with hs.running(case) as (proc, port, started):
        served = fetch_chain(port)[0]  # with SNI: the issued certificate, not a placeholder
        if crypto.is_placeholder(served):
            raise RuntimeError(f"{case}: serving a placeholder")
        time.sleep(args.settle)
        rss = rss_mib(proc.pid)
        cpu0, t0 = run_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle)
        idle_cpu = run_seconds(proc.pid) - cpu0
        idle_wall = time.monotonic() - t0
        hs_rates = {}
        for groups in GROUPS:
            handshakes_per_second(port, args.hs_clients, min(0.5, args.hs_seconds), groups)
            cpu0 = run_seconds(proc.pid)
            rate = handshakes_per_second(port, args.hs_clients, args.hs_seconds, groups)
            # Server CPU per handshake: what one core of a listener can sustain, which other
            # load on the machine moves much less than the wall-clock rate.
            rate["server_cpu_s"] = run_seconds(proc.pid) - cpu0
            rate["per_cpu_s"] = rate["handshakes"] / max(rate["server_cpu_s"], 1e-9)
            hs_rates[groups] = rate
        if proc.poll() is not None:
            raise RuntimeError(f"{case}: Synapse died during the run\n{hs.log_tail()}")
    return {
        "start_s": started,
        "start_cpu_s": hs.start_cpu_s,
        "listening_s": hs.listening_s,
        "rss_mib": rss,
        "idle_cpu_s": idle_cpu,
        "idle_wall_s": idle_wall,
        "idle_cpu_percent": 100 * idle_cpu / idle_wall,
        "handshakes": hs_rates,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before RSS")
    parser.add_argument("--idle", type=float, default=60.0, help="idle CPU window, seconds")
    parser.add_argument("--hs-seconds", type=float, default=5.0)
    parser.add_argument("--hs-clients", type=int, default=2)
    parser.add_argument(
        "--inprocess", type=int, default=2000, help="handshakes for the in-process comparison"
    )
    parser.add_argument("--keep", help="work in this directory and keep it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    with contextlib.ExitStack() as stack:
        work = args.keep or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="synapse-acme-cost-")
        )
        # Pebble must know where its validator would dial; with PEBBLE_VA_ALWAYS_VALID it never
        # dials, and this bound (never listening) socket keeps the number from meaning anything.
        holder = stack.enter_context(socket.socket())
        holder.bind(("127.0.0.1", 0))
        env = {**PEBBLE_ENV, "PEBBLE_VA_ALWAYS_VALID": "1"}
        ca = stack.enter_context(
            PebbleCA(os.path.join(work, "pebble"), http_port=holder.getsockname()[1], env=env)
        )
        hs = Homeserver(os.path.join(work, "hs"), ca)
        warm = hs.warm_up()
        log.info("warm-up: %s", warm)
        inproc = server_cpu_per_handshake(hs.configs[WITHOUT], args.inprocess)
        log.info("in-process server CPU per handshake: %s", inproc)
        runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
        for i in range(args.runs):
            order = CASES if i % 2 == 0 else CASES[::-1]
            for case in order:
                r = measure_case(hs, case, args)
                runs[case].append(r)
                log.info(
                    "run %d %-7s start %.3f s (listening %.3f s, CPU %.3f s), RSS %.1f MiB, "
                    "idle CPU %.2f%%, handshakes/s %s, per server CPU-second %s",
                    i + 1,
                    case,
                    r["start_s"],
                    r["listening_s"],
                    r["start_cpu_s"],
                    r["rss_mib"],
                    r["idle_cpu_percent"],
                    {g: round(v["per_s"]) for g, v in r["handshakes"].items()},
                    {g: round(v["per_cpu_s"]) for g, v in r["handshakes"].items()},
                )
    result = {
        "settings": vars(args),
        "labels": LABELS,
        "warm_up": warm,
        "inprocess": inproc,
        "runs": runs,
        "summary": {case: summarize(runs[case]) for case in CASES},
        "ratios": ratios(runs),
        "client_openssl": ssl.OPENSSL_VERSION,
    }
    print(json.dumps(result))
    return 0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {
        key: summary([r[key] for r in runs])
        for key in ("start_s", "start_cpu_s", "listening_s", "rss_mib", "idle_cpu_percent")
    }
    for groups in GROUPS:
        out[f"hs_{groups}"] = summary([r["handshakes"][groups]["per_s"] for r in runs])
        out[f"hs_{groups}_per_cpu_s"] = summary(
            [r["handshakes"][groups]["per_cpu_s"] for r in runs]
        )
    out["hs_failed"] = sum(v["failed"] for r in runs for v in r["handshakes"].values())
    out["hs_resumed"] = sum(v["resumed"] for r in runs for v in r["handshakes"].values())
    return out


def _paired(runs: dict[str, list[dict[str, Any]]], get: Any, op: Any) -> float | None:
    """Median over runs of ``op(with run i, without run i)`` (runs are interleaved)."""
    values = sorted(op(get(a), get(b)) for a, b in zip(runs[WITH], runs[WITHOUT], strict=True))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """With / without, run by run, then the median (deltas for start, RSS and idle CPU)."""
    out = {
        "start_delta_s": _paired(runs, lambda r: r["start_s"], lambda a, b: a - b),
        "start_ratio": _paired(runs, lambda r: r["start_s"], lambda a, b: a / b),
        "start_cpu_delta_s": _paired(runs, lambda r: r["start_cpu_s"], lambda a, b: a - b),
        "rss_delta_mib": _paired(runs, lambda r: r["rss_mib"], lambda a, b: a - b),
        "idle_cpu_delta_percent": _paired(
            runs, lambda r: r["idle_cpu_percent"], lambda a, b: a - b
        ),
    }
    for groups in GROUPS:
        for unit in ("per_s", "per_cpu_s"):
            out[f"hs_{groups}_{unit}_ratio"] = _paired(
                runs, lambda r, g=groups, u=unit: r["handshakes"][g][u], lambda a, b: a / b
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
