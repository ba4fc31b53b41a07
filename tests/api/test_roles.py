"""SERVER_ROLE on the single-node catalog: an ``api`` process serves and
never indexes; a process of another role on the same data directory does."""

from __future__ import annotations

import asyncio

import pytest

from tests.api.test_api import create, search
from tests.conftest import RunningApp, make_settings

pytestmark = pytest.mark.slow


async def test_an_api_process_serves_what_an_ingest_process_indexes(tmp_path, checkpoint_dir):
    api = RunningApp(make_settings(tmp_path, checkpoint_dir, server_role="api"))
    await api.start()
    ingest = None
    try:
        ready = (await api.client.get("/ready")).json()
        assert ready["writer"]["alive"] is False  # ready without a writer of its own
        await create(api.client, "roles")
        body = {"documents": [{"id": "r", "text": "The ingest role indexes what the api role accepts."}], "wait": False}
        r = await api.client.post("/v1/collections/roles/documents", json=body)
        assert r.status_code == 202, r.text
        await asyncio.sleep(1.5)
        assert (await api.client.get("/v1/collections/roles")).json()["pending_documents"] == 1  # nobody indexes
        ingest = RunningApp(make_settings(tmp_path, checkpoint_dir, server_role="ingest"))
        await ingest.start()
        for _ in range(100):
            if (await api.client.get("/v1/collections/roles")).json()["pending_documents"] == 0:
                break
            await asyncio.sleep(0.1)
        hits = await search(api.client, "roles", "which role indexes", k=1)
        assert hits[0]["document_id"] == "r"
    finally:
        if ingest is not None:
            await ingest.stop()
        await api.stop()
