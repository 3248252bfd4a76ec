"""Run the real ``synapse-acme`` CLI, counting events, and SIGKILL ourselves at the Nth one.

Usage: ``python crash_run.py --trace FILE [--kill-at N] -- <cli args>``

Events are every filesystem operation the library's write path makes (open/write/fsync/
rename/link/mkdir/chmod/unlink through ``os``), every HTTP request the transport sends and
every log record. Each event is appended to FILE (one line: number, kind, detail) and flushed
*before* it happens, so the test knows exactly where the process died. With ``--kill-at N``
the process sends itself SIGKILL just before event N: no cleanup, no atexit, no flush - what
``kill -9`` or a power cut does to a process.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

_state = {"n": 0, "kill_at": 0, "fd": -1}


def event(kind: str, detail: str) -> None:
    _state["n"] += 1
    n = _state["n"]
    line = f"{n}\t{kind}\t{detail}\n".encode("utf-8", "replace")
    os.write(_state["fd"], line)  # unbuffered: survives the kill
    if n == _state["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap_os(name: str) -> None:
    real = getattr(os, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _state["fd"] >= 0 and not _in_trace(args):
            event("fs", f"{name} {_describe(args)}")
        return real(*args, **kwargs)

    setattr(os, name, wrapper)


def _in_trace(args: tuple[Any, ...]) -> bool:
    return bool(args) and args[0] == _state["fd"]


def _describe(args: tuple[Any, ...]) -> str:
    out = []
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
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("cli", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    _state["kill_at"] = args.kill_at
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
