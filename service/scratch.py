"""Scratch folders inside the data folder, owned by the live process that made them (issue 14).

Received and uploaded DICOM never passes through the system temp folder: a process that needs scratch space for it
(``voxeldose serve``: an upload or a STOW-RS request being received, :func:`service.intake.new_temp_dir`; the DICOM
node: pynetdicom's C-STORE receive files, :mod:`service.dicom_node`) makes a folder under the data folder whose name
ends in ``.owner-<token>``, the *owner token* of that process.  At its next start the service removes the scratch
folders whose owner is gone (:func:`remove_orphans`) — an upload or a push interrupted by a crash or ``kill -9`` is
cleaned at once, while one in progress in another live process on the same data folder (a second ``serve``, a
``dicom-node``) is left alone.

The owner token: at first use a process creates ``data_dir/.owners/<pid>-<random>.lock`` and holds an exclusive
``flock`` on it for as long as it lives.  The kernel drops the lock when the process ends, however it ends, so "is
the owner alive" is answered by trying to take that lock (:func:`owner_alive`).  Why a lock and not a pid and a
liveness check (``kill(pid, 0)``): pids are reused (after a restart the new process may get the dead one's pid),
and processes in different containers sharing the data folder cannot see, or may share, each other's pids; a lock
on a file in the data folder means the same thing to all of them and needs no clock.  The lock file is locked
under a hidden name and only then renamed into place, so no one ever finds an owner's lock file unlocked while
that owner lives; it is deleted only by someone holding its lock (so: after its owner is gone), and a scratch
folder whose owner has no lock file left is an orphan.

``flock`` needs a local file system, or NFSv4 (where Linux maps it to byte-range locks).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

OWNERS_DIR = ".owners"
#: ``<anything>.owner-<pid>-<8 hex>``: a scratch folder and its owner's token
_OWNED = re.compile(r"\.owner-(?P<token>[0-9]+-[0-9a-f]{8})$")
_TOKEN = re.compile(r"[0-9]+-[0-9a-f]{8}")
#: A lock file still under its hidden name younger than this is being made (s)
_NEW_GRACE_S = 60.0

_lock = threading.Lock()
#: data folder → (pid that made it, token, open descriptor holding the lock)
_owners: dict[Path, tuple[int, str, int]] = {}


def _owners_dir(data_dir: Path) -> Path:
    return Path(data_dir) / OWNERS_DIR


def owner_token(data_dir: Path) -> str:
    """This process's owner token for ``data_dir`` (made and locked at first use; a new one if its lock file was
    deleted under it, or after a fork)."""
    key = Path(data_dir).resolve()
    with _lock:
        held = _owners.get(key)
        if held is not None:
            pid, token, fd = held
            if pid == os.getpid() and _same_file(fd, _owners_dir(key) / f"{token}.lock"):
                return token
            if pid == os.getpid():
                os.close(fd)  # our lock file is gone: its lock means nothing any more
            del _owners[key]
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        folder = _owners_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        hidden = folder / f".new-{token}.lock"
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, folder / f"{token}.lock")
        except BaseException:
            os.close(fd)
            hidden.unlink(missing_ok=True)
            raise
        _owners[key] = (os.getpid(), token, fd)
        return token


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def owned_name(data_dir: Path, prefix: str) -> str:
    """A fresh scratch name ``<prefix><32 hex>.owner-<token>`` owned by this process."""
    return f"{prefix}{secrets.token_hex(16)}.owner-{owner_token(data_dir)}"


def owner_of(path: Path) -> str | None:
    """The owner token in a scratch folder's name, or None (a name of another form)."""
    m = _OWNED.search(Path(path).name)
    return m.group("token") if m else None


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s lock, or None when someone holds it (or the file is gone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def owner_alive(data_dir: Path, token: str) -> bool:
    """True while the process that holds ``token`` lives (its lock file exists and is locked)."""
    if not _TOKEN.fullmatch(token):
        return False
    path = _owners_dir(data_dir) / f"{token}.lock"
    if not path.exists():
        return False
    fd = _try_lock(path)
    if fd is None:
        return path.exists()  # locked: alive (unless it was just deleted by someone who found it dead)
    os.close(fd)
    return False


def prune_owners(data_dir: Path) -> int:
    """Delete the lock files of owners that are gone (each under its lock); returns how many."""
    folder = _owners_dir(data_dir)
    if not folder.is_dir():
        return 0
    n = 0
    now = time.time()
    for path in folder.glob("*.lock"):
        try:
            if path.name.startswith(".new-") and now - path.stat().st_mtime < _NEW_GRACE_S:
                continue  # being made: its maker takes the lock an instant after creating it
        except OSError:
            continue
        fd = _try_lock(path)
        if fd is None:
            continue
        try:
            path.unlink(missing_ok=True)
            n += 1
        finally:
            os.close(fd)
    return n


def remove_orphans(root: Path, data_dir: Path, prefix: str, *, unowned_older_than_s: float | None = None) -> int:
    """Remove the scratch entries ``root/<prefix>*`` whose owner is gone (folders and files); an entry without an
    owner token in its name (another naming, or made by an older version) only when it is older than
    ``unowned_older_than_s`` (None: never).  Then prune the lock files of gone owners.  Returns how many entries
    were removed."""
    n = 0
    if Path(root).is_dir():
        now = time.time()
        alive: dict[str, bool] = {}
        for p in Path(root).glob(prefix + "*"):
            token = owner_of(p)
            try:
                if token is not None:
                    if token not in alive:
                        alive[token] = owner_alive(data_dir, token)
                    if alive[token]:
                        continue
                elif unowned_older_than_s is None or now - p.lstat().st_mtime <= unowned_older_than_s:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                n += 1
            except OSError:
                pass
    prune_owners(data_dir)
    return n
