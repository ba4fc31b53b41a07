"""Text extraction in a separate process, within memory and time limits.

Parsers of untrusted files can take super-linear time or memory on crafted
input (nested markup, decompression bombs, pathological PDFs). In the server
process such a file would stall the job queue, or take the whole process
down with an out-of-memory kill, at every restart again. Here extraction runs
in one long-lived child process (a fresh interpreter, so it shares no
threads or locks with the server and never re-imports the server's main
module) at a lower CPU priority than the server (parsing yields the cores to
searches); a file that runs past the wall-clock limit or the memory limit,
or kills the child, fails with that reason, the child is replaced, and the
queue moves on.

The memory limit is watched from the server: it reads the child's resident
memory while it waits and kills the child past the limit. An address-space
limit alone is not enough: CPython at a hard allocation limit can spin
forever in its own error handling (every MemoryError while reporting the
previous one allocates again), so the file would end only at the wall-clock
limit. The child keeps an address-space limit well above the memory limit
as a backstop for platforms without ``/proc``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from app.ingest.extract import ExtractedDocument, ExtractionError

logger = logging.getLogger("app.ingest")

WATCH_INTERVAL_S = 0.05  # how often the server reads the child's resident memory while it waits
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def address_space_backstop(memory_bytes: int) -> int:
    """The child's address-space limit: far enough above ``memory_bytes``
    (mapped but untouched memory, allocator arenas, thread stacks) that the
    resident-memory watch fires first."""
    return 2 * memory_bytes + 256 * 2**20 if memory_bytes else 0


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory, or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def main(fd: int, memory_bytes: int, nice: int = 0, parent: int = 0) -> None:
    """The child's entry point (``python -c``): serve on the inherited socket."""
    if parent:
        _die_with(parent)
    _serve(Connection(fd), memory_bytes, nice)


def _die_with(parent: int) -> None:
    """End this child when the server dies, even mid-file.

    Otherwise a server killed by -9 while the child parses a huge file leaves
    it running to the end of that file (up to the memory limit, on a core the
    restarted server needs). A watch thread rather than ``PR_SET_PDEATHSIG``,
    which fires when the *thread* that started the child ends.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(conn: Connection, memory_bytes: int, nice: int = 0) -> None:
    """The child: extract each file sent until the pipe closes."""
    try:
        import resource

        limit = address_space_backstop(memory_bytes)
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not on this OS: the wall-clock limit still holds
        pass
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    from app.ingest.extract import extract

    while True:
        try:
            filename, data, max_bytes = conn.recv()
        except (EOFError, OSError):  # the server closed the pipe or died
            return
        try:
            result: tuple[bool, object] = (True, extract(filename, data, max_bytes))
        except ExtractionError as exc:
            result = (False, exc.reason)
        except MemoryError:
            result = (False, "extraction needed more memory than the limit allows")
        except Exception as exc:  # a parser bug: reported as the file's failure, not a crash
            result = (False, f"extraction failed: {type(exc).__name__}")
        del data
        try:
            conn.send(result)
        except (OSError, MemoryError):
            return


class ExtractionSandbox:
    """One child process that extracts files one at a time (thread-safe)."""

    def __init__(self, timeout_s: float, memory_bytes: int, nice: int = 0):
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.nice = nice
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._closed = False

    def extract(self, filename: str, data: bytes, max_bytes: int) -> ExtractedDocument:
        """The file's text, or ExtractionError with the reason (a parser's
        refusal, the time limit, the memory limit, a crash)."""
        with self._lock:
            conn = self._start()
            try:
                conn.send((filename, data, max_bytes))
                self._wait(conn)
                ok, payload = conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                code = self._process.poll() if self._process is not None else None
                self._stop()
                raise ExtractionError(
                    f"the extraction process stopped (exit code {code}): the file needs more memory than "
                    "the limit allows, or crashed its parser"
                ) from None
            if not ok:
                if "memory" in str(payload):
                    self._stop()  # a MemoryError may leave the child's heap in a bad state: start afresh
                raise ExtractionError(str(payload))
            assert isinstance(payload, ExtractedDocument)
            return payload

    def _wait(self, conn: Connection) -> None:
        """Wait for the child's answer within the time and memory limits."""
        assert self._process is not None
        pid = self._process.pid
        deadline = time.monotonic() + self.timeout_s
        while not conn.poll(max(0.0, min(WATCH_INTERVAL_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self._stop()
                raise ExtractionError(f"extraction took longer than the {self.timeout_s:g} s limit")
            resident = resident_bytes(pid) if self.memory_bytes else None
            if resident is not None and resident > self.memory_bytes:
                self._stop()
                raise ExtractionError(
                    f"extraction needed more memory than the {self.memory_bytes / 2**20:g} MiB limit allows"
                )

    def _start(self) -> Connection:
        if self._closed:
            raise ExtractionError("the server is stopping")
        if self._process is not None and self._process.poll() is None and self._conn is not None:
            return self._conn
        self._stop()
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the app package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from app.ingest.sandbox import main; "
                    f"main({theirs.fileno()}, {int(self.memory_bytes)}, {int(self.nice)}, {os.getpid()})",
                ],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C or a group-wide SIGTERM meant for
                # the server must not kill it mid-file (that file would fail
                # for good); it ends when the server closes its pipe.
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        return self._conn

    def _stop(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                logger.warning("the extraction process %d did not stop", process.pid)

    def close(self) -> None:
        """Stop the child, even in the middle of a file (its caller then gets
        an ExtractionError; the file's attempt is already counted)."""
        self._closed = True  # no new child after this
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
        with self._lock:
            self._stop()
