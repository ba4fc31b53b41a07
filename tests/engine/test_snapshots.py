"""The snapshot cache: a byte budget with least-recently-searched eviction,
and collections deleted by another process forgotten."""

from __future__ import annotations

import pytest

from app.engine.snapshots import SnapshotCache
from app.settings import Settings
from app.store.index_state import IndexStateStore
from app.store.schema import connect
from app.store.store import Store
from tests.engine.test_writer import doc, writer
from tests.fakes import FakeInMemoryBackend


async def run_inline(fn, *args):
    return fn(*args)


@pytest.fixture
async def env(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    store = Store(settings.database_path)
    await store.open()
    conn = connect(settings.database_path)
    backend = FakeInMemoryBackend()
    w = writer(settings, backend)
    state = IndexStateStore(conn)
    for name in ("a", "b", "c"):
        c = (await store.create_collection(name, None)).id
        await store.insert_pending(c, [doc(f"{name}{i}", f"{name} text number {i}") for i in range(3)])
    while w.step(state):
        pass
    yield store, backend
    conn.close()
    await store.close()


async def test_a_tiny_budget_keeps_only_the_collection_last_searched(env):
    store, backend = env
    cache = SnapshotCache(store, backend, run_inline, budget_bytes=1)
    a, snap_a = await cache.get("a")
    assert snap_a.snapshot.memory_bytes > 1 and cache.cached(a) is not None  # the one just loaded stays
    b, _ = await cache.get("b")
    assert cache.cached(a) is None and cache.cached(b) is not None
    assert cache.evictions == 1
    a_again, reloaded = await cache.get("a")  # an evicted collection loads again when searched
    assert a_again == a and reloaded.snapshot.num_passages == 3
    assert cache.cached(b) is None


async def test_the_least_recently_searched_goes_first(env):
    store, backend = env
    probe = SnapshotCache(store, backend, run_inline)
    size = (await probe.get("a"))[1].snapshot.memory_bytes
    cache = SnapshotCache(store, backend, run_inline, budget_bytes=2 * size)
    a, _ = await cache.get("a")
    b, _ = await cache.get("b")
    await cache.get("a")  # a is now the most recent
    c, _ = await cache.get("c")
    assert cache.cached(b) is None
    assert cache.cached(a) is not None and cache.cached(c) is not None
    assert cache.bytes <= 2 * size


async def test_collections_deleted_elsewhere_are_forgotten_at_the_sweep(env):
    store, backend = env
    cache = SnapshotCache(store, backend, run_inline)
    a, _ = await cache.get("a")
    b, _ = await cache.get("b")
    await store.delete_collection("a")  # as another process would
    await cache.sweep()
    assert cache.cached(a) is None and cache.cached(b) is not None
