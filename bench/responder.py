"""HTTP-01 responder throughput and latency under wrk on loopback (bounded in count and time).

Each server answers the same token at ``/.well-known/acme-challenge/<token>``, set up as it
runs in production:

- synapse-acme: the listener ``synapse-acme run`` opens (``bench/serve_responder.py``: the
  HTTP-01 protocol inside the connection caps), and the same responder's twisted.web resource
  in a plain Site (``--site``: how Synapse serves it);
- certbot: what ``certbot --standalone`` builds, with certbot's own code
  (``bench/certbot_responder.py`` in certbot's venv), once with the DEBUG log file every
  certbot run writes and once without any logging (the bare server);
- nginx: Debian's shipped ``/etc/nginx/nginx.conf`` (see :func:`debian_nginx_conf` for the
  only lines changed) serving the token as a static file.

Each is started fresh, warmed up, then loaded by ``wrk -t1 -cC -dDs --latency`` (wrk's one
thread and the server share the machine's cores). Runs are interleaved server by server.
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
from bench.issuance import pair_ratio

TOKEN = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1-f4CBgoM"  # base64url of 32 bytes, as CAs send
VALIDATION = TOKEN + ".aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
PATH = f"/.well-known/acme-challenge/{TOKEN}"

SITE = "synapse-acme resource in a twisted.web Site"
CERTBOT = "certbot standalone"
CERTBOT_BARE = "certbot standalone, no log"
NGINX = "nginx static file"
SERVERS = ("synapse-acme", SITE, CERTBOT, CERTBOT_BARE, NGINX)
#: Debian's nginx configuration, the base of the nginx peer.
DEBIAN_NGINX_CONF = "/etc/nginx/nginx.conf"
#: nginx's compiled-in prefix ``/usr/share/nginx``: where relative ``load_module`` paths point.
DEBIAN_NGINX_MODULES = "/usr/share/nginx/modules"

#: How each peer is set up (printed with the results).
PEER_SETTINGS = {
    CERTBOT: "`certbot --standalone`'s own `ServerManager.run` on its default "
    '`--http-01-address` (`""`: one IPv6 socket on `::` taking IPv4 too, listen backlog 5), '
    "`HTTP01DualNetworkedServers` (stdlib `http.server`, HTTP/1.0, a thread per connection) "
    "serving an `HTTP01Resource` with a real response, and certbot's logging as every run "
    "sets it up: DEBUG records to `letsencrypt.log` through certbot's "
    "`setup_log_file_handler` (1 MiB rotating file; three lines per request)",
    CERTBOT_BARE: "the same server with no logging configured (the bare server)",
    NGINX: f"Debian's shipped `{DEBIAN_NGINX_CONF}` as is (`worker_processes auto`, "
    "`worker_connections 768`, `sendfile on`, `tcp_nopush on`, `gzip on`, the access log "
    "written per request, keepalive defaults) with only these lines changed: `daemon off` "
    "(foreground), `user`/`pid`/`error_log`/`access_log` and the temp paths moved to the "
    "run's directory (same log format), and the `conf.d`/`sites-enabled` includes replaced "
    "by Debian's default site (`root`, `index`, `server_name _`, "
    "`location / { try_files $uri $uri/ =404; }`) listening on 127.0.0.1:PORT only",
}


def debian_nginx_conf(shipped: str, prefix: str, port: int, root: str) -> str:
    """nginx.conf for the bench from Debian's shipped ``shipped`` text: every default kept,
    only the paths, the listener and the foreground switch changed (see PEER_SETTINGS)."""
    import getpass

    temp_paths = "".join(
        f"\n\t{t}_temp_path {prefix}/{t};"
        for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    site = (
        "\tserver {\n"
        f"\t\tlisten 127.0.0.1:{port} default_server;\n"
        f"\t\troot {root};\n"
        "\t\tindex index.html index.htm index.nginx-debian.html;\n"
        "\t\tserver_name _;\n"
        "\t\tlocation / {\n\t\t\ttry_files $uri $uri/ =404;\n\t\t}\n"
        "\t}"
    )
    # directive -> its replacement; the bench's own user, as the token lives in its private
    # temporary directory
    changes = {
        "user": f"user {getpass.getuser()};",
        "pid": f"pid {prefix}/nginx.pid;\ndaemon off;",
        "error_log": f"error_log {prefix}/logs/error.log;",
        "access_log": f"\taccess_log {prefix}/logs/access.log;" + temp_paths,
        "include /etc/nginx/conf.d/*.conf;": "",
        "include /etc/nginx/sites-enabled/*;": site,
    }
    lines, replaced = [], set()
    for line in shipped.splitlines():
        stripped = line.strip()
        key = stripped if stripped in changes else (stripped.split(None, 1) or [""])[0]
        if key in changes and stripped.endswith(";"):
            replaced.add(key)
            line = changes[key]
        lines.append(line)
    missing = set(changes) - replaced
    if missing:
        raise RuntimeError(
            f"{DEBIAN_NGINX_CONF} is not Debian's shipped file (no {', '.join(sorted(missing))})"
        )
    return "\n".join(lines) + "\n"


def start_debian_nginx(workdir: str, port: int, root: str) -> subprocess.Popen[bytes]:
    """nginx with Debian's shipped configuration (:func:`debian_nginx_conf`), not waited for."""
    if not os.path.exists(DEBIAN_NGINX_CONF):
        raise RuntimeError(f"{DEBIAN_NGINX_CONF} is missing (apt-get install nginx)")
    with open(DEBIAN_NGINX_CONF, encoding="utf-8") as f:
        shipped = f.read()
    prefix = os.path.join(workdir, f"nginx-{port}")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    # Debian's modules-enabled/*.conf load their modules by a path relative to the prefix
    # (``load_module modules/ngx_http_echo_module.so;``, which nginx-light brings): with the
    # bench's own prefix they are found where Debian's prefix has them.
    modules = os.path.join(prefix, "modules")
    if os.path.isdir(DEBIAN_NGINX_MODULES) and not os.path.lexists(modules):
        os.symlink(DEBIAN_NGINX_MODULES, modules)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w", encoding="utf-8") as f:
        f.write(debian_nginx_conf(shipped, prefix, port, root))
    return subprocess.Popen(
        ["nginx", "-p", prefix, "-c", conf],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(prefix, "logs", "stderr.log"), "wb"),
    )


def _start(server: str, workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    """The server on a reserved port, started again on another if it was taken anyway."""
    if server == NGINX:
        root = os.path.join(workdir, "www")
        d = os.path.join(root, ".well-known", "acme-challenge")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, TOKEN), "w", encoding="ascii") as f:
            f.write(VALIDATION)
        return start_on_reserved_port(lambda port: start_debian_nginx(workdir, port, root), PATH)
    if server in ("synapse-acme", SITE):
        cmd = [PY, os.path.join(ROOT, "bench", "serve_responder.py"), "{port}", TOKEN, VALIDATION]
        cmd += ["--site"] if server == SITE else []
    else:
        cmd = [CERTBOT_PY, os.path.join(ROOT, "bench", "certbot_responder.py"), "{port}"]
        cmd += [TOKEN, VALIDATION]
        if server == CERTBOT:
            logs = os.path.join(workdir, "certbot-logs")
            os.makedirs(logs, exist_ok=True)
            cmd += ["--logs-dir", logs]

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
    total = re.search(r"(\d+) requests in", out)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(x) for x in m.groups()) if m else 0
    # An HTTP/1.0 server (certbot's) closes after each answer; wrk counts that as a read error.
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": errors,
        "socket": socket_errors,
        "requests": int(total.group(1)) if total else 0,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its live descendants, all threads
    (nginx's workers are children of its master): the server's own work, whatever else runs
    on the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


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
                    cpu0 = cpu_seconds(proc.pid)
                    out = subprocess.run(
                        wrk_command(port, c, seconds),
                        capture_output=True,
                        text=True,
                        check=True,
                        timeout=seconds + 30,
                    ).stdout
                    r = parse_wrk(out)
                    r["cpu_us"] = (cpu_seconds(proc.pid) - cpu0) * 1e6 / max(1, r["requests"])
                    raw[server][c].append(r)
                    log(
                        f"  responder {server} c={c} run {run + 1}: {r['rps']:.0f} req/s, "
                        f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                        f"non-2xx {r['errors']}, "
                        f"socket errors {r['socket']}, "
                        f"server CPU {r['cpu_us']:.1f} us/request"
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
                "cpu_us_per_request": summary([r["cpu_us"] for r in raw[s][c]]),
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
        "peers": {s: PEER_SETTINGS[s] for s in servers if s in PEER_SETTINGS},
        "command": " ".join(wrk_command(0, 0, seconds))
        .replace(":0", ":PORT")
        .replace("-c0", "-cC"),
    }
