"""The HTTP-01 listener on real sockets, with a real reactor in a subprocess (the suite's rule)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

_SCRIPT = textwrap.dedent(
    r"""
    import json, logging, socket, sys
    import urllib.error, urllib.request
    from twisted.internet import defer, task, threads
    from synapse_acme.errors import ListenError
    from synapse_acme.http01 import HTTP01Responder
    from synapse_acme.listeners import ListenerService
    from synapse_acme.http01_server import make_factory
    from synapse_acme.testing.ports import reserve_port

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    MODE = sys.argv[1]

    def fetch(url):
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return [resp.status, resp.read().decode()]
        except urllib.error.HTTPError as e:
            return [e.code, ""]

    async def main(reactor):
        # The endpoints name one port number for both families, so it is picked up front:
        # reserved (synapse_acme.testing.ports), and if it was taken anyway, another one.
        for attempt in range(1, 4):
            with reserve_port() as reservation:
                done = await listen(reactor, reservation.port)
            if done or MODE != "free" or attempt == 3:
                return
            print(f"port {reservation.port} was taken: another one", file=sys.stderr)

    async def listen(reactor, port):
        # False if the port was taken by someone else (free mode): try another.
        endpoints = [rf"tcp6:port={port}:interface=\:\:", f"tcp:port={port}:interface=0.0.0.0"]
        responder = HTTP01Responder()
        responder.start_responding("a.example.test", "tok_1", "tok_1.thumb")
        blockers = []
        if MODE == "occupied":
            for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
                s = socket.socket(family)
                try:
                    s.bind((host, port))
                    s.listen()
                    blockers.append(s)
                except OSError:
                    s.close()  # dual-stack: the first socket already took IPv4 too
        svc = ListenerService(reactor, make_factory(responder, reactor), endpoints)
        svc.privilegedStartService()
        svc.startService()
        out = {}
        try:
            ports = await svc.when_listening()
        except ListenError as e:
            await svc.stopService()
            if MODE == "free" and "EADDRINUSE" in str(e):
                return False
            out["error"] = str(e)
            print(json.dumps(out))
            return True
        out["bound"] = [p.getHost().host for p in ports]
        # A plain HTTP client in a thread (treq's URL handling rejects IPv6 literals).
        for host in ("127.0.0.1", "[::1]"):
            url = f"http://{host}:{port}/.well-known/acme-challenge/tok_1"
            out[host] = await threads.deferToThread(fetch, url)
        out["other"] = await threads.deferToThread(fetch, f"http://127.0.0.1:{port}/anything")
        await svc.stopService()
        s = socket.socket(socket.AF_INET6)
        # REUSEADDR skips TIME_WAIT leftovers; on Linux it still refuses a live listener.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))  # the port is really free again
        s.listen()
        s.close()
        out["freed"] = True
        print(json.dumps(out))
        return True

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


def _v6only() -> bool:
    with open("/proc/sys/net/ipv6/bindv6only") as f:
        return f.read().strip() == "1"


def _run(mode: str) -> tuple[dict[str, object], str]:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_dual_stack_listener_serves_ipv4_and_ipv6() -> None:
    out, log = _run("free")
    assert out["127.0.0.1"] == [200, "tok_1.thumb"]
    assert out["[::1]"] == [200, "tok_1.thumb"]
    assert out["other"] == [404, ""]
    assert out["freed"] is True
    assert "WARNING" not in log
    if _v6only():  # each family needs its own socket
        assert out["bound"] == ["::", "0.0.0.0"]
    else:  # Linux default: '::' takes IPv4 too; 0.0.0.0 is reported at INFO, not WARNING
        assert out["bound"] == ["::"]
        assert "covered by the IPv6 dual-stack socket" in log


def test_nothing_bindable_fails_naming_each_endpoint() -> None:
    out, log = _run("occupied")
    error = str(out["error"])
    # Each address in words with its OS error, and what to do about a port in use; the waiter
    # (the CLI, the module) reports it, so the listener does not log it a second time.
    assert error.startswith("could not open any HTTP-01 challenge listener: port ")
    assert " on :: (Address already in use, EADDRINUSE)" in error
    assert " on 0.0.0.0 (Address already in use, EADDRINUSE)" in error
    assert "Let it forward /.well-known/acme-challenge" in error
    assert "interface=" not in error and "ERROR" not in log
