"""Index files of one collection and the immutable snapshots searches use.

Layout under ``indexes/<collection id>/``:

- ``seg-<generation>.pt``: passages added by one commit: their passage ids,
  token counts, and either fp16 token vectors (exact tier, small collections)
  or PLAID codes + residuals;
- ``codec-<generation>.pt``: centroids and residual buckets of a PLAID build;
- ``manifest-<generation>.json``: which codec and segments make up that
  generation. Written last; SQLite's ``collections.manifest`` names the
  committed one, so a crash before the SQLite commit leaves files nobody
  points at (removed at the next start).

Every file is written once, atomically, and never changed; a snapshot reads a
manifest and the files it names, so a searcher never sees half a commit. A new
snapshot reuses the segments the previous one already holds in memory.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from colbert_patches.codec import codec_from_state
from colbert_patches.persistence import atomic_torch_save, atomic_write_json, fsync_dir
from colbert_patches.scorer import SearchParams, SnapshotScorer

logger = logging.getLogger("app.engine")

# Filtered PLAID searches score every allowed passage when there are at most
# this many (decompressing ~100 vectors each costs about 1 ms per 1,000).
EXHAUSTIVE_SUBSET_MAX = 8192

_GENERATION_FILE = re.compile(r"^(seg|codec|manifest)-(\d+)\.(pt|json)$")


class IndexFiles:
    """Reads and writes the files of one collection's index directory."""

    def __init__(self, root: Path):
        self.root = root

    def ensure(self) -> None:
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root.parent)  # the new directory entry survives power loss

    def write_segment(self, generation: int, state: dict) -> str:
        name = f"seg-{generation:09d}.pt"
        atomic_torch_save(state, self.root / name)
        return name

    def write_codec(self, generation: int, state: dict) -> str:
        name = f"codec-{generation:09d}.pt"
        atomic_torch_save(state, self.root / name)
        return name

    def write_manifest(self, generation: int, manifest: dict) -> str:
        name = f"manifest-{generation:09d}.json"
        atomic_write_json(manifest, self.root / name)
        return name

    _manifests: dict[str, dict] = {}  # manifests never change once written: cache by path

    def read_manifest(self, name: str) -> dict:
        key = str(self.root / name)
        manifest = self._manifests.get(key)
        if manifest is None:
            manifest = json.loads((self.root / name).read_text())
            if len(self._manifests) > 1024:
                self._manifests.clear()
            self._manifests[key] = manifest
        return dict(manifest)

    def load(self, name: str) -> dict:
        return torch.load(self.root / name, map_location="cpu", weights_only=True)

    def files_of(self, manifest_name: str | None) -> set[str]:
        if not manifest_name:
            return set()
        manifest = self.read_manifest(manifest_name)
        names = {manifest_name, *manifest["segments"]}
        if manifest.get("codec"):
            names.add(manifest["codec"])
        return names

    def remove_unreferenced(self, keep: set[str]) -> None:
        """Delete generation files not in ``keep`` (and stale temp files)."""
        if not self.root.exists():
            return
        for path in self.root.iterdir():
            if path.name in keep:
                continue
            if _GENERATION_FILE.match(path.name) or path.name.startswith("."):
                path.unlink(missing_ok=True)


@dataclass
class SearchResult:
    passage_ids: list[int]
    scores: list[float]


class Snapshot:
    """An immutable, searchable view of one committed generation."""

    def __init__(self, generation: int, slot_to_pid: torch.Tensor, kind: str, scorer=None, exact=None, files=None):
        self.generation = generation
        self.files = files or {}  # file name -> loaded state; reused by the next snapshot
        self.slot_to_pid = slot_to_pid  # int64, ascending
        self.kind = kind  # "empty" | "exact" | "plaid"
        self._scorer = scorer
        self._exact = exact  # (packed fp32 vectors, doclens)

    @property
    def num_passages(self) -> int:
        return int(self.slot_to_pid.numel())

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(0, torch.empty(0, dtype=torch.int64), "empty")

    @classmethod
    def load(
        cls, files: IndexFiles, generation: int, manifest_name: str | None, previous: Snapshot | None = None
    ) -> Snapshot:
        """Load a generation, reading only files the previous snapshot lacks."""
        if not manifest_name:
            return cls.empty()
        manifest = files.read_manifest(manifest_name)
        known = previous.files if previous is not None else {}
        loaded = {name: known[name] if name in known else files.load(name) for name in manifest["segments"]}
        if manifest.get("codec"):
            name = manifest["codec"]
            loaded[name] = known[name] if name in known else files.load(name)
        segments = [loaded[name] for name in manifest["segments"]]
        if not segments:
            return cls(generation, torch.empty(0, dtype=torch.int64), "empty")
        pids = torch.cat([s["pids"] for s in segments])
        doclens = torch.cat([s["doclens"] for s in segments]).to(torch.int64)
        if pids.numel() > 1 and not bool((pids[1:] > pids[:-1]).all()):
            raise RuntimeError(f"{manifest_name}: passage ids are not ascending across segments")
        if manifest.get("codec"):
            codec = codec_from_state(loaded[manifest["codec"]])
            codes = torch.cat([s["codes"] for s in segments])
            residuals = torch.cat([s["residuals"] for s in segments])
            scorer = SnapshotScorer(codec, codes, residuals, doclens)
            return cls(generation, pids, "plaid", scorer=scorer, files=loaded)
        embs = torch.cat([s["embs"] for s in segments]).float()
        return cls(generation, pids, "exact", exact=(embs, doclens), files=loaded)

    def alive_mask(self, dead_pids: torch.Tensor) -> torch.Tensor | None:
        if dead_pids.numel() == 0:
            return None
        return ~torch.isin(self.slot_to_pid, dead_pids)

    def search(
        self,
        Q: torch.Tensor,
        k: int,
        params: SearchParams,
        alive: torch.Tensor | None,
        allowed_pids: torch.Tensor | None = None,
    ) -> SearchResult:
        """Top ``k`` live passages; with ``allowed_pids`` only among those.

        A filter is applied before ranking: a small allowed set is scored
        exhaustively (every allowed passage, exact MaxSim on its stored
        vectors); a large one masks PLAID's candidates, probing more cells
        until ``k`` are found. Either way k results come back whenever k
        matching passages exist.
        """
        if self.kind == "empty":
            return SearchResult([], [])
        mask = alive
        if allowed_pids is not None:
            allowed = torch.isin(self.slot_to_pid, allowed_pids)
            mask = allowed if mask is None else mask & allowed
        if self.kind == "exact":
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
        if allowed_pids is not None and int(mask.sum()) <= EXHAUSTIVE_SUBSET_MAX:
            slots = mask.nonzero().flatten()
            if slots.numel() == 0:
                return SearchResult([], [])
            ranked, scores = self._scorer.rank(params, Q, pids=slots.tolist())
        else:
            ranked, scores = self._scorer.search(Q, params, mask, k)
        ranked, scores = ranked[:k], scores[:k]
        return SearchResult(self.slot_to_pid[torch.tensor(ranked, dtype=torch.int64)].tolist(), list(scores))
