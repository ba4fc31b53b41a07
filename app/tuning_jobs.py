"""Tuning jobs: ``POST /v1/collections/{name}/tune``.

A job is ``python -m app.cli tune`` run as a process of its own (at a lower
CPU priority, so searches come first; its memory apart from the server's),
started by the server with the job's id. The process records its outcome in
the job's row itself: the figures, the checkpoint written under the data
directory's ``checkpoints/``, and, when asked, the collection's re-index with
it started (app/engine/reindex.py). A job whose process ended without a
word (killed, out of memory) reads as failed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.store.schema import START_REINDEX_SQL, connect, transaction

logger = logging.getLogger("app.tune")

NICENESS = 10  # of the tuning process, above the server's own

COLUMNS = "id, collection_id, state, config, reindex, pid, checkpoint, result, error, created_at, updated_at"


def finish(
    conn: sqlite3.Connection, job_id: str, checkpoint: str, result: dict, reindex_collection: int | None
) -> None:
    """The job done, and (``reindex_collection``) that collection's re-index
    with the new checkpoint started, in one transaction."""
    with transaction(conn):
        conn.execute(
            "UPDATE tuning_jobs SET state = 'done', checkpoint = ?, result = ?, updated_at = ? WHERE id = ?",
            (checkpoint, json.dumps(result), time.time(), job_id),
        )
        if reindex_collection is not None:
            _start_reindex(conn, reindex_collection, checkpoint)


def start_reindex(conn: sqlite3.Connection, collection_id: int, checkpoint: str) -> None:
    with transaction(conn):
        _start_reindex(conn, collection_id, checkpoint)


def _start_reindex(conn: sqlite3.Connection, collection_id: int, checkpoint: str) -> None:
    conn.execute(START_REINDEX_SQL + " WHERE id = ?", (checkpoint, collection_id))


def record_failure(database_path: Path, job_id: str, message: str) -> None:
    """``fail`` on a connection of its own (the tune command, the server)."""
    conn = connect(database_path)
    try:
        fail(conn, job_id, message)
    finally:
        conn.close()


def fail(conn: sqlite3.Connection, job_id: str, error: str) -> None:
    with transaction(conn):
        conn.execute(
            "UPDATE tuning_jobs SET state = 'failed', error = ?, updated_at = ? WHERE id = ? AND state = 'running'",
            (error[:2000], time.time(), job_id),
        )


def read(conn: sqlite3.Connection, job_id: str) -> dict | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM tuning_jobs WHERE id = ?", (job_id,)).fetchone()
    return describe(dict(row)) if row is not None else None


def describe(row: dict) -> dict:
    """A job row as the API shows it; a running job whose process is gone reads as failed."""
    out = {
        "id": row["id"],
        "state": row["state"],
        "config": json.loads(row["config"]),
        "reindex": bool(row["reindex"]),
        "checkpoint": row["checkpoint"],
        "result": json.loads(row["result"]) if row["result"] else None,
        "error": row["error"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
    if row["state"] == "running" and row["pid"] is not None and not _alive(row["pid"]):
        out["state"] = "failed"
        out["error"] = "the tuning process ended without recording a result (killed, or out of memory)"
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_process(
    data_dir: Path, collection: str, job_id: str, base_checkpoint: str, out: Path, options: dict[str, object]
) -> subprocess.Popen:
    """Run the tuning CLI for ``job_id``; it records its own outcome. It
    runs in a session of its own: a server stopping does not cut a tuning
    short (its checkpoint is still written and its re-index started)."""
    args = [sys.executable, "-m", "app.cli", "tune", "--collection", collection, "--data-dir", str(data_dir)]
    args += ["--job", job_id, "--checkpoint", base_checkpoint, "--out", str(out), "--nice", str(NICENESS)]
    for key, value in options.items():
        if isinstance(value, bool):
            if value:
                args.append(f"--{key.replace('_', '-')}")
        elif value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    root = str(Path(__file__).resolve().parents[1])  # the directory holding the app package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    log = log_path(data_dir, job_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    # Reap it when it ends (a zombie would still read as alive).
    threading.Thread(target=process.wait, name=f"tuning-{job_id[:8]}", daemon=True).start()
    return process


def log_path(data_dir: Path, job_id: str) -> Path:
    """Where a tuning process writes its progress and errors."""
    return Path(data_dir) / "tuning" / f"{job_id}.log"
