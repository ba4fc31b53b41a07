"""Upload jobs: durable files waiting for extraction, and the job-state rule.

An upload is stored whole (its files as BLOBs) before it is acknowledged, so
it survives a crash; the ingest pipeline takes queued files one at a time.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import JobNotFound

if TYPE_CHECKING:
    from app.store.store import Store

FILE_STATES = ("queued", "added", "unchanged", "failed")


def job_state(files: int, queued: int, failed: int, attempts: int, indexing: int) -> str:
    """A job's state from its files: ``queued`` until any file was tried,
    ``running`` while a file is queued or its document still indexing,
    ``failed`` when every file failed, else ``done``."""
    if queued == files and not attempts:
        return "queued"
    if queued or indexing:
        return "running"
    if failed == files:
        return "failed"
    return "done"


@dataclass(frozen=True)
class QueuedFile:
    id: int
    job_id: str
    filename: str
    document_id: str
    metadata: str  # JSON
    data: bytes
    attempts: int
    collection_id: int


@dataclass(frozen=True)
class NewJobFile:
    filename: str
    document_id: str
    metadata: dict
    data: bytes | None
    error: str | None = None  # refused before processing


def summarise_job(job: dict) -> dict:
    """The API's view of a job (``GET /v1/jobs/{id}``) from :meth:`Jobs.get`."""
    files = job["files"]
    counts = {state: sum(f["state"] == state for f in files) for state in FILE_STATES}
    indexing = [f for f in files if f["state"] == "added" and f["doc_state"] == "pending"]
    state = job_state(len(files), counts["queued"], counts["failed"], sum(f["attempts"] for f in files), len(indexing))
    chunks_total = sum(f["chunks"] for f in files if f["state"] in ("added", "unchanged"))
    chunks_done = sum(
        f["chunks"]
        for f in files
        if f["state"] == "unchanged" or (f["state"] == "added" and f["doc_state"] != "pending")
    )
    return {
        "id": job["id"],
        "collection": job["collection"],
        "state": state,
        "files_total": len(files),
        "files_done": len(files) - counts["queued"] - len(indexing),
        "chunks_total": chunks_total,
        "chunks_done": chunks_done,
        "counts": counts,
        "created_at": job["created_at"],
        "files": [{k: f[k] for k in ("filename", "document_id", "state", "chunks", "error")} for f in files],
    }


class Jobs:
    """Job queries on the store's connection."""

    def __init__(self, store: Store):
        self.store = store

    async def create(self, collection_id: int, files: list[NewJobFile]) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        async with self.store.transaction() as db:
            await db.execute(
                "INSERT INTO jobs(id, collection_id, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (job_id, collection_id, now, now),
            )
            await db.executemany(
                """INSERT INTO job_files(job_id, filename, document_id, metadata, data, state, error)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        job_id,
                        f.filename,
                        f.document_id,
                        json.dumps(f.metadata, sort_keys=True, ensure_ascii=False, allow_nan=False),
                        None if f.error else f.data,
                        "failed" if f.error else "queued",
                        f.error,
                    )
                    for f in files
                ],
            )
        return job_id

    async def next_queued(self, served: dict[str, int] | None = None) -> QueuedFile | None:
        """The next file to process: with ``served`` (the turn at which each
        job was last served, kept by the caller), the oldest file of the job
        whose turn is oldest (a new job first): jobs take turns, so a large
        upload does not hold back the uploads made after it; without, the
        oldest file of all."""
        # Files of a deleted collection wait for the writer's purge, unserved.
        live_jobs = "job_id IN (SELECT j.id FROM jobs j JOIN collections c ON c.id = j.collection_id)"
        if served is None:
            where = f"f.id = (SELECT MIN(id) FROM job_files WHERE state = 'queued' AND {live_jobs})"
            params: tuple = ()
        else:
            heads = await self.store._all(
                f"SELECT job_id, MIN(id) AS head FROM job_files WHERE state = 'queued' AND {live_jobs} GROUP BY job_id"
            )
            for gone in set(served) - {h["job_id"] for h in heads}:
                del served[gone]
            if not heads:
                return None
            where, params = "f.id = ?", (min(heads, key=lambda h: (served.get(h["job_id"], 0), h["head"]))["head"],)
        row = await self.store._one(
            f"""SELECT f.id, f.job_id, f.filename, f.document_id, f.metadata, f.data, f.attempts, j.collection_id
                FROM job_files f JOIN jobs j ON j.id = f.job_id WHERE {where} AND f.state = 'queued'""",
            params,
        )
        if row is None:
            return None
        if served is not None:
            served[row["job_id"]] = max(served.values(), default=0) + 1
        return QueuedFile(**dict(row))

    async def begin_attempt(self, file_id: int) -> None:
        """Count an attempt before it runs: one that never ends (the process
        killed, out of memory) still counts, so a file cannot stall the queue
        at every restart."""
        async with self.store.transaction() as db:
            await db.execute("UPDATE job_files SET attempts = attempts + 1 WHERE id = ?", (file_id,))

    async def fail_file(self, file_id: int, error: str | None) -> None:
        """Mark the file failed (its attempt was counted when it began) and drop its data."""
        async with self.store.transaction() as db:
            await db.execute(
                "UPDATE job_files SET state = 'failed', error = ?, data = NULL WHERE id = ?", (error, file_id)
            )

    async def finish_file(self, file_id: int, state: str, chunks: int) -> None:
        """A file whose document is indexed elsewhere (the stateless tier:
        acknowledged by Qdrant): ``added`` or ``unchanged``, its data dropped."""
        async with self.store.transaction() as db:
            await db.execute(
                "UPDATE job_files SET state = ?, chunks = ?, data = NULL WHERE id = ?", (state, chunks, file_id)
            )

    async def get(self, job_id: str) -> dict:
        job = await self.store._one(
            """SELECT j.id, j.created_at, c.name AS collection FROM jobs j JOIN collections c ON c.id = j.collection_id
               WHERE j.id = ?""",
            (job_id,),
        )
        if job is None:
            raise JobNotFound(f"job {job_id!r} does not exist")
        files = await self.store._all(
            """SELECT f.filename, f.document_id, f.state, f.error, f.chunks, f.attempts, d.state AS doc_state
               FROM job_files f LEFT JOIN documents d ON d.id = f.doc_row WHERE f.job_id = ? ORDER BY f.id""",
            (job_id,),
        )
        return {**dict(job), "files": [dict(f) for f in files]}
