"""Background index maintenance: merges and codec retraining off the writer
thread, so no commit ever waits for them.

The maintainer runs next to the writer in the process holding the writer
lease. For each collection it asks the backend for a step
(:meth:`IndexBackend.plan`), does the step's work on its own thread
(:meth:`IndexBackend.prepare`: new files only) and hands the result to the
writer, which folds it into the current generation between commits (cheap).
The thread runs at a lower CPU priority (``NICENESS``, Linux; the
threads it starts for k-means inherit it), so on a busy machine commits and
searches come first and maintenance takes what is left. A step that fails backs off for that collection (doubling, up to
``MAX_BACKOFF_S``); a process killed during one leaves only unreferenced
files, removed at the next start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from app.engine.backend import IndexBackend, PreparedChange
from app.store.index_state import IndexStateStore
from app.store.schema import connect

logger = logging.getLogger("app.engine")

MAX_BACKOFF_S = 600.0
NICENESS = 5  # of the maintainer thread, above the process's own


def lower_thread_priority(niceness: int) -> bool:
    """Raise the calling thread's nice value by ``niceness`` (Linux: threads
    are tasks with a nice value each); False where the OS does not allow it."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + niceness, 19))
        return True
    except (AttributeError, OSError):
        return False


def release_freed_memory() -> bool:
    """Hand memory freed by a large step back to the OS (glibc's
    ``malloc_trim``): a merge or a codec training allocates and frees
    hundreds of MiB, which glibc would otherwise keep in the process's heap
    as resident memory. False where the C library has no such call."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    trim(0)
    return True


@dataclass
class Submitted:
    """A prepared change on its way to the writer."""

    change: PreparedChange
    done: threading.Event = field(default_factory=threading.Event)
    outcome: str = ""
    reindex: bool = False  # a step of the index a re-index builds, not of the served one
    # The checkpoint that index was encoded with: a step (a codec trained on
    # its vectors) applies to an index of that checkpoint only, never to the
    # one a re-index put in its place meanwhile.
    checkpoint: str | None = None


class Maintainer:
    def __init__(self, database_path, backend: IndexBackend, is_writer, on_submit, poll_s: float = 5.0):
        self.database_path = database_path
        self.backend = backend
        self._is_writer = is_writer  # () -> bool: this process holds the writer lease
        self._on_submit = on_submit  # () -> None: wakes the writer
        self.poll_s = poll_s
        self.changes: queue.Queue[Submitted] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff: dict[tuple[int, bool], tuple[float, float]] = {}  # (collection, re-index) -> (until, seconds)
        self.busy = False
        self.last_error: str | None = None
        self.steps_done = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-maintainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        """Something was committed or deleted: look for work again."""
        self._wake.set()

    def _run(self) -> None:
        lower_thread_priority(NICENESS)
        conn = connect(self.database_path)
        store = IndexStateStore(conn)
        try:
            while not self._stop.is_set():
                did_work = self._is_writer() and self.run_once(store)
                if not did_work:
                    self._wake.wait(self.poll_s)
                    self._wake.clear()
        finally:
            conn.close()

    def run_once(self, store: IndexStateStore) -> bool:
        """Prepare and hand over at most one step per collection, waiting
        for the writer to fold each in."""
        did_work = False
        # The served indexes, and the ones re-indexes build (they grow like
        # a bulk load: codecs trained, segments merged as they grow).
        collections = store.collections()
        targets = [(c.id, c.manifest, False, c.checkpoint) for c in collections]
        targets += [(c.id, c.reindex_manifest, True, c.reindex_checkpoint) for c in collections if c.reindexing]
        for collection_id, manifest, reindex, checkpoint in targets:
            if self._stop.is_set():
                break
            submitted = self.prepare_step(store, collection_id, manifest, reindex, checkpoint)
            if submitted is None:
                continue
            self.changes.put(submitted)
            self._on_submit()
            while not submitted.done.wait(0.5):
                if self._stop.is_set():
                    return did_work
            self._backoff.pop((collection_id, reindex), None)
            self.steps_done += 1
            did_work = True
        return did_work

    def prepare_step(
        self,
        store: IndexStateStore,
        collection_id: int,
        manifest: str | None,
        reindex: bool = False,
        checkpoint: str | None = None,
    ) -> Submitted | None:
        """Plan and prepare one step for a collection's index (``reindex``:
        the one its re-index builds); None: nothing to do, or it failed and
        backs off."""
        until, _ = self._backoff.get((collection_id, reindex), (0.0, 0.0))
        if time.monotonic() < until:
            return None
        try:
            dead = torch.tensor(store.dead_passage_ids(collection_id), dtype=torch.int64)
            task = self.backend.plan(collection_id, manifest, dead)
            if task is None:
                return None
            self.busy = True
            started = time.perf_counter()
            change = self.backend.prepare(task, dead)
        except Exception as exc:  # back off; commits go on regardless
            self._failed((collection_id, reindex), exc)
            return None
        finally:
            if self.busy:  # a step ran (or failed): it freed what it allocated
                release_freed_memory()
            self.busy = False
        logger.info(
            "collection %d: %s of %s (%s) prepared in %.1fs",
            collection_id,
            task.kind,
            ", ".join(task.segments) or "a new codec",
            task.reason,
            time.perf_counter() - started,
        )
        self.last_error = None
        return Submitted(change, reindex=reindex, checkpoint=checkpoint)

    def _failed(self, key: tuple[int, bool], exc: Exception) -> None:
        logger.exception("index maintenance of collection %d%s failed", key[0], " (its re-index)" if key[1] else "")
        _, seconds = self._backoff.get(key, (0.0, 2.5))
        seconds = min(seconds * 2, MAX_BACKOFF_S)
        self._backoff[key] = (time.monotonic() + seconds, seconds)
        self.last_error = type(exc).__name__
