"""Start as root, bind port 80, then run as an unprivileged user (``synapse-acme run --user``).

Why: the CA always connects to port 80, which only root may bind (without authbind, a systemd
socket or ``CAP_NET_BIND_SERVICE``). The runner builds its parts *as the target user* (so the
store, account key and status files belong to it), binds its listeners as root in
``privilegedStartService``, then drops root for good before anything talks to the CA.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.python.util import runAsEffectiveUser

from synapse_acme.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@attrs.frozen
class RunAs:
    """The user (and group) to run as once the listeners are bound."""

    user: str
    uid: int
    gid: int
    group: str


def resolve(user: str, group: str | None = None) -> RunAs:
    """Look up ``user`` (a name or a number) and ``group`` (default: the user's primary group)."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError("--user", "no such user on this system", user) from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("--group", "no such group on this system", group) from None
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = str(gid)
    return RunAs(user=pw.pw_name, uid=pw.pw_uid, gid=gid, group=group_name)


def needs_switch(run_as: RunAs) -> bool:
    """False when already running as that user (nothing to do); ConfigError when not root."""
    if os.geteuid() == run_as.uid and os.getegid() == run_as.gid:
        return False
    if os.geteuid() != 0:
        raise ConfigError(
            "--user",
            f"only root can switch to another user (running as uid {os.geteuid()})",
            run_as.user,
        )
    return True


def prepare_storage(storage: str, run_as: RunAs) -> None:
    """Make ``storage`` exist and belong to the user, without taking over someone else's files.

    A missing directory is created (0700) and given to the user. An existing one owned by
    another user is refused with the command that fixes it: a recursive chown by this program
    could follow links into places it must not touch.
    """
    try:
        st = os.lstat(storage)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(storage))
        os.makedirs(parent, mode=0o755, exist_ok=True)
        os.mkdir(storage, 0o700)
        os.chown(storage, run_as.uid, run_as.gid)
        logger.info("Created %s for %s", storage, run_as.user)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("storage", "expected a directory", storage)
    if st.st_uid != run_as.uid:
        raise ConfigError(
            "storage",
            f"belongs to uid {st.st_uid}, not to {run_as.user} (uid {run_as.uid}) that the "
            f"runner switches to; fix with: chown -R {run_as.user}:{run_as.group} {storage}",
            storage,
        )


def as_user(run_as: RunAs, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``function`` with the user's effective uid/gid, then return to root.

    Files it creates belong to the user; a PermissionError names the user so the operator
    knows whose access is missing.
    """
    try:
        return runAsEffectiveUser(run_as.uid, run_as.gid, function, *args, **kwargs)
    except PermissionError as e:
        raise ConfigError(
            "--user", f"{run_as.user} cannot access {e.filename!r} ({e.strerror})", run_as.user
        ) from e


def check_installation(run_as: RunAs) -> None:
    """ConfigError unless the user can read the Python installation running this program.

    Modules are still imported after the drop (some lazily, deep inside libraries): an
    interpreter or virtualenv under a private home (/root) would fail much later, mid-issuance.
    """
    import twisted

    import synapse_acme

    places = [os.path.dirname(os.__file__), os.path.dirname(twisted.__file__)]
    places.append(os.path.dirname(synapse_acme.__file__))

    def unreadable() -> list[str]:
        ok = os.R_OK | os.X_OK
        return [p for p in places if not os.access(p, ok, effective_ids=True)]

    missing = runAsEffectiveUser(run_as.uid, run_as.gid, unreadable)
    if missing:
        raise ConfigError(
            "--user",
            f"{run_as.user} cannot read the Python installation ({', '.join(missing)}); "
            "install synapse-acme where that user can read it (e.g. a virtualenv in /opt)",
            run_as.user,
        )


def drop(run_as: RunAs) -> None:
    """Become the user for good (real, effective and saved ids; its supplementary groups)."""
    # Groups first, then gid, then uid: after setresuid nothing else can be changed.
    os.setgroups(os.getgrouplist(run_as.user, run_as.gid))
    os.setresgid(run_as.gid, run_as.gid, run_as.gid)
    os.setresuid(run_as.uid, run_as.uid, run_as.uid)
    if os.getresuid() != (run_as.uid,) * 3 or os.getresgid() != (run_as.gid,) * 3:
        raise RuntimeError("privilege drop did not take effect")  # never continue as root
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise RuntimeError("privilege drop is reversible; refusing to continue")
    logger.info(
        "Running as %s:%s (uid %d, gid %d)", run_as.user, run_as.group, run_as.uid, run_as.gid
    )
