"""Issuance against one Pebble: synapse-acme (CLI, service, floor) vs certbot, acme-tiny and lego.

Every client runs as its documentation recommends (certbot ``certonly --standalone`` /
``--webroot``; acme-tiny with openssl-made keys and CSR and a webroot; lego ``run --http`` /
``--http.webroot``), with a fresh state directory per run
(so each run registers its account, as a first install does) and a freshly started Pebble.
Runs are interleaved round-robin (run 1 of every client, then run 2, ...), so a noisy moment
hits all clients alike and ratios are computed pair by pair (run i of A / run i of B, then
the median).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import yaml

from bench.common import CERTBOT, PY, ROOT, summary, timed_parallel, timed_run, wait_http

Groups = list[list[str]]
# Pebble 2.4 sometimes stops answering part of its API under 100 concurrent orders, for
# every client alike (docs/BENCHMARKS.md); such a run is recorded as failed and made up for.
MAX_FAILED_RUNS = 3


@attrs.define
class Client:
    """One way to get ``groups`` (lists of names, one list per certificate) issued."""

    name: str
    kind: str  # "project" | "floor" | "certbot" | "acme-tiny" | "lego"
    needs_nginx: bool
    run: Callable[[Groups, str], float]  # (groups, fresh workdir) -> seconds
    command: str  # what the report shows


@attrs.define
class Scenario:
    key: str
    title: str
    certs: int
    names_per_cert: int
    clients: list[str]


class Issuance:
    """Owns the Pebble handle, the HTTP-01 port, and nginx for the webroot clients."""

    def __init__(self, ca: Any, http_port: int, workdir: str, parallel: int) -> None:
        self.ca = ca
        self.port = http_port
        self.workdir = workdir
        self.parallel = parallel
        self.webroot = os.path.join(workdir, "webroot")
        os.makedirs(os.path.join(self.webroot, ".well-known", "acme-challenge"), exist_ok=True)
        self._nginx: subprocess.Popen[bytes] | None = None
        self.clients = {c.name: c for c in self._clients()}

    # -- nginx for webroot ------------------------------------------------------------------

    def nginx(self, on: bool) -> None:
        if on and self._nginx is None:
            self._nginx = start_nginx(self.workdir, self.port, self.webroot)
        elif not on and self._nginx is not None:
            self._nginx.terminate()
            self._nginx.wait(10)
            self._nginx = None

    # -- clients ----------------------------------------------------------------------------

    def _config(self, work: str, groups: Groups, name: str = "acme.yaml") -> str:
        block: dict[str, Any] = {
            "enabled": True,
            "url": self.ca.directory_url,
            "ca_bundle": self.ca.ca_bundle,
            "issuer_roots": self.ca.issuer_roots,
            "port": self.port,
            "bind_addresses": ["127.0.0.1"],
            "domain": groups[0][0],
            "domains": groups[0][1:],
            "storage": os.path.join(work, "store"),
            "terms_of_service_agreed": True,
            "contact": ["admin@example.test"],
            # Pebble has no rate limits, and the floor runs uncapped: lift the cap that keeps
            # a real CA (Let's Encrypt: 20 requests/s) safe, so both do the same work.
            "max_requests_per_minute": 100_000,
            # The preflight probes each name through Pebble's DNS stub, as Pebble validates.
            "preflight": {"port": self.port, "resolver": f"127.0.0.1:{self.ca.dns_port}"},
        }
        if len(groups) > 1:
            block["certificates"] = [{"domains": g} for g in groups[1:]]
        path = os.path.join(work, name)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({"acme": block}, f)
        return path

    def _project_seq(self, groups: Groups, work: str) -> float:
        total = 0.0
        for i, g in enumerate(groups):
            cfg = self._config(work, [g], f"acme{i}.yaml")
            t, _ = timed_run([PY, "-m", "synapse_acme", "issue", "-c", cfg])
            total += t
        return total

    def _project_one_config(self, groups: Groups, work: str) -> float:
        cfg = self._config(work, groups)
        t, _ = timed_run([PY, "-m", "synapse_acme", "issue", "-c", cfg])
        return t

    def _project_service(self, groups: Groups, work: str) -> float:
        cfg = self._config(work, groups)
        _, proc = timed_run(
            [PY, os.path.join(ROOT, "bench", "inproc.py"), "service", "--config", cfg]
        )
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])

    def _floor_cmd(self, groups: Groups) -> list[str]:
        cmd = [
            PY,
            os.path.join(ROOT, "bench", "inproc.py"),
            "floor",
            "--directory",
            self.ca.directory_url,
            "--ca-bundle",
            self.ca.ca_bundle,
            "--http-port",
            str(self.port),
        ]
        for g in groups:
            cmd += ["--names", ",".join(g)]
        return cmd

    def _floor(self, groups: Groups, work: str) -> float:
        _, proc = timed_run(self._floor_cmd(groups))
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])

    def _floor_process(self, groups: Groups, work: str) -> float:
        seconds, _ = timed_run(self._floor_cmd(groups))
        return seconds

    def certbot_cmd(self, g: list[str], work: str, webroot: bool) -> list[str]:
        cmd = [
            CERTBOT,
            "certonly",
            "--non-interactive",
            "--agree-tos",
            "-m",
            "admin@example.test",
            "--server",
            self.ca.directory_url,
            "--config-dir",
            os.path.join(work, "config"),
            "--work-dir",
            os.path.join(work, "work"),
            "--logs-dir",
            os.path.join(work, "logs"),
        ]
        if webroot:
            cmd += ["--webroot", "-w", self.webroot]
        else:
            cmd += ["--standalone", "--http-01-port", str(self.port)]
            cmd += ["--http-01-address", "127.0.0.1"]
        for name in g:
            cmd += ["-d", name]
        return cmd

    def _certbot_env(self) -> dict[str, str]:
        return {"REQUESTS_CA_BUNDLE": self.ca.ca_bundle}

    def _certbot_seq(self, webroot: bool) -> Callable[[Groups, str], float]:
        def run(groups: Groups, work: str) -> float:
            total = 0.0
            for g in groups:
                t, _ = timed_run(self.certbot_cmd(g, work, webroot), env=self._certbot_env())
                total += t
            return total

        return run

    def _certbot_parallel(self, groups: Groups, work: str) -> float:
        # certbot locks its directories: one set per process, sharing the nginx webroot.
        cmds = [
            self.certbot_cmd(g, os.path.join(work, f"p{i}"), webroot=True)
            for i, g in enumerate(groups)
        ]
        return timed_parallel(cmds, parallel=self.parallel, env=self._certbot_env())

    def lego_cmd(self, g: list[str], work: str, webroot: bool) -> list[str]:
        cmd = [
            "lego",
            "--accept-tos",
            "--email",
            "admin@example.test",
            "--server",
            self.ca.directory_url,
            "--path",
            os.path.join(work, "lego"),
            "--http",
        ]
        if webroot:
            cmd += ["--http.webroot", self.webroot]
        else:
            cmd += ["--http.port", f"127.0.0.1:{self.port}"]
        for name in g:
            cmd += ["--domains", name]
        return [*cmd, "run"]

    def _lego_env(self) -> dict[str, str]:
        return {"LEGO_CA_CERTIFICATES": self.ca.ca_bundle}

    def _lego_seq(self, groups: Groups, work: str) -> float:
        total = 0.0
        for g in groups:
            t, _ = timed_run(self.lego_cmd(g, work, webroot=False), env=self._lego_env())
            total += t
        return total

    def _lego_parallel(self, groups: Groups, work: str) -> float:
        cmds = [
            self.lego_cmd(g, os.path.join(work, f"p{i}"), webroot=True)
            for i, g in enumerate(groups)
        ]
        return timed_parallel(cmds, parallel=self.parallel, env=self._lego_env())

    def acme_tiny_cmd(self, g: list[str], work: str) -> list[str]:
        """The original Matrix TLS guide's way, in one shell: an RSA account key (acme-tiny
        reads no other kind; made once per state directory, like a first install), an ECDSA
        P-256 certificate key and CSR with openssl, then acme-tiny writing the challenge files
        into the webroot nginx serves. ``--disable-check`` skips its own fetch of
        http://NAME/... before answering: the test names resolve only through Pebble's DNS
        stub."""
        san = ",".join(f"DNS:{n}" for n in g)
        script = (
            'set -e; mkdir -p "$1/$4"; cd "$1"; '
            "[ -f account.key ] || openssl genrsa -out account.key 2048 2>/dev/null; "
            'cd "$4"; openssl ecparam -name prime256v1 -genkey -noout -out domain.key; '
            'openssl req -new -sha256 -key domain.key -subj "/CN=$4" '
            '-addext "subjectAltName=$5" -out domain.csr; '
            'acme-tiny --account-key ../account.key --csr domain.csr --acme-dir "$2" '
            '--directory-url "$3" --contact mailto:admin@example.test --disable-check --quiet '
            "> chain.pem"
        )
        acme_dir = os.path.join(self.webroot, ".well-known", "acme-challenge")
        state = os.path.join(work, "acme-tiny")
        return ["sh", "-c", script, "sh", state, acme_dir, self.ca.directory_url, g[0], san]

    def _acme_tiny_env(self) -> dict[str, str]:
        # acme-tiny fetches with urllib, which trusts what SSL_CERT_FILE names.
        return {"SSL_CERT_FILE": self.ca.ca_bundle}

    def _acme_tiny_seq(self, groups: Groups, work: str) -> float:
        total = 0.0
        for g in groups:
            # One state directory (one account key) for the whole sequence, as certbot keeps
            # one account per --config-dir.
            t, _ = timed_run(self.acme_tiny_cmd(g, work), env=self._acme_tiny_env())
            total += t
        return total

    def _acme_tiny_parallel(self, groups: Groups, work: str) -> float:
        cmds = [self.acme_tiny_cmd(g, os.path.join(work, f"p{i}")) for i, g in enumerate(groups)]
        return timed_parallel(cmds, parallel=self.parallel, env=self._acme_tiny_env())

    def _clients(self) -> list[Client]:
        p = self.port
        return [
            Client(
                "synapse-acme CLI, one process per cert",
                "project",
                False,
                self._project_seq,
                "python -m synapse_acme issue -c acme.yaml   (once per certificate)",
            ),
            Client(
                "synapse-acme CLI, one config",
                "project",
                False,
                self._project_one_config,
                "python -m synapse_acme issue -c acme.yaml   (all certificates under "
                "`certificates:`, issued concurrently)",
            ),
            Client(
                "synapse-acme service (in-process)",
                "project",
                False,
                self._project_service,
                "python bench/inproc.py service --config acme.yaml   (timed around "
                "AcmeService.renew(force=True) in a running process)",
            ),
            Client(
                "floor (minimal client)",
                "floor",
                False,
                self._floor,
                "python bench/inproc.py floor ...   (bare protocol requests, zero poll delay; "
                "timed inside the process from account registration)",
            ),
            Client(
                "floor, whole process",
                "floor",
                False,
                self._floor_process,
                "python bench/inproc.py floor ...   (the same minimal client, timed from process "
                "start to exit: interpreter, imports, registration, orders)",
            ),
            Client(
                "certbot standalone, sequential",
                "certbot",
                False,
                self._certbot_seq(webroot=False),
                f"certbot certonly --non-interactive --agree-tos -m M --server DIR "
                f"--standalone --http-01-port {p} --http-01-address 127.0.0.1 -d NAME "
                "--config-dir/--work-dir/--logs-dir D",
            ),
            Client(
                "certbot webroot, sequential",
                "certbot",
                True,
                self._certbot_seq(webroot=True),
                "certbot certonly ... --webroot -w WEBROOT -d NAME   (nginx serves WEBROOT)",
            ),
            Client(
                f"certbot webroot, {self.parallel} processes in parallel",
                "certbot",
                True,
                self._certbot_parallel,
                f"certbot certonly ... --webroot -w WEBROOT -d NAME   (xargs -P {self.parallel}"
                " style, own --config-dir each; standalone cannot share the port)",
            ),
            Client(
                "acme-tiny webroot, sequential",
                "acme-tiny",
                True,
                self._acme_tiny_seq,
                "openssl genrsa 2048 (account key, once) + openssl ecparam -name prime256v1 "
                "-genkey + openssl req -subj /CN=NAME -addext subjectAltName=DNS:NAME,... + "
                "acme-tiny --account-key A --csr C --acme-dir WEBROOT/.well-known/acme-challenge "
                "--directory-url DIR --contact mailto:M --disable-check   (nginx serves WEBROOT; "
                "SSL_CERT_FILE = Pebble's API CA)",
            ),
            Client(
                f"acme-tiny webroot, {self.parallel} processes in parallel",
                "acme-tiny",
                True,
                self._acme_tiny_parallel,
                f"the same, xargs -P {self.parallel} style, own account key each",
            ),
            Client(
                "lego http, sequential",
                "lego",
                False,
                self._lego_seq,
                f"lego --accept-tos --email M --server DIR --path D --http --http.port "
                f"127.0.0.1:{p} --domains NAME run",
            ),
            Client(
                f"lego webroot, {self.parallel} processes in parallel",
                "lego",
                True,
                self._lego_parallel,
                "lego ... --http --http.webroot WEBROOT --domains NAME run   "
                f"(xargs -P {self.parallel} style, own --path each)",
            ),
        ]

    # -- measuring ----------------------------------------------------------------------------

    def measure(
        self,
        scenario: Scenario,
        runs: int,
        cell_budget: float,
        log: Callable[[str], None],
        floor_runs: int = 0,
        floor_budget: float = 0.0,
    ) -> dict[str, Any]:
        """Round-robin runs of every client of ``scenario``; a client whose runs exceed
        ``cell_budget`` seconds in total stops early (its ``n`` says how many runs). A failed
        run is recorded (``failures``, with the first error, and Pebble's goroutine stacks
        when Pebble was still up) and the client goes on, with an extra run to make up for
        it; MAX_FAILED_RUNS failures stop it.

        The rows compared with the floor (the project's clients and the floors: kinds
        "project" and "floor") are run by run within a few tens of milliseconds of each
        other, where one noisy moment moves a ratio by 0.3x or more. After its ``runs`` runs,
        such a client goes on to ``floor_runs`` runs if that many cost at most
        ``floor_budget`` seconds at its median so far (the cheap cells; a 40 s row stays at
        ``runs``). Every client of a scenario decides alike, by the same rule, so run i of
        the CLI still pairs with run i of the floor."""
        times: dict[str, list[float | None]] = {c: [] for c in scenario.clients}
        spent: dict[str, float] = dict.fromkeys(scenario.clients, 0.0)
        errors: dict[str, str] = {}
        failures: dict[str, int] = dict.fromkeys(scenario.clients, 0)
        dumps: dict[str, list[str]] = {}

        def target(name: str, done: int) -> int:
            if floor_runs <= runs or self.clients[name].kind not in ("project", "floor"):
                return runs
            ok = sorted(x for x in times[name] if x is not None)
            if done < runs or not ok:
                return runs
            median = ok[len(ok) // 2]
            return floor_runs if median * floor_runs <= floor_budget else runs

        # Extra rounds, only for a client whose run failed, so it still gets its runs.
        for run in range(max(runs, floor_runs) + MAX_FAILED_RUNS):
            for name in scenario.clients:
                done = sum(1 for x in times[name] if x is not None)
                if (
                    failures[name] >= MAX_FAILED_RUNS
                    or done >= target(name, done)
                    or (run > 0 and spent[name] > cell_budget)
                ):
                    continue
                client = self.clients[name]
                groups = [
                    [
                        f"{'w' if n else 'c'}{n}.{i}.r{run}.{scenario.key}.{client.kind}"
                        f"{abs(hash(name)) % 1000}.example.test"
                        for n in range(scenario.names_per_cert)
                    ]
                    for i in range(scenario.certs)
                ]
                work = os.path.join(self.workdir, "runs", scenario.key, f"{run}-{abs(hash(name))}")
                os.makedirs(work, exist_ok=True)
                self.nginx(client.needs_nginx)
                # A fresh Pebble for every run (outside the timing): Pebble keeps every
                # account, order and certificate in memory, and after a few thousand orders
                # (the 100-certificate rows) it slowed down and then stopped answering within
                # 45 s, for every client alike. Each run now meets the same empty CA.
                self.ca.stop()
                self.ca.start()
                t0 = time.perf_counter()
                try:
                    seconds = client.run(groups, work)
                except Exception as e:  # reported in the table, never hidden
                    failures[name] += 1
                    times[name].append(None)  # keeps run i of every client aligned
                    errors.setdefault(name, str(e)[-4000:])  # the end says why
                    log(f"  {scenario.key} / {name} run {run + 1}: FAILED {str(e)[-600:]}")
                    tag = f"{scenario.key}-{run}-{client.kind}"
                    # outside the run's temporary directory, which goes at the end
                    dump = os.path.join(tempfile.gettempdir(), f"synapse-acme-pebble-{tag}.log")
                    if self.ca.dump_goroutines(dump):
                        dumps.setdefault(name, []).append(summarize_goroutines(dump))
                        log(f"  Pebble's goroutine stacks at that moment: {dump}")
                    continue
                finally:
                    spent[name] += time.perf_counter() - t0
                    shutil.rmtree(work, ignore_errors=True)
                times[name].append(seconds)
                log(f"  {scenario.key} / {name} run {run + 1}: {seconds:.3f} s")
        self.nginx(False)
        return {
            "key": scenario.key,
            "title": scenario.title,
            "certs": scenario.certs,
            "names_per_cert": scenario.names_per_cert,
            "results": {
                n: {**summary([x for x in v if x is not None]), "by_run": v}
                for n, v in times.items()
                if any(x is not None for x in v)
            },
            "errors": errors,
            "failures": {n: f for n, f in failures.items() if f},
            "pebble_dumps": dumps,
        }

    def close(self) -> None:
        self.nginx(False)


def summarize_goroutines(path: str) -> str:
    """One line about a Go goroutine dump: how many goroutines, how many wait on a lock, and
    in which of Pebble's functions."""
    with open(path, encoding="utf-8", errors="replace") as f:
        blocks = f.read().split("\ngoroutine ")
    total = sum(1 for b in blocks if "]:" in b.split("\n", 1)[0])
    waiting: dict[str, int] = {}
    for block in blocks:
        if "[semacquire" not in block.split("\n", 1)[0]:
            continue
        where = next(
            (line.rsplit("(", 1)[0].rsplit("/", 1)[-1] for line in block.splitlines()
             if line.startswith("github.com/letsencrypt/pebble/")),
            "?",
        )  # fmt: skip
        waiting[where] = waiting.get(where, 0) + 1
    top = ", ".join(f"{n} in {w}" for w, n in sorted(waiting.items(), key=lambda x: -x[1]))
    return (
        f"{total} goroutines, {sum(waiting.values())} of them waiting for a lock ({top}); "
        f"full dump: {path}"
    )


def run_ratios(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """The run-by-run ratios a[i]/b[i], sorted, over the runs both have (None: a failed run)."""
    return sorted(x / y for x, y in zip(a, b, strict=False) if x is not None and y)


def pair_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Median of :func:`run_ratios`."""
    pairs = run_ratios(a, b)
    if not pairs:
        return None
    mid = len(pairs) // 2
    return pairs[mid] if len(pairs) % 2 else (pairs[mid - 1] + pairs[mid]) / 2


def start_nginx(workdir: str, port: int, root: str, wait: bool = True) -> subprocess.Popen[bytes]:
    """nginx serving ``root`` as static files on 127.0.0.1:port, in the foreground; with
    ``wait``, once it answers (else the caller waits: common.start_on_reserved_port)."""
    prefix = os.path.join(workdir, f"nginx-{port}")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    user = "user root;" if os.geteuid() == 0 else ""
    with open(conf, "w", encoding="utf-8") as f:
        f.write(
            f"""{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type text/plain;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""
        )
    proc = subprocess.Popen(
        ["nginx", "-p", prefix, "-c", conf],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(prefix, "logs", "stderr.log"), "wb"),
    )
    if not wait:
        return proc
    try:
        wait_http(port, proc=proc)
    except RuntimeError:
        proc.kill()
        raise
    return proc


__all__ = ["Client", "Issuance", "Scenario", "pair_ratio", "start_nginx"]
