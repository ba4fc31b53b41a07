"""A writer process for the crash tests (tests/engine/test_crash.py).

``python -m tests.engine.crash_worker DATA_DIR PHASE``: fills a collection
through the real writer, PLAID backend and SQLite store (the fake encoder),
deletes some documents, then runs background maintenance with the step's
file writes slowed down, printing ``PHASE <kind> <where>`` when a step of
kind ``PHASE`` (merge | retrain) has written a temporary file or a finished
one, so the test can kill -9 the process at either point.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import colbert_patches.persistence as persistence
from app.engine.plaid import PlaidBackend, PlaidConfig
from app.engine.writer import IndexWriter
from app.settings import Settings
from app.store.index_state import IndexStateStore
from app.store.schema import connect
from app.store.store import Store
from tests.engine.test_writer import doc
from tests.fakes import FakeEncoder

WORDS = ["amber", "basalt", "cobalt", "dahlia", "ember", "fjord", "garnet", "harbor"]


def settings_for(data_dir: Path) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=data_dir,
        exact_search_max_passages=20,
        rebuild_growth_factor=2.0,
        commit_max_chunks=40,
    )


def backend_for(settings: Settings) -> PlaidBackend:
    encoder = FakeEncoder()
    return PlaidBackend(PlaidConfig.from_settings(settings, encoder.dim, encoder.nbits))


async def fill(settings: Settings) -> None:
    store = Store(settings.database_path)
    await store.open()
    c = (await store.create_collection("crash", None)).id
    w = IndexWriter(settings, FakeEncoder(), backend_for(settings))
    conn = connect(settings.database_path)
    state = IndexStateStore(conn)
    for start in range(0, 200, 40):
        docs = [
            doc(f"d{i}", f"note {i} about {WORDS[i % 8]} and {WORDS[(i * 3) % 8]}") for i in range(start, start + 40)
        ]
        await store.insert_pending(c, docs)
        while w.step(state):
            pass
    for i in range(0, 200, 3):
        await store.delete_document(c, f"d{i}")
    conn.close()
    await store.close()


def slow_saves(phase: str) -> None:
    original = persistence.os.replace

    def replace(src, dst):
        name = Path(dst).name
        kind = "merge" if name.startswith("seg-") else "retrain" if name.startswith("codec-") else None
        if kind == phase:
            print(f"PHASE {kind} temporary", flush=True)
            time.sleep(1.0)
        original(src, dst)
        if kind == phase:
            print(f"PHASE {kind} written", flush=True)
            time.sleep(1.0)

    persistence.os.replace = replace


ALT_SALT = 0x5A5A  # checkpoint "alt": the fake encoder with other word vectors


def alt_encoders(settings: Settings):
    """The encoders of a writer whose collections may move to checkpoint ``alt``."""
    from app.engine.encoders import Encoders, checkpoint_root

    return Encoders(FakeEncoder(), checkpoint_root(settings.data_dir), lambda path: FakeEncoder(salt=ALT_SALT))


def reindex(settings: Settings) -> None:
    """Phase ``reindex``: a re-index to ``alt`` under way, each file it puts
    in place printed (``PHASE reindex written``) with a pause after it, so
    the test can kill -9 between a batch's files and its commit."""
    from app.tuning_jobs import start_reindex

    (settings.data_dir / "checkpoints" / "alt").mkdir(parents=True, exist_ok=True)
    conn = connect(settings.database_path)
    start_reindex(conn, IndexStateStore(conn).collections()[0].id, "alt")
    conn.close()
    original = persistence.os.replace

    def replace(src, dst):
        original(src, dst)
        print(f"PHASE reindex written {Path(dst).name}", flush=True)
        time.sleep(0.3)

    persistence.os.replace = replace
    w = IndexWriter(settings, FakeEncoder(), backend_for(settings), alt_encoders(settings))
    w.start()


def main() -> None:
    data_dir, phase = Path(sys.argv[1]), sys.argv[2]
    settings = settings_for(data_dir)
    asyncio.run(fill(settings))
    print("FILLED", flush=True)
    if phase == "reindex":
        reindex(settings)
    else:
        slow_saves(phase)
        IndexWriter(settings, FakeEncoder(), backend_for(settings)).start()
    time.sleep(120)  # killed long before this


if __name__ == "__main__":
    main()
