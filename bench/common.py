"""Shared pieces of the benchmark harness: timing, statistics, machine facts, Pebble, processes.

Everything here is blocking (subprocess, time.perf_counter): the harness is a driver that runs
the measured programs as child processes; it never runs a reactor itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
PY = sys.executable
CERTBOT_VENV = os.environ.get("BENCH_CERTBOT_VENV", os.path.join(BENCH, ".venv-certbot"))
CERTBOT = os.path.join(CERTBOT_VENV, "bin", "certbot")
CERTBOT_PY = os.path.join(CERTBOT_VENV, "bin", "python")

#: Pebble settings for every run: no random validation sleep (Pebble otherwise waits 0-15 s
#: before each validation), no rejected nonces and no authorization reuse, so each client does
#: the same protocol work on every run.
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}


def rss_mib() -> float:
    """This process's resident memory now (peak RSS where /proc is missing), in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and count: what every table cell shows."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": [round(v, 4) for v in values],
    }


def timed_run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
    cwd: str | None = None,
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``cmd`` to completion; (wall seconds, result). Raises if it fails."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    t0 = time.perf_counter()
    proc = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:6])}... exited {proc.returncode}:\n{proc.stdout[-1500:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return elapsed, proc


def timed_parallel(
    cmds: Sequence[Sequence[str]],
    *,
    parallel: int,
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
) -> float:
    """Run ``cmds`` with at most ``parallel`` at once (like ``xargs -P``); wall seconds."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    pending = list(cmds)
    running: list[tuple[subprocess.Popen[bytes], Sequence[str], Any]] = []
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    failures: list[str] = []
    while pending or running:
        while pending and len(running) < parallel:
            cmd = pending.pop(0)
            log = open(os.devnull, "wb")
            err = subprocess.PIPE
            running.append(
                (
                    subprocess.Popen(
                        list(cmd), stdout=log, stderr=err, env=full_env, stdin=subprocess.DEVNULL
                    ),
                    cmd,
                    log,
                )
            )
        still = []
        for proc, cmd, log in running:
            if proc.poll() is None:
                still.append((proc, cmd, log))
                continue
            stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if proc.stderr:
                proc.stderr.close()
            log.close()
            if proc.returncode != 0:
                failures.append(f"{' '.join(cmd[:4])}... exited {proc.returncode}: {stderr[-800:]}")
        running = still
        if time.monotonic() > deadline:
            for proc, _, _ in running:
                proc.kill()
            raise RuntimeError(f"parallel run exceeded {timeout} s")
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(cmds)} failed; first: {failures[0]}")
    return elapsed


def _version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available ({e.__class__.__name__})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _dpkg_version(pkg: str) -> str:
    return _version(["dpkg-query", "-W", "-f=${Version}", pkg])


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, OS, and the version of every program measured."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
                break
    load = "?"
    with contextlib.suppress(OSError):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    import synapse_acme

    versions = {
        "synapse-acme": synapse_acme.__version__,
        "python": platform.python_version(),
        "pebble (Debian)": _dpkg_version("pebble"),
        "certbot (PyPI)": _version([CERTBOT, "--version"]) if os.path.exists(CERTBOT) else "-",
        "acme-tiny (Debian)": _dpkg_version("acme-tiny") if shutil.which("acme-tiny") else "-",
        "lego (Debian)": _dpkg_version("lego") if shutil.which("lego") else "-",
        "nginx (Debian)": _version(["nginx", "-v"]) if shutil.which("nginx") else "-",
        "wrk (Debian)": _dpkg_version("wrk") if shutil.which("wrk") else "-",
    }
    with contextlib.suppress(Exception):
        import twisted

        versions["twisted"] = twisted.__version__
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "os": platform.platform(),
        "kernel": platform.release(),
        "load_at_start": load,
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


@contextlib.contextmanager
def pebble(workdir: str, http_port: int = 0) -> Iterator[Any]:
    """One private Pebble for a whole group of measurements (PEBBLE_ENV). Without
    ``http_port`` it reserves the port its validator dials (``ca.http_port``) until it stops:
    every client measured binds that number in turn."""
    from synapse_acme.testing.pebble import PebbleCA

    ca = PebbleCA(workdir, http_port=http_port, env=PEBBLE_ENV)
    ca.start()
    try:
        yield ca
    finally:
        ca.stop()


def start_on_reserved_port(
    start: Callable[[int], subprocess.Popen[bytes]], path: str = "/", attempts: int = 3
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server that must be told its port (``start(port)``) on a reserved one
    (synapse_acme.testing.ports), held until the server answers; if the server exits instead
    (its port was taken after all), start it again on another, at most ``attempts`` times."""
    from synapse_acme.testing.ports import reserve_port

    for attempt in range(1, attempts + 1):
        with reserve_port() as reservation:
            proc = start(reservation.port)
            try:
                wait_http(reservation.port, path, proc=proc)
            except RuntimeError:
                exited = proc.poll() is not None
                if not exited:
                    proc.kill()
                    proc.wait()
                if not exited or attempt == attempts:
                    raise
                continue
            if proc.poll() is None:  # not another program answering in its place
                return proc, reservation.port
    raise RuntimeError(f"the server exited at start {attempts} times")


def wait_http(
    port: int,
    path: str = "/",
    timeout: float = 15.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until something answers HTTP on 127.0.0.1:port (any status); RuntimeError on
    timeout, or at once if ``proc`` (the server expected to answer) exits."""
    import http.client

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for 127.0.0.1:{port} exited ({proc.returncode})")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def dump_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
