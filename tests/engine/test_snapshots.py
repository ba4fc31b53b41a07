"""The snapshot cache: a byte budget with least-recently-searched eviction,
collections deleted by another process forgotten, new generations loaded
by the refresher before a search asks."""

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


env_writer: list = []  # (writer, its state store) of the running ``env``


async def add_documents(store, name: str, count: int) -> None:
    """``count`` more documents in ``name``, committed by ``env``'s writer (a new generation)."""
    w, state = env_writer
    collection_id = (await store.get_collection(name)).id
    await store.insert_pending(collection_id, [doc(f"{name}-more{i}", f"{name} more text {i}") for i in range(count)])
    while w.step(state):
        pass


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
    env_writer[:] = [w, state]
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


async def test_refresh_loads_a_new_generation_before_any_search_asks(env):
    store, backend = env
    loads: list[int] = []

    async def counting_load(fn, *args):
        loads.append(args[1])  # the generation loaded
        return fn(*args)

    cache = SnapshotCache(store, backend, counting_load)
    a, first = await cache.get("a")
    b, _ = await cache.get("b")
    await add_documents(store, "a", 2)
    generation = (await store.index_state("a"))[1]
    assert generation > first.snapshot.generation
    await cache.refresh()
    refreshed = cache.cached(a)
    assert refreshed is not None and refreshed.snapshot.generation == generation
    assert refreshed.snapshot.num_passages == 5 and refreshed.version == (await store.index_state("a"))[3]
    assert list(cache._cache) == [a, b]  # a refresh is not a search: b stays the most recent
    loads.clear()
    _, searched = await cache.get("a")  # the search finds it loaded
    assert loads == [] and searched is refreshed
    await cache.refresh()  # nothing moved: nothing loaded
    assert loads == []


async def test_refresh_forgets_collections_deleted_meanwhile_even_when_the_name_is_taken_again(env):
    store, backend = env
    loads: list[int] = []

    async def counting_load(fn, *args):
        loads.append(args[0])  # the collection id loaded
        return fn(*args)

    cache = SnapshotCache(store, backend, counting_load)
    a, _ = await cache.get("a")
    b, _ = await cache.get("b")
    c, _ = await cache.get("c")
    await store.delete_collection("a")
    await store.delete_collection("c")
    again = (await store.create_collection("c", None)).id  # a new collection under an old name
    await add_documents(store, "b", 1)
    loads.clear()
    await cache.refresh()
    assert cache.cached(a) is None and cache.cached(c) is None and cache.cached(again) is None
    assert loads == [b]  # the new "c" is loaded when it is searched, not by the refresher
    refreshed = cache.cached(b)
    assert refreshed is not None and refreshed.snapshot.num_passages == 4


async def test_a_refresh_over_the_budget_gives_up_the_refreshed_collection_not_a_recently_searched_one(env):
    store, backend = env
    probe = SnapshotCache(store, backend, run_inline)
    size = (await probe.get("a"))[1].snapshot.memory_bytes
    cache = SnapshotCache(store, backend, run_inline, budget_bytes=2 * size)
    a, _ = await cache.get("a")  # cold from now on
    b, _ = await cache.get("b")  # searched last
    await add_documents(store, "a", 3)  # a grows past what the budget leaves it
    await cache.refresh()
    assert cache.cached(b) is not None
    assert cache.cached(a) is None
