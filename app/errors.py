"""The project's own errors; one HTTP handler maps them to status codes."""

from __future__ import annotations

from collections.abc import Iterator


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it or what it interrupted, and so on (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


class ServerError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, details=None):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(ServerError):
    status_code = 422
    code = "invalid_input"


class NotFound(ServerError):
    status_code = 404
    code = "not_found"


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class DocumentNotFound(NotFound):
    code = "document_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class CheckpointNotFound(NotFound):
    code = "checkpoint_not_found"


class Conflict(ServerError):
    status_code = 409
    code = "conflict"


class CollectionExists(ServerError):
    status_code = 409
    code = "collection_exists"


class PayloadTooLarge(ServerError):
    status_code = 413
    code = "payload_too_large"


class NotReady(ServerError):
    status_code = 503
    code = "not_ready"


class BackendUnavailable(ServerError):
    """The index backend (a Qdrant cluster) did not answer, or failed:
    ``transient`` when retrying later may succeed (unreachable, 5xx, 429)."""

    status_code = 503
    code = "backend_unavailable"

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient  # (a machine's fault to the index writer either way)


class IndexingFailed(ServerError):
    status_code = 500
    code = "indexing_failed"
