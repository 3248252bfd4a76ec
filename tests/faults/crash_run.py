"""Run the real ``synapse-acme`` CLI, counting events, and SIGKILL ourselves at the Nth one.

Usage: ``python crash_run.py --trace FILE [--kill-match REGEX [--kill-nth N]
[--kill-after]] -- <cli args>``

Events are every filesystem operation the library's write path makes through ``os`` (open,
write, fsync, chmod/fchmod, ftruncate/truncate, and every call that changes a directory entry:
mkdir, rename, replace, link, symlink, unlink/remove, rmdir), every HTTP request the transport
sends and every log record. Each event is appended to FILE (one line: number, kind, detail) and
flushed *before* it happens, so the test knows exactly where the process died. With
``--kill-match`` the process sends itself SIGKILL just before the N-th event matching the regex
(matching by meaning, because event numbers shift with the reactor's own wake-up writes): no
cleanup, no atexit, no flush - what ``kill -9`` or a power cut does to a process. With
``--kill-after`` it dies right after that event instead (once the call returned or raised); the
trace then ends with an extra ``after`` line naming the event. The line of the event the process
died at ends with ``KILL``.

Paths are shown by their last component only (``rename .cert.pem.<hex>.tmp cert.pem``).
Writes through Python file objects (``open(path, "w")``) bypass ``os`` and are not traced; the
directory entry changes are checked against ``strace`` by tests/faults/test_crash_every_point.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import re

# Imported before os is wrapped, as in the real CLI: shutil decides at import time whether
# rmtree can use the dir_fd functions, and the wrappers below are not in os.supports_dir_fd.
import shutil  # noqa: F401
import signal
import sys
from typing import Any

_state: dict[str, Any] = {"n": 0, "fd": -1, "match": None, "nth": 0, "seen": 0, "after": False}
_fd_names: dict[int, str] = {}  # fd -> basename of the file last opened on it

#: The ``os`` functions traced. Those that change a directory entry are listed in
#: :data:`ENTRY_CHANGES` (the names used in the trace).
TRACED_OS_CALLS = ("open", "write", "fsync", "chmod", "fchmod", "ftruncate", "truncate", "mkdir",
                   "rename", "replace", "link", "symlink", "unlink", "remove", "rmdir")  # fmt: skip
ENTRY_CHANGES = ("mkdir", "rename", "replace", "link", "symlink", "unlink", "remove", "rmdir")


def event(kind: str, detail: str) -> int:
    """Record one event; die now if it is the one to die before. Returns the event's number
    if the process must die once the event is over (``--kill-after``), else 0."""
    _state["n"] += 1
    n = _state["n"]
    text = f"{kind} {detail}"
    die = False
    if _state["match"] is not None and _state["match"].search(text):
        _state["seen"] += 1
        die = _state["seen"] == _state["nth"]
    before = die and not _state["after"]
    line = f"{n}\t{kind}\t{detail}{chr(9) + 'KILL' if before else ''}\n"
    os.write(_state["fd"], line.encode("utf-8", "replace"))  # unbuffered: survives the kill
    if before:
        os.kill(os.getpid(), signal.SIGKILL)
    return n if die else 0


def die_after(n: int, kind: str, detail: str) -> None:
    """The ``--kill-after`` end: event ``n`` is over (returned or raised); die now."""
    line = f"{n}\tafter\t{kind} {detail}\tKILL\n"
    os.write(_state["fd"], line.encode("utf-8", "replace"))
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap_os(name: str) -> None:
    real = getattr(os, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _state["fd"] < 0 or _in_trace(args):
            return real(*args, **kwargs)
        detail = f"{name} {_describe(args)}"
        after = event("fs", detail)
        try:
            result = real(*args, **kwargs)
        finally:
            if after:
                die_after(after, "fs", detail)
        if name == "open" and isinstance(result, int) and args and isinstance(args[0], str):
            _fd_names[result] = os.path.basename(args[0])  # so write/fsync name their file
        return result

    setattr(os, name, wrapper)


def _in_trace(args: tuple[Any, ...]) -> bool:
    return bool(args) and args[0] == _state["fd"]


def _describe(args: tuple[Any, ...]) -> str:
    out = []
    if args and isinstance(args[0], int) and args[0] in _fd_names:
        # "write privkey.pem <N bytes>": the file, not its descriptor number, which shifts
        # whenever something else (the store lock) holds a descriptor.
        out.append(_fd_names[args[0]])
        args = args[1:2]
    for a in args[:2]:
        if isinstance(a, (bytes, memoryview)):
            out.append(f"<{len(a)} bytes>")
        elif isinstance(a, (str, os.PathLike)):
            text = os.fspath(a)
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            out.append(os.path.basename(text.rstrip("/")) or text)
        else:
            out.append(str(a))
    return " ".join(out)


class _LogCounter(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        after = event("log", record.name)
        if after:
            die_after(after, "log", record.name)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trace", required=True)
    p.add_argument("--kill-match", help="regex on 'kind detail' of the event to die at")
    p.add_argument("--kill-nth", type=int, default=1, help="die at the n-th matching event")
    p.add_argument(
        "--kill-after", action="store_true", help="die right after that event, not before it"
    )
    p.add_argument("cli", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    _state["match"] = re.compile(args.kill_match) if args.kill_match else None
    _state["nth"] = args.kill_nth
    _state["after"] = args.kill_after
    _state["fd"] = os.open(args.trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    # os.remove is os.unlink under a second name: both are wrapped. os.makedirs, os.renames,
    # os.removedirs and shutil.rmtree go through the wrapped names at call time.
    for name in TRACED_OS_CALLS:
        _wrap_os(name)

    from synapse_acme import cli
    from synapse_acme.acme import transport

    real_send = transport.JWSTransport._send

    async def send(self: Any, method: str, url: str, body: Any, expect: Any, *rest: Any) -> Any:
        detail = f"{method} {url.rsplit('/', 2)[-2] if '/' in url else url}"
        after = event("http", detail)
        try:
            return await real_send(self, method, url, body, expect, *rest)
        finally:
            if after:
                die_after(after, "http", detail)  # the answer has arrived (or failed)

    transport.JWSTransport._send = send  # type: ignore[method-assign]
    # cli.main's basicConfig is a no-op once the root logger has handlers: configure it the
    # same way here (INFO to stderr), then count every record.
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger().addHandler(_LogCounter())
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
