"""One writer per output folder: an exclusive POSIX record lock (fcntl.lockf) on OUT/.sftkit.lock,
held by the live run.

The kernel drops the lock when its holder dies (kill -9 included), so a lock is stale exactly when
its holder is gone, and a folder whose lock can be taken has no live writer: whatever temporary
folders it holds were left by a dead one. A record lock, not a flock: a flock is shared with every
forked child, and a DataLoader worker outlives a killed run by up to its 5 s liveness check,
keeping the folder "in use" meanwhile. A record lock belongs to the process alone; its one trap
(closing any descriptor of the file drops it) is why only `acquire` opens the file in the holding
process. The file names its holder (command, pid, host, start), so a refused command can say who
has the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sftkit.errors import ConfigError

LOCK_FILE = ".sftkit.lock"


def _holder_text(path: Path) -> str:
    """'sftkit train, pid 123 on host h since 06:01:02 UTC' from a held lock file."""
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not who:  # it took the lock and has not written its name yet
        return "another process"
    return f"{who.get('command', 'sftkit')}, pid {who.get('pid')} on host {who.get('host')} since {who.get('since')}"


def _refusal(folder: Path, path: Path, flag: str) -> ConfigError:
    return ConfigError(f"{flag} {folder} is in use by a live run ({_holder_text(path)}); nothing was changed: "
                       f"wait for it to end, or choose another {flag}")


def check_unlocked(folder: Path, flag: str = "--output_dir") -> None:
    """Refuse a folder whose lock a live process holds; creates nothing."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or none readable): no sftkit run holds it
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: a read-only descriptor can take it
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise _refusal(Path(folder), path, flag) from None
    finally:
        os.close(fd)  # closing drops the probe's own lock at once


class FolderLock:
    """The lock on one folder, held from `acquire` until `release` or the end of the process."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.made_folder = False

    def acquire(self, flag: str = "--output_dir") -> FolderLock:
        self.made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise _refusal(self.folder, self.path, flag) from None
            # the holder before us may have removed the file between our open and our lock: a
            # lock on a removed file guards nothing, so take the one now at the path
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        who = {"command": "sftkit " + " ".join(sys.argv[1:2]), "pid": os.getpid(), "host": socket.gethostname(),
               "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(who).encode())
        return self

    def release(self, failed: bool = False) -> None:
        """Drop the lock and its file; after a failed start, also the folder it made if still empty."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: nobody can take the removed file
        os.close(self.fd)
        self.fd = None
        if failed and self.made_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass  # something was written there: it stays

    @contextmanager
    def released_on_error(self) -> Iterator[FolderLock]:
        """For the rest of a command's start: a failure there leaves the folder as it found it."""
        try:
            yield self
        except BaseException:
            self.release(failed=True)
            raise


class NoLock(FolderLock):
    """What a process other than the main one holds: rank 0 holds the folder for the launch."""

    def acquire(self, flag: str = "--output_dir") -> FolderLock:
        return self
