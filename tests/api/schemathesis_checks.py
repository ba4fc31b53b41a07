"""Checks of this server's own promises, for schemathesis runs against a live
server (tests/api/test_schemathesis.py loads them with SCHEMATHESIS_HOOKS).

- Every 4xx/5xx body is the JSON error shape ``{"error": {"code", "message"}}``
  (validation errors may add ``details``).
- A 4xx changed nothing stored: collections, each collection's documents
  (id, content, title, metadata) and jobs are the same after the call as
  before it, read straight from the server's SQLite database.
- With a read-only key, every request that could change data gets 403.

Settings come from the environment: SCHEMATHESIS_COLBERT_DATABASE (the
server's database file), SCHEMATHESIS_COLBERT_ACCESS (``read-write`` or
``read-only``) and SCHEMATHESIS_COLBERT_STATS (a file that gets, at exit, how
often each check ran and passed, so a test can tell they ran at all). Run one
worker (``--workers 1``): the before/after comparison needs calls one at a
time, and ``--checks all`` (a list of names disables the checks it leaves out,
these ones included).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sqlite3
import time
from contextlib import closing

import schemathesis

DATABASE = os.environ.get("SCHEMATHESIS_COLBERT_DATABASE", "")
READ_ONLY = os.environ.get("SCHEMATHESIS_COLBERT_ACCESS", "read-write") == "read-only"
# The read-only run's key (its requests without a key, or with a wrong one, get 401).
READ_ONLY_KEY = os.environ.get("SCHEMATHESIS_COLBERT_KEY", "")
STATS_FILE = os.environ.get("SCHEMATHESIS_COLBERT_STATS", "")

# Responses each check passed, by check and status code.
passed: dict[str, dict[int, int]] = {}


def _passed(check: str, status: int) -> bool:
    counts = passed.setdefault(check, {})
    counts[status] = counts.get(status, 0) + 1
    return True


@atexit.register
def _write_stats() -> None:
    if STATS_FILE:
        with open(STATS_FILE, "w") as f:
            json.dump(passed, f)


# What changes nothing (the server's rule, app/api/security.py, stated again
# here so that the test does not take it from the code it checks).
READ_METHODS = {"GET", "HEAD", "OPTIONS"}
READ_ONLY_POSTS = re.compile(r"/v1/collections/[^/]+/(search|answer)/?|/v1/rerank/?|/api/search/?")


def changes_data(method: str, path: str) -> bool:
    return method.upper() not in READ_METHODS and not (method.upper() == "POST" and READ_ONLY_POSTS.fullmatch(path))


def _connect(database: str) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _wait_for_queued_files(conn: sqlite3.Connection, timeout: float = 60.0) -> None:
    """Uploaded files become documents in the background after their 202;
    the comparison starts once none is queued, so only the call under test
    can change what is stored."""
    deadline = time.monotonic() + timeout
    while conn.execute("SELECT COUNT(*) FROM job_files WHERE state = 'queued'").fetchone()[0]:
        if time.monotonic() > deadline:
            raise AssertionError("uploaded files stayed queued for a minute")
        time.sleep(0.05)


def stored_state(database: str = DATABASE) -> tuple:
    """What a client can see stored: collections, the newest version of each
    document that is not deleted (the index writer only moves older versions
    to 'deleted' and pending ones to live or failed, which this ignores) and
    the jobs, of collections that exist (a deleted collection's rows are
    purged by the writer in the background)."""
    with closing(_connect(database)) as conn:
        _wait_for_queued_files(conn)
        collections = conn.execute("SELECT id, name, description FROM collections ORDER BY id").fetchall()
        documents = conn.execute(
            """SELECT d.collection_id, d.external_id, d.content_hash, d.title, d.metadata
               FROM documents d JOIN collections c ON c.id = d.collection_id
               WHERE d.id = (SELECT MAX(n.id) FROM documents n WHERE n.collection_id = d.collection_id
                               AND n.external_id = d.external_id AND n.state != 'deleted')
               ORDER BY d.collection_id, d.external_id"""
        ).fetchall()
        jobs = conn.execute(
            "SELECT j.id FROM jobs j JOIN collections c ON c.id = j.collection_id ORDER BY j.id"
        ).fetchall()
    return tuple(collections), tuple(documents), tuple(jobs)


# The stored state before the call in flight: (case id, state).
_before: dict[str, tuple] = {}


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    _before.clear()
    _before[case.id] = stored_state()


@schemathesis.check
def error_body_has_the_json_error_shape(ctx, response, case) -> bool | None:
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"a {response.status_code} answered a body that is not JSON: {response.content[:200]!r}"
        ) from None
    error = body.get("error") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or set(body) != {"error"}
        or not isinstance(error, dict)
        or not {"code", "message"} <= set(error) <= {"code", "message", "details"}
        or not isinstance(error["code"], str)
        or not error["code"]
        or not isinstance(error["message"], str)
        or not error["message"]
    ):
        raise AssertionError(
            f'a {response.status_code} body is not {{"error": {{"code": str, "message": str}}}}: {body!r:.300}'
        )
    return _passed("error_shape", response.status_code)


@schemathesis.check
def a_refused_request_changed_nothing_stored(ctx, response, case) -> bool | None:
    if not 400 <= response.status_code < 500 or case.id not in _before:
        return None
    before, after = _before[case.id], stored_state()
    if before != after:
        what = [name for name, b, a in zip(("collections", "documents", "jobs"), before, after) if b != a]
        raise AssertionError(
            f"{response.request.method} {response.request.path_url} answered {response.status_code} "
            f"but changed the stored {', '.join(what)}"
        )
    return _passed("changed_nothing", response.status_code)


@schemathesis.check
def a_read_only_key_cannot_change_data(ctx, response, case) -> bool | None:
    """A documented operation that changes data answers 403 to the read-only
    key; a method no route takes (the unsupported-method probes) may say 405."""
    if not READ_ONLY:
        return None
    request = response.request
    path = request.path_url.split("?", 1)[0]
    if not changes_data(request.method, path) or request.headers.get("Authorization") != f"Bearer {READ_ONLY_KEY}":
        return None
    documented = request.method == case.operation.method.upper()
    if response.status_code != 403 and (documented or response.status_code != 405):
        raise AssertionError(f"{request.method} {path} with a read-only key answered {response.status_code}, not 403")
    return _passed("read_only", response.status_code)
