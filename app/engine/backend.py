"""The index-backend seam: everything that touches vectors goes through it.

The services (ingest, search, snapshots) speak only these types; which engine
stores and searches the vectors is a backend behind :class:`IndexBackend`.
Today's is PLAID over immutable segment files (:mod:`app.engine.plaid`); a
distributed engine plugs in by implementing the same two protocols, and
``tests/engine/test_backend_contract.py`` is the contract each must pass.

Passage ids are assigned by the store (one counter per collection, never
reused); a backend keeps whatever it needs to map them to its own slots.
Deletes are tombstones in the store, visible at once: a search passes them as
a *deleted mask*, and background maintenance drops them from the index.
Writes are two-phase: :meth:`IndexBackend.write` prepares a new generation
(named by a manifest string) that nobody sees until the store commits that
name; :meth:`IndexBackend.release` then drops what no kept generation needs.

Maintenance (merges, codec retraining, dropping tombstones) is three-phase so
that it never holds up a commit: :meth:`IndexBackend.plan` names a step,
:meth:`IndexBackend.prepare` does its work on another thread from immutable
inputs, and :meth:`IndexBackend.apply` folds the result into whatever
generation is current by then (cheap, on the writer thread). A backend that
maintains itself (a distributed engine) plans nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class PassageBatch:
    """Encoded passages: ids ascending, packed token vectors, tokens per
    passage, each passage's dense vector when the encoder has a pooled head,
    and the text that was encoded (for a backend that keeps its own keyword
    vectors; PLAID does not)."""

    pids: torch.Tensor  # int64 (n,)
    embs: torch.Tensor  # float16 (sum(doclens), dim)
    doclens: torch.Tensor  # int64 (n,)
    dense: torch.Tensor | None = None  # float16 (n, dense dim), L2-normalised
    texts: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.pids.numel())

    @classmethod
    def empty(cls, dim: int) -> PassageBatch:
        return cls(
            torch.empty(0, dtype=torch.int64),
            torch.empty(0, dim, dtype=torch.float16),
            torch.empty(0, dtype=torch.int64),
        )


@dataclass(frozen=True)
class SearchRequest:
    """Per-call search parameters (never shared state between queries).
    ``None`` leaves a knob to the backend's default for ``k``. ``dense`` and
    ``text`` (the query's pooled vector and its words) let a backend that
    gathers MaxSim's candidates from first stages (Qdrant) use them; PLAID
    gathers its own from centroids."""

    k: int
    ncells: int | None = None
    centroid_score_threshold: float | None = None
    ndocs: int | None = None
    dense: torch.Tensor | None = None  # (1, dense dim)
    text: str | None = None


@dataclass
class SearchResult:
    passage_ids: list[int]
    scores: list[float]


@dataclass(frozen=True)
class IndexStats:
    kind: str  # backend-specific tier, e.g. "empty" | "exact" | "plaid"
    passages: int  # indexed passages, tombstoned ones included
    segments: int
    tokens: int = 0  # token vectors stored
    bytes: int = 0  # on disk


@dataclass(frozen=True)
class MaintenanceTask:
    """A background step planned against one committed generation."""

    collection_id: int
    manifest: str  # the generation it was planned on
    kind: str  # e.g. "merge" | "retrain"
    segments: tuple[str, ...]  # the inputs a merge replaces
    reason: str


@dataclass(frozen=True)
class PreparedChange:
    """A prepared step's result, waiting for the writer to apply it."""

    task: MaintenanceTask
    codec: str | None  # retrain: the new codec
    segment: object | None  # merge: what replaces the inputs (None: nothing was left)
    written: tuple[str, ...]  # files it wrote
    dropped_pids: torch.Tensor  # tombstoned passages in no segment once applied
    consumed: tuple[str, ...] = ()  # retrain: the training vectors' files, no longer needed once applied
    sized_for: tuple[int, int] = (0, 0)  # retrain: the (passages, tokens) the new codec was sized and trained for


class IndexSnapshot(Protocol):
    """An immutable, searchable view of one committed generation."""

    generation: int

    @property
    def num_passages(self) -> int: ...

    @property
    def memory_bytes(self) -> int:
        """What holding it costs (mapped files and private arrays), for the
        snapshot cache's budget."""
        ...

    def deleted_mask(self, dead_pids: torch.Tensor) -> torch.Tensor | None:
        """A mask of live passages for :meth:`search` (None: nothing deleted).
        Computed once per store version and reused by every search."""
        ...

    def search(
        self,
        Q: torch.Tensor,
        request: SearchRequest,
        alive: torch.Tensor | None = None,
        allowed_pids: torch.Tensor | None = None,
    ) -> SearchResult:
        """The top ``request.k`` live passages for query vectors ``Q``
        (1 x L x dim), best first; with ``allowed_pids`` only among those.
        Returns k results whenever k live allowed passages exist."""
        ...

    def dense_search(
        self,
        q: torch.Tensor,
        k: int,
        alive: torch.Tensor | None = None,
        allowed_pids: torch.Tensor | None = None,
    ) -> SearchResult:
        """The top ``k`` live passages by the cosine of their dense vector
        with ``q`` (1 x dense dim), best first; passages stored without a
        dense vector are not ranked."""
        ...

    def dense_scores(self, q: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        """The dense cosine of each of ``pids`` with ``q`` (float32, NaN for a
        passage stored without a dense vector or not in this generation)."""
        ...


class IndexBackend(Protocol):
    def write(self, collection_id: int, base: str | None, generation: int, batch: PassageBatch) -> str:
        """Prepare ``generation``: the passages of ``base`` plus ``batch``.
        Returns its manifest name; invisible until the store commits it."""
        ...

    def plan(self, collection_id: int, manifest: str | None, dead_pids: torch.Tensor) -> MaintenanceTask | None:
        """The next background step for this generation, or None."""
        ...

    def prepare(self, task: MaintenanceTask, dead_pids: torch.Tensor) -> PreparedChange:
        """Do the step's work (slow, off the writer thread): new data only,
        kept from :meth:`release` until applied or abandoned."""
        ...

    def apply(self, collection_id: int, base: str | None, generation: int, change: PreparedChange) -> str | None:
        """Prepare ``generation``: ``base`` with the change in it; None when
        it no longer applies (its inputs are gone). Cheap."""
        ...

    def abandon(self, change: PreparedChange) -> None:
        """Drop a prepared change that will not be applied."""
        ...

    def release(self, collection_id: int, keep: Iterable[str | None]) -> None:
        """Drop the data of generations other than ``keep`` (after a commit,
        the new and the previous one: other processes may still load it)."""
        ...

    def recover(self, committed: Mapping[int, Iterable[str | None]]) -> None:
        """At start-up: drop what was prepared but never committed, and the
        data of collections that no longer exist. ``committed``: each
        collection's committed generations (the served one, and the one a
        re-index builds)."""
        ...

    def drop(self, collection_id: int) -> None: ...

    def load(
        self, collection_id: int, generation: int, manifest: str | None, previous: IndexSnapshot | None = None
    ) -> IndexSnapshot:
        """Open a committed generation, reusing what ``previous`` holds.
        Raises FileNotFoundError when its data was already released."""
        ...

    def stats(self, collection_id: int, manifest: str | None) -> IndexStats: ...
