"""Stand-ins for tests that are about something else than the model or PLAID.

- :class:`FakeEncoder`: no model. Each word gets a fixed pseudo-random unit
  vector (seeded by its hash), so MaxSim behaves like soft word overlap: a
  passage sharing the query's words ranks above one that does not.
- :class:`FakeInMemoryBackend`: an index backend that keeps every generation
  in a dict and ranks by exact MaxSim; the reference the backend contract
  suite holds the real backends to.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Mapping

import torch

from app.engine.backend import IndexStats, MaintenanceTask, PassageBatch, PreparedChange, SearchRequest, SearchResult
from app.engine.encoder import EncodedPassages

WORD = re.compile(r"\w+|[^\w\s]")


class FakeTokenizer:
    """Words and punctuation as tokens, in the call shape of a HF fast tokenizer."""

    def __call__(self, text, add_special_tokens: bool = False, return_offsets_mapping: bool = False, **_):
        if isinstance(text, list):  # a batch: lists per text, as a fast tokenizer returns them
            rows = [self(t, add_special_tokens, return_offsets_mapping) for t in text]
            return {key: [row[key] for row in rows] for key in (rows[0] if rows else {"input_ids": []})}
        matches = list(WORD.finditer(text))
        out = {"input_ids": [_word_id(m.group().lower()) for m in matches]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(m.start(), m.end()) for m in matches]
        return out


def _word_id(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")


class FakeEncoder:
    """Word vectors as token vectors; the dense vector is their normalised
    mean (a bag of words), so the dense signal too favours shared words."""

    dim = 16
    dense_dim = 16
    nbits = 2
    query_maxlen = 8
    doc_maxlen = 40
    passage_token_budget = 40

    def __init__(self, salt: int = 0) -> None:
        """``salt``: another checkpoint's vectors (each word another vector)."""
        self.chunk_lock = threading.Lock()
        self._tokenizer = FakeTokenizer()
        self.documents_encoded = 0
        self.salt = salt

    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tokenizer

    def _vectors(self, text: str, limit: int) -> torch.Tensor:
        ids = self._tokenizer(text)["input_ids"][:limit] or [0]
        rows = []
        for token in ids:
            generator = torch.Generator().manual_seed(token ^ self.salt)
            rows.append(torch.randn(self.dim, generator=generator))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def encode_queries(self, queries: list[str]) -> torch.Tensor:
        out = torch.zeros(len(queries), self.query_maxlen, self.dim)
        for i, q in enumerate(queries):
            v = self._vectors(q, self.query_maxlen)
            out[i, : v.size(0)] = v
        return out

    def encode_documents(self, texts: list[str], batch_size: int = 32) -> tuple[torch.Tensor, list[int]]:
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float16), []
        vectors = [self._vectors(t, self.doc_maxlen) for t in texts]
        self.documents_encoded += len(texts)
        return torch.cat(vectors).half(), [v.size(0) for v in vectors]

    def encode_query(self, query: str) -> tuple[torch.Tensor, torch.Tensor]:
        Q = self.encode_queries([query])
        return Q, torch.nn.functional.normalize(Q[0, : len(self._tokenizer(query)["input_ids"]) or 1].mean(0), dim=0)[
            None
        ]

    def encode_passages(self, texts: list[str]) -> EncodedPassages:
        embs, doclens = self.encode_documents(texts)  # (tests patch it to fail or slow down)
        dense = [torch.nn.functional.normalize(rows.float().mean(0), dim=0) for rows in embs.split(doclens)]
        stacked = torch.stack(dense).half() if dense else torch.empty(0, self.dense_dim, dtype=torch.float16)
        return EncodedPassages(embs, doclens, stacked)

    def maxsim(self, query: str, texts: list[str]) -> list[float]:
        Q = self.encode_queries([query])[0]
        return [maxsim(Q, self._vectors(t, self.doc_maxlen)) for t in texts]


def maxsim(Q: torch.Tensor, D: torch.Tensor) -> float:
    """Late interaction: each query vector's best match in the passage, summed."""
    return float((Q @ D.float().T).max(dim=1).values.sum())


class FakeInMemorySnapshot:
    def __init__(self, generation: int, batches: tuple[PassageBatch, ...]):
        self.generation = generation
        self._passages: list[tuple[int, torch.Tensor]] = []
        self._dense: dict[int, torch.Tensor] = {}
        for batch in batches:
            offsets = torch.cumsum(batch.doclens, 0) - batch.doclens
            for row, (pid, start, n) in enumerate(zip(batch.pids.tolist(), offsets.tolist(), batch.doclens.tolist())):
                self._passages.append((pid, batch.embs[start : start + n]))
                if batch.dense is not None:
                    self._dense[pid] = batch.dense[row].float()

    @property
    def num_passages(self) -> int:
        return len(self._passages)

    @property
    def memory_bytes(self) -> int:
        return sum(D.numel() * D.element_size() for _, D in self._passages)

    def deleted_mask(self, dead_pids: torch.Tensor) -> torch.Tensor | None:
        if dead_pids.numel() == 0:
            return None
        dead = set(dead_pids.tolist())
        return torch.tensor([pid not in dead for pid, _ in self._passages], dtype=torch.bool)

    def search(self, Q, request: SearchRequest, alive=None, allowed_pids=None) -> SearchResult:
        allowed = set(allowed_pids.tolist()) if allowed_pids is not None else None
        scored = [
            (maxsim(Q[0], D), pid)
            for slot, (pid, D) in enumerate(self._passages)
            if (alive is None or bool(alive[slot])) and (allowed is None or pid in allowed)
        ]
        scored.sort(key=lambda item: (-item[0], item[1]))
        top = scored[: request.k]
        return SearchResult([pid for _, pid in top], [score for score, _ in top])

    def dense_search(self, q, k: int, alive=None, allowed_pids=None) -> SearchResult:
        allowed = set(allowed_pids.tolist()) if allowed_pids is not None else None
        scored = [
            (float(self._dense[pid] @ q.reshape(-1).float()), pid)
            for slot, (pid, _) in enumerate(self._passages)
            if pid in self._dense and (alive is None or bool(alive[slot])) and (allowed is None or pid in allowed)
        ]
        scored.sort(key=lambda item: (-item[0], item[1]))
        return SearchResult([pid for _, pid in scored[:k]], [score for score, _ in scored[:k]])

    def dense_scores(self, q, pids: torch.Tensor) -> torch.Tensor:
        return torch.tensor(
            [float(self._dense[p] @ q.reshape(-1).float()) if p in self._dense else float("nan") for p in pids.tolist()]
        )


class FakeInMemoryBackend:
    """:class:`app.engine.backend.IndexBackend` in a dict (no files)."""

    def __init__(self, rebuild_deleted_share: float = 0.3):
        self.rebuild_deleted_share = rebuild_deleted_share
        self.generations: dict[tuple[int, str], tuple[PassageBatch, ...]] = {}
        self.prepared: dict[str, tuple[tuple[PassageBatch, ...], tuple[PassageBatch, ...]]] = {}

    def write(self, collection_id: int, base: str | None, generation: int, batch: PassageBatch) -> str:
        previous = self.generations[(collection_id, base)] if base else ()
        name = f"memory-{generation:09d}"
        self.generations[(collection_id, name)] = (*previous, batch) if len(batch) else previous
        return name

    def _passages(self, collection_id: int, manifest: str | None) -> int:
        return sum(len(b) for b in self.generations[(collection_id, manifest)]) if manifest else 0

    def plan(self, collection_id: int, manifest: str | None, dead_pids: torch.Tensor) -> MaintenanceTask | None:
        """Compaction only: every batch rewritten once tombstones pass the share."""
        passages = self._passages(collection_id, manifest)
        dead = sum(
            int(torch.isin(b.pids, dead_pids).sum()) for b in self.generations.get((collection_id, manifest), ())
        )
        if manifest and passages > 0 and dead > self.rebuild_deleted_share * passages:
            return MaintenanceTask(collection_id, manifest, "merge", (manifest,), f"{dead} deleted")
        return None

    def prepare(self, task: MaintenanceTask, dead_pids: torch.Tensor) -> PreparedChange:
        kept, dropped = [], []
        for b in self.generations[(task.collection_id, task.manifest)]:
            keep = ~torch.isin(b.pids, dead_pids)
            tokens = torch.repeat_interleave(keep, b.doclens)
            dense = b.dense[keep] if b.dense is not None else None
            kept.append(PassageBatch(b.pids[keep], b.embs[tokens], b.doclens[keep], dense))
            dropped.append(b.pids[~keep])
        name = f"prepared-{len(self.prepared)}"
        self.prepared[name] = (self.generations[(task.collection_id, task.manifest)], tuple(b for b in kept if len(b)))
        return PreparedChange(task, None, name, (name,), torch.cat(dropped))

    def apply(self, collection_id: int, base: str | None, generation: int, change: PreparedChange) -> str | None:
        old, batches = self.prepared.pop(str(change.segment))
        current = self.generations.get((collection_id, base), ()) if base else ()
        if len(current) < len(old) or any(a is not b for a, b in zip(current, old)):
            return None  # compacted meanwhile
        name = f"memory-{generation:09d}"
        self.generations[(collection_id, name)] = (*batches, *current[len(old) :])
        return name

    def abandon(self, change: PreparedChange) -> None:
        self.prepared.pop(str(change.segment), None)

    def release(self, collection_id: int, keep: Iterable[str | None]) -> None:
        kept = set(keep)
        for key in [key for key in self.generations if key[0] == collection_id and key[1] not in kept]:
            del self.generations[key]

    def recover(self, committed: Mapping[int, Iterable[str | None]]) -> None:
        for key in [key for key in self.generations if key[1] not in set(committed.get(key[0], ()))]:
            del self.generations[key]

    def drop(self, collection_id: int) -> None:
        self.release(collection_id, [])

    def load(self, collection_id: int, generation: int, manifest: str | None, previous=None) -> FakeInMemorySnapshot:
        if not manifest:
            return FakeInMemorySnapshot(generation, ())
        try:
            batches = self.generations[(collection_id, manifest)]
        except KeyError:
            raise FileNotFoundError(manifest) from None
        return FakeInMemorySnapshot(generation, batches)

    def stats(self, collection_id: int, manifest: str | None) -> IndexStats:
        if not manifest:
            return IndexStats("empty", 0, 0)
        return IndexStats(
            "memory", self._passages(collection_id, manifest), len(self.generations[(collection_id, manifest)])
        )
