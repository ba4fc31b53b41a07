"""Upserts: validate a batch, chunk it, store it pending, and (``wait``) wait
until the index writer has committed it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from app.errors import IndexingFailed, InvalidInput
from app.ingest.pipeline import DocumentInput, DocumentPreparer
from app.settings import Settings
from app.store.store import Store
from app.validation import check_fields, check_metadata

# A document row's state, as an upsert result reports it.
RESULT_STATUS = {"live": "indexed", "deleted": "superseded"}
# Upserts of at most this many documents skip the queue of bulk loads.
PRIORITY_MAX_DOCUMENTS = 16


class DocumentIngest:
    def __init__(self, settings: Settings, store: Store, preparer: DocumentPreparer, notify: Callable[[], None]):
        self.settings = settings
        self.store = store
        self.preparer = preparer
        self.notify = notify  # wakes the index writer

    def validate(self, docs: list[DocumentInput]) -> None:
        """Refuse a bad batch whole, before anything is stored; assign ids."""
        if not docs:
            raise InvalidInput("documents must not be empty")
        if len(docs) > self.settings.max_batch_documents:
            raise InvalidInput(f"at most {self.settings.max_batch_documents} documents per request")
        seen: set[str] = set()
        for i, doc in enumerate(docs):
            if not doc.text or not doc.text.strip():
                raise InvalidInput(f"documents[{i}].text is empty")
            if len(doc.text) > self.settings.max_document_chars:
                raise InvalidInput(
                    f"documents[{i}].text has {len(doc.text)} characters; the limit is {self.settings.max_document_chars}"
                )
            try:  # every way in (HTTP, multipart, CLI) stores only what SQLite's JSON functions can read
                check_metadata(doc.metadata, f"documents[{i}].metadata")
                check_fields(doc.fields, f"documents[{i}].fields")
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            if doc.fields:  # one document's work is bounded whatever its fields
                total = len(doc.text) + sum(len(v) for v in doc.fields.values())
                if total > self.settings.max_document_chars:
                    raise InvalidInput(
                        f"documents[{i}] has {total} characters in its text and fields; "
                        f"the limit is {self.settings.max_document_chars}"
                    )
            if doc.id is None:
                doc.id = uuid.uuid4().hex
            if doc.id in seen:
                raise InvalidInput(f"duplicate document id {doc.id!r} in one batch")
            seen.add(doc.id)

    async def upsert(self, collection_id: int, docs: list[DocumentInput], wait: bool = True) -> list[dict]:
        self.validate(docs)
        prepared = await asyncio.to_thread(self.preparer.prepare, docs)  # tokenizer only: not the model thread
        # A small upsert is indexed before documents of bulk loads queued earlier.
        priority = 1 if len(docs) <= PRIORITY_MAX_DOCUMENTS else 0
        inserted = await self.store.insert_pending(collection_id, prepared, priority=priority)
        self.notify()
        results = [
            {"id": ext, "status": "unchanged" if row is None else "pending", "row": row} for ext, row in inserted
        ]
        if wait:
            await self._wait_indexed(results)
        for r in results:
            r.pop("row")
        return results

    async def _wait_indexed(self, results: list[dict]) -> None:
        waiting = {r["row"]: r for r in results if r["row"] is not None}
        deadline = time.monotonic() + self.settings.upsert_wait_timeout_s
        delay = 0.01
        while waiting and time.monotonic() < deadline:
            states = await self.store.document_states(list(waiting))
            for row_id in list(waiting):
                state, error = states.get(row_id, ("deleted", None))  # purged: superseded or deleted
                if state == "pending":
                    continue
                result = waiting.pop(row_id)
                result["status"] = RESULT_STATUS.get(state, state)
                if error:
                    result["error"] = error
            if waiting:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.1)
        failed = [r["id"] for r in results if r.get("status") == "failed"]
        if failed:
            raise IndexingFailed(f"indexing failed for {len(failed)} document(s)", details={"ids": failed[:20]})
