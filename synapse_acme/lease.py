"""The rules of the issuance lock's lease, as pure functions (no clock, no storage).

Every backend keeps one :class:`Lease` per lock name (the file backend in a small JSON file, the
in-memory fake in a dict, a database in a row) and decides with the same functions, so they
cannot disagree on what "held" means. Times are seconds on the backend's clock.
"""

from __future__ import annotations

import math

import attrs


@attrs.frozen
class Lease:
    """``holder`` holds the lock until ``expires`` (exclusive: at ``expires`` it is free)."""

    holder: str
    expires: float

    def in_force(self, now: float) -> bool:
        return now < self.expires


def check_request(holder: object, lease_seconds: object) -> None:
    """ValueError unless ``holder`` is a non-empty string and ``lease_seconds`` a positive,
    finite number of seconds."""
    if not isinstance(holder, str) or not holder:
        raise ValueError(f"a lock holder must be a non-empty string, got {holder!r}")
    if (
        not isinstance(lease_seconds, (int, float))
        or isinstance(lease_seconds, bool)
        or not math.isfinite(lease_seconds)
        or lease_seconds <= 0
    ):
        raise ValueError(f"a lease must last a positive number of seconds, got {lease_seconds!r}")


def acquire(current: Lease | None, holder: str, lease_seconds: float, now: float) -> Lease | None:
    """The new lease if ``holder`` may take (or extend) the lock, else ``None`` (another
    holder's lease is in force)."""
    if current is not None and current.in_force(now) and current.holder != holder:
        return None
    return Lease(holder, now + lease_seconds)


def renew(current: Lease | None, holder: str, lease_seconds: float, now: float) -> Lease | None:
    """The extended lease if ``holder``'s lease is still in force, else ``None``.

    An expired lease is not renewed even when nobody took it since: another process may have
    taken and released it in between, so the holder can no longer know it was alone.
    """
    if current is None or current.holder != holder or not current.in_force(now):
        return None
    return Lease(holder, now + lease_seconds)


def releases(current: Lease | None, holder: str) -> bool:
    """Whether ``holder`` releasing removes ``current`` (only its own lease, expired or not)."""
    return current is not None and current.holder == holder
