"""Store-wide figures for ``/metrics``: index sizes, queues and job states.

Read on a read-only connection of its own (a scrape must never take a write
lock or wait behind the request path's transactions), the same in every process.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from app.store.jobs import job_state


@dataclass(frozen=True)
class CollectionStats:
    name: str
    generation: int
    documents: int
    passages: int
    pending_documents: int
    pending_chunks: int


@dataclass
class StoreStats:
    collections: list[CollectionStats] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("queued", "running", "done", "failed"), 0))
    queued_files: int = 0


def read_store_stats(database: Path) -> StoreStats:
    stats = StoreStats()
    if not database.exists():
        return stats
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        stats.collections = [
            CollectionStats(*row)
            for row in conn.execute(
                """SELECT c.name, c.generation, IFNULL(n.live_documents, 0), IFNULL(n.live_chunks, 0),
                          IFNULL(n.pending_documents, 0), IFNULL(n.pending_chunks, 0)
                   FROM collections c LEFT JOIN collection_counts n ON n.collection_id = c.id
                   ORDER BY c.name"""
            )
        ]
        for row in conn.execute(
            """SELECT COUNT(*), SUM(f.state = 'queued'), SUM(f.state = 'failed'), SUM(f.attempts),
                      SUM(f.state = 'added' AND d.state = 'pending')
               FROM job_files f LEFT JOIN documents d ON d.id = f.doc_row GROUP BY f.job_id"""
        ):
            stats.jobs[job_state(*(int(v or 0) for v in row))] += 1
        stats.queued_files = conn.execute("SELECT COUNT(*) FROM job_files WHERE state = 'queued'").fetchone()[0]
    finally:
        conn.close()
    return stats
