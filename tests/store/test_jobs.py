"""Upload jobs: the job-state rule, and the queue in the store."""

from __future__ import annotations

import pytest

from app.errors import JobNotFound
from app.store.jobs import NewJobFile, job_state, summarise_job


@pytest.mark.parametrize(
    ("files", "queued", "failed", "attempts", "indexing", "state"),
    [
        (2, 2, 0, 0, 0, "queued"),  # nothing tried yet
        (2, 2, 0, 1, 0, "running"),  # a file failed once and waits for its retry
        (2, 1, 0, 0, 0, "running"),
        (2, 0, 0, 0, 1, "running"),  # extracted, its document not yet indexed
        (2, 0, 2, 2, 0, "failed"),
        (2, 0, 1, 1, 0, "done"),  # partly failed is done: the files say which
        (1, 0, 0, 0, 0, "done"),
    ],
)
def test_job_state_rule(files, queued, failed, attempts, indexing, state):
    assert job_state(files, queued, failed, attempts, indexing) == state


async def test_a_job_is_stored_whole_and_drained_in_order(store):
    c = (await store.create_collection("docs", None)).id
    job = await store.jobs.create(
        c,
        [
            NewJobFile("a.txt", "a.txt", {"team": "x"}, b"alpha"),
            NewJobFile("b.exe", "b.exe", {}, b"MZ", error="unsupported file type"),
            NewJobFile("c.txt", "c.txt", {}, b"gamma"),
        ],
    )
    status = summarise_job(await store.jobs.get(job))
    assert status["state"] == "running"  # one file is already settled (refused at upload)
    assert status["counts"] == {"queued": 2, "added": 0, "unchanged": 0, "failed": 1}
    assert [f["error"] for f in status["files"]] == [None, "unsupported file type", None]
    first = await store.jobs.next_queued()
    assert (first.filename, first.data, first.metadata, first.collection_id) == ("a.txt", b"alpha", '{"team": "x"}', c)
    await store.jobs.fail_file(first.id, "boom", final=False)  # counted, still queued
    again = await store.jobs.next_queued()
    assert (again.id, again.attempts) == (first.id, 1)
    assert summarise_job(await store.jobs.get(job))["state"] == "running"
    await store.jobs.fail_file(first.id, "boom", final=True)
    third = await store.jobs.next_queued()
    assert third.filename == "c.txt"
    await store.jobs.fail_file(third.id, "bad", final=True)
    assert await store.jobs.next_queued() is None
    status = summarise_job(await store.jobs.get(job))
    assert status["state"] == "failed" and status["files_done"] == 3


async def test_unknown_job(store):
    with pytest.raises(JobNotFound):
        await store.jobs.get("nope")
