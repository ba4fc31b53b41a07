"""Search modes and fusion: ``colbert`` (late interaction through the index
backend), ``keyword`` (BM25 over the store's full-text index) and ``hybrid``
(both, fused or rescored), each after the metadata filter, joined back to
chunk text and document fields from the store."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.backend import SearchRequest, SearchResult
from app.engine.rerank import Reranker
from app.engine.snapshots import CachedSnapshot, SnapshotCache
from app.errors import InvalidInput
from app.ingest.pipeline import passage_text
from app.observability import EngineMetrics
from app.settings import Settings
from app.store.filters import compile_filter
from app.store.store import Hit, Store

MODES = ("colbert", "keyword", "hybrid")
FUSIONS = ("rescore", "rrf", "normalized")
HYBRID_DEPTH = 50  # candidates taken from each ranking before fusing
RRF_K = 60

Ranking = list[tuple[int, float]]  # (passage id, score), best first


@dataclass
class SearchHit:
    hit: Hit
    score: float
    rank: int


def fuse(dense: Ranking, sparse: Ranking, method: str) -> Ranking:
    """Fuse two rankings of passage ids: reciprocal rank fusion, or the mean of
    min-max normalised scores (a passage missing from one ranking gets 0 there)."""
    fused: dict[int, float] = {}
    if method == "rrf":
        for ranking in (dense, sparse):
            for rank, (pid, _) in enumerate(ranking):
                fused[pid] = fused.get(pid, 0.0) + 1.0 / (RRF_K + rank + 1)
    elif method == "normalized":
        for ranking in (dense, sparse):
            if not ranking:
                continue
            scores = [s for _, s in ranking]
            low, high = min(scores), max(scores)
            span = (high - low) or 1.0
            for pid, s in ranking:
                fused[pid] = fused.get(pid, 0.0) + 0.5 * (s - low) / span
    else:
        raise InvalidInput(f"unknown fusion {method!r}; use rrf or normalized")
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


class Searcher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        snapshots: SnapshotCache,
        encoder,
        run: Callable[..., Awaitable[Any]],
        metrics: EngineMetrics,
        reranker: Reranker | None = None,
    ):
        self.settings = settings
        self.store = store
        self.snapshots = snapshots
        self.encoder = encoder
        self._run = run  # runs model calls and index scoring on the search thread
        self.metrics = metrics
        self.reranker = reranker

    def request(self, k: int) -> SearchRequest:
        s = self.settings
        return SearchRequest(k, s.ncells, s.centroid_score_threshold, s.ndocs)

    def _score(self, query: str, k: int, cached: CachedSnapshot, allowed: torch.Tensor | None) -> SearchResult:
        started = time.perf_counter()
        Q = self.encoder.encode_queries([query])
        self.metrics.query_encode_seconds.observe(time.perf_counter() - started)
        return cached.snapshot.search(Q, self.request(k), cached.alive, allowed)

    async def _colbert(self, query: str, depth: int, collection_id: int, cached: CachedSnapshot, where) -> Ranking:
        allowed = None
        if where is not None:
            allowed = torch.tensor(await self.store.allowed_passage_ids(collection_id, where), dtype=torch.int64)
        result = await self._run(self._score, query, depth, cached, allowed)
        return list(zip(result.passage_ids, result.scores))

    async def _rescore(self, query: str, k: int, cached: CachedSnapshot, dense: Ranking, sparse: Ranking) -> Ranking:
        """ColBERT's exact MaxSim ranks the union of both candidate lists:
        keyword recall, late-interaction precision."""
        union = torch.tensor(sorted({pid for pid, _ in dense} | {pid for pid, _ in sparse}), dtype=torch.int64)
        if not union.numel():
            return []
        result = await self._run(self._score, query, k, cached, union)
        return list(zip(result.passage_ids, result.scores))

    async def _rerank(self, query: str, hits: list[SearchHit], k: int) -> list[SearchHit]:
        """The top ``k`` of ``hits`` by the reranker's scores, which replace
        retrieval's (equal scores keep retrieval's order). The reranker reads
        what the encoder read: the title, then the chunk."""
        if not hits or self.reranker is None:
            return hits[:k]
        texts = [passage_text(h.hit.title, h.hit.text) for h in hits]
        scores = await self._run(self.reranker.score, query, texts)
        order = sorted(range(len(hits)), key=lambda i: -scores[i])[:k]
        return [SearchHit(hits[i].hit, scores[i], rank) for rank, i in enumerate(order, 1)]

    async def search(
        self,
        name: str,
        query: str,
        k: int,
        mode: str = "colbert",
        where: dict | None = None,
        fusion: str | None = None,
        rerank: bool | None = None,
    ) -> list[SearchHit]:
        """Ranked chunks. ``mode``: colbert | keyword | hybrid; ``where``: a
        metadata filter applied before ranking; ``fusion`` (hybrid): rrf,
        normalized, or rescore; ``rerank``: False skips the rerank stage
        (None: on when a reranker is configured)."""
        if not query or not query.strip():
            raise InvalidInput("query is empty")
        started = time.perf_counter()
        fusion = fusion or self.settings.hybrid_fusion
        collection_id, cached = await self.snapshots.get(name)
        if mode not in MODES:
            raise InvalidInput(f"unknown search mode {mode!r}")
        if where is not None:
            compile_filter(where)  # refuse a bad filter before any work
        reranking = self.reranker is not None and rerank is not False
        wanted, k = k, (max(k, self.settings.rerank_depth) if reranking else k)  # retrieval's k: the candidates
        depth = k if mode != "hybrid" else max(2 * k, HYBRID_DEPTH)
        dense = await self._colbert(query, depth, collection_id, cached, where) if mode != "keyword" else []
        sparse = await self.store.keyword_search(collection_id, query, depth, where) if mode != "colbert" else []
        if mode == "colbert":
            ranked = dense
        elif mode == "keyword":
            ranked = sparse
        elif fusion == "rescore":
            ranked = await self._rescore(query, k, cached, dense, sparse)
        else:
            ranked = fuse(dense, sparse, fusion)[:k]
        hits = await self.store.fetch_hits(collection_id, [pid for pid, _ in ranked])
        out: list[SearchHit] = []
        for pid, score in ranked:
            hit = hits.get(pid)
            if hit is not None:  # deleted between scoring and the join
                out.append(SearchHit(hit, float(score), len(out) + 1))
        if reranking:
            out = await self._rerank(query, out, wanted)
        self.metrics.search_seconds.labels(mode).observe(time.perf_counter() - started)
        return out
