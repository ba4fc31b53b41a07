"""kill -9 during background maintenance (a merge, a codec retraining):
nothing acknowledged is lost, nothing half-written is visible, and the
next writer cleans up and finishes the work. Real processes, real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.engine.backend import SearchRequest
from app.engine.writer import IndexWriter
from app.store.index_state import IndexStateStore
from app.store.schema import connect
from tests.engine.crash_worker import WORDS, backend_for, settings_for
from tests.fakes import FakeEncoder

ROOT = Path(__file__).resolve().parents[2]


def kill_at(data_dir: Path, phase: str, where: str, nth: int = 1) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.engine.crash_worker", str(data_dir), phase],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = 0
        for line in proc.stdout:
            if line.strip().startswith(f"PHASE {phase} {where}"):
                seen += 1
                if seen == nth:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        else:
            raise AssertionError(f"the worker never reached {phase} {where}")
    finally:
        proc.kill()
        proc.wait()


def check_everything_live_is_found(state: IndexStateStore, backend, encoder) -> int:
    """Every live document's passage is in the served generation and found
    by a query of ``encoder`` (the checkpoint it must be encoded with)."""
    [col] = state.collections()
    snapshot = backend.load(col.id, col.generation, col.manifest)
    dead = torch.tensor(state.dead_passage_ids(col.id), dtype=torch.int64)
    alive = snapshot.deleted_mask(dead)
    live = [
        int(r["external_id"][1:]) for r in state.conn.execute("SELECT external_id FROM documents WHERE state = 'live'")
    ]
    assert len(live) == 200 - len(range(0, 200, 3))  # every acknowledged document that was not deleted
    pids = {
        r[0]
        for r in state.conn.execute(
            "SELECT c.passage_id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.state = 'live'"
        )
    }
    indexed = set(snapshot.slot_to_pid.tolist())
    assert pids <= indexed  # each live passage is in the committed generation
    for i in live[::9]:
        Q = encoder.encode_queries([f"{i} {WORDS[i % 8]} {WORDS[(i * 3) % 8]}"])
        hits = snapshot.search(Q, SearchRequest(len(live)), alive).passage_ids
        row = state.conn.execute(
            """SELECT c.passage_id FROM chunks c JOIN documents d ON d.id = c.document_id
               WHERE d.external_id = ? AND d.state = 'live'""",
            (f"d{i}",),
        ).fetchone()
        # Searchable and not masked (ranking quality of this toy codec is not the point here).
        assert row[0] in hits and not set(hits) & set(dead.tolist())
    return col.id


@pytest.mark.parametrize("phase", ["retrain", "merge"])
@pytest.mark.parametrize("where", ["temporary", "written"])
def test_kill_9_during_background_maintenance(tmp_path, phase, where):
    kill_at(tmp_path, phase, where)
    settings = settings_for(tmp_path)
    backend = backend_for(settings)
    encoder = FakeEncoder()
    conn = connect(settings.database_path)
    state = IndexStateStore(conn)
    try:
        collection_id = check_everything_live_is_found(state, backend, encoder)
        [col] = state.collections()
        backend.recover({c.id: c.manifests() for c in state.collections()})
        files = backend.files(collection_id)
        left = {p.name for p in files.root.iterdir()}
        assert left == files.files_of(col.manifest)  # no temporary or unreferenced file survives
        w = IndexWriter(settings, encoder, backend)
        w._stop.set()
        for _ in range(30):  # the next writer finishes the maintenance
            submitted = w.maintainer.prepare_step(state, collection_id, state.collections()[0].manifest)
            if submitted is None:
                break
            w.maintainer.changes.put(submitted)
            assert w.step(state) and submitted.outcome == "landed"
        else:
            raise AssertionError("maintenance never settles")
        check_everything_live_is_found(state, backend, encoder)
        assert state.dead_passage_count(collection_id) == 0  # tombstones merged away and purged
    finally:
        conn.close()


@pytest.mark.parametrize("nth", [1, 4, 9])
def test_kill_9_during_a_reindex_loses_nothing_and_the_next_writer_finishes_it(tmp_path, nth):
    """Killed after the re-index's nth file is in place (a batch's segment or
    manifest before its commit, or a codec of the new index): the served
    index is whole, the re-index resumes from its last commit, and once it
    is served every live document is found with the new checkpoint's queries."""
    from tests.engine.crash_worker import ALT_SALT, alt_encoders

    kill_at(tmp_path, "reindex", "written", nth)
    settings = settings_for(tmp_path)
    backend = backend_for(settings)
    conn = connect(settings.database_path)
    state = IndexStateStore(conn)
    try:
        [col] = state.collections()
        assert col.reindexing and col.checkpoint is None  # under way, not served yet
        check_everything_live_is_found(state, backend, FakeEncoder())  # the served index is whole
        w = IndexWriter(settings, FakeEncoder(), backend, alt_encoders(settings))
        w._stop.set()
        backend.recover({c.id: c.manifests() for c in state.collections()})
        for _ in range(500):
            if not w.step(state):
                break
        [col] = state.collections()
        assert col.checkpoint == "alt" and not col.reindexing
        check_everything_live_is_found(state, backend, FakeEncoder(salt=ALT_SALT))
        # Every live passage was encoded with alt: its stored dense vector is
        # alt's vector of its text (the default's is another direction).
        alt, snapshot = FakeEncoder(salt=ALT_SALT), backend.load(col.id, col.generation, col.manifest)
        rows = state.conn.execute(
            "SELECT c.passage_id, c.text FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.state = 'live'"
        ).fetchall()
        for pid, text in rows:
            own = alt.encode_passages([text]).dense.float()
            other = FakeEncoder().encode_passages([text]).dense.float()
            pids = torch.tensor([pid])
            assert snapshot.dense_scores(own, pids)[0] > 0.99 > snapshot.dense_scores(other, pids)[0], pid
        backend.release(col.id, col.manifests())
        files = backend.files(col.id)
        assert {p.name for p in files.root.iterdir()} == files.files_of(col.manifest)  # nothing else left
    finally:
        conn.close()
