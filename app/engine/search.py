"""Search modes and fusion, each after the metadata filter, joined back to
chunk text and document fields from the store.

Three signals: ``colbert`` (late interaction, MaxSim through the index
backend), ``dense`` (the cosine of the encoder's pooled sentence vector, made
by the same forward pass as the token vectors; a checkpoint without a pooled
head has none) and ``keyword`` (BM25 over the store's full-text index). A mode
is one signal, or ``hybrid``: candidates from each weighted signal, every
candidate scored exactly by each vector signal, and one score from them
(weighted min-max normalised sum, weighted reciprocal rank, or MaxSim alone
over the union: ``rescore``), in the manner of BGE-M3's combined scores.

A choice of document fields (:mod:`app.engine.fields`) restricts the
candidates like the metadata filter, and its weights re-rank the hits last."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.backend import SearchRequest
from app.engine.encoders import Encoders
from app.engine.fields import FieldChoice
from app.engine.rerank import Reranker
from app.engine.retrieval import DEFAULT, Retrieval
from app.engine.snapshots import CachedSnapshot, SnapshotCache
from app.errors import InvalidInput
from app.ingest.pipeline import passage_text
from app.observability import EngineMetrics
from app.settings import Settings
from app.store.filters import compile_filter
from app.store.store import Hit, Store

MODES = ("colbert", "dense", "keyword", "hybrid")
FUSIONS = ("normalized", "sum", "rrf", "rescore")
SIGNALS = ("colbert", "dense", "keyword")
RRF_K = 60

Ranking = list[tuple[int, float]]  # (passage id, score), best first


@dataclass
class SearchHit:
    hit: Hit
    score: float
    rank: int


def fuse(signals: dict[str, Ranking], weights: dict[str, float], method: str) -> Ranking:
    """One ranking from several signals' scored lists, each weighted.

    ``normalized``: the weighted mean of each signal's min-max normalised
    score (a passage missing from a signal's list gets 0 there); ``sum``: the
    weighted mean of the scores as they are (BGE-M3's combination; the
    caller puts them on comparable scales: cosines, and keyword scores
    relative to the best one); ``rrf``: weighted reciprocal rank fusion.
    Ties are broken by passage id."""
    if method not in ("normalized", "sum", "rrf"):
        raise InvalidInput(f"unknown fusion {method!r}; use {', '.join(FUSIONS)}")
    total = sum(weights.get(name, 0.0) for name in signals) or 1.0
    fused: dict[int, float] = {}
    for name, ranking in signals.items():
        weight = weights.get(name, 0.0) / total
        for pid, _ in ranking:
            fused.setdefault(pid, 0.0)
        if not ranking or weight <= 0:
            continue
        if method == "rrf":
            ordered = sorted(ranking, key=lambda item: (-item[1], item[0]))
            for rank, (pid, _) in enumerate(ordered):
                fused[pid] += weight / (RRF_K + rank + 1)
            continue
        scores = [score for _, score in ranking]
        low, high = (min(scores), max(scores)) if method == "normalized" else (0.0, 1.0)
        span = (high - low) or 1.0
        for pid, score in ranking:
            fused[pid] += weight * (score - low) / span
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def maxsim_scale(Q: torch.Tensor, fusion: str) -> float:
    """What MaxSim is multiplied by in a ``sum`` fusion: it sums a cosine per
    query vector, so per vector it is on the dense cosine's scale."""
    return 1.0 / max(int((Q[0].abs().sum(-1) > 0).sum()), 1) if fusion == "sum" else 1.0


@dataclass(frozen=True)
class Plan:
    """What one search computes: the signals that give candidates and count in the score."""

    mode: str
    weights: dict[str, float]  # signal -> weight (> 0 only)
    fusion: str
    depth: int  # candidates taken from each signal

    def uses(self, signal: str) -> bool:
        return self.weights.get(signal, 0.0) > 0


class Searcher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        snapshots: SnapshotCache,
        encoders: Encoders,
        run: Callable[..., Awaitable[Any]],
        metrics: EngineMetrics,
        reranker: Reranker | None = None,
    ):
        self.settings = settings
        self.store = store
        self.snapshots = snapshots
        self.encoders = encoders  # each collection's queries are encoded with its index's checkpoint
        self._run = run  # runs model calls and index scoring on the search thread
        self.metrics = metrics
        self.reranker = reranker

    def request(self, k: int, query: str | None = None, q: torch.Tensor | None = None) -> SearchRequest:
        s = self.settings
        return SearchRequest(k, s.ncells, s.centroid_score_threshold, s.ndocs, dense=q, text=query)

    @property
    def has_dense(self) -> bool:
        """Whether the encoder yields a dense vector (a pooled head)."""
        return bool(getattr(self.encoders.default, "dense_dim", None))

    def default_weights(self) -> dict[str, float]:
        s = self.settings
        return {"colbert": s.hybrid_weight_colbert, "dense": s.hybrid_weight_dense, "keyword": s.hybrid_weight_keyword}

    def plan(self, k: int, mode: str | None, fusion: str | None, weights: dict[str, float] | None) -> Plan:
        """The request's mode, fusion and weights, settings filling what it
        leaves out; refused when they cannot be served."""
        mode = mode or self.settings.search_mode
        if mode not in MODES:
            raise InvalidInput(f"unknown search mode {mode!r}; use {', '.join(MODES)}")
        if mode == "dense" and not self.has_dense:
            raise InvalidInput("dense search needs a checkpoint with a pooled sentence vector; this one has none")
        fusion = fusion or self.settings.hybrid_fusion
        if fusion not in FUSIONS:
            raise InvalidInput(f"unknown fusion {fusion!r}; use {', '.join(FUSIONS)}")
        if mode != "hybrid":
            return Plan(mode, {mode: 1.0}, fusion, k)
        chosen = (
            self.default_weights() if weights is None else {name: float(weights.get(name, 0.0)) for name in SIGNALS}
        )
        if not self.has_dense:
            chosen["dense"] = 0.0  # no pooled head: hybrid without the dense signal
        chosen = {name: w for name, w in chosen.items() if w > 0}
        if not chosen:
            raise InvalidInput("hybrid search needs a positive weight for at least one available signal")
        return Plan(mode, chosen, fusion, max(2 * k, self.settings.hybrid_depth))

    def _encode(self, query: str, checkpoint: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query encoded with ``checkpoint``: the one the searched
        index was encoded with (a re-index swaps both in one commit)."""
        started = time.perf_counter()
        Q, q = self.encoders.get(checkpoint).encode_query(query)
        self.metrics.query_encode_seconds.observe(time.perf_counter() - started)
        return Q, q

    def _vector_signals(
        self,
        query: str,
        plan: Plan,
        cached: CachedSnapshot,
        allowed: torch.Tensor | None,
        keyword: Ranking,
        k: int,
    ) -> dict[str, Ranking]:
        """On the search thread: the query encoded once, each vector
        signal's candidates, then (hybrid) the exact colbert and dense scores
        of every candidate of any signal, so that each signal scores the
        same set."""
        Q, q = self._encode(query, cached.checkpoint)
        snapshot, alive = cached.snapshot, cached.alive
        if plan.mode == "colbert":
            result = snapshot.search(Q, self.request(k, query, q), alive, allowed)
            return {"colbert": list(zip(result.passage_ids, result.scores))}
        if plan.mode == "dense":
            assert q is not None
            result = snapshot.dense_search(q, k, alive, allowed)
            return {"dense": list(zip(result.passage_ids, result.scores))}
        union = {pid for pid, _ in keyword}
        if plan.uses("colbert"):
            result = snapshot.search(Q, self.request(plan.depth, query, q), alive, allowed)
            union.update(result.passage_ids)
        if plan.uses("dense") and q is not None:
            result = snapshot.dense_search(q, plan.depth, alive, allowed)
            union.update(result.passage_ids)
        if not union:
            return {}
        candidates = torch.tensor(sorted(union), dtype=torch.int64)
        signals: dict[str, Ranking] = {}
        if plan.uses("colbert") or plan.fusion == "rescore":
            exact = snapshot.search(Q, self.request(len(union), query, q), alive, candidates)
            per_vector = maxsim_scale(Q, plan.fusion)
            signals["colbert"] = [(pid, score * per_vector) for pid, score in zip(exact.passage_ids, exact.scores)]
        if plan.uses("dense") and q is not None:
            scores = snapshot.dense_scores(q, candidates)
            signals["dense"] = [(int(p), float(v)) for p, v in zip(candidates, scores) if not torch.isnan(v)]
        return signals

    async def _rerank(self, query: str, hits: list[SearchHit], k: int) -> list[SearchHit]:
        """The top ``k`` of ``hits`` by the reranker's scores, which replace
        retrieval's (equal scores keep retrieval's order). The reranker reads
        what the encoder read: the title, then the chunk."""
        if not hits or self.reranker is None:
            return hits[:k]
        texts = [passage_text(h.hit.title, h.hit.text, h.hit.field) for h in hits]
        scores = await self._run(self.reranker.score, query, texts)
        order = sorted(range(len(hits)), key=lambda i: -scores[i])[:k]
        return [SearchHit(hits[i].hit, scores[i], rank) for rank, i in enumerate(order, 1)]

    async def search(self, name: str, query: str, k: int, retrieval: Retrieval = DEFAULT) -> list[SearchHit]:
        """Ranked chunks, retrieved as ``retrieval`` says (:class:`Retrieval`).
        Field weights apply first and choose which candidates the reranker
        sees; the reranker's order is the answer."""
        wanted = k
        started = time.perf_counter()
        where = retrieval.where
        choice, reranking, k, plan = self.prepare(query, k, retrieval)
        collection_id, cached = await self.snapshots.get(name)
        if where is not None:
            compile_filter(where)  # refuse a bad filter before any work
        keyword: Ranking = []
        if plan.uses("keyword"):
            keyword = await self.store.keyword_search(collection_id, query, plan.depth, where, choice.filter)
        signals: dict[str, Ranking] = {"keyword": keyword} if plan.uses("keyword") else {}
        if plan.mode != "keyword":
            allowed = None
            if where is not None or choice.filter.restricts:
                ids = await self.store.allowed_passage_ids(collection_id, where, choice.filter)
                allowed = torch.tensor(ids, dtype=torch.int64)
            signals.update(await self._run(self._vector_signals, query, plan, cached, allowed, keyword, k))
        ranked = self.rank(plan, signals, k)
        hits = await self.store.fetch_hits(collection_id, [pid for pid, _ in ranked])
        out: list[SearchHit] = []
        for pid, score in ranked:
            hit = hits.get(pid)
            if hit is not None:  # deleted between scoring and the join
                out.append(SearchHit(hit, float(score), len(out) + 1))
        return await self.finish(query, out, choice, reranking, wanted, plan, started)

    def prepare(self, query: str, k: int, retrieval: Retrieval) -> tuple[FieldChoice, bool, int, Plan]:
        """(field choice, whether the reranker runs, retrieval's k, plan):
        retrieval goes deeper than ``k`` when field weights re-rank, or a
        reranker re-scores, the candidates."""
        if not query or not query.strip():
            raise InvalidInput("query is empty")
        choice = FieldChoice.of(retrieval.fields, retrieval.field_weights)
        reranking = self.reranker is not None and retrieval.rerank is not False
        k = max(choice.depth(k), self.settings.rerank_depth if reranking else k)
        return choice, reranking, k, self.plan(k, retrieval.mode, retrieval.fusion, retrieval.weights)

    @staticmethod
    def rank(plan: Plan, signals: dict[str, Ranking], k: int) -> Ranking:
        """The top ``k`` from the signals' scored candidates, as the plan says."""
        if plan.mode != "hybrid":
            return signals.get(plan.mode, [])[:k]
        if plan.fusion == "rescore":  # exact MaxSim ranks every signal's candidates
            return signals.get("colbert", [])[:k]
        keyword = signals.get("keyword")
        if plan.fusion == "sum" and keyword:  # BM25 is unbounded: relative to the query's best match
            best = max(score for _, score in keyword) or 1.0
            signals = {**signals, "keyword": [(pid, score / best) for pid, score in keyword]}
        return fuse(signals, plan.weights, plan.fusion)[:k]

    async def finish(
        self,
        query: str,
        hits: list[SearchHit],
        choice: FieldChoice,
        reranking: bool,
        wanted: int,
        plan: Plan,
        started: float,
    ) -> list[SearchHit]:
        """The ``wanted`` hits: field weights first, then the reranker's order."""
        if reranking:  # the weighted candidates, then the reranker's order
            hits = await self._rerank(query, choice.weigh(hits, max(wanted, self.settings.rerank_depth)), wanted)
        else:
            hits = choice.weigh(hits, wanted)
        self.metrics.search_seconds.labels(plan.mode).observe(time.perf_counter() - started)
        return hits
