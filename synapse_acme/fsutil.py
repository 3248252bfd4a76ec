"""Crash-safe, private file writes: the only place that turns bytes into files on disk.

A reader must see either the old file or the new one, never half of either, even if the
process dies or the disk fills mid-write. Keys are created 0600 from the first byte (not
chmod-ed afterwards) and directories holding them are 0700.

These calls block, which is fine for the tiny files involved; callers on the reactor wrap
results in Deferreds (``defer.succeed`` / ``defer.maybeDeferred``).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import threading
from collections.abc import Sequence

from synapse_acme.errors import StoreError

logger = logging.getLogger(__name__)

# Temporary files are ``.<name>.<random>.tmp`` next to their target, so a rename never
# crosses a filesystem and leftovers after a crash are easy to recognise (see is_temp_name).
_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def describe_os_error(e: OSError) -> str:
    """``No space left on device (ENOSPC)``: the strerror plus the errno name operators grep for."""
    name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    text = e.strerror or str(e)
    return f"{text} ({name})" if name else text


def temp_name_for(path: str) -> str:
    """A fresh temporary path in the same directory as ``path``."""
    head, tail = os.path.split(path)
    return os.path.join(head, f"{_TMP_PREFIX}{tail}.{secrets.token_hex(6)}{_TMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for a leftover temporary file name made by :func:`temp_name_for`."""
    if not (name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX)):
        return False
    stem = name[len(_TMP_PREFIX) : -len(_TMP_SUFFIX)]
    _, _, token = stem.rpartition(".")
    return len(token) == 12 and all(c in "0123456789abcdef" for c in token)


def write_new_file(
    path: str, data: bytes, mode: int = PRIVATE_FILE_MODE, *, sync: bool = True
) -> None:
    """Create ``path`` (must not exist; symlinks are not followed), write all of ``data``, fsync.

    Raises ``OSError``; the caller decides what to clean up. The file is created with ``mode``
    so a key is never readable by others, even for a moment. ``sync=False`` leaves the fsync
    to the caller (:func:`fsync_all`, before anything depends on the file).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        # The umask may have removed bits from ``mode`` (e.g. 0644 -> 0640); set exactly.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def file_kind(mode: int) -> str:
    """``"a FIFO (named pipe)"`` and so on, for messages about a path that is not a plain file."""
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(
    path: str, flags: int = os.O_RDONLY, *, follow: bool = False, mode: int = PRIVATE_FILE_MODE
) -> int:
    """Open ``path`` as a regular file and return the descriptor, or raise.

    Files in the store and the export directories may have been left there by somebody else
    (or an attacker with write access to a parent). So: no symlink is followed unless
    ``follow`` (``O_NOFOLLOW``: a symlink fails with ELOOP), the open never blocks
    (``O_NONBLOCK``: a FIFO would otherwise hang the reactor thread forever), and ``fstat`` on
    the open descriptor checks it is a regular file (a check on the path would race).
    FileNotFoundError passes through (callers decide what "absent" means); anything else is
    StoreError naming the path and what it is. With ``os.O_CREAT`` in ``flags`` a missing file
    is created with ``mode`` (filtered by the umask).
    """
    extra = os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags | extra, mode)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise StoreError(
                f"refusing to open {path}: it is a symbolic link (synapse-acme does not follow "
                "links here; replace it with a regular file)"
            ) from None
        raise StoreError(f"cannot open {path}: {describe_os_error(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(
                f"refusing to use {path}: it is {file_kind(st.st_mode)}, not a regular file"
            )
        # Reads of a regular file never block; clear O_NONBLOCK so writes behave normally.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, *, follow: bool = False, limit: int | None = None) -> bytes | None:
    """The bytes of regular file ``path`` (see :func:`open_regular`), ``None`` if it is absent.

    ``limit``: StoreError if the file holds more than that many bytes (a key or a chain is a few
    KiB; a huge file is not one, and must not be read into memory).
    """
    try:
        fd = open_regular(path, follow=follow)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if limit is not None and size > limit:
                raise StoreError(f"refusing to read {path}: larger than {limit} bytes")
            chunks.append(chunk)
    except OSError as e:
        raise StoreError(f"cannot read {path}: {describe_os_error(e)}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def access_hint(path: str) -> str:
    """Why this user may not open ``path`` after EACCES, as text to append to the error:
    ``"; the directory /srv/ca is not searchable by nobody (uid 65534)"`` when a directory on
    the way blocks it (the file itself may be fine), else ``""``."""
    euid = os.geteuid()
    who = f"{_user_name(euid)} (uid {euid})"
    effective = os.access in os.supports_effective_ids
    parent = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    for directory in reversed(chain):  # from the root down: the first one that blocks
        if os.path.isdir(directory) and not os.access(directory, os.X_OK, effective_ids=effective):
            return f"; the directory {directory} is not searchable by {who}"
    if os.path.exists(path) and not os.access(path, os.R_OK, effective_ids=effective):
        return f"; {who} may not read it"
    return ""


def check_owned_by_us(path: str, what: str) -> None:
    """StoreError unless ``path`` (followed if a link) belongs to the effective user.

    Run as root on a directory that belongs to another user, synapse-acme would otherwise
    chmod it, use the keys in it and leave root-owned files behind that the owner can no longer
    replace. A missing path is fine (it will be created as ours).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"cannot check {what} {path}: {describe_os_error(e)}") from None
    euid = os.geteuid()
    if st.st_uid == euid:
        return
    owner, me = _user_name(st.st_uid), _user_name(euid)
    target, link = path, ""
    if os.path.islink(path):  # `chown -R` would change the link, not what it points to
        target = os.path.realpath(path)
        link = f" (it is a symbolic link to {target})"
    hint = (
        f"run synapse-acme as {owner} (as root: `synapse-acme run --user {owner}`), or "
        f"`chown -R {me} {target}` if this process should own it"
    )
    raise StoreError(
        f"{what} {path} belongs to {owner} (uid {st.st_uid}), not to {me} (uid {euid}){link}: "
        f"{hint}"
    )


def _user_name(uid: int) -> str:
    """The user's login name, or the number when it has none (usable in chown and --user)."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def fsync_dir(path: str) -> None:
    """Make a rename/creation inside directory ``path`` durable (POSIX needs the dir fsync-ed)."""
    _fsync_path(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync_path(path: str, flags: int = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The most threads :func:`fsync_all` starts (with the caller's): one certificate's save
#: has four paths, and more threads than that only add start-up cost.
FSYNC_THREADS = 4


def fsync_all(paths: Sequence[str]) -> None:
    """fsync every file or directory in ``paths``; returns when all of them are durable.

    The fsyncs run at the same time, in up to :data:`FSYNC_THREADS` threads: a journalling
    filesystem (ext4, xfs) commits concurrent fsyncs in one transaction, so a save of three
    files and their directory waits for about one disk flush instead of four in a row (the
    store's save of 20 certificates at once spent most of its time there). With more paths
    than threads (the store saving several certificates together), each thread takes the
    next path when it is done: the first fsyncs commit what every file wrote, and the later
    ones find little left to flush. Raises the first ``OSError``, after every fsync has
    finished, like a loop of fsyncs would (minus the ones it would skip); anything else
    raised in a worker thread is raised here too.
    """
    if len(paths) <= 1:
        for path in paths:
            _fsync_path(path)
        return
    errors: list[BaseException] = []
    todo = iter(paths)
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                path = next(todo, None)
            if path is None:
                return
            try:
                _fsync_path(path)
            except BaseException as e:  # handed to the caller's thread, whatever it is
                errors.append(e)

    threads = [
        threading.Thread(target=run, daemon=True) for _ in range(min(len(paths), FSYNC_THREADS) - 1)
    ]
    for t in threads:
        t.start()
    run()  # this thread takes its share
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def remove_quietly(path: str) -> None:
    """Remove a temporary file; already gone is fine, any other failure is only logged."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove temporary file %s: %s", path, describe_os_error(e))


def atomic_write(path: str, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically: temp file (O_EXCL, ``mode``), fsync, rename,
    fsync the directory.

    On failure the temporary file is removed, ``path`` keeps its old content, and StoreError
    names the path and the OS error (``No space left on device (ENOSPC)``).
    """
    tmp = temp_name_for(path)
    try:
        write_new_file(tmp, data, mode)
        os.rename(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise StoreError(f"cannot write {path}: {describe_os_error(e)}") from None
    try:
        fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:
        # The data is in place; only its durability across a power cut is in doubt.
        logger.warning("could not fsync the directory of %s: %s", path, describe_os_error(e))


def create_exclusive(path: str, data: bytes, mode: int = PRIVATE_FILE_MODE) -> bool:
    """Create ``path`` with ``data`` atomically unless it already exists.

    Returns True if this call created it, False if another writer got there first (the
    existing file is left untouched). Used for keys that must never be replaced by accident.
    StoreError on any other failure.
    """
    tmp = temp_name_for(path)
    try:
        write_new_file(tmp, data, mode)
        try:
            # link() fails with EEXIST instead of replacing: first writer wins, atomically.
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # Filesystem without hard links: fall back to an exclusive create of the target.
            if os.path.lexists(path):
                return False
            os.rename(tmp, path)
    except OSError as e:
        raise StoreError(f"cannot write {path}: {describe_os_error(e)}") from None
    finally:
        remove_quietly(tmp)
    try:
        fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:
        logger.warning("could not fsync the directory of %s: %s", path, describe_os_error(e))
    return True


def check_mode(path: str, max_mode: int) -> list[str]:
    """Warnings (empty if none) when ``path`` grants permissions beyond ``max_mode``.

    A missing path gives no warning: whether it must exist is the caller's business.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    except OSError as e:
        return [f"cannot check the permissions of {path}: {describe_os_error(e)}"]
    mode = stat.S_IMODE(st.st_mode)
    extra = mode & ~max_mode
    if not extra:
        return []
    return [
        f"{path} has mode {mode:04o}, looser than {max_mode:04o} "
        f"(run: chmod {mode & max_mode:04o} {path})"
    ]


def tighten(path: str, mode: int, *, directory: bool = False, follow: bool = False) -> int | None:
    """Set ``path``'s permission bits to at most ``mode`` through an open descriptor; returns
    the old mode if it changed them, else ``None``.

    ``fchmod`` on a descriptor opened with ``O_NOFOLLOW`` (unless ``follow``) and checked with
    ``fstat``: a path swapped for a symlink after a check cannot redirect the chmod to another
    file (``chmod`` on the path would follow it). OSError/StoreError on failure.
    """
    if directory:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        fd = os.open(path, flags | (0 if follow else getattr(os, "O_NOFOLLOW", 0)))
    else:
        fd = open_regular(path, follow=follow)
    try:
        old = stat.S_IMODE(os.fstat(fd).st_mode)
        if not old & ~mode:
            return None
        os.fchmod(fd, old & mode)
        return old
    finally:
        os.close(fd)


def ensure_private_file(path: str, *, fix: bool = True) -> list[str]:
    """Warnings about a key file looser than 0600, tightening it to 0600 when ``fix`` is set.

    Each warning is also logged. A file we cannot chmod (owned by someone else) is reported.
    """
    loose = check_mode(path, PRIVATE_FILE_MODE)
    if not loose or not fix:
        for w in loose:
            logger.warning("%s", w)
        return loose
    try:
        mode = tighten(path, PRIVATE_FILE_MODE)
        warnings = (
            [f"{path} had mode {mode:04o}; tightened it to 0600 (it holds a private key)"]
            if mode is not None
            else []
        )
    except OSError as e:
        warnings = [*loose, f"cannot set mode 0600 on {path}: {describe_os_error(e)}"]
    except StoreError as e:
        warnings = [*loose, f"cannot set mode 0600: {e}"]
    for w in warnings:
        logger.warning("%s", w)
    return warnings


def ensure_private_dir(path: str, *, fix: bool = True, follow: bool = True) -> list[str]:
    """Make sure directory ``path`` exists and is private (0700); returns what it warned about.

    A new directory is created 0700 (missing parents with the default mode). An existing one
    that is looser is tightened when ``fix`` is set (it holds our keys; nobody else should
    read it), otherwise only reported. ``follow``: False for directories inside the store,
    where a symlink is never ours (the storage root itself may be a link the operator made).
    StoreError if it cannot be created.
    """
    warnings: list[str] = []
    try:
        os.makedirs(path, mode=PRIVATE_DIR_MODE, exist_ok=False)
    except FileExistsError:
        if not os.path.isdir(path):
            raise StoreError(
                f"cannot use {path} as a directory: it exists and is not one"
            ) from None
    except OSError as e:
        raise StoreError(f"cannot create directory {path}: {describe_os_error(e)}") from None
    else:
        try:
            os.chmod(path, PRIVATE_DIR_MODE)  # makedirs' mode is filtered by the umask
        except OSError as e:
            warnings.append(f"cannot set mode 0700 on {path}: {describe_os_error(e)}")
        for w in warnings:
            logger.warning("%s", w)
        return warnings
    loose = check_mode(path, PRIVATE_DIR_MODE)
    if loose and fix:
        try:
            mode = tighten(path, PRIVATE_DIR_MODE, directory=True, follow=follow)
            if mode is not None:
                warnings.append(f"{path} had mode {mode:04o}; tightened it to 0700")
        except OSError as e:
            warnings.extend(loose)
            warnings.append(f"cannot set mode 0700 on {path}: {describe_os_error(e)}")
    else:
        warnings.extend(loose)
    for w in warnings:
        logger.warning("%s", w)
    return warnings
