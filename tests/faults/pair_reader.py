"""Read a certificate and key pair without pause; on SIGTERM print what was seen as JSON.

Usage: ``python pair_reader.py CERT_PATH KEY_PATH``

What a homeserver does when it (re)loads its TLS files, as fast as possible: open the
certificate, then the key (following symbolic links, as Synapse does). A pair read this way
only says something about one moment on disk if nothing changed in between, so each read is
checked: after opening the key, the certificate path is looked up again, and if it no longer
leads to the file opened first, the read *straddled* a change and is not counted. Otherwise
the certificate path led to that same file the whole time, including the instant the key was
opened: the two opened files were on disk together, and that pair must match. (The first file
is held open meanwhile, so its inode number cannot be reused by another file.)

Counted: ``reads`` (pairs from one moment), ``straddles``, ``mismatches`` (reads whose key is not
the certificate's, each such a moment on disk), ``missing`` (a path led nowhere, confirmed by an
immediate re-read that does not show a new pair), ``missing_straddled`` (it did show a new pair:
the lookup raced a change), ``naive_mismatches`` (mismatched pairs among the straddles: what a
reader without the check would have reported), ``mismatched_pairs`` (distinct certificate and
key contents among the mismatches: about one per change that left the pair open) and ``serials``
(distinct leaf serials read).

Each serial seen for the first time is also announced at once, as a line ``serial <hex>``, so
that a test can wait for the reader to have seen a certificate before it asks for the next one
(a reader starved of CPU would otherwise miss a certificate that lived on disk briefly). The
JSON summary is the last line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

_stop = False


def _on_term(signum: int, frame: object) -> None:
    global _stop
    _stop = True


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


class Matcher:
    """Whether a certificate file and a key file belong together; parses each content once."""

    def __init__(self) -> None:
        self._certs: dict[bytes, tuple[bytes, int] | None] = {}
        self._keys: dict[bytes, bytes | None] = {}

    def leaf(self, chain_pem: bytes) -> tuple[bytes, int] | None:
        if chain_pem not in self._certs:
            try:
                cert = x509.load_pem_x509_certificates(chain_pem)[0]
                self._certs[chain_pem] = (_spki(cert.public_key()), cert.serial_number)
            except ValueError:
                self._certs[chain_pem] = None
        return self._certs[chain_pem]

    def key(self, key_pem: bytes) -> bytes | None:
        if key_pem not in self._keys:
            try:
                private = serialization.load_pem_private_key(key_pem, password=None)
                self._keys[key_pem] = _spki(private.public_key())
            except (ValueError, TypeError):
                self._keys[key_pem] = None
        return self._keys[key_pem]

    def matches(self, chain_pem: bytes, key_pem: bytes) -> bool:
        leaf, key = self.leaf(chain_pem), self.key(key_pem)
        return leaf is not None and key is not None and leaf[0] == key


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_once(cert_path: str, key_path: str) -> tuple[str, bytes, bytes]:
    """``("pair", chain, key)`` from one moment, ``("straddle", chain, key)`` or
    ``("missing", b"", b"")``."""
    try:
        cert_fd = os.open(cert_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing", b"", b""
    try:
        first = os.fstat(cert_fd)
        try:
            key_fd = os.open(key_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return "missing", b"", b""
        try:
            # At once: the shorter the time between the key's lookup and this one, the
            # shorter a window between two changes this read can still prove.
            try:
                again: os.stat_result | None = os.stat(cert_path)
            except FileNotFoundError:
                again = None
            same = again is not None and _identity(again) == _identity(first)
            return ("pair" if same else "straddle"), _read_fd(cert_fd), _read_fd(key_fd)
        finally:
            os.close(key_fd)
    finally:
        os.close(cert_fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    # The inode says which file; size and mtime catch a file rewritten in place.
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def main(argv: list[str]) -> int:
    cert_path, key_path = argv
    signal.signal(signal.SIGTERM, _on_term)
    matcher = Matcher()
    counts = dict.fromkeys(
        ("reads", "straddles", "mismatches", "missing", "missing_straddled", "naive_mismatches"),
        0,
    )
    serials: set[int] = set()
    mismatched: set[tuple[bytes, bytes]] = set()
    examples: list[str] = []
    last_good: tuple[bytes, bytes] | None = None
    while not _stop:
        what, chain, key = read_once(cert_path, key_path)
        if what == "missing":
            # Confirm: a lookup that raced a change (an old link target removed just after it
            # was followed) is followed at once by a new pair; a real gap is not.
            what2, chain2, key2 = read_once(cert_path, key_path)
            new_pair = (
                what2 != "missing" and (chain2, key2) != last_good and matcher.matches(chain2, key2)
            )
            if new_pair:
                counts["missing_straddled"] += 1
            else:
                counts["missing"] += 1
                if len(examples) < 10:
                    examples.append("a path led nowhere")
            continue
        if what == "straddle":
            counts["straddles"] += 1
            if not matcher.matches(chain, key):
                counts["naive_mismatches"] += 1
            continue
        counts["reads"] += 1
        if matcher.matches(chain, key):
            last_good = (chain, key)
            leaf = matcher.leaf(chain)
            assert leaf is not None
            if leaf[1] not in serials:
                serials.add(leaf[1])
                print(f"serial {leaf[1]:x}", flush=True)
            continue
        counts["mismatches"] += 1
        counts["naive_mismatches"] += 1
        if (chain, key) not in mismatched and len(examples) < 10:
            leaf = matcher.leaf(chain)
            examples.append(
                f"certificate {leaf[1]:x} with another key" if leaf else "unparseable pair"
            )
        mismatched.add((chain, key))
    result = {**counts, "mismatched_pairs": len(mismatched), "serials": len(serials)}
    print(json.dumps({**result, "examples": examples}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
