"""Qdrant as the index backend (``INDEX_BACKEND=qdrant``), behind the seam
of :mod:`app.engine.backend`.

One Qdrant collection holds one *lineage* of a collection's index: the
generations written on top of each other from one first write (a re-index
starts a new lineage beside the served one, as PLAID starts a new index
directory). Its name is ``<prefix>_c<collection id>_g<first generation>``.

One point per passage, its id the passage id (a retried write rewrites the
same points), with:

- ``colbert``: the token vectors as a multivector, MaxSim comparator, HNSW off
  (``m=0``): MaxSim only ever rescores candidates, or scans when there is no
  first stage (Qdrant's guidance for ColBERT-style vectors);
- ``dense``: the passage's pooled vector (HNSW), when the encoder has one;
- ``bm25``: a sparse vector of the passage's words, their term frequencies
  saturated and length-normalised as BM25 does, Qdrant's IDF modifier
  supplying the inverse document frequency from the collection itself;
- payload ``g``: the generation that wrote it.

Generations: a snapshot of generation ``G`` sees the points with ``g <= G``
(later writes are invisible to it, as PLAID's immutable files are); the
lineage's collection metadata lists its live generations, so a released
generation is gone (``FileNotFoundError``) as the contract asks, and
``recover`` deletes the points of generations never committed.

Deletes: the store's tombstones reach a search as a list of dead ids
(``must_not``), and maintenance deletes their points (one ``purge`` step as
soon as any exists: a Qdrant delete is cheap, there is nothing to merge).

Search: with the query's dense vector and words (``SearchRequest.dense``,
``.text``), candidates come from the dense (HNSW) and sparse first stages,
``qdrant_prefetch`` each, and MaxSim rescores their union; without them, or
when the first stages found fewer than ``k`` of the allowed passages, MaxSim
scans. PLAID instead gathers candidates from its centroids: the measured
difference is in BENCHMARKS.md ("Qdrant backend").

Consistency: a write runs on every active replica of its shard and is
acknowledged once ``qdrant_write_consistency`` of them applied it (a
replica that failed is marked inactive until it recovers), so a search that
asks one replica (``qdrant_read_consistency``, default 1) already sees every
acknowledged write, through any server; asking more replicas keeps only the
points all of them hold.

Local mode (``QdrantClient(path=...)`` or ``":memory:"``) runs the same calls
in-process, one process per directory; its calls are serialised here (it is
not thread-safe). It computes MaxSim, prefetch and IDF as a server does, but
ignores payload indexes, quantization and sharding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from app.engine.backend import (
    IndexStats,
    MaintenanceTask,
    PassageBatch,
    PreparedChange,
    SearchRequest,
    SearchResult,
)
from app.errors import BackendUnavailable, InvalidInput
from app.settings import Settings

logger = logging.getLogger("app.engine")

COLBERT, DENSE, SPARSE = "colbert", "dense", "bm25"
# Token vectors per upsert request: as JSON a token vector is about 2 KB (128
# floats), so a request stays near 8 MB, well under Qdrant's 32 MB limit.
UPSERT_TOKENS = 4096
# MaxSim scans when the first stages found fewer than k passages, only up to
# this many allowed ones (the token vectors have no graph to search them by).
SCAN_MAX_PASSAGES = 20_000
# BM25's term-frequency saturation and length normalisation (Robertson's
# defaults); the average passage length is a constant since no server keeps
# corpus-wide statistics here (Qdrant's IDF modifier supplies the other half).
BM25_K1, BM25_B, BM25_AVG_WORDS = 1.2, 0.75, 100.0
WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def word_index(word: str) -> int:
    """A word's stable sparse index (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(word.encode())


def bm25_document(text: str) -> qm.SparseVector:
    """A passage's words, each weighted by BM25's saturated, length-normalised
    term frequency (the IDF half comes from Qdrant's modifier)."""
    counts = Counter(word_index(w) for w in words(text))
    n = sum(counts.values())
    norm = BM25_K1 * (1 - BM25_B + BM25_B * n / BM25_AVG_WORDS)
    indices = sorted(counts)
    return qm.SparseVector(indices=indices, values=[counts[i] * (BM25_K1 + 1) / (counts[i] + norm) for i in indices])


def bm25_query(text: str) -> qm.SparseVector:
    indices = sorted({word_index(w) for w in words(text)})
    return qm.SparseVector(indices=indices, values=[1.0] * len(indices))


@dataclass(frozen=True)
class QdrantConfig:
    dim: int
    dense_dim: int | None
    url: str = ""
    path: Path | None = None  # local mode in a directory; neither url nor path: in memory
    api_key: str = ""
    prefix: str = "colbert"
    shards: int = 1
    replication_factor: int = 1
    write_consistency: str = "1"  # a number, "majority" or "all"
    read_consistency: str = "1"  # a number, "majority", "quorum" or "all"
    on_disk: bool = False
    vector_storage: str = "float16"  # float32 | float16 | int8
    prefetch: int = 256
    timeout_s: int = 60

    @classmethod
    def from_settings(cls, settings: Settings, encoder) -> QdrantConfig:
        """The encoder's sizes (no dense vector without a pooled head), and
        every other field from its ``qdrant_`` setting."""
        named = {
            f.name: getattr(settings, f"qdrant_{f.name}") for f in fields(cls) if f.name not in ("dim", "dense_dim")
        }
        return cls(dim=encoder.dim, dense_dim=getattr(encoder, "dense_dim", None), **named)

    @property
    def local(self) -> bool:
        return not self.url

    @property
    def write_factor(self) -> int:
        """Replicas that must acknowledge a write."""
        rf = self.replication_factor
        if self.write_consistency == "all":
            return rf
        if self.write_consistency == "majority":
            return rf // 2 + 1
        return max(1, min(int(self.write_consistency), rf))

    @property
    def read_consistency_value(self) -> int | qm.ReadConsistencyType:
        """Replicas a search asks: a number, or majority / quorum / all. Qdrant
        answers a write only once every active replica has applied it (those
        that failed are marked inactive), so one replica already sees every
        acknowledged write; more trade availability for agreement."""
        if self.read_consistency.isdigit():
            return int(self.read_consistency)
        return qm.ReadConsistencyType(self.read_consistency)


# Local mode allows one client per directory per process: backends over the
# same directory (two app instances in one test process) share it.
_LOCAL_CLIENTS: dict[Path, list] = {}  # path -> [client, users]
_LOCAL_CLIENTS_LOCK = threading.Lock()
_LOCAL_CALLS = threading.RLock()  # local mode is not thread-safe


def _open_client(config: QdrantConfig) -> QdrantClient:
    if config.url:
        return QdrantClient(url=config.url, api_key=config.api_key or None, timeout=config.timeout_s)
    if config.path is None:
        return QdrantClient(":memory:")
    with _LOCAL_CLIENTS_LOCK:
        entry = _LOCAL_CLIENTS.get(config.path)
        if entry is None:
            config.path.mkdir(parents=True, exist_ok=True)
            entry = _LOCAL_CLIENTS[config.path] = [QdrantClient(path=str(config.path)), 0]
        entry[1] += 1
        return entry[0]


def _close_client(config: QdrantConfig, client: QdrantClient) -> None:
    if config.url or config.path is None:
        client.close()
        return
    with _LOCAL_CLIENTS_LOCK:
        entry = _LOCAL_CLIENTS.get(config.path)
        if entry is None or entry[0] is not client:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _LOCAL_CLIENTS[config.path]
            client.close()


def vectors_config(config: QdrantConfig, dense_dim: int | None) -> tuple[dict, dict]:
    """A collection's named vectors (token multivector, dense) and its sparse one (bm25)."""
    c = config
    storage = qm.Datatype.FLOAT32 if c.vector_storage == "float32" else qm.Datatype.FLOAT16
    quantization = None
    if c.vector_storage == "int8":
        quantization = qm.ScalarQuantization(
            scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, quantile=0.99, always_ram=True)
        )
    vectors = {
        COLBERT: qm.VectorParams(
            size=c.dim,
            distance=qm.Distance.DOT,  # unit vectors: MaxSim of cosines, exactly PLAID's score
            datatype=storage,
            multivector_config=qm.MultiVectorConfig(comparator=qm.MultiVectorComparator.MAX_SIM),
            hnsw_config=qm.HnswConfigDiff(m=0),  # rescoring only: no graph over token vectors
            quantization_config=quantization,
            on_disk=c.on_disk,
        )
    }
    if dense_dim:
        vectors[DENSE] = qm.VectorParams(size=dense_dim, distance=qm.Distance.DOT, on_disk=c.on_disk)
    sparse = {SPARSE: qm.SparseVectorParams(modifier=qm.Modifier.IDF, index=qm.SparseIndexParams(on_disk=c.on_disk))}
    return vectors, sparse


def point_vectors(
    embs: torch.Tensor, dense: torch.Tensor | None, text: str | None, with_dense: bool = True
) -> dict[str, object]:
    """One point's vectors: its token vectors, its dense vector, its words."""
    vector: dict[str, object] = {COLBERT: embs.float().numpy().tolist()}
    if with_dense and dense is not None:
        vector[DENSE] = dense.float().numpy().tolist()
    if text is not None and (terms := bm25_document(text)).indices:
        vector[SPARSE] = terms
    return vector


def query_vectors(Q: torch.Tensor) -> list[list[float]]:
    """A query's token vectors for MaxSim (1 x L x dim; padding rows dropped)."""
    vectors = Q[0].float()
    return vectors[vectors.abs().sum(-1) > 0].numpy().tolist()


@contextlib.contextmanager
def qdrant_errors():
    """A Qdrant cluster's failures as the API's errors: a request it refuses
    as invalid (400, 422) is 422; anything else is 503 ``backend_unavailable``,
    transient when unreachable, overloaded (429) or failing (5xx)."""
    try:
        yield
    except UnexpectedResponse as exc:
        status = exc.status_code
        if status in (400, 422):
            raise InvalidInput(f"Qdrant refused the request: {exc.content.decode(errors='replace')[:300]}") from exc
        transient = status is None or status >= 500 or status == 429
        raise BackendUnavailable(f"the Qdrant cluster answered {status}", transient=transient) from exc
    except ResponseHandlingException as exc:
        raise BackendUnavailable(f"the Qdrant cluster did not answer: {type(exc.source).__name__}") from exc


def is_missing(exc: BaseException) -> bool:
    """Whether a client error (or what it was mapped from) says the collection does not exist."""
    cause = exc.__cause__ if isinstance(exc, BackendUnavailable) and exc.__cause__ is not None else exc
    return isinstance(cause, (ValueError, KeyError)) or getattr(cause, "status_code", None) == 404


def _tokens(point: qm.PointStruct) -> int:
    vectors = point.vector.get(COLBERT) if isinstance(point.vector, dict) else None
    return len(vectors) if isinstance(vectors, list) else 1


class QdrantStorage:
    """A client (shared per local-mode directory), its calls serialised in
    local mode, and the reads and writes both Qdrant layers make."""

    def __init__(self, config: QdrantConfig, client: QdrantClient | None = None):
        self.config = config
        self._owns_client = client is None
        self.closed = False
        self.client = client if client is not None else _open_client(config)
        self._lock = _LOCAL_CALLS if config.local else contextlib.nullcontext()
        self._consistency = None if config.local else config.read_consistency_value

    @contextlib.contextmanager
    def _calls(self):
        """Around every client call: serialised in local mode, failures as the API's errors."""
        with self._lock, qdrant_errors():
            yield

    def close(self) -> None:
        if self._owns_client and not self.closed:
            _close_client(self.config, self.client)
        self.closed = True

    def _create_collection(self, name: str, dense_dim: int | None, metadata: dict | None = None) -> None:
        c = self.config
        vectors, sparse = vectors_config(c, dense_dim)
        with self._calls():
            self.client.create_collection(
                name,
                vectors_config=vectors,
                sparse_vectors_config=sparse,
                shard_number=c.shards,
                replication_factor=c.replication_factor,
                write_consistency_factor=c.write_factor,
                on_disk_payload=c.on_disk,
                timeout=c.timeout_s,
                metadata=metadata,
            )

    def _payload_index(self, collection: str, key: str, schema, wait: bool = True) -> None:
        """An index on a payload key that filters use (a server only: local mode has none)."""
        if self.config.local:
            return
        with self._calls():
            self.client.create_payload_index(collection, key, schema, wait=wait)

    def _upsert_points(self, collection: str, groups: list[list[qm.PointStruct]]) -> None:
        """Write ``groups`` of points (each group one document's, or one
        point) in requests of about ``UPSERT_TOKENS`` token vectors, never
        splitting a group that fits one request: a request is applied whole,
        so a server that dies while writing leaves no half document behind."""
        request: list[qm.PointStruct] = []
        tokens = 0
        for group in groups:
            whole = sum(_tokens(p) for p in group) <= UPSERT_TOKENS
            for part in [group] if whole else [[p] for p in group]:  # past the budget alone: point by point
                size = sum(_tokens(p) for p in part)
                if request and tokens + size > UPSERT_TOKENS:
                    self._upsert_request(collection, request)
                    request, tokens = [], 0
                request.extend(part)
                tokens += size
        if request:
            self._upsert_request(collection, request)

    def _upsert_request(self, collection: str, points: list[qm.PointStruct]) -> None:
        with self._calls():
            self.client.upsert(collection, points, wait=True, ordering=qm.WriteOrdering.MEDIUM)

    def _delete(self, collection: str, selector: qm.PointIdsList | qm.FilterSelector) -> None:
        with self._calls():
            self.client.delete(collection, points_selector=selector, wait=True, ordering=qm.WriteOrdering.MEDIUM)

    def _count(self, collection: str, where: qm.Filter | None) -> int:
        with self._calls():
            return int(self.client.count(collection, count_filter=where, exact=True).count)

    def _query(
        self,
        collection: str,
        *,
        query,
        using: str | None,
        where: qm.Filter | None,
        k: int,
        prefetch: list[qm.Prefetch] | None = None,
        with_payload: bool | list[str] = False,
        offset: int | None = None,
    ) -> list[qm.ScoredPoint]:
        with self._calls():
            return self.client.query_points(
                collection,
                query=query,
                using=using,
                prefetch=prefetch or None,
                query_filter=where,
                limit=k,
                offset=offset,
                with_payload=with_payload,
                timeout=self.config.timeout_s,
                consistency=self._consistency,
            ).points

    def _retrieve(self, collection: str, ids: list, payload: bool | list[str], vectors: bool | list[str] = False):
        with self._calls():
            return self.client.retrieve(
                collection, ids, with_payload=payload, with_vectors=vectors, consistency=self._consistency
            )


@dataclass(frozen=True)
class Manifest:
    lineage: str  # the Qdrant collection
    generation: int

    def __str__(self) -> str:
        return f"{self.lineage}/{self.generation}"

    @classmethod
    def parse(cls, name: str) -> Manifest:
        lineage, _, generation = name.rpartition("/")
        if not lineage or not generation.isdigit():
            raise ValueError(f"not a Qdrant manifest: {name!r}")
        return cls(lineage, int(generation))


def _ids(pids: torch.Tensor) -> list[int]:
    return [int(p) for p in pids.tolist()]


class QdrantSnapshot:
    """One committed generation: the lineage's points with ``g <= generation``."""

    def __init__(self, backend: QdrantBackend, generation: int, manifest: Manifest | None, passages: int):
        self.backend = backend
        self.generation = generation
        self.manifest = manifest
        self._passages = passages
        self.has_dense = manifest is not None and backend._has_dense(manifest.lineage)

    @property
    def num_passages(self) -> int:
        return self._passages

    @property
    def memory_bytes(self) -> int:
        return 0  # the vectors live in Qdrant

    def deleted_mask(self, dead_pids: torch.Tensor) -> torch.Tensor | None:
        """The dead ids themselves: a search excludes them in Qdrant (``must_not``)."""
        return dead_pids.clone() if dead_pids.numel() else None

    def _filter(self, dead: torch.Tensor | None, allowed: torch.Tensor | None) -> qm.Filter:
        assert self.manifest is not None
        must: list[qm.Condition] = [qm.FieldCondition(key="g", range=qm.Range(lte=self.manifest.generation))]
        if allowed is not None:
            must.append(qm.HasIdCondition(has_id=_ids(allowed)))
        must_not: list[qm.Condition] | None = None
        if dead is not None and dead.numel():
            must_not = [qm.HasIdCondition(has_id=_ids(dead))]
        return qm.Filter(must=must, must_not=must_not)

    def _result(self, points: list[qm.ScoredPoint]) -> SearchResult:
        return SearchResult([int(p.id) for p in points], [float(p.score) for p in points])

    def search(
        self,
        Q: torch.Tensor,
        request: SearchRequest,
        alive: torch.Tensor | None = None,
        allowed_pids: torch.Tensor | None = None,
    ) -> SearchResult:
        if self.manifest is None or self._passages == 0 or request.k <= 0:
            return SearchResult([], [])
        if allowed_pids is not None and allowed_pids.numel() == 0:
            return SearchResult([], [])
        query = query_vectors(Q)
        where = self._filter(alive, allowed_pids)
        depth = max(self.backend.config.prefetch, request.k)
        prefetch: list[qm.Prefetch] = []
        if self.backend.config.prefetch:  # (0: configured to scan)
            if request.dense is not None and self.has_dense:
                dense = request.dense.reshape(-1).float().numpy().tolist()
                prefetch.append(qm.Prefetch(query=dense, using=DENSE, filter=where, limit=depth))
            if request.text and (terms := bm25_query(request.text)).indices:
                prefetch.append(qm.Prefetch(query=terms, using=SPARSE, filter=where, limit=depth))
        b = self.backend
        if prefetch:
            points = b._query(
                self.manifest.lineage, query=query, using=COLBERT, prefetch=prefetch, where=where, k=request.k
            )
            if len(points) >= request.k:
                return self._result(points)
            matching = self._allowed_count(alive, allowed_pids)
            if not len(points) < matching <= SCAN_MAX_PASSAGES:  # all found, or too many to scan
                return self._result(points)
        # No first stage, or it found fewer than k of few enough allowed passages: MaxSim scans.
        return self._result(b._query(self.manifest.lineage, query=query, using=COLBERT, where=where, k=request.k))

    def _allowed_count(self, dead: torch.Tensor | None, allowed: torch.Tensor | None) -> int:
        if allowed is None and dead is None:
            return self._passages
        assert self.manifest is not None
        return self.backend._count(self.manifest.lineage, self._filter(dead, allowed))

    def dense_search(
        self,
        q: torch.Tensor,
        k: int,
        alive: torch.Tensor | None = None,
        allowed_pids: torch.Tensor | None = None,
    ) -> SearchResult:
        if self.manifest is None or not self.has_dense or k <= 0:
            return SearchResult([], [])
        if allowed_pids is not None and allowed_pids.numel() == 0:
            return SearchResult([], [])
        query = q.reshape(-1).float().numpy().tolist()
        where = self._filter(alive, allowed_pids)
        return self._result(self.backend._query(self.manifest.lineage, query=query, using=DENSE, where=where, k=k))

    def dense_scores(self, q: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        out = torch.full((pids.numel(),), float("nan"))
        if self.manifest is None or not self.has_dense or not pids.numel():
            return out
        found = self.backend._vectors(self.manifest.lineage, _ids(pids), self.manifest.generation)
        query = q.reshape(-1).float()
        for i, pid in enumerate(_ids(pids)):
            vector = found.get(pid)
            if vector is not None:
                out[i] = float(torch.tensor(vector) @ query)
        return out


class QdrantBackend(QdrantStorage):
    """:class:`app.engine.backend.IndexBackend` over a Qdrant server, cluster or local store."""

    def __init__(self, config: QdrantConfig, client: QdrantClient | None = None):
        super().__init__(config, client)
        self._dense: dict[str, bool] = {}  # lineage -> has a dense vector field

    # -- Qdrant calls ----------------------------------------------------------------

    def _lineage_name(self, collection_id: int, generation: int) -> str:
        return f"{self.config.prefix}_c{collection_id}_g{generation}"

    def _lineages(self, collection_id: int | None = None) -> dict[str, int]:
        """This server's lineages (Qdrant collection -> collection id), of one collection or all."""
        with self._calls():
            names = [c.name for c in self.client.get_collections().collections]
        pattern = re.compile(rf"^{re.escape(self.config.prefix)}_c(\d+)_g\d+$")
        out = {}
        for name in names:
            match = pattern.match(name)
            if match and (collection_id is None or int(match.group(1)) == collection_id):
                out[name] = int(match.group(1))
        return out

    def _meta(self, lineage: str) -> dict:
        try:
            with self._calls():
                info = self.client.get_collection(lineage)
        except Exception as exc:
            if is_missing(exc):
                raise FileNotFoundError(lineage) from exc
            raise
        self._dense[lineage] = isinstance(info.config.params.vectors, dict) and DENSE in info.config.params.vectors
        return dict(info.config.metadata or {})

    def _has_dense(self, lineage: str) -> bool:
        if lineage not in self._dense:
            self._meta(lineage)
        return self._dense[lineage]

    def _set_live(self, lineage: str, live: Iterable[int]) -> None:
        with self._calls():
            self.client.update_collection(lineage, metadata={"live": sorted(set(live))})

    def _create(self, collection_id: int, lineage: str, dense_dim: int | None, generation: int) -> None:
        self._create_collection(lineage, dense_dim, {"collection_id": collection_id, "live": [], "first": generation})
        self._payload_index(
            lineage, "g", qm.IntegerIndexParams(type=qm.IntegerIndexType.INTEGER, lookup=False, range=True)
        )
        self._dense[lineage] = bool(dense_dim)

    def _upsert(self, lineage: str, batch: PassageBatch, generation: int) -> None:
        has_dense = self._has_dense(lineage)
        embs = torch.split(batch.embs, batch.doclens.tolist())
        points = [
            qm.PointStruct(
                id=pid,
                vector=point_vectors(
                    embs[i],
                    batch.dense[i] if batch.dense is not None else None,
                    batch.texts[i] if batch.texts is not None else None,
                    with_dense=has_dense,
                ),
                payload={"g": generation},
            )
            for i, pid in enumerate(_ids(batch.pids))
        ]
        self._upsert_points(lineage, [[p] for p in points])

    def _vectors(self, lineage: str, pids: list[int], generation: int) -> dict[int, list[float]]:
        """The dense vectors of those of ``pids`` that ``generation`` holds."""
        out: dict[int, list[float]] = {}
        for r in self._retrieve(lineage, pids, ["g"], [DENSE]):
            vector = r.vector.get(DENSE) if isinstance(r.vector, dict) else None
            if isinstance(vector, list) and (r.payload or {}).get("g", math.inf) <= generation:
                out[int(r.id)] = vector
        return out

    def _live(self, manifest: Manifest) -> list[int]:
        return list(self._meta(manifest.lineage).get("live", []))

    # -- IndexBackend ----------------------------------------------------------------

    def write(self, collection_id: int, base: str | None, generation: int, batch: PassageBatch) -> str:
        if base:
            lineage = Manifest.parse(base).lineage
            live = self._live(Manifest.parse(base))
        else:
            lineage, live = self._lineage_name(collection_id, generation), []
            dense_dim = int(batch.dense.shape[1]) if batch.dense is not None else self.config.dense_dim
            self._drop_lineage(lineage)  # a retried first write starts clean
            self._create(collection_id, lineage, dense_dim, generation)
        if len(batch):
            self._upsert(lineage, batch, generation)
        self._set_live(lineage, [*live, generation])
        return str(Manifest(lineage, generation))

    def plan(self, collection_id: int, manifest: str | None, dead_pids: torch.Tensor) -> MaintenanceTask | None:
        if not manifest or not dead_pids.numel():
            return None
        return MaintenanceTask(collection_id, manifest, "purge", (), f"{dead_pids.numel()} deleted")

    def prepare(self, task: MaintenanceTask, dead_pids: torch.Tensor) -> PreparedChange:
        return PreparedChange(task, None, None, (), dead_pids.clone())

    def apply(self, collection_id: int, base: str | None, generation: int, change: PreparedChange) -> str | None:
        if not base or Manifest.parse(base).lineage != Manifest.parse(change.task.manifest).lineage:
            return None  # another lineage is served now (a re-index went live): planned again there
        manifest = Manifest.parse(base)
        if change.dropped_pids.numel():
            self._delete(manifest.lineage, qm.PointIdsList(points=_ids(change.dropped_pids)))
        self._set_live(manifest.lineage, [*self._live(manifest), generation])
        return str(Manifest(manifest.lineage, generation))

    def abandon(self, change: PreparedChange) -> None:
        pass  # nothing was written

    def _drop_lineage(self, lineage: str) -> None:
        with self._calls():
            if self.client.collection_exists(lineage):
                self.client.delete_collection(lineage, timeout=self.config.timeout_s)
        self._dense.pop(lineage, None)

    def _keep(self, lineages: Iterable[str], keep: Iterable[str | None], at_start: bool = False) -> None:
        """Drop the lineages that ``keep`` does not name; in the others,
        forget the generations it does not name. ``at_start`` (nothing is
        being written): also delete the points of generations past the
        newest kept one, written and never committed. (While serving, such
        points are rewritten by the retry that reuses their passage ids.)"""
        kept: dict[str, list[int]] = {}
        for name in keep:
            if name:
                m = Manifest.parse(name)
                kept.setdefault(m.lineage, []).append(m.generation)
        for lineage in lineages:
            generations = kept.get(lineage)
            if not generations:
                self._drop_lineage(lineage)
                continue
            if at_start:
                where = qm.Filter(must=[qm.FieldCondition(key="g", range=qm.Range(gt=max(generations)))])
                self._delete(lineage, qm.FilterSelector(filter=where))
            if sorted(set(self._live(Manifest(lineage, 0)))) != sorted(set(generations)):
                self._set_live(lineage, generations)

    def release(self, collection_id: int, keep: Iterable[str | None]) -> None:
        self._keep(self._lineages(collection_id), keep)

    def recover(self, committed: Mapping[int, Iterable[str | None]]) -> None:
        lineages = self._lineages()
        for collection_id in set(lineages.values()):
            mine = [name for name, cid in lineages.items() if cid == collection_id]
            self._keep(mine, committed.get(collection_id, ()), at_start=True)

    def drop(self, collection_id: int) -> None:
        for lineage in self._lineages(collection_id):
            self._drop_lineage(lineage)

    def load(
        self, collection_id: int, generation: int, manifest: str | None, previous: object | None = None
    ) -> QdrantSnapshot:
        if not manifest:
            return QdrantSnapshot(self, generation, None, 0)
        m = Manifest.parse(manifest)
        if m.generation not in self._live(m):
            raise FileNotFoundError(manifest)
        where = qm.Filter(must=[qm.FieldCondition(key="g", range=qm.Range(lte=m.generation))])
        return QdrantSnapshot(self, generation, m, self._count(m.lineage, where))

    def stats(self, collection_id: int, manifest: str | None) -> IndexStats:
        if not manifest:
            return IndexStats("empty", 0, 0)
        m = Manifest.parse(manifest)
        where = qm.Filter(must=[qm.FieldCondition(key="g", range=qm.Range(lte=m.generation))])
        try:
            passages = self._count(m.lineage, where)
        except Exception:
            logger.warning("no statistics for %s", manifest, exc_info=True)
            passages = 0
        return IndexStats("qdrant", passages, self.config.shards)
