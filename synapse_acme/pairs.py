"""Reading a certificate chain and its private key from two files as one consistent pair.

Whoever replaces the two files (synapse-acme's exporter flipping one symlink, certbot flipping
two) does it while readers may be reading. A reader opens one file, then the other, and can
straddle the replacement: it then holds a chain from one renewal and a key from another. The
cure is to check that the two belong together and read again at once; a straddle lasts
microseconds, so a few immediate re-reads settle it, and a pair that still does not match after
them really is mismatched (a half-done manual copy, another tool mid-renewal).
"""

from __future__ import annotations

import logging

from synapse_acme import crypto, fsutil
from synapse_acme.errors import BundleError, StoreError

logger = logging.getLogger(__name__)

#: Immediate re-reads of a pair that does not match before it is reported as mismatched.
REREADS = 5
#: The largest file read as a chain or key (a chain of a few certificates is ~5 KiB).
MAX_PEM_FILE = 1024 * 1024


class PairMismatch(BundleError):
    """The two files were read whole but do not form a pair (after the re-reads)."""


def read_pair(cert_path: str, key_path: str, rereads: int = REREADS) -> tuple[bytes, bytes]:
    """``(chain_pem, key_pem)`` read from the two paths, whose key belongs to the chain's leaf.

    Symlinks are followed (certbot's ``live/`` and synapse-acme's exports are links); FIFOs and
    other non-files are refused without blocking. FileNotFoundError if a file is missing,
    StoreError if one cannot be read, BundleError if one does not parse, PairMismatch if the key
    does not match the leaf after ``rereads`` immediate re-reads.
    """
    problem: BundleError = PairMismatch(
        f"the private key in {key_path} does not match the certificate in {cert_path}"
    )
    for attempt in range(rereads + 1):
        chain_pem = _read(cert_path)
        key_pem = _read(key_path)
        try:
            if crypto.key_matches_leaf(key_pem, chain_pem):
                if attempt:
                    logger.debug("read %s / %s after %d re-read(s)", cert_path, key_path, attempt)
                return chain_pem, key_pem
        except BundleError as e:  # a file caught mid-write by a tool that does not rename
            problem = e
    raise problem


def _read(path: str) -> bytes:
    data = fsutil.read_regular(path, follow=True, limit=MAX_PEM_FILE)
    if data is None:
        raise FileNotFoundError(2, "No such file or directory", path)
    return data


__all__ = ["REREADS", "PairMismatch", "StoreError", "read_pair"]
