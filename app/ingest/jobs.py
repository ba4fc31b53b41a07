"""Upload jobs: files stored durably with the job, then extracted, chunked and
queued for the index writer one at a time, in the writer process only (so two
processes never add the same file)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.errors import CollectionNotFound, InvalidInput
from app.ingest.extract import ExtractionError, safe_filename
from app.ingest.pipeline import DocumentInput, DocumentPreparer
from app.ingest.sandbox import ExtractionSandbox
from app.settings import Settings
from app.store.jobs import NewJobFile, QueuedFile
from app.store.store import Store

logger = logging.getLogger("app.ingest")

MAX_FILE_ATTEMPTS = 3


@dataclass
class UploadedFile:
    filename: str
    data: bytes | None  # None when refused before reading (too large)
    document_id: str | None = None
    error: str | None = None


def job_files(files: list[UploadedFile], metadata: dict | None) -> list[NewJobFile]:
    """The rows of a new job: files refused up front carry their reason."""
    if not files:
        raise InvalidInput("no files in the upload")
    rows, seen = [], set()
    for f in files:
        error, filename = f.error, f.filename
        try:
            filename = safe_filename(f.filename or "")
        except ExtractionError as exc:
            error = error or exc.reason
        document_id = f.document_id or filename
        if not error and document_id in seen:
            error = f"another file of this upload has the document id {document_id!r}"
        if not error and not f.data:
            error = "the file is empty"
        seen.add(document_id)
        rows.append(NewJobFile(filename or "(no name)", document_id or "(no name)", metadata or {}, f.data, error))
    return rows


class JobRunner:
    """Drains queued upload files while this process holds the writer lease."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        preparer: DocumentPreparer,
        notify: Callable[[], None],
        is_writer: Callable[[], bool],
        index: Callable[[QueuedFile, list], Awaitable[None]] | None = None,
    ):
        self.settings = settings
        self.store = store
        self.preparer = preparer
        self.notify = notify
        self.is_writer = is_writer
        # Where a file's prepared document goes: by default the store's
        # pending rows, which the index writer takes (the stateless tier: Qdrant).
        self.index = index or self._insert_pending
        self._served: dict[str, int] = {}  # files taken per job with files still queued: uploads take turns
        self.sandbox = ExtractionSandbox(
            settings.extract_timeout_s, settings.extract_memory_mb * 1024 * 1024, settings.extract_nice
        )

    async def run(self) -> None:
        while True:
            try:
                if not self.is_writer():
                    await asyncio.sleep(0.5)
                    continue
                item = await self.store.jobs.next_queued(self._served)
                if item is None:
                    await asyncio.sleep(0.1)
                    continue
                await self.process(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("job runner step failed")
                await asyncio.sleep(1.0)

    async def process(self, item: QueuedFile) -> None:
        if item.attempts >= MAX_FILE_ATTEMPTS:  # earlier attempts never finished: the process stopped during them
            await self.store.jobs.fail_file(
                item.id,
                f"processing did not finish in {item.attempts} attempts (the server stopped, or the store failed, "
                "during each)",
            )
            return
        await self.store.jobs.begin_attempt(item.id)
        try:
            extracted = await asyncio.to_thread(
                self.sandbox.extract, item.filename, item.data, self.settings.max_file_bytes
            )
            if len(extracted.text) > self.settings.max_document_chars:
                raise ExtractionError(
                    f"the extracted text has {len(extracted.text):,} characters; the limit is {self.settings.max_document_chars:,}"
                )
            metadata = {**json.loads(item.metadata), "filename": item.filename, "media_type": extracted.media_type}
            doc = DocumentInput(item.document_id, extracted.text, None, metadata, extracted.sections)
            prepared = await asyncio.to_thread(self.preparer.prepare, [doc])
        except ExtractionError as exc:
            await self.store.jobs.fail_file(item.id, exc.reason)
            return
        except Exception as exc:  # unexpected (chunking, the store): retried a bounded number of times
            logger.exception("processing %s failed (attempt %d)", item.filename, item.attempts + 1)
            if item.attempts + 1 >= MAX_FILE_ATTEMPTS:
                await self.store.jobs.fail_file(item.id, f"processing failed: {type(exc).__name__}: {exc}"[:500])
            await asyncio.sleep(min(2**item.attempts, 10))
            return
        await self.index(item, prepared)

    async def _insert_pending(self, item: QueuedFile, prepared: list) -> None:
        try:
            await self.store.insert_pending(item.collection_id, prepared, job_file=item.id)
        except CollectionNotFound:
            await self.store.jobs.fail_file(item.id, "the collection was deleted")
            return
        self.notify()

    def close(self) -> None:
        self.sandbox.close()
