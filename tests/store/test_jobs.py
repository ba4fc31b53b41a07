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
    await store.jobs.begin_attempt(first.id)  # counted before it runs, still queued
    again = await store.jobs.next_queued()
    assert (again.id, again.attempts) == (first.id, 1)
    assert summarise_job(await store.jobs.get(job))["state"] == "running"
    await store.jobs.fail_file(first.id, "boom")
    third = await store.jobs.next_queued()
    assert third.filename == "c.txt"
    await store.jobs.begin_attempt(third.id)
    await store.jobs.fail_file(third.id, "bad")
    assert await store.jobs.next_queued() is None
    status = summarise_job(await store.jobs.get(job))
    assert status["state"] == "failed" and status["files_done"] == 3


async def test_unknown_job(store):
    with pytest.raises(JobNotFound):
        await store.jobs.get("nope")


class FakeChunker:
    """A fake document preparer (the runner's chunking is not under test)."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def prepare(self, docs):
        from app.ingest.chunking import Passage
        from app.store.store import NewDocument

        if self.fail:
            raise RuntimeError("a chunker bug")
        return [NewDocument(d.id, d.title, d.metadata, d.text, [Passage(d.text, 0, len(d.text))]) for d in docs]


def runner(store, tmp_path, preparer):
    from app.ingest.jobs import JobRunner
    from app.settings import Settings

    settings = Settings(_env_file=None, data_dir=tmp_path)
    return JobRunner(settings, store, preparer, notify=lambda: None, is_writer=lambda: True)


async def test_an_attempt_is_counted_before_it_runs_so_a_file_that_never_finishes_fails(store, tmp_path):
    from app.ingest.jobs import MAX_FILE_ATTEMPTS

    c = (await store.create_collection("docs", None)).id
    job = await store.jobs.create(
        c, [NewJobFile("a.txt", "a.txt", {}, b"alpha"), NewJobFile("b.txt", "b.txt", {}, b"b")]
    )
    first = await store.jobs.next_queued()
    for _ in range(MAX_FILE_ATTEMPTS):  # each attempt began, and the process died during it
        await store.jobs.begin_attempt(first.id)
    jobs = runner(store, tmp_path, FakeChunker())
    try:
        await jobs.process(await store.jobs.next_queued())
        await jobs.process(await store.jobs.next_queued())
    finally:
        jobs.close()
    files = {f["filename"]: f for f in summarise_job(await store.jobs.get(job))["files"]}
    assert files["a.txt"]["state"] == "failed" and "did not finish" in files["a.txt"]["error"]
    assert files["b.txt"]["state"] != "failed" and files["b.txt"]["error"] is None  # extracted, handed to the writer
    assert await store.jobs.next_queued() is None


async def test_a_chunking_error_is_retried_a_bounded_number_of_times(store, tmp_path, monkeypatch):
    import app.ingest.jobs as jobs_module

    monkeypatch.setattr(jobs_module.asyncio, "sleep", _no_sleep)
    c = (await store.create_collection("docs", None)).id
    job = await store.jobs.create(c, [NewJobFile("a.txt", "a.txt", {}, b"alpha")])
    jobs = runner(store, tmp_path, FakeChunker(fail=True))
    try:
        for _ in range(jobs_module.MAX_FILE_ATTEMPTS):
            await jobs.process(await store.jobs.next_queued())
    finally:
        jobs.close()
    [file] = summarise_job(await store.jobs.get(job))["files"]
    assert file["state"] == "failed" and "RuntimeError" in file["error"]
    assert await store.jobs.next_queued() is None


async def _no_sleep(seconds):
    return None


async def test_uploads_take_turns_so_a_large_one_does_not_hold_back_a_later_one(store):
    c = (await store.create_collection("docs", None)).id
    big = await store.jobs.create(c, [NewJobFile(f"big{i}.txt", f"big{i}", {}, b"x") for i in range(6)])
    small = await store.jobs.create(c, [NewJobFile(f"small{i}.txt", f"small{i}", {}, b"y") for i in range(2)])
    served: dict[str, int] = {}
    order = []
    while (item := await store.jobs.next_queued(served)) is not None:
        order.append(item.filename)
        await store.jobs.fail_file(item.id, "done with it")
    assert order == ["big0.txt", "small0.txt", "big1.txt", "small1.txt", "big2.txt", "big3.txt", "big4.txt", "big5.txt"]
    assert served == {}  # jobs with nothing queued are forgotten
    assert big != small
