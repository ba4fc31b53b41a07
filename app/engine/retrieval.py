"""How a search, or an answer's retrieval, ranks: one value from the request
to the searcher (the HTTP routes, the service facade and the answer service
pass it on whole)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Retrieval:
    """``mode``: colbert | dense | keyword | hybrid (None: the settings'
    default); ``where``: a metadata filter applied before ranking;
    ``fusion`` and ``weights`` (hybrid): how the signals' scores make one;
    ``fields`` and ``field_weights``: the document fields searched and each
    one's weight (:mod:`app.engine.fields`); ``rerank``: False skips the
    rerank stage (None: on when a reranker is configured)."""

    mode: str | None = None
    where: dict | None = None
    fusion: str | None = None
    weights: dict[str, float] | None = None
    fields: list[str] | None = None
    field_weights: dict[str, float] | None = None
    rerank: bool | None = None


DEFAULT = Retrieval()
