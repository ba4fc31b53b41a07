"""The PLAID backend: immutable segment files, searched segment by segment.

A collection starts in an *exact* tier (fp16 token vectors, exhaustive
MaxSim) and switches to PLAID (centroids + compressed residuals) once it
outgrows ``exact_search_max_passages``: the maintainer trains a first codec
on a sample of the vectors already stored while commits go on into the exact
tier, and background merges then compress the exact segments with it. Every later commit compresses only its
own passages with the current codec and writes one segment with its own IVF,
so a commit costs O(its passages) and a snapshot opens only the new segment
(memory-mapped) next to the ones it already holds.

Everything else happens in the background (:mod:`app.engine.maintenance`)
through :meth:`PlaidBackend.plan` / :meth:`prepare` / :meth:`apply`: tiered
merges of adjacent segments (dropping tombstoned passages), and a new codec
trained from vectors the index already holds when the collection has grown.
Segments keep the codec they were written with: merges join segments of one
codec, and only past ``MAX_SEGMENTS`` with no such pair left is a pair of two
codecs recompressed. Nothing is ever re-encoded from text.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from colbert.indexing.codecs.residual_embeddings import ResidualEmbeddings

import colbert_patches
from app.engine.backend import (
    IndexSnapshot,
    IndexStats,
    MaintenanceTask,
    PassageBatch,
    PreparedChange,
    SearchRequest,
    SearchResult,
)
from app.engine.index import IndexFiles, Manifest, SegmentEntry
from app.settings import Settings
from colbert_patches.codec import (
    POINTS_PER_CENTROID,
    codec_from_state,
    codec_state,
    num_partitions_for,
    partitions_trainable,
    train_codec,
)
from colbert_patches.persistence import atomic_torch_save
from colbert_patches.scorer import (
    IvfPart,
    SnapshotScorer,
    build_ivf,
    load_extensions,
    merge_ivfs,
    search_params,
    segment_arrays,
)

logger = logging.getLogger("app.engine")

# Filtered PLAID searches score every allowed passage when there are at most
# this many (decompressing ~100 vectors each costs about 1 ms per 1,000).
EXHAUSTIVE_SUBSET_MAX = 8192
# Segments up to this many passages are scored exhaustively (fresh commits
# of a few documents, whose passages PLAID's cells might not reach): about
# the number of passages one PLAID pass decompresses (``ndocs // 4``).
SMALL_SEGMENT_PASSAGES = 64
# Tiered merging: this many adjacent segments of one size tier become one.
MERGE_FACTOR = 4
# Past this many segments the smallest adjacent pair is merged whatever its tiers.
MAX_SEGMENTS = 16
# Original vectors kept (across segments) for training the next codec:
# POINTS_PER_CENTROID per centroid of the largest codec (PLAID_MAX_CENTROIDS), at most this
# many (16 per centroid at 32,768). Decompressed vectors train measurably worse codecs
# (-0.008 nDCG@10 on msmarco-mini, BENCHMARKS.md), so segments written while
# the codec is below PLAID_MAX_CENTROIDS keep a sample of their originals,
# at a rate that yields about this many by the next retraining.
RETRAIN_SAMPLE = 1 << 19
RECOMPRESS_BLOCK = 1 << 16  # token vectors decompressed or compressed at a time in a merge


@dataclass
class _Segment:
    entry: SegmentEntry
    pids: torch.Tensor
    scorer: SnapshotScorer | None = None  # PLAID segments
    embs: torch.Tensor | None = None  # exact-tier segments (fp16)
    doclens: torch.Tensor | None = None
    dense: torch.Tensor | None = None  # (passages, dense dim) fp16, memory-mapped; None: written without
    nbytes: int = 0  # its arrays, mapped or not


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class PlaidSnapshot:
    """An immutable, searchable view of one committed generation."""

    def __init__(self, generation: int, segments: list[_Segment], kind: str):
        self.generation = generation
        self.segments = segments  # in pid order; reused by the next snapshot
        self.kind = kind  # "empty" | "exact" | "plaid"
        self.slot_to_pid = torch.cat([s.pids for s in segments]) if segments else torch.empty(0, dtype=torch.int64)
        self._offsets = [0]
        for s in segments:
            self._offsets.append(self._offsets[-1] + int(s.pids.numel()))

    @property
    def num_passages(self) -> int:
        return int(self.slot_to_pid.numel())

    @property
    def memory_bytes(self) -> int:
        return _nbytes(self.slot_to_pid) + sum(s.nbytes for s in self.segments)

    @classmethod
    def empty(cls, generation: int = 0) -> PlaidSnapshot:
        return cls(generation, [], "empty")

    @classmethod
    def load(
        cls, files: IndexFiles, generation: int, manifest_name: str | None, previous: PlaidSnapshot | None = None
    ) -> PlaidSnapshot:
        """Open a generation, reading only segments the previous snapshot lacks."""
        if not manifest_name:
            return cls.empty(generation)
        manifest = files.read_manifest(manifest_name)
        if not manifest.segments:
            return cls.empty(generation)
        known = {s.entry.name: s for s in previous.segments} if previous is not None else {}
        codecs: dict[str, object] = {}
        segments = []
        for entry in manifest.segments:
            segment = known.get(entry.name)
            if segment is None:
                segment = _open_segment(files, entry, codecs)
            segments.append(segment)
        kind = "plaid" if any(s.scorer is not None for s in segments) else "exact"
        return cls(generation, segments, kind)

    def deleted_mask(self, dead_pids: torch.Tensor) -> torch.Tensor | None:
        if dead_pids.numel() == 0:
            return None
        return ~torch.isin(self.slot_to_pid, dead_pids)

    def search(
        self,
        Q: torch.Tensor,
        request: SearchRequest,
        alive: torch.Tensor | None = None,
        allowed_pids: torch.Tensor | None = None,
    ) -> SearchResult:
        """A filter is applied before ranking: a small allowed set is scored
        exhaustively (exact MaxSim on its stored vectors); a large one masks
        PLAID's candidates, probing more cells until ``k`` are found. Each
        segment returns its best ``k``; the merged list keeps the best ``k``."""
        k = request.k
        if self.kind == "empty":
            return SearchResult([], [])
        mask = alive
        if allowed_pids is not None:
            allowed = torch.isin(self.slot_to_pid, allowed_pids)
            mask = allowed if mask is None else mask & allowed
        params = search_params(
            k,
            Q.size(1),
            ncells=request.ncells,
            centroid_score_threshold=request.centroid_score_threshold,
            ndocs=request.ndocs,
        )
        subset = mask is not None and allowed_pids is not None and int(mask.sum()) <= EXHAUSTIVE_SUBSET_MAX
        result = self._search_segments(Q, params, mask, k, subset, expand=False)
        available = int(mask.sum()) if mask is not None else self.num_passages
        if len(result.passage_ids) < min(k, available):
            # The probed cells held too few live passages (tiny or heavily
            # deleted collections): probe more cells until k are found.
            result = self._search_segments(Q, params, mask, k, subset, expand=True)
        return result

    def dense_search(
        self,
        q: torch.Tensor,
        k: int,
        alive: torch.Tensor | None = None,
        allowed_pids: torch.Tensor | None = None,
    ) -> SearchResult:
        """Exhaustive: every live allowed passage's dense vector against
        ``q``, segment by segment (fp16 on the mapped arrays, no copies)."""
        mask = alive
        if allowed_pids is not None:
            allowed = torch.isin(self.slot_to_pid, allowed_pids)
            mask = allowed if mask is None else mask & allowed
        query = q.reshape(-1).to(torch.float16)
        pids: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        for n, segment in enumerate(self.segments):
            if segment.dense is None:
                continue
            part = mask[self._offsets[n] : self._offsets[n + 1]] if mask is not None else None
            if part is not None and not bool(part.any()):
                continue
            values = (segment.dense @ query).float()
            if part is not None:
                values = values.masked_fill(~part, float("-inf"))
            top = values.topk(min(k, int(part.sum()) if part is not None else values.numel()))
            pids.append(segment.pids[top.indices])
            scores.append(top.values)
        if not pids:
            return SearchResult([], [])
        all_pids, all_scores = torch.cat(pids), torch.cat(scores)
        top = all_scores.topk(min(k, all_scores.numel()))
        return SearchResult(all_pids[top.indices].tolist(), top.values.tolist())

    def dense_scores(self, q: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        out = torch.full((pids.numel(),), float("nan"))
        if not self.segments or not pids.numel():
            return out
        slots = torch.searchsorted(self.slot_to_pid, pids).clamp(max=self.num_passages - 1)
        found = self.slot_to_pid[slots] == pids
        query = q.reshape(-1).float()
        for n, segment in enumerate(self.segments):
            if segment.dense is None:
                continue
            start, end = self._offsets[n], self._offsets[n + 1]
            mine = (found & (slots >= start) & (slots < end)).nonzero().flatten()
            if mine.numel():
                out[mine] = segment.dense[slots[mine] - start].float() @ query
        return out

    def _search_segments(self, Q, params, mask, k: int, subset: bool, expand: bool) -> SearchResult:
        """Each segment's best ``k`` merged: a small segment (or a small
        allowed subset) is scored exhaustively, a large one by one PLAID pass."""
        pids: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []

        def keep(segment: _Segment, ranked, values) -> None:
            ranked, values = list(ranked)[:k], list(values)[:k]
            if ranked:
                pids.append(segment.pids[torch.tensor(ranked, dtype=torch.int64)])
                scores.append(torch.tensor(values, dtype=torch.float32))

        # PLAID segments: each one's shortlist, cut to one budget per codec
        # by its centroid-only score, then only the survivors decompressed
        # and scored exactly (a snapshot of S segments decompresses what one
        # segment would, not S times as much).
        found: list[tuple[_Segment, torch.Tensor, torch.Tensor]] = []
        shortlists: dict[str | None, list[tuple[_Segment, torch.Tensor, torch.Tensor]]] = {}
        for n, segment in enumerate(self.segments):
            part = mask[self._offsets[n] : self._offsets[n + 1]] if mask is not None else None
            if part is not None and not bool(part.any()):
                continue
            if segment.scorer is None:  # still in the exact tier (its first codec is being trained)
                keep(segment, *_exact_top(Q, segment, part, k))
            elif subset or segment.scorer.num_passages <= SMALL_SEGMENT_PASSAGES:
                slots = part.nonzero().flatten() if part is not None else torch.arange(segment.scorer.num_passages)
                keep(segment, *segment.scorer.rank(params, Q, pids=slots.tolist()))
            elif expand:
                keep(segment, *segment.scorer.search(Q, params, part, k))
            else:
                slots, centroid_scores = segment.scorer.candidates(params, Q, part)
                if slots.numel():
                    found.append((segment, slots, centroid_scores))
        # Each segment keeps a share of ``ndocs`` in proportion to its part
        # of its codec's candidates (at least ``4 k``): together about what
        # one segment of them all would keep, so many segments cost PLAID's
        # later stages what one does.
        totals: dict[str | None, int] = {}
        for segment, slots, _ in found:
            totals[segment.entry.codec] = totals.get(segment.entry.codec, 0) + int(slots.numel())
        for segment, slots, centroid_scores in found:
            assert segment.scorer is not None
            share = max(4 * k, math.ceil(params.ndocs * slots.numel() / totals[segment.entry.codec]))
            slots, approx = segment.scorer.shortlist(params, slots, centroid_scores, share)
            if slots.numel():
                shortlists.setdefault(segment.entry.codec, []).append((segment, slots, approx))
        budget = max(params.ndocs // 4, k)
        for group in shortlists.values():
            approx = torch.cat([a for _, _, a in group])
            owner = torch.cat([torch.full((len(a),), i, dtype=torch.int64) for i, (_, _, a) in enumerate(group)])
            chosen = torch.zeros(len(approx), dtype=torch.bool)
            chosen[approx.topk(min(budget, len(approx))).indices] = True
            for i, (segment, slots, _) in enumerate(group):
                mine = slots[chosen[owner == i]]
                if mine.numel():
                    assert segment.scorer is not None
                    keep(segment, *segment.scorer.rank(params, Q, pids=mine.tolist()))
        if not pids:
            return SearchResult([], [])
        all_pids, all_scores = torch.cat(pids), torch.cat(scores)
        top = all_scores.topk(min(k, all_scores.numel()))
        return SearchResult(all_pids[top.indices].tolist(), top.values.tolist())


def _exact_top(Q: torch.Tensor, segment: _Segment, mask: torch.Tensor | None, k: int):
    """Exhaustive MaxSim over an exact-tier segment: the best ``k`` (positions, scores) among ``mask``."""
    from colbert.modeling.colbert import colbert_score_packed

    assert segment.embs is not None and segment.doclens is not None
    scores = colbert_score_packed(Q, segment.embs, segment.doclens)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    n = min(k, int(mask.sum()) if mask is not None else scores.numel())
    if n <= 0:
        return [], []
    top = scores.topk(n)
    return top.indices.tolist(), top.values.tolist()


def _open_segment(files: IndexFiles, entry: SegmentEntry, codecs: dict) -> _Segment:
    state = files.load(entry.name)
    nbytes = sum(_nbytes(t) for t in state.values() if isinstance(t, torch.Tensor))
    dense = state.get("dense")
    if entry.codec is None:  # exact tier: scored as fp32, converted once here
        embs, doclens = state["embs"].float(), state["doclens"].to(torch.int64)
        nbytes = _nbytes(embs) + _nbytes(doclens) + (_nbytes(dense) if dense is not None else 0)
        return _Segment(entry, state["pids"], embs=embs, doclens=doclens, dense=dense, nbytes=nbytes)
    codec = _codec(files, entry.codec, codecs)
    if "ivf" not in state:  # written before segments carried their IVF: build it here, once
        state = {**state, **segment_arrays(state["codes"], state["residuals"], state["doclens"], _centroids(codec))}
    scorer = SnapshotScorer(codec, {k: v for k, v in state.items() if k != "dense"})
    return _Segment(entry, state["pids"], scorer=scorer, dense=dense, nbytes=nbytes)


def _codec(files: IndexFiles, name: str, cache: dict):
    """A codec file, loaded once per ``cache`` (one load or step)."""
    if name not in cache:
        cache[name] = codec_from_state(files.load(name))
    return cache[name]


def _centroids(codec) -> int:
    return int(codec.centroids.size(0))


def _exact(batch: PassageBatch) -> dict:
    """A segment of the exact tier: the fp16 vectors themselves."""
    return _with_dense({"pids": batch.pids, "doclens": batch.doclens, "embs": batch.embs}, batch.dense)


def _with_dense(state: dict, dense: torch.Tensor | None) -> dict:
    """A segment's arrays with its passages' dense vectors (fp16), if any."""
    if dense is not None:
        state["dense"] = dense.to(torch.float16).contiguous()
    return state


def _entry(name: str, codec: str | None, batch: PassageBatch) -> SegmentEntry:
    n = len(batch)
    first = int(batch.pids[0]) if n else 0
    last = int(batch.pids[-1]) if n else -1
    return SegmentEntry(name, codec, n, int(batch.doclens.sum()), first, last)


@dataclass(frozen=True)
class PlaidConfig:
    index_root: Path
    dim: int
    nbits: int
    exact_search_max_passages: int
    kmeans_niters: int
    rebuild_deleted_share: float
    rebuild_growth_factor: float
    max_centroids: int = 32768
    segment_max_passages: int = 200_000

    @classmethod
    def from_settings(cls, settings: Settings, dim: int, nbits: int) -> PlaidConfig:
        return cls(
            index_root=settings.index_root,
            dim=dim,
            nbits=nbits,
            exact_search_max_passages=settings.exact_search_max_passages,
            kmeans_niters=settings.kmeans_niters,
            rebuild_deleted_share=settings.rebuild_deleted_share,
            rebuild_growth_factor=settings.rebuild_growth_factor,
            max_centroids=settings.plaid_max_centroids,
            segment_max_passages=settings.segment_max_passages,
        )


class PlaidBackend:
    """:class:`app.engine.backend.IndexBackend` over PLAID segment files."""

    def __init__(self, config: PlaidConfig):
        self.config = config
        # The codec patches (faiss centroid assignment, fast residual packing,
        # quiet training) whatever encoder the service runs with; idempotent.
        colbert_patches.apply()
        load_extensions()  # colbert's C++ search kernels (idempotent)
        # Files a background step wrote and the writer has not applied yet:
        # no release may remove them.
        self._pinned: dict[int, set[str]] = {}
        self._pin_lock = threading.Lock()
        self._centroid_counts: dict[tuple[int, str], int] = {}
        # Each collection's current codecs as compression uses them (with
        # their centroid-assignment index, built once): codec files never
        # change. Two per collection: the served index's and, while a
        # re-index runs, the one of the index it builds.
        self._current_codecs: dict[int, dict[str, object]] = {}
        self._codec_lock = threading.Lock()

    @property
    def _retrain_sample(self) -> int:
        return min(RETRAIN_SAMPLE, POINTS_PER_CENTROID * self.config.max_centroids)

    def _current_codec(self, collection_id: int, files: IndexFiles, name: str):
        """The codec ``name`` of a collection, loaded once while it is the
        current one (commits and merges compress with it)."""
        with self._codec_lock:
            cached = self._current_codecs.get(collection_id, {}).get(name)
        if cached is not None:
            return cached
        codec = codec_from_state(files.load(name))
        with self._codec_lock:
            held = self._current_codecs.setdefault(collection_id, {})
            held[name] = codec
            while len(held) > 2:  # the oldest goes
                del held[next(iter(held))]
        return codec

    def files(self, collection_id: int) -> IndexFiles:
        return IndexFiles(self.config.index_root / str(collection_id))

    # -- writes (the writer thread) ----------------------------------------

    def write(self, collection_id: int, base: str | None, generation: int, batch: PassageBatch) -> str:
        files = self.files(collection_id)
        files.ensure()
        manifest = files.read_manifest(base) if base else Manifest()
        if manifest.codec is None:
            # The exact tier, also past exact_search_max_passages until the
            # maintainer's first codec lands (plan(): "first codec").
            entry = _entry(files.write_segment(generation, _exact(batch)), None, batch)
        else:
            codec = self._current_codec(collection_id, files, manifest.codec)
            entry = _entry(files.write_segment(generation, self._compress(codec, batch)), manifest.codec, batch)
            entry = replace(entry, sample=self._originals(files, manifest, codec, batch.embs))
        if len(manifest.segments) + 1 > 4 * MAX_SEGMENTS:
            count = len(manifest.segments) + 1
            logger.warning("collection %d has %d segments: background merges are behind", collection_id, count)
        return files.write_manifest(replace(manifest, generation=generation, segments=(*manifest.segments, entry)))

    def _originals(self, files: IndexFiles, manifest: Manifest, codec, embs: torch.Tensor) -> str | None:
        """A file with a sample of a new segment's original vectors, while
        the codec is below its largest size (the next retraining's training
        set), at a rate that gives about RETRAIN_SAMPLE by then."""
        sample = self._original_sample(manifest, codec, embs)
        if sample is None:
            return None
        name = files.new_name("sample", manifest.generation)
        atomic_torch_save({"embs": sample}, files.root / name)
        return name

    def _original_sample(self, manifest: Manifest, codec, embs: torch.Tensor) -> torch.Tensor | None:
        """The share of ``embs`` (fp16) kept for training the next codec; None at full size."""
        if _centroids(codec) >= self.config.max_centroids or embs.size(0) == 0:
            return None
        rate = self._retrain_sample / max(self.config.rebuild_growth_factor * max(manifest.codec_tokens, 1), 1)
        if rate >= 1:
            # Every original, in order (a small collection's early codecs):
            # when the next codec lands the segment is recompressed from them
            # (plan(): "recompress"); from its codes it would gain nothing.
            return embs.to(torch.float16).contiguous()
        n = min(embs.size(0), max(1, round(embs.size(0) * rate)))
        take = torch.randperm(embs.size(0), generator=torch.Generator().manual_seed(manifest.generation))[:n]
        return embs[take].to(torch.float16).contiguous()

    def _train(self, embs: torch.Tensor, tokens: int | None = None):
        """A codec sized for ``tokens`` vectors (default: the ones given),
        trained on ``embs``; never more centroids than ``embs`` supports."""
        wanted = num_partitions_for(tokens or embs.size(0), self.config.max_centroids)
        return train_codec(
            embs,
            dim=self.config.dim,
            nbits=self.config.nbits,
            kmeans_niters=self.config.kmeans_niters,
            partitions=min(wanted, partitions_trainable(embs.size(0))),
        )

    @staticmethod
    def _compress(codec, batch: PassageBatch) -> dict:
        codes, residuals = _Part(batch.pids, batch.doclens, embs=batch.embs).compressed_with(codec)
        arrays = segment_arrays(codes, residuals, batch.doclens, _centroids(codec))
        return _with_dense({"pids": batch.pids, **arrays}, batch.dense)

    # -- background maintenance --------------------------------------------

    def plan(self, collection_id: int, manifest: str | None, dead_pids: torch.Tensor) -> MaintenanceTask | None:
        """The most useful background step for this generation, if any: a
        new codec once the collection outgrew the current one; a segment
        rewritten without its tombstones; segments on an old codec
        recompressed; a tier of ``MERGE_FACTOR`` similar segments merged;
        the smallest adjacent pair merged past ``MAX_SEGMENTS``."""
        if not manifest:
            return None
        files = self.files(collection_id)
        m = files.read_manifest(manifest)
        if not m.segments:
            return None
        if m.codec is None and m.passages > self.config.exact_search_max_passages:
            return MaintenanceTask(
                collection_id, manifest, "retrain", (), f"first codec at {m.passages} passages (the switch to PLAID)"
            )
        if m.codec is not None:
            centroids = self._codec_centroids(collection_id, m.codec)
            wanted = num_partitions_for(m.tokens, self.config.max_centroids)
            # Only at REBUILD_GROWTH_FACTOR x the passages the codec was
            # trained at, however cheap an earlier one would be: codecs trained
            # as soon as more centroids were wanted measured better at 5k
            # passages and worse past it (msmarco-mini nDCG@10 at 100k 0.654
            # against 0.708; BENCHMARKS.md, "Early codecs").
            if wanted > centroids and m.passages > self.config.rebuild_growth_factor * max(m.codec_passages, 1):
                return MaintenanceTask(collection_id, manifest, "retrain", (), f"{centroids} -> {wanted} centroids")
        dead = torch.sort(dead_pids).values
        for s in m.segments:
            n_dead = int(
                torch.searchsorted(dead, s.last_pid, right=True) - torch.searchsorted(dead, s.first_pid, right=False)
            )
            if s.passages and n_dead > self.config.rebuild_deleted_share * s.passages:
                return MaintenanceTask(collection_id, manifest, "merge", (s.name,), f"{n_dead} of {s.passages} deleted")
        limit = self.config.segment_max_passages
        exact = [i for i, s in enumerate(m.segments) if s.codec is None and m.codec is not None]
        if exact:  # exhaustively searched until compressed: first
            run = _run_from(m.segments, exact[0], limit, lambda s: s.codec is None)
            names = tuple(s.name for s in run)
            return MaintenanceTask(collection_id, manifest, "merge", names, "compress the exact tier")

        # On an older codec with every original kept (a sample file's header each, read once).
        complete = {s.name for s in m.segments if s.codec != m.codec and _has_all_originals(files, s)}

        def stale(s: SegmentEntry) -> bool:
            return s.name in complete

        older = [i for i, s in enumerate(m.segments) if stale(s)]
        if older:
            run = _run_from(m.segments, older[0], limit, stale)
            names = tuple(s.name for s in run)
            reason = "an older codec's segments, recompressed from their originals"
            return MaintenanceTask(collection_id, manifest, "recompress", names, reason)
        # Segments keep the codec they were written with: a merge joins
        # segments of one codec (concatenation, no centroid assignment), so a
        # retraining never makes the whole collection wait to be recompressed.
        # Older segments stay searchable on their coarser codec; new data gets
        # the finer one.
        same = [a.codec == b.codec for a, b in zip(m.segments, m.segments[1:])]
        tiers = [int(math.log(max(s.passages, 1), MERGE_FACTOR)) for s in m.segments]
        for i in range(len(m.segments) - MERGE_FACTOR + 1):
            group = m.segments[i : i + MERGE_FACTOR]
            same_tier = len(set(tiers[i : i + MERGE_FACTOR])) == 1
            if same_tier and all(same[i : i + MERGE_FACTOR - 1]) and sum(s.passages for s in group) <= limit:
                return MaintenanceTask(
                    collection_id, manifest, "merge", tuple(s.name for s in group), f"tier {tiers[i]}"
                )
        if len(m.segments) > MAX_SEGMENTS:
            # The smallest pair of one codec; only when no such pair is left,
            # the smallest pair of two (recompressed with the current codec).
            pairs = [
                (not same[i], a.passages + b.passages, i) for i, (a, b) in enumerate(zip(m.segments, m.segments[1:]))
            ]
            mixed, _, i = min(pairs)
            names = (m.segments[i].name, m.segments[i + 1].name)
            reason = f"{len(m.segments)} segments" + (", recompressed with the current codec" if mixed else "")
            return MaintenanceTask(collection_id, manifest, "merge", names, reason)
        return None

    def _codec_centroids(self, collection_id: int, codec: str) -> int:
        key = (collection_id, codec)  # codec files never change once written
        if key not in self._centroid_counts:
            self._centroid_counts[key] = int(self.files(collection_id).load(codec)["centroids"].size(0))
        return self._centroid_counts[key]

    def prepare(self, task: MaintenanceTask, dead_pids: torch.Tensor) -> PreparedChange:
        """Do a planned step's work (slow; off the writer thread): new files
        only, pinned until :meth:`apply` or :meth:`abandon`."""
        with self._pin_lock:
            before = set(self._pinned.get(task.collection_id, ()))
        try:
            return self._prepare(task, dead_pids)
        except BaseException:
            with self._pin_lock:
                mine = self._pinned.get(task.collection_id, set()) - before
            self._unpin(task.collection_id, mine)
            raise

    def _prepare(self, task: MaintenanceTask, dead_pids: torch.Tensor) -> PreparedChange:
        files = self.files(task.collection_id)
        m = files.read_manifest(task.manifest)
        if task.kind == "retrain":
            codec = self._train(self._sample(files, m), tokens=m.tokens)
            name = files.new_name("codec", m.generation)
            self._pin(task.collection_id, {name})
            files.write_codec(m.generation, codec_state(codec), name)
            consumed = tuple(e.sample for e in m.segments if e.sample)
            return PreparedChange(
                task,
                codec=name,
                segment=None,
                written=(name,),
                dropped_pids=torch.empty(0),
                consumed=consumed,
                sized_for=(m.passages, m.tokens),
            )
        return self._merge(files, m, task, dead_pids)

    def _merge(self, files: IndexFiles, m: Manifest, task: MaintenanceTask, dead_pids: torch.Tensor) -> PreparedChange:
        """The task's segments as one, without tombstones: on their codec
        when they share one, else (exact-tier or mixed inputs) on the current one."""
        entries = [s for s in m.segments if s.name in task.segments]
        assert [s.name for s in entries] == list(task.segments)
        shared = {s.codec for s in entries}
        one = len(shared) == 1 and None not in shared and task.kind != "recompress"
        target = shared.pop() if one else m.codec
        codecs: dict[str, object] = {}
        if target is None:
            target_codec = None
        elif target == m.codec:
            target_codec = self._current_codec(task.collection_id, files, target)
        else:
            target_codec = _codec(files, target, codecs)
        parts: list[_Part] = []
        dropped: list[torch.Tensor] = []
        for source in entries:
            state = files.load(source.name)
            keep = ~torch.isin(state["pids"], dead_pids)
            dropped.append(state["pids"][~keep])
            part = _select(state, keep, source, target_codec, files, codecs)
            if target_codec is not None and part.embs is not None:
                # Originals going into PLAID (the exact tier, or an older
                # codec's segment recompressed): keep the next codec's share of them.
                part.sample = self._original_sample(m, target_codec, part.embs)
            parts.append(part)
        entry: SegmentEntry | None = None
        written: tuple[str, ...] = ()
        if sum(p.passages for p in parts):
            state = _concat(parts, target_codec)
            name = files.new_name("seg", m.generation)
            self._pin(task.collection_id, {name})
            files.write_segment(m.generation, state, name)
            pids, tokens = state["pids"], int(state["doclens"].sum())
            entry = SegmentEntry(name, target, int(pids.numel()), tokens, int(pids[0]), int(pids[-1]))
            written = (name,)
            samples = [p.sample for p in parts if p.sample is not None]
            if samples:  # the inputs' originals, still wanted for the next codec
                sample = files.new_name("sample", m.generation)
                self._pin(task.collection_id, {sample})
                atomic_torch_save({"embs": torch.cat(samples)}, files.root / sample)
                entry, written = replace(entry, sample=sample), (name, sample)
        return PreparedChange(task, codec=None, segment=entry, written=written, dropped_pids=torch.cat(dropped))

    def apply(self, collection_id: int, base: str | None, generation: int, change: PreparedChange) -> str | None:
        """The current manifest with a prepared step in it (cheap; on the
        writer thread), or None when it no longer applies."""
        try:
            if not base:
                return None
            files = self.files(collection_id)
            m = files.read_manifest(base)
            if change.task.kind == "retrain":
                # The originals it was trained on are spent (the next codec
                # trains on what commits keep from now on); at the largest
                # size there is no next codec at all.
                last = self._codec_centroids(collection_id, str(change.codec)) >= self.config.max_centroids
                # Every original of a segment is kept until it is recompressed.
                spent = set(change.consumed)
                segments = tuple(
                    replace(e, sample=None) if (last or e.sample in spent) and not _has_all_originals(files, e) else e
                    for e in m.segments
                )
                # The next retraining is due at growth past what this codec
                # was sized for, not past what landed while it trained (the
                # first codec trains while the exact tier grows at full speed).
                passages, tokens = change.sized_for
                retrained = replace(m, codec=change.codec, codec_passages=passages, codec_tokens=tokens)
                return files.write_manifest(replace(retrained, generation=generation, segments=segments))
            names = [s.name for s in m.segments]
            wanted = list(change.task.segments)
            starts = [i for i in range(len(names)) if names[i : i + len(wanted)] == wanted]
            if not starts:
                return None  # merged or dropped meanwhile
            i = starts[0]
            new = (change.segment,) if change.segment is not None else ()
            segments = (*m.segments[:i], *new, *m.segments[i + len(wanted) :])
            return files.write_manifest(replace(m, generation=generation, segments=segments))
        finally:
            self._unpin(collection_id, set(change.written))

    def abandon(self, change: PreparedChange) -> None:
        self._unpin(change.task.collection_id, set(change.written))
        files = self.files(change.task.collection_id)
        for name in change.written:
            (files.root / name).unlink(missing_ok=True)

    def _sample(self, files: IndexFiles, m: Manifest) -> torch.Tensor:
        """The training set of a new codec: the original vectors segments
        kept (see :meth:`_originals`); when they are too few, vectors drawn
        evenly from every segment, decompressed with the codec each was
        written with."""
        kept = [files.load(e.sample)["embs"] for e in m.segments if e.sample]
        if sum(k.size(0) for k in kept) >= self._retrain_sample // 2:
            return torch.cat(kept).float()
        states = [(entry, files.load(entry.name)) for entry in m.segments]
        gen = torch.Generator().manual_seed(m.generation)
        share = self._retrain_sample / max(m.tokens, 1)
        parts = []
        codecs: dict[str, object] = {}
        for entry, state in states:
            n = entry.tokens
            take = torch.randperm(n, generator=gen)[: max(1, int(n * share))] if share < 1 else torch.arange(n)
            if entry.codec is None:
                parts.append(state["embs"][take].float())
                continue
            codec = _codec(files, entry.codec, codecs)
            parts.append(_decompress(codec, state["codes"][take], state["residuals"][take]))
        return torch.cat([*parts, *(k.float() for k in kept)])

    def _pin(self, collection_id: int, names: set[str]) -> None:
        with self._pin_lock:
            self._pinned.setdefault(collection_id, set()).update(names)

    def _unpin(self, collection_id: int, names: set[str]) -> None:
        with self._pin_lock:
            self._pinned.get(collection_id, set()).difference_update(names)

    # -- housekeeping ------------------------------------------------------

    def release(self, collection_id: int, keep: Iterable[str | None]) -> None:
        files = self.files(collection_id)
        with self._pin_lock:
            pinned = set(self._pinned.get(collection_id, ()))
        files.remove_unreferenced(pinned.union(*(files.files_of(name) for name in keep)))

    def recover(self, committed: Mapping[int, Iterable[str | None]]) -> None:
        for collection_id, manifests in committed.items():
            files = self.files(collection_id)
            try:
                keep = set().union(*(files.files_of(m) for m in manifests))
                files.remove_unreferenced(keep, temp_files=True)
            except FileNotFoundError:
                pass  # collection deleted meanwhile
        root = self.config.index_root
        if root.exists():
            known = {str(i) for i in committed}
            for path in root.iterdir():
                if path.is_dir() and path.name not in known:
                    shutil.rmtree(path, ignore_errors=True)

    def drop(self, collection_id: int) -> None:
        with self._codec_lock:
            self._current_codecs.pop(collection_id, None)
        shutil.rmtree(self.files(collection_id).root, ignore_errors=True)

    # -- reads -------------------------------------------------------------

    def load(
        self, collection_id: int, generation: int, manifest: str | None, previous: IndexSnapshot | None = None
    ) -> PlaidSnapshot:
        reuse = previous if isinstance(previous, PlaidSnapshot) else None
        files = self.files(collection_id)
        if manifest and not (files.root / manifest).exists():  # released (the manifest cache would hide it)
            raise FileNotFoundError(manifest)
        return PlaidSnapshot.load(files, generation, manifest, reuse)

    def stats(self, collection_id: int, manifest: str | None) -> IndexStats:
        if not manifest:
            return IndexStats("empty", 0, 0)
        files = self.files(collection_id)
        m = files.read_manifest(manifest)
        return IndexStats("plaid" if m.codec else "exact", m.passages, len(m.segments), m.tokens, files.size(m.files()))


def _run_from(segments, start: int, limit: int, member) -> list[SegmentEntry]:
    """Adjacent segments from ``start`` that satisfy ``member``, up to
    ``limit`` passages (at least one)."""
    run = [segments[start]]
    for s in segments[start + 1 :]:
        if not member(s) or sum(r.passages for r in run) + s.passages > limit:
            break
        run.append(s)
    return run


def _decompress(codec, codes: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    if codes.numel() == 0:
        return torch.empty(0, codec.dim, dtype=torch.float32)
    return codec.decompress(ResidualEmbeddings(codes.to(torch.int32), residuals)).float()


@dataclass
class _Part:
    """The kept passages of one segment on their way into a merged one."""

    pids: torch.Tensor
    doclens: torch.Tensor
    codes: torch.Tensor | None = None  # on the current codec: as they are
    residuals: torch.Tensor | None = None
    embs: torch.Tensor | None = None  # exact-tier vectors to compress
    source_codec: object | None = None  # codes and residuals of another codec: recompressed
    sample: torch.Tensor | None = None  # original vectors kept for codec training
    ivf: IvfPart | None = None  # its segment's IVF, when its codes are kept as they are
    dense: torch.Tensor | None = None  # the kept passages' dense vectors, if the segment has them

    def compressed_with(self, current) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Codes and residuals on ``current``, block by block: a merge holds
        the compact form of its segments, never all of their vectors as floats."""
        if self.codes is not None and self.residuals is not None and self.source_codec is None:
            return [self.codes], [self.residuals]
        codes, residuals = [], []
        n = int(self.doclens.sum())
        for start in range(0, n, RECOMPRESS_BLOCK):
            if self.embs is not None:
                block = self.embs[start : start + RECOMPRESS_BLOCK].float()
            else:
                assert self.codes is not None and self.residuals is not None
                end = start + RECOMPRESS_BLOCK
                block = _decompress(self.source_codec, self.codes[start:end], self.residuals[start:end])
            compressed = current.compress(block)
            codes.append(compressed.codes.to(torch.int32))
            residuals.append(compressed.residuals)
        if not codes:  # no vectors
            width = current.dim * current.nbits // 8
            return [torch.empty(0, dtype=torch.int32)], [torch.empty(0, width, dtype=torch.uint8)]
        return codes, residuals

    @property
    def passages(self) -> int:
        return int(self.pids.numel())


def _select(state: dict, keep: torch.Tensor, entry: SegmentEntry, current, files: IndexFiles, codecs: dict) -> _Part:
    doclens = state["doclens"].to(torch.int64)
    tokens = torch.repeat_interleave(keep, doclens)
    pids, kept_lens = state["pids"][keep], doclens[keep]
    dense = state["dense"][keep] if "dense" in state else None
    sample = files.load(entry.sample)["embs"] if entry.sample else None
    if entry.codec is None:
        return _Part(pids, kept_lens, embs=state["embs"][tokens], sample=sample, dense=dense)
    n = int(doclens.sum())
    complete = sample is not None and sample.size(0) == n  # every original, in order
    if sample is not None and complete:  # (mypy: complete implies a sample)
        sample = sample[tokens]  # stays aligned with the kept passages
    codec = _codec(files, entry.codec, codecs)
    foreign = None if current is not None and _same_codec(codec, current) else codec
    if foreign is not None and complete:  # onto another codec: from the originals, not from the codes
        return _Part(pids, kept_lens, embs=sample, dense=dense)
    everything = bool(keep.all())
    codes, residuals = state["codes"][:n], state["residuals"][:n]  # memory-mapped views
    if not everything:
        codes, residuals = codes[tokens], residuals[tokens]
    ivf = None
    if foreign is None and "ivf" in state:
        ivf = IvfPart(state["ivf"], state["ivf_lengths"], int(keep.numel()), None if everything else keep)
    return _Part(
        pids, kept_lens, codes=codes, residuals=residuals, source_codec=foreign, sample=sample, ivf=ivf, dense=dense
    )


def _has_all_originals(files: IndexFiles, entry: SegmentEntry) -> bool:
    """A compressed segment whose sample file holds every original vector (memory-mapped: only its header is read)."""
    if entry.codec is None or not entry.sample:
        return False
    return int(files.load(entry.sample)["embs"].size(0)) == entry.tokens


def _same_codec(a, b) -> bool:
    return a.centroids.shape == b.centroids.shape and torch.equal(a.centroids, b.centroids)


def _concat(parts: list[_Part], current) -> dict:
    """One segment from parts, all on the current codec (None: exact tier)."""
    pids, doclens = torch.cat([p.pids for p in parts]), torch.cat([p.doclens for p in parts])
    dense = _concat_dense(parts)
    if current is None:
        embs = torch.cat([p.embs for p in parts if p.embs is not None])
        return _with_dense({"pids": pids, "doclens": doclens, "embs": embs}, dense)
    codes, residuals, ivfs = [], [], []
    for p in parts:
        c, r = p.compressed_with(current)
        codes += c
        residuals += r
        if p.ivf is not None:  # codes kept as they are (set only then: _select)
            ivfs.append(p.ivf)
        else:  # compressed just now: its own lists, from its new codes
            lists, lengths = build_ivf(torch.cat(c), p.doclens, _centroids(current))
            ivfs.append(IvfPart(lists, lengths, p.passages))
    ivf = merge_ivfs(ivfs, _centroids(current))
    arrays = segment_arrays(codes, residuals, doclens, _centroids(current), ivf=ivf)
    return _with_dense({"pids": pids, **arrays}, dense)


def _concat_dense(parts: list[_Part]) -> torch.Tensor | None:
    """The parts' dense vectors in order; zeros (a cosine of 0 with any
    query) for passages of a segment written without them."""
    width = next((p.dense.size(1) for p in parts if p.dense is not None), None)
    if width is None:
        return None
    return torch.cat(
        [p.dense if p.dense is not None else torch.zeros(p.passages, width, dtype=torch.float16) for p in parts]
    )
