"""Kernel uids unique on the host: leases that every server on the machine takes from one directory.

A uid is what separates one kernel's files and processes from another's, so two live kernels must never
share one, whichever servers started them. Each uid in use is a file in REGISTRY; a server holds an
exclusive `flock` on it for as long as the uid's session lives, and removes it on release. The kernel
releases a lock when its holder dies, even by SIGKILL, so a lease is never leaked, and no pid or clock is
trusted. (systemd's DynamicUser hands out uids the same way, with lock files under /run/systemd/dynamic-uid.)

Reuse is made rare and safe:
- claims go round a shared cursor through SPAN uids, so a uid comes back only after SPAN others;
- each lease records the session directory it was given for; whoever claims the uid next first seals
  what a killed server left there (owner root, mode 000), so the new kernel cannot read it;
- kernels see the host read-only with a private /tmp and /dev/shm (see confine.py), so they leave files
  nowhere else.
Servers in different containers that share a kernel but not /run must use disjoint --kernel-uid-base ranges.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

REGISTRY = "/run/codeact/uids"
SPAN = 1 << 20  # uids handed out in turn from the base; about a million sessions before one comes back
CURSOR = "cursor"


class NoFreeUid(RuntimeError):
    """Every uid of the range is leased by a live session."""


class UidLeases:
    """The uids this server holds. Usage:

        leases = UidLeases(base=200000)
        uid = leases.claim("/tmp/codeact-server-x/session-1")
        ...
        leases.release(uid)
    """

    def __init__(self, base: int, directory: str = REGISTRY, span: int = SPAN) -> None:
        self.base = base
        self.span = span
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        info = os.fstat(self.directory)
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            os.close(self.directory)
            raise PermissionError(f"{directory} must belong to uid {os.geteuid()} and not be writable by others")
        self.held: dict[int, int] = {}  # uid -> the descriptor holding its lock

    def _open(self, name: str) -> int:
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.directory)

    def claim(self, home: str) -> int:
        """A uid no live kernel on this host has, leased for the session directory `home`."""
        cursor = self._open(CURSOR)
        try:
            fcntl.flock(cursor, fcntl.LOCK_EX)  # claims from all servers go one at a time (microseconds)
            start = int(os.pread(cursor, 32, 0) or b"0") % self.span
            for step in range(self.span):
                offset = (start + step) % self.span
                uid = self.base + offset
                if uid in self.held:
                    continue
                lease = self._lock(str(uid))
                if lease is None:
                    continue
                seal_leftovers(lease)
                record = json.dumps({"home": home, "server": os.getpid()}).encode()
                os.ftruncate(lease, 0)
                os.pwrite(lease, record, 0)
                self.held[uid] = lease
                os.ftruncate(cursor, 0)
                os.pwrite(cursor, str(offset + 1).encode(), 0)
                return uid
        finally:
            os.close(cursor)  # closing drops the lock
        raise NoFreeUid(f"all {self.span} kernel uids from {self.base} are in use")

    def _lock(self, name: str) -> int | None:
        """The lease file `name`, opened and locked, or None when a live holder has it. A holder removes the
        file on release, so the lock taken must be on the file that has the name now, or it means nothing."""
        while True:
            lease = self._open(name)
            try:
                fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lease)
                return None
            try:
                if os.stat(name, dir_fd=self.directory, follow_symlinks=False).st_ino == os.fstat(lease).st_ino:
                    return lease
            except FileNotFoundError:
                pass
            os.close(lease)  # removed or replaced by its holder while we waited: open the name again

    def release(self, uid: int) -> None:
        """Give the uid back, once its session directory is gone: its lease file goes (a killed server never
        gets here: its file stays, and the next claimant seals what the record names)."""
        lease = self.held.pop(uid, None)
        if lease is not None:
            os.unlink(str(uid), dir_fd=self.directory)  # while still locked: see _lock
            os.close(lease)

    def close(self) -> None:
        for uid in list(self.held):
            os.close(self.held.pop(uid))  # records kept: the directories they name may still exist
        os.close(self.directory)


def seal_leftovers(lease: int) -> None:
    """Make what a dead holder of this uid left unreachable for the next kernel with the uid: the session
    directory its record names becomes root's, mode 000 (the stale-root sweep removes it later)."""
    try:
        record = json.loads(os.pread(lease, 4096, 0) or b"{}")
    except ValueError:
        return
    home = record.get("home") if isinstance(record, dict) else None
    if not isinstance(home, str) or not home.startswith("/"):
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(descriptor, 0, 0)
            os.fchmod(descriptor, 0)
        finally:
            os.close(descriptor)
