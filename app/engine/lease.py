"""The writer lease: at most one process per data directory changes indexes."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path


class WriterLease:
    """An exclusive, process-wide lease on writing (an flock'd file holding
    the holder's pid)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False  # another process holds it
            raise  # no locks on this filesystem, say: the caller must not pass for a reader in silence
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def beat(self) -> None:
        """The holder's sign of life: the lease file's mtime, which any
        process can read (:meth:`heartbeat_age`)."""
        if self._fd is not None:
            os.utime(self._fd)

    def heartbeat_age(self) -> float | None:
        """Seconds since the holder's last :meth:`beat` (None: no lease file)."""
        try:
            return max(0.0, time.time() - os.stat(self.path).st_mtime)
        except OSError:
            return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder_pid(self) -> int | None:
        """The pid of the process holding the lease, if it is alive on this host."""
        if self.held:
            return os.getpid()
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        if pid <= 0:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return pid
