from __future__ import annotations

import math
import time

from fastapi import APIRouter, Query

from app.api.deps import ServiceDep, SettingsDep
from app.api.schemas import (
    ERROR_RESPONSES,
    CollectionName,
    RerankRequest,
    RerankResponse,
    SearchRequest,
    SearchResponse,
)
from app.validation import COLLECTION_NAME_PATTERN, COLLECTION_NAME_RULE, NOT_BLANK_PATTERN

router = APIRouter(tags=["search"], responses=ERROR_RESPONSES)


def _hit_out(h) -> dict:
    return {
        "document_id": h.hit.document_id,
        "chunk_id": h.hit.chunk_id,
        "chunk_index": h.hit.chunk_index,
        "text": h.hit.text,
        "score": h.score,
        "rank": h.rank,
        "title": h.hit.title,
        "metadata": h.hit.metadata,
        "char_start": h.hit.char_start,
        "char_end": h.hit.char_end,
        "page": h.hit.page,
        "heading": h.hit.heading,
        "field": h.hit.field,
    }


@router.post("/v1/collections/{collection}/search", response_model=SearchResponse)
async def search(collection: CollectionName, body: SearchRequest, service: ServiceDep, settings: SettingsDep):
    started = time.perf_counter()
    hits = await service.search(collection, body.query, body.k, body.retrieval(rerank=body.rerank))
    return {
        "query": body.query,
        "k": body.k,
        "mode": body.mode or settings.search_mode,
        "reranked": service.reranks(body.rerank),
        "results": [_hit_out(h) for h in hits],
        "took_ms": round((time.perf_counter() - started) * 1000, 3),
    }


@router.post("/v1/rerank", response_model=RerankResponse)
async def rerank(body: RerankRequest, service: ServiceDep):
    """Score texts against a query with ColBERT MaxSim; no index needed."""
    scores = await service.rerank(body.query, body.documents)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {
        "query": body.query,
        "results": [{"index": i, "score": scores[i], "text": body.documents[i]} for i in order],
    }


@router.get("/api/search", tags=["compat"])
async def reference_search(
    service: ServiceDep,
    settings: SettingsDep,
    query: str = Query(min_length=1, max_length=10_000, json_schema_extra={"pattern": NOT_BLANK_PATTERN}),
    k: int = Query(default=10, ge=1, le=1000),
    collection: str | None = Query(
        default=None,
        pattern=COLLECTION_NAME_PATTERN,
        description=f"{COLLECTION_NAME_RULE}; defaults to the server's default collection",
    ),
):
    """The ColBERT reference server's format (``/api/search?query=&k=``)."""
    hits = await service.search(collection or settings.default_collection, query, k)
    scores = [h.score for h in hits]
    top = max(scores, default=0.0)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps) or 1.0
    return {
        "query": query,
        "topk": [
            {
                "text": h.hit.text,
                "pid": h.hit.passage_id,
                "rank": h.rank,
                "score": h.score,
                "prob": e / total,
                "document_id": h.hit.document_id,
                "chunk_index": h.hit.chunk_index,
            }
            for h, e in zip(hits, exps)
        ],
    }
