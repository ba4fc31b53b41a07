"""A codec retraining and merges run while upserts go on: no upsert waits
for them, and documents they did not touch are found exactly as before.

The real writer and maintainer threads, the PLAID backend and the SQLite
store, over the fake encoder; every background step is slowed down (a
sleep before its work) so that upserts land while one is in flight."""

from __future__ import annotations

import asyncio
import time

import torch

import app.engine.plaid as plaid_module
from app.engine.backend import SearchRequest
from app.engine.writer import IndexWriter
from app.store.index_state import IndexStateStore
from app.store.schema import connect
from app.store.store import Store
from tests.engine.crash_worker import WORDS, backend_for, settings_for
from tests.engine.test_writer import doc
from tests.fakes import FakeEncoder

UPSERT_VISIBLE_GOAL_S = 2.0  # issue 10's upsert-to-visible goal
STEP_DELAY_S = 1.5


def text(i: int) -> str:
    return f"note {i} about {WORDS[i % 8]} and {WORDS[(i * 3) % 8]}"


def settled(backend, state: IndexStateStore, collection_id: int) -> bool:
    col = state.collection(collection_id)
    pending = state.conn.execute(
        "SELECT count(*) FROM documents WHERE collection_id = ? AND state = 'pending'", (collection_id,)
    ).fetchone()[0]
    dead = torch.tensor(state.dead_passage_ids(collection_id), dtype=torch.int64)
    return pending == 0 and backend.plan(collection_id, col.manifest, dead) is None


def ranked(backend, encoder, state: IndexStateStore, collection_id: int, queries: list[str], among: set[int]):
    """Each query's hits {passage id: score}, keeping only passages in ``among``
    (a mapping: passages of equal score may come in either order)."""
    col = state.collection(collection_id)
    snapshot = backend.load(collection_id, col.generation, col.manifest)
    alive = snapshot.deleted_mask(torch.tensor(state.dead_passage_ids(collection_id), dtype=torch.int64))
    out = []
    for q in queries:
        result = snapshot.search(encoder.encode_queries([q]), SearchRequest(1000), alive)
        out.append({p: round(s, 4) for p, s in zip(result.passage_ids, result.scores) if p in among})
    return out


def live_passages(state: IndexStateStore, collection_id: int) -> set[int]:
    rows = state.conn.execute(
        """SELECT c.passage_id FROM chunks c JOIN documents d ON d.id = c.document_id
           WHERE d.collection_id = ? AND d.state = 'live'""",
        (collection_id,),
    )
    return {r[0] for r in rows}


def is_live(state: IndexStateStore, external_id: str) -> bool:
    row = state.conn.execute("SELECT 1 FROM documents WHERE external_id = ? AND state = 'live'", (external_id,))
    return row.fetchone() is not None


async def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_upserts_land_while_a_retraining_and_merges_run_and_untouched_results_stay(tmp_path, monkeypatch):
    # Segments keep a sample of their originals, not all of them (as past a
    # few thousand passages): older segments stay on their codec.
    monkeypatch.setattr(plaid_module, "RETRAIN_SAMPLE", 256)
    settings = settings_for(tmp_path)  # exact tier to 20 passages, retrain at 2x growth, commits of 40
    encoder = FakeEncoder()
    backend = backend_for(settings)
    store = Store(settings.database_path)
    await store.open()
    conn = connect(settings.database_path)
    state = IndexStateStore(conn)
    c = (await store.create_collection("live", None)).id
    writer = IndexWriter(settings, encoder, backend)
    steps: list[tuple[str, float, float]] = []  # (kind, started, prepared) of each background step
    prepare = backend.prepare

    def slow_prepare(task, dead):
        started = time.monotonic()
        time.sleep(STEP_DELAY_S)
        change = prepare(task, dead)
        steps.append((task.kind, started, time.monotonic()))
        return change

    try:
        # A first codec, settled: the "before" results come from compressed segments.
        await store.insert_pending(c, [doc(f"d{i}", text(i)) for i in range(60)])
        writer.start()
        writer.notify()
        await wait_until(lambda: settled(backend, state, c), 120, "the first codec and its merges")
        untouched = live_passages(state, c)
        queries = [text(i) for i in range(0, 60, 7)]
        before = ranked(backend, encoder, state, c, queries, untouched)
        assert all(before)

        backend.prepare = slow_prepare  # the maintainer calls it through the backend
        waits: list[tuple[float, float]] = []  # (acknowledged, visible) of each one-document upsert
        n = 60
        deadline = time.monotonic() + 240
        while not {"retrain", "merge"} <= {kind for kind, _, _ in steps}:
            assert time.monotonic() < deadline, f"maintenance never ran both kinds of step: {steps}"
            if n < 400:  # growth: bulk batches that call for a new codec and leave segments to merge
                await store.insert_pending(c, [doc(f"d{i}", text(i)) for i in range(n, n + 40)])
                n += 40
            probe = f"probe{len(waits)}"
            await store.insert_pending(c, [doc(probe, f"a one document upsert {len(waits)}")])
            acknowledged = time.monotonic()
            writer.notify()
            await wait_until(lambda probe=probe: is_live(state, probe), 30, probe)
            waits.append((acknowledged, time.monotonic()))
            await asyncio.sleep(0.2)
        await wait_until(lambda: settled(backend, state, c), 120, "maintenance to settle")

        kinds = {kind for kind, _, _ in steps}
        assert {"retrain", "merge"} <= kinds
        slowest = max(visible - ack for ack, visible in waits)
        assert slowest <= UPSERT_VISIBLE_GOAL_S, f"an upsert waited {slowest:.2f}s"
        for kind in ("retrain", "merge"):
            # Some upsert was acknowledged and made visible while a step of this kind was being prepared.
            assert any(
                started <= ack and visible <= prepared
                for k, started, prepared in steps
                if k == kind
                for ack, visible in waits
            ), f"no upsert landed during a {kind}: {steps}"
        assert writer.maintainer.last_error is None and writer.last_error is None
        after = ranked(backend, encoder, state, c, queries, untouched)
        for a, b in zip(after, before):
            assert a == b, {p: (a.get(p), b.get(p)) for p in set(a) | set(b) if a.get(p) != b.get(p)}
    finally:
        backend.prepare = prepare
        writer.stop()
        conn.close()
        await store.close()
