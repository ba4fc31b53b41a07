"""The snapshot cache: each collection's current generation, loaded once per
process and swapped when the store names a newer one.

A search reads (generation, manifest, version) from the store in one read,
loads that generation if this process holds an older one (reusing what the
old snapshot already holds), and recomputes the deleted mask only when the
store's version moved (a delete or a commit).

Loads run on their own thread (``load``), never on the search thread: a
collection's new generation does not hold up searches of the others. The
service's refresher calls :meth:`refresh` every ``snapshot_refresh_s``: each
cached collection whose generation moved is loaded in the background and
swapped in, so searches nearly always find it loaded, and every worker lets
go of superseded segment files (their pages, their disk space) within a
second of a commit, whether it is searched or not.

The cache holds at most ``snapshot_cache_bytes`` of snapshots (their
``memory_bytes``: mapped index files and private arrays), evicting the least
recently searched collection first; collections deleted by another process
are dropped at the next sweep (every ``SWEEP_S`` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.backend import IndexBackend, IndexSnapshot
from app.errors import CollectionNotFound
from app.store.store import Store

logger = logging.getLogger("app.engine")

LOAD_ATTEMPTS = 5
SWEEP_S = 10.0


@dataclass
class CachedSnapshot:
    snapshot: IndexSnapshot
    name: str = ""
    version: int = -1
    alive: torch.Tensor | None = None  # the deleted mask at ``version``
    checkpoint: str | None = None  # what the snapshot's passages were encoded with (None: the configured one)


class SnapshotCache:
    def __init__(
        self,
        store: Store,
        backend: IndexBackend,
        load: Callable[..., Awaitable[Any]],
        budget_bytes: int = 0,
        warm: Callable[[str], Any] | None = None,
    ):
        self.store = store
        self.backend = backend
        self._load = load  # runs blocking loads (on the loader thread, not the search thread)
        # Loads a checkpoint's encoder (a re-indexed collection's) with its
        # snapshot, so the first search after the switch does not wait for it.
        self._warm = warm
        self.budget_bytes = budget_bytes  # 0: no limit
        self._cache: OrderedDict[int, CachedSnapshot] = OrderedDict()  # least recently searched first
        self._locks: dict[int, asyncio.Lock] = {}
        self._swept = time.monotonic()
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return sum(c.snapshot.memory_bytes for c in self._cache.values())

    def cached(self, collection_id: int) -> CachedSnapshot | None:
        """The snapshot this process holds for a collection, if any."""
        return self._cache.get(collection_id)

    def forget(self, collection_id: int) -> None:
        self._cache.pop(collection_id, None)
        self._locks.pop(collection_id, None)

    async def get(self, name: str) -> tuple[int, CachedSnapshot]:
        """(collection id, its current snapshot)."""
        if time.monotonic() - self._swept > SWEEP_S:
            await self.sweep()
        for attempt in range(LOAD_ATTEMPTS):
            try:
                return await self._current(name)
            except FileNotFoundError:
                # The writer moved on two generations while this process was
                # loading an older one, and removed its files: read again.
                if attempt == LOAD_ATTEMPTS - 1:
                    collection_id = (await self.store.index_state(name))[0]
                    cached = self._cache.get(collection_id)
                    if cached is not None:  # serve the last good snapshot
                        logger.warning("serving generation %d of %s", cached.snapshot.generation, name)
                        return collection_id, cached
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _current(self, name: str, searched: bool = True, state=None) -> tuple[int, CachedSnapshot]:
        """``state``: the store's (id, generation, manifest, version,
        checkpoint) when the caller has just read it."""
        collection_id, generation, manifest, version, checkpoint = state or await self.store.index_state(name)
        cached = self._cache.get(collection_id)
        if cached is None or cached.snapshot.generation != generation:
            async with self._locks.setdefault(collection_id, asyncio.Lock()):
                cached = self._cache.get(collection_id)
                if cached is None or cached.snapshot.generation < generation:
                    previous = cached.snapshot if cached is not None else None
                    snapshot = await self._load(self.backend.load, collection_id, generation, manifest, previous)
                    if checkpoint is not None and self._warm is not None:
                        await self._load(self._warm, checkpoint)
                    cached = CachedSnapshot(snapshot, name, checkpoint=checkpoint)
                    held = self._cache.get(collection_id)
                    if held is not None and held.snapshot.generation >= generation:
                        cached = held  # a newer one landed meanwhile (another lock, after a forget)
                    elif searched or held is not None:  # a refresh never brings back what was evicted
                        self._cache[collection_id] = cached
                        # A searched collection stays whatever its size; a
                        # refreshed one keeps its place and may go itself.
                        self._evict(keep=collection_id if searched else None)
        if searched and collection_id in self._cache:
            self._cache.move_to_end(collection_id)
        if cached.version != version:
            dead = await self.store.dead_passage_ids(collection_id)
            cached.alive = cached.snapshot.deleted_mask(torch.tensor(dead, dtype=torch.int64))
            cached.version = version
        return collection_id, cached

    def _evict(self, keep: int | None) -> None:
        """Least recently searched first, until within the budget (``keep``,
        the collection a search just loaded, stays whatever its size)."""
        if not self.budget_bytes:
            return
        while self.bytes > self.budget_bytes and len(self._cache) > (1 if keep is not None else 0):
            victim = next(c for c in self._cache if c != keep)
            logger.info("evicting collection %d from the snapshot cache (budget %d bytes)", victim, self.budget_bytes)
            self.forget(victim)
            self.evictions += 1

    async def refresh(self) -> None:
        """Load the current generation of every cached collection whose
        generation moved (the least recently searched keep their place);
        collections deleted meanwhile are forgotten."""
        if time.monotonic() - self._swept > SWEEP_S:
            await self.sweep()
        for collection_id, cached in list(self._cache.items()):
            try:
                state = await self.store.index_state(cached.name)
                if state[0] != collection_id:  # deleted, and the name taken by a new collection
                    self.forget(collection_id)
                    continue
                await self._current(cached.name, searched=False, state=state)
            except CollectionNotFound:
                self.forget(collection_id)
            except FileNotFoundError:
                continue  # a generation released while it loaded: the next round or search settles it

    async def sweep(self) -> None:
        """Forget collections that no longer exist (deleted by any process)."""
        self._swept = time.monotonic()
        existing = {c.id for c in await self.store.list_collections()}
        for collection_id in [c for c in self._cache if c not in existing]:
            self.forget(collection_id)
