"""Loopback ports for tests and benchmarks, without "pick a free port, bind it later" races.

Picking a port by binding port 0 and closing the socket is a race: until the program that is
told the number binds it, the kernel may hand the same number to any other socket on the
machine (every outgoing connection takes an ephemeral port), and other test runs pick the
same way. So, in order of preference:

1. **A socket bound once and handed over** (:func:`listening_socket`): the test binds port 0,
   keeps the socket, and gives it to the program. Our own listeners take it as a ``systemd:``
   endpoint (:func:`handover`: ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, as systemd
   socket activation passes them); an in-process listener adopts it
   (``reactor.adoptStreamPort``). No window at all.
2. **A reserved number and a real retry** (:func:`reserve_port`, :func:`port_in_use`), for a
   program that must be told its port up front and cannot take a descriptor (Pebble, Pebble's
   DNS stub, Synapse, nginx, Apache), or for a port that a program only *dials* (Pebble's
   ``httpPort``, which the listener under test binds later). A reserved number lies below the
   kernel's ephemeral range, so no ``bind(0)`` or outgoing connection is ever given it, and it
   is locked (``flock`` on a file under the temporary directory) against every other user of
   this function on the machine until released. It is *not* bound: a program that binds that
   number on its own can still take it, so whoever starts a program on it treats
   ``EADDRINUSE`` (:func:`port_in_use`) as a reason to pick another and start again, a bounded
   number of times.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import sys
import tempfile
from collections.abc import Sequence

import attrs

#: Reserved ports are drawn from [RESERVED_LOW, the start of the ephemeral range).
RESERVED_LOW = 20000
#: Where the reservation locks live (shared by every process on the machine).
LOCK_DIR = os.path.join(tempfile.gettempdir(), "synapse-acme-ports")
#: Tries to find a reservable port before giving up.
_PICKS = 200
#: How the programs we start say that a port was taken (Go, Python, nginx, Apache, Synapse).
_USAGE = "usage: python -m synapse_acme.testing.ports exec FD... -- PROGRAM ARGS"
_IN_USE = ("address already in use", "eaddrinuse", "errno 98", "(98)", "could not bind")


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on a port the kernel chose (``getsockname()[1]``): the port is
    ours from this moment until the socket is closed. Hand it over with :func:`handover`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def systemd_endpoint(index: int = 0, host: str = "127.0.0.1") -> str:
    """The ``systemd:`` endpoint description for the ``index``-th handed-over socket."""
    return f"systemd:domain={'INET6' if ':' in host else 'INET'}:index={index}"


def handover(
    argv: Sequence[str], sockets: Sequence[socket.socket]
) -> tuple[list[str], tuple[int, ...]]:
    """``(argv, pass_fds)`` for ``subprocess`` that run ``argv`` with ``sockets`` as systemd
    socket activation passes them: descriptors 3, 4, ... in this order, ``LISTEN_FDS``,
    ``LISTEN_FDNAMES`` and ``LISTEN_PID`` (the pid of ``argv``'s process, which is why a
    small exec wrapper sets it: ``python -m synapse_acme.testing.ports exec FD... -- argv``).
    Pass ``pass_fds=`` to ``subprocess.run``/``Popen``; the caller keeps its sockets."""
    fds = tuple(s.fileno() for s in sockets)
    wrapper = [sys.executable, "-m", "synapse_acme.testing.ports", "exec"]
    return [*wrapper, *(str(fd) for fd in fds), "--", *argv], fds


@attrs.define(eq=False)
class PortReservation:
    """A port number locked for us (see the module docstring); :meth:`release` when done."""

    port: int
    _lock_fd: int | None = attrs.field(repr=False)
    _lock_path: str | None = attrs.field(default=None, repr=False)

    def release(self) -> None:
        if self._lock_fd is not None:
            if self._lock_path is not None:
                # Removed while still locked, so nobody holds a lock on a file that is gone
                # (reserve_port checks that the file it locked is still the one at the path).
                with contextlib.suppress(OSError):
                    os.unlink(self._lock_path)
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _free_now(port: int, host: str, udp: bool) -> bool:
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def reserve_port(
    host: str = "127.0.0.1", *, udp: bool = False, rand: random.Random | None = None
) -> PortReservation:
    """Lock a port number below the ephemeral range that is free now (for TCP, and for UDP
    too with ``udp``). Not bound: see the module docstring for what that leaves open."""
    rand = rand if rand is not None else random.Random()
    high = _ephemeral_low()
    low = RESERVED_LOW if high > RESERVED_LOW + 1000 else 1024
    os.makedirs(LOCK_DIR, exist_ok=True)
    if os.stat(LOCK_DIR).st_uid == os.geteuid():
        os.chmod(LOCK_DIR, 0o1777)  # every user's test runs share it
    for _ in range(_PICKS):
        port = rand.randrange(low, high)
        path = os.path.join(LOCK_DIR, f"{port}.lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            continue  # another user's lock file we may not open: theirs
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)  # released and removed meanwhile: not a lock
        except OSError:
            os.close(fd)
            continue  # another process holds it
        if _free_now(port, host, udp):
            return PortReservation(port, fd, path)
        os.close(fd)
    raise OSError(errno.EADDRINUSE, f"no free port to reserve in {low}-{high - 1}")


def port_in_use(text: str) -> bool:
    """True if a program's output says it could not bind because the port was taken."""
    lowered = text.lower()
    return any(marker in lowered for marker in _IN_USE)


def _exec(argv: Sequence[str]) -> int:
    """``exec FD... -- PROGRAM ARGS``: the program runs with descriptors ``FD...`` as 3, 4, ...
    and the systemd variables naming them (run as the program's own pid, through exec)."""
    if "--" not in argv:
        print(_USAGE, file=sys.stderr)
        return 2
    split = list(argv).index("--")
    fds, program = [int(fd) for fd in argv[:split]], list(argv[split + 1 :])
    # Out of the way first, so that dup2 onto 3, 4, ... never overwrites one still to move,
    # and no second copy of a socket stays open in the program.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 256) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index, inheritable=True)
        os.close(fd)
    env = dict(os.environ)
    env.update(
        LISTEN_FDS=str(len(fds)),
        LISTEN_PID=str(os.getpid()),
        LISTEN_FDNAMES=":".join(f"handed-over-{i}" for i in range(len(fds))),
    )
    os.execvpe(program[0], program, env)
    return 127  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["exec"]:
        return _exec(args[1:])
    print(_USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "PortReservation",
    "handover",
    "listening_socket",
    "port_in_use",
    "reserve_port",
    "systemd_endpoint",
]
