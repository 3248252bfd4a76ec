"""The test harness's ports: handed-over sockets and reserved numbers (no bind-later race)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from synapse_acme.testing import ports

PROBE = """
import json, os, socket
s = socket.socket(fileno=3)
print(json.dumps({
    "port": s.getsockname()[1],
    "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    "fds": os.environ["LISTEN_FDS"],
    "pid_ok": os.environ["LISTEN_PID"] == str(os.getpid()),
    "names": os.environ["LISTEN_FDNAMES"],
    "fd4": os.path.exists("/proc/self/fd/4"),
}))
s.detach()
"""


def test_handover_passes_the_bound_socket_as_systemd_does() -> None:
    with ports.listening_socket() as sock:
        argv, fds = ports.handover([sys.executable, "-c", PROBE], [sock])
        r = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout)
        assert seen == {
            "port": sock.getsockname()[1],
            "listening": 1,
            "fds": "1",
            "pid_ok": True,
            "names": "handed-over-0",
            "fd4": False,  # only the one socket, and no second copy of it
        }
    assert ports.systemd_endpoint(0) == "systemd:domain=INET:index=0"


def test_reserved_ports_are_below_the_ephemeral_range_and_exclusive() -> None:
    held = [ports.reserve_port(udp=True) for _ in range(30)]
    try:
        numbers = [r.port for r in held]
        assert len(set(numbers)) == len(numbers)
        assert all(ports.RESERVED_LOW <= p < ports._ephemeral_low() for p in numbers)
        # Free when reserved: a server can bind it (TCP and UDP).
        with socket.socket() as s:
            s.bind(("127.0.0.1", numbers[0]))
        lock = os.path.join(ports.LOCK_DIR, f"{numbers[0]}.lock")
        assert os.path.exists(lock)
    finally:
        for r in held:
            r.release()
    assert not os.path.exists(lock)  # released: removed, so the directory does not fill up
    again = ports.reserve_port()
    again.release()


def test_port_in_use_reads_each_programs_wording() -> None:
    for text in (
        "listen tcp 127.0.0.1:14000: bind: address already in use",  # Go (Pebble)
        "nginx: [emerg] bind() to 127.0.0.1:8080 failed (98: Address already in use)",
        "(98)Address already in use: AH00072: make_sock: could not bind to address",  # Apache
        "twisted.internet.error.CannotListenError: Couldn't listen on 127.0.0.1:8448: "
        "[Errno 98] Address already in use.",  # Synapse
    ):
        assert ports.port_in_use(text), text
    assert not ports.port_in_use("permission denied")
