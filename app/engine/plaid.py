"""The PLAID backend: immutable segment files, snapshots assembled in memory.

A collection starts in an *exact* tier (fp16 token vectors, exhaustive
MaxSim) and switches to PLAID (centroids + compressed residuals) once it
outgrows ``exact_search_max_passages``: the first build trains the codec on
the vectors already stored, with no re-encoding. Later commits append
segments compressed with that codec; past ``MAX_SEGMENTS`` the newest ones are
merged. A rebuild trains fresh centroids on every live passage.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from app.engine.backend import IndexSnapshot, IndexStats, PassageBatch, SearchRequest, SearchResult
from app.engine.index import IndexFiles, Manifest
from app.settings import Settings
from colbert_patches.codec import codec_from_state, codec_state, train_codec
from colbert_patches.scorer import SnapshotScorer, load_extensions, search_params

logger = logging.getLogger("app.engine")

MAX_SEGMENTS = 16
# Filtered PLAID searches score every allowed passage when there are at most
# this many (decompressing ~100 vectors each costs about 1 ms per 1,000).
EXHAUSTIVE_SUBSET_MAX = 8192


class PlaidSnapshot:
    """An immutable, searchable view of one committed generation."""

    def __init__(self, generation: int, slot_to_pid: torch.Tensor, kind: str, scorer=None, exact=None, files=None):
        self.generation = generation
        self.files: dict[str, dict] = files or {}  # file name -> loaded state; reused by the next snapshot
        self.slot_to_pid = slot_to_pid  # int64, ascending
        self.kind = kind  # "empty" | "exact" | "plaid"
        self._scorer = scorer
        self._exact = exact  # (packed fp32 vectors, doclens)

    @property
    def num_passages(self) -> int:
        return int(self.slot_to_pid.numel())

    @classmethod
    def empty(cls, generation: int = 0) -> PlaidSnapshot:
        return cls(generation, torch.empty(0, dtype=torch.int64), "empty")

    @classmethod
    def load(
        cls, files: IndexFiles, generation: int, manifest_name: str | None, previous: PlaidSnapshot | None = None
    ) -> PlaidSnapshot:
        """Load a generation, reading only files the previous snapshot lacks."""
        if not manifest_name:
            return cls.empty(generation)
        manifest = files.read_manifest(manifest_name)
        known = previous.files if previous is not None else {}
        loaded = {name: known[name] if name in known else files.load(name) for name in manifest.files()}
        segments = [loaded[name] for name in manifest.segments]
        if not segments:
            return cls.empty(generation)
        pids = torch.cat([s["pids"] for s in segments])
        doclens = torch.cat([s["doclens"] for s in segments]).to(torch.int64)
        if pids.numel() > 1 and not bool((pids[1:] > pids[:-1]).all()):
            raise RuntimeError(f"{manifest_name}: passage ids are not ascending across segments")
        if manifest.codec:
            codec = codec_from_state(loaded[manifest.codec])
            codes = torch.cat([s["codes"] for s in segments])
            residuals = torch.cat([s["residuals"] for s in segments])
            scorer = SnapshotScorer(codec, codes, residuals, doclens)
            return cls(generation, pids, "plaid", scorer=scorer, files=loaded)
        embs = torch.cat([s["embs"] for s in segments]).float()
        return cls(generation, pids, "exact", exact=(embs, doclens), files=loaded)

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
        PLAID's candidates, probing more cells until ``k`` are found."""
        k = request.k
        if self.kind == "empty":
            return SearchResult([], [])
        mask = alive
        if allowed_pids is not None:
            allowed = torch.isin(self.slot_to_pid, allowed_pids)
            mask = allowed if mask is None else mask & allowed
        if self.kind == "exact":
            return self._search_exact(Q, k, mask)
        params = search_params(
            k,
            Q.size(1),
            ncells=request.ncells,
            centroid_score_threshold=request.centroid_score_threshold,
            ndocs=request.ndocs,
        )
        if mask is not None and allowed_pids is not None and int(mask.sum()) <= EXHAUSTIVE_SUBSET_MAX:
            slots = mask.nonzero().flatten()
            if slots.numel() == 0:
                return SearchResult([], [])
            ranked, scores = self._scorer.rank(params, Q, pids=slots.tolist())
        else:
            ranked, scores = self._scorer.search(Q, params, mask, k)
        ranked, scores = ranked[:k], scores[:k]
        return SearchResult(self.slot_to_pid[torch.tensor(ranked, dtype=torch.int64)].tolist(), list(scores))

    def _search_exact(self, Q: torch.Tensor, k: int, mask: torch.Tensor | None) -> SearchResult:
        from colbert.modeling.colbert import colbert_score_packed

        embs, doclens = self._exact
        scores = colbert_score_packed(Q, embs, doclens)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        n = min(k, int(mask.sum()) if mask is not None else scores.numel())
        if n <= 0:
            return SearchResult([], [])
        top = scores.topk(n)
        return SearchResult(self.slot_to_pid[top.indices].tolist(), top.values.tolist())


def _exact(batch: PassageBatch) -> dict:
    """A segment of the exact tier: the fp16 vectors themselves."""
    return {"pids": batch.pids, "doclens": batch.doclens, "embs": batch.embs}


@dataclass(frozen=True)
class PlaidConfig:
    index_root: Path
    dim: int
    nbits: int
    exact_search_max_passages: int
    kmeans_niters: int
    rebuild_deleted_share: float
    rebuild_growth_factor: float

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
        )


class PlaidBackend:
    """:class:`app.engine.backend.IndexBackend` over PLAID segment files."""

    def __init__(self, config: PlaidConfig):
        self.config = config
        load_extensions()  # colbert's C++ search kernels (idempotent)

    def files(self, collection_id: int) -> IndexFiles:
        return IndexFiles(self.config.index_root / str(collection_id))

    # -- writes ------------------------------------------------------------

    def write(self, collection_id: int, base: str | None, generation: int, batch: PassageBatch) -> str:
        files = self.files(collection_id)
        files.ensure()
        manifest = files.read_manifest(base) if base else Manifest()
        total = manifest.passages + len(batch)
        if manifest.codec is None and total <= self.config.exact_search_max_passages:
            manifest = replace(self._append(files, generation, manifest, _exact(batch)), appended_passages=total)
        elif manifest.codec is None:
            # First PLAID build: train on every vector already stored, no re-encoding.
            existing = [files.load(name) for name in manifest.segments]
            merged = PassageBatch(
                *(torch.cat([*(s[key] for s in existing), getattr(batch, key)]) for key in ("pids", "embs", "doclens"))
            )
            return self._build(files, generation, merged)
        else:
            codec = codec_from_state(files.load(manifest.codec))
            manifest = self._append(files, generation, manifest, self._compress(codec, batch))
            manifest = replace(manifest, appended_passages=manifest.appended_passages + len(batch))
        return files.write_manifest(replace(manifest, generation=generation))

    def rebuild(self, collection_id: int, generation: int, batch: PassageBatch) -> str:
        files = self.files(collection_id)
        files.ensure()
        if len(batch) <= self.config.exact_search_max_passages:
            segments = (files.write_segment(generation, _exact(batch)),) if len(batch) else ()
            return files.write_manifest(Manifest(generation, None, segments, 0, len(batch)))
        return self._build(files, generation, batch)

    def _build(self, files: IndexFiles, generation: int, batch: PassageBatch) -> str:
        codec = train_codec(
            batch.embs, dim=self.config.dim, nbits=self.config.nbits, kmeans_niters=self.config.kmeans_niters
        )
        codec_name = files.write_codec(generation, codec_state(codec))
        segment = files.write_segment(generation, self._compress(codec, batch))
        return files.write_manifest(Manifest(generation, codec_name, (segment,), len(batch), 0))

    @staticmethod
    def _compress(codec, batch: PassageBatch) -> dict:
        compressed = codec.compress(batch.embs.float())
        return {
            "pids": batch.pids,
            "doclens": batch.doclens,
            "codes": compressed.codes.to(torch.int32),
            "residuals": compressed.residuals,
        }

    @staticmethod
    def _append(files: IndexFiles, generation: int, manifest: Manifest, new_state: dict) -> Manifest:
        """Add a segment; past MAX_SEGMENTS, merge the newest ones into it.

        Merging the tail keeps segment counts (files a snapshot opens) bounded
        while big old segments are rewritten rarely, as in an LSM tree.
        """
        names = list(manifest.segments)
        if len(names) + 1 > MAX_SEGMENTS:
            tail, names = names[-(MAX_SEGMENTS // 2) :], names[: -(MAX_SEGMENTS // 2)]
            states = [files.load(name) for name in tail] + [new_state]
            new_state = {key: torch.cat([s[key] for s in states]) for key in new_state}
        return replace(manifest, segments=(*names, files.write_segment(generation, new_state)))

    def needs_rebuild(self, collection_id: int, manifest: str | None, dead_passages: int) -> bool:
        if not manifest:
            return False
        m = self.files(collection_id).read_manifest(manifest)
        if m.passages == 0:
            return False
        if dead_passages > self.config.rebuild_deleted_share * m.passages:
            return True
        return bool(m.codec and m.appended_passages > self.config.rebuild_growth_factor * m.built_passages)

    # -- housekeeping ------------------------------------------------------

    def release(self, collection_id: int, keep: Iterable[str | None]) -> None:
        files = self.files(collection_id)
        files.remove_unreferenced(set().union(*(files.files_of(name) for name in keep)))

    def recover(self, committed: Mapping[int, str | None]) -> None:
        for collection_id, manifest in committed.items():
            try:
                self.release(collection_id, [manifest])
            except FileNotFoundError:
                pass  # collection deleted meanwhile
        root = self.config.index_root
        if root.exists():
            known = {str(i) for i in committed}
            for path in root.iterdir():
                if path.is_dir() and path.name not in known:
                    shutil.rmtree(path, ignore_errors=True)

    def drop(self, collection_id: int) -> None:
        shutil.rmtree(self.files(collection_id).root, ignore_errors=True)

    # -- reads -------------------------------------------------------------

    def load(
        self, collection_id: int, generation: int, manifest: str | None, previous: IndexSnapshot | None = None
    ) -> PlaidSnapshot:
        reuse = previous if isinstance(previous, PlaidSnapshot) else None
        return PlaidSnapshot.load(self.files(collection_id), generation, manifest, reuse)

    def stats(self, collection_id: int, manifest: str | None) -> IndexStats:
        if not manifest:
            return IndexStats("empty", 0, 0)
        m = self.files(collection_id).read_manifest(manifest)
        return IndexStats("plaid" if m.codec else "exact", m.passages, len(m.segments))
