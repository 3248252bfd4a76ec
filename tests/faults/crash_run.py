"""Run the real ``synapse-acme`` CLI, counting events, and SIGKILL ourselves at the Nth one.

Usage: ``python crash_run.py --trace FILE [--kill-match REGEX [--kill-nth N]] -- <cli args>``

Events are every filesystem operation the library's write path makes (open/write/fsync/
rename/link/mkdir/chmod/unlink through ``os``), every HTTP request the transport sends and
every log record. Each event is appended to FILE (one line: number, kind, detail) and flushed
*before* it happens, so the test knows exactly where the process died. With ``--kill-match``
the process sends itself SIGKILL just before the N-th event matching the regex (matching by
meaning, because event numbers shift with the reactor's own wake-up writes): no cleanup, no
atexit, no flush - what ``kill -9`` or a power cut does to a process.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from typing import Any

_state: dict[str, Any] = {"n": 0, "fd": -1, "match": None, "nth": 0, "seen": 0}
_fd_names: dict[int, str] = {}  # fd -> basename of the file last opened on it


def event(kind: str, detail: str) -> None:
    _state["n"] += 1
    n = _state["n"]
    text = f"{kind} {detail}"
    die = False
    if _state["match"] is not None and _state["match"].search(text):
        _state["seen"] += 1
        die = _state["seen"] == _state["nth"]
    line = f"{n}\t{kind}\t{detail}{chr(9) + 'KILL' if die else ''}\n".encode("utf-8", "replace")
    os.write(_state["fd"], line)  # unbuffered: survives the kill
    if die:
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap_os(name: str) -> None:
    real = getattr(os, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _state["fd"] >= 0 and not _in_trace(args):
            event("fs", f"{name} {_describe(args)}")
        result = real(*args, **kwargs)
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
        elif isinstance(a, str):
            out.append(os.path.basename(a) or a)
        else:
            out.append(str(a))
    return " ".join(out)


class _LogCounter(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        event("log", record.name)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trace", required=True)
    p.add_argument("--kill-match", help="regex on 'kind detail' of the event to die at")
    p.add_argument("--kill-nth", type=int, default=1, help="die at the n-th matching event")
    p.add_argument("cli", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    _state["match"] = re.compile(args.kill_match) if args.kill_match else None
    _state["nth"] = args.kill_nth
    _state["fd"] = os.open(args.trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for name in ("open", "write", "fsync", "rename", "replace", "link", "mkdir", "chmod",
                 "fchmod", "unlink", "rmdir"):  # fmt: skip
        _wrap_os(name)

    from synapse_acme import cli, transport

    real_send = transport.JWSTransport._send

    async def send(self: Any, method: str, url: str, body: Any, expect: Any) -> Any:
        event("http", f"{method} {url.rsplit('/', 2)[-2] if '/' in url else url}")
        return await real_send(self, method, url, body, expect)

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
