"""HTTP-01 responder throughput and latency under wrk on loopback (bounded in count and time).

Four servers answer the same token at ``/.well-known/acme-challenge/<token>``:
synapse-acme's standalone listener (``bench/serve_responder.py``), the same responder's
twisted.web resource in a plain Site (``--site``: how Synapse serves it), certbot's standalone
server (``bench/certbot_responder.py`` in certbot's venv) and nginx serving the token as a
static file.
Each is started fresh, warmed up, then loaded by ``wrk -t1 -cC -dDs --latency`` (wrk's one
thread and the server share the 2 cores). Runs are interleaved server by server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import CERTBOT_PY, PY, ROOT, start_on_reserved_port, summary
from bench.issuance import pair_ratio, start_nginx

TOKEN = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1-f4CBgoM"  # base64url of 32 bytes, as CAs send
VALIDATION = TOKEN + ".aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
PATH = f"/.well-known/acme-challenge/{TOKEN}"

SITE = "synapse-acme resource in a twisted.web Site"
SERVERS = ("synapse-acme", SITE, "certbot standalone", "nginx static file")


def _start(server: str, workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    """The server on a reserved port, started again on another if it was taken anyway."""
    if server == "nginx static file":
        root = os.path.join(workdir, "www")
        d = os.path.join(root, ".well-known", "acme-challenge")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, TOKEN), "w", encoding="ascii") as f:
            f.write(VALIDATION)
        return start_on_reserved_port(
            lambda port: start_nginx(workdir, port, root, wait=False), PATH
        )
    if server in ("synapse-acme", SITE):
        cmd = [PY, os.path.join(ROOT, "bench", "serve_responder.py"), "{port}", TOKEN, VALIDATION]
        cmd += ["--site"] if server == SITE else []
    else:
        cmd = [CERTBOT_PY, os.path.join(ROOT, "bench", "certbot_responder.py"), "{port}"]
        cmd += [TOKEN, VALIDATION]

    def start(port: int) -> subprocess.Popen[bytes]:
        argv = [str(port) if arg == "{port}" else arg for arg in cmd]
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    return start_on_reserved_port(start, PATH)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, latency p50/p99 (ms), errors from wrk's --latency output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(x) for x in m.groups()) if m else 0
    # An HTTP/1.0 server (certbot's) closes after each answer; wrk counts that as a read error.
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors, "socket": socket_errors}


def wrk_command(port: int, connections: int, seconds: float) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        f"http://127.0.0.1:{port}{PATH}",
    ]


def measure(
    servers: Sequence[str],
    connections: Sequence[int],
    seconds: float,
    runs: int,
    workdir: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    raw: dict[str, dict[int, list[dict[str, float]]]] = {
        s: {c: [] for c in connections} for s in servers
    }
    for run in range(runs):
        for server in servers:
            work = os.path.join(workdir, f"resp-{run}-{servers.index(server)}")
            proc, port = _start(server, work)
            try:
                # check the body once, then warm up (imports, first-request paths)
                import urllib.request

                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(f"http://127.0.0.1:{port}{PATH}", timeout=5) as resp:
                    body = resp.read().decode()
                if body != VALIDATION:
                    raise RuntimeError(f"{server} answered {body[:80]!r}")
                subprocess.run(wrk_command(port, 1, 1), capture_output=True, check=True)
                for c in connections:
                    out = subprocess.run(
                        wrk_command(port, c, seconds),
                        capture_output=True,
                        text=True,
                        check=True,
                        timeout=seconds + 30,
                    ).stdout
                    r = parse_wrk(out)
                    raw[server][c].append(r)
                    log(
                        f"  responder {server} c={c} run {run + 1}: {r['rps']:.0f} req/s, "
                        f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                        f"non-2xx {r['errors']}, "
                        f"socket errors {r['socket']}"
                    )
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                time.sleep(0.1)
    results: dict[str, Any] = {}
    for s in servers:
        results[s] = {
            str(c): {
                "rps": summary([r["rps"] for r in raw[s][c]]),
                "p50_ms": summary([r["p50_ms"] for r in raw[s][c]]),
                "p99_ms": summary([r["p99_ms"] for r in raw[s][c]]),
                "errors": sum(int(r["errors"]) for r in raw[s][c]),
                "socket_errors": sum(int(r["socket"]) for r in raw[s][c]),
            }
            for c in connections
        }
    ratios: dict[str, dict[str, float | None]] = {}
    if "synapse-acme" in servers:
        ours = raw["synapse-acme"]
        for other in servers:
            if other == "synapse-acme":
                continue
            ratios[other] = {
                str(c): pair_ratio([r["rps"] for r in ours[c]], [r["rps"] for r in raw[other][c]])
                for c in connections
            }
    return {
        "connections": list(connections),
        "seconds": seconds,
        "runs": runs,
        "results": results,
        "rps_ratio_ours_to": ratios,
        "command": " ".join(wrk_command(0, 0, seconds))
        .replace(":0", ":PORT")
        .replace("-c0", "-cC"),
    }
