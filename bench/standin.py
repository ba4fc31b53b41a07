"""``StandInEncoder``: a benchmark stand-in for the ColBERT model, so that a
scale run measures the engine's own cost (chunking, store writes,
compression, commits, search) and not the transformer's.

It is NOT a model and its rankings mean nothing beyond token overlap. It uses
the real tokenizer of the bundled MiniLM checkpoint (the same word-pieces,
passage budget and lengths as the default model) and gives every token a
fixed 128-dimensional unit vector: a row of a seeded random table indexed by
token id, with a little seeded noise that depends on the position (one of
:data:`POSITION_VARIANTS` noisy copies of each row, chosen by position, all
renormalised when the table is built), plus ``context`` times a row of a
second seeded table chosen by a hash of the token's two neighbours, so that
each occurrence of a word lies in a cloud around the word's row, one point
per context, as contextual vectors do. Without that context (``context=0``,
the first version) every passage's [CLS] and every "the" fall on the same
few points, one PLAID cell holds every passage and the engine searches the
whole collection for every query: on the 10k-passage scale corpus at 4,096
centroids its first stage yields 100% of the passages against 6.9% for the
real checkpoint; with ``CONTEXT_WEIGHT`` 23%, still 3x the real model's
(``python -m bench.plaid_cells``, BENCHMARKS.md). A call is the Rust
tokenizer plus two vectorised gathers; no forward pass. Like the real
encoder with the default checkpoint: no marker tokens, no query
augmentation, punctuation dropped from documents, queries padded with zero
vectors to the batch's longest.

With ``stats_dir`` set, each process writes ``standin-<pid>.json`` there
after every document-encoding call (passages and token vectors produced so
far), which is how the scale benchmark counts index tokens.
"""

from __future__ import annotations

import copy
import json
import os
import string
import threading
from pathlib import Path

import numpy as np
import torch

from app.engine.encoder import EncodedPassages
from models.build_default_checkpoint import COLBERT_DIM, DOC_MAXLEN, QUERY_MAXLEN, bundled_minilm_dir

DENSE_DIM = 384  # the default checkpoint's pooled vector

TABLE_SEED = 20250101
POSITION_NOISE = 0.1  # norm of the noise added to a token's row before renormalising
POSITION_VARIANTS = 4  # noisy copies of each row; position p uses copy p % 4
CONTEXT_WEIGHT = 0.5  # the weight of a token's context row against its own (see _vectors)
CONTEXT_ROWS = 1 << 16  # rows of the context table (neighbour pairs hash into it)


def load_tokenizer(path: Path | None = None):
    """The bundled MiniLM's fast tokenizer (no model weights are read)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path or bundled_minilm_dir()), use_fast=True)
    if not tokenizer.is_fast:
        raise RuntimeError("the stand-in encoder needs a fast tokenizer")
    return tokenizer


class StandInEncoder:
    """Deterministic token vectors from a seeded table; see the module docstring."""

    dim = COLBERT_DIM
    dense_dim = DENSE_DIM
    nbits = 2
    doc_maxlen = DOC_MAXLEN
    query_maxlen = QUERY_MAXLEN

    def __init__(
        self,
        seed: int = TABLE_SEED,
        noise: float = POSITION_NOISE,
        context: float = CONTEXT_WEIGHT,
        stats_dir: Path | str | None = None,
        tokenizer_dir: Path | None = None,
    ):
        base = load_tokenizer(tokenizer_dir)
        # Fast tokenizers refuse concurrent use of one instance: one each for
        # chunking (under chunk_lock), documents and queries.
        self._chunk_tokenizer = base
        self.chunk_lock = threading.Lock()
        self._doc_lock = threading.Lock()
        self._query_lock = threading.Lock()
        self.checkpoint_name = "stand-in (seeded token table, no model)"
        # The Rust tokenizer directly: the same ids as the HF call, without
        # building Python attention masks and type ids for every text.
        self._doc_backend = copy.deepcopy(base.backend_tokenizer)
        self._doc_backend.no_padding()
        self._doc_backend.enable_truncation(self.doc_maxlen)
        self._query_backend = copy.deepcopy(base.backend_tokenizer)
        self._query_backend.no_padding()
        self._query_backend.enable_truncation(self.query_maxlen)
        vocab = len(base)
        generator = torch.Generator().manual_seed(seed)
        rows = torch.nn.functional.normalize(torch.randn(vocab, 1, self.dim, generator=generator), dim=-1)
        jitter = noise * torch.randn(vocab, POSITION_VARIANTS, self.dim, generator=generator) / self.dim**0.5
        table = torch.nn.functional.normalize(rows + jitter, dim=-1).reshape(vocab * POSITION_VARIANTS, self.dim)
        self._table = table.to(torch.float16)
        # The dense vector: the mean token vector lifted to the real model's
        # width by a fixed matrix (what the index stores and scans per passage).
        self._lift = torch.randn(self.dim, self.dense_dim, generator=generator) / self.dim**0.5
        keep = np.ones(vocab, dtype=bool)
        for symbol in string.punctuation:
            ids = base.encode(symbol, add_special_tokens=False)
            if len(ids) == 1:
                keep[ids[0]] = False
        self._keep = keep
        self._pad_id = int(base.pad_token_id or 0)
        self.context = float(context)
        contexts = torch.randn(CONTEXT_ROWS, self.dim, generator=generator)
        self._context_table = torch.nn.functional.normalize(contexts, dim=-1).to(torch.float16)
        self._stats_path = Path(stats_dir) / f"standin-{os.getpid()}.json" if stats_dir else None
        self._stats = {"pid": os.getpid(), "calls": 0, "passages": 0, "tokens": 0}

    @property
    def tokenizer(self):
        """The tokenizer for splitting text into passages; hold ``chunk_lock``."""
        return self._chunk_tokenizer

    @property
    def passage_token_budget(self) -> int:
        return self.doc_maxlen - 2  # [CLS] and [SEP]

    def _vectors(self, ids: np.ndarray, positions: np.ndarray, owner: np.ndarray) -> torch.Tensor:
        """float16 unit rows for (token id, position) pairs; with ``context``,
        each row plus ``context`` times a row of a second seeded table picked
        by a hash of its neighbours' ids in the same text (``owner``: the text
        of each token), renormalised: each occurrence of a word lies in a
        cloud around the word's row, one point per context, as contextual
        vectors do, instead of on one of a few points."""
        rows = self._table[torch.from_numpy(ids * POSITION_VARIANTS + positions % POSITION_VARIANTS)]
        if not self.context:
            return rows
        edge = np.int64(len(self._keep))  # "no neighbour": outside the vocabulary
        boundary = owner[1:] != owner[:-1]  # between two texts
        before = np.concatenate([[edge], np.where(boundary, edge, ids[:-1])])
        after = np.concatenate([np.where(boundary, edge, ids[1:]), [edge]])
        keys = (before * 1_000_003 + after) % self._context_table.size(0)
        mixed = rows.float() + self.context * self._context_table[torch.from_numpy(keys)].float()
        return torch.nn.functional.normalize(mixed, dim=-1).to(torch.float16)

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        with self._doc_lock:
            rows = [e.ids for e in self._doc_backend.encode_batch(list(texts))]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        ids = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.arange(ids.size, dtype=np.int64) - starts
        owner = np.repeat(np.arange(len(rows)), lengths)
        kept = self._keep[ids]
        doclens = np.bincount(owner[kept], minlength=len(rows))
        return self._vectors(ids[kept], positions[kept], owner[kept]), doclens.tolist()

    def encode_documents(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Packed token vectors (sum(doclens), dim) float16 and per-text lengths."""
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float16), []
        embs, doclens = self._encode(texts)
        self._record(len(texts), int(embs.size(0)))
        return embs, doclens

    def encode_passages(self, texts: list[str]) -> EncodedPassages:
        """Token vectors and dense vectors (see ``_lift``)."""
        embs, doclens = self.encode_documents(texts)
        if not texts:
            return EncodedPassages(embs, doclens, torch.empty(0, self.dense_dim, dtype=torch.float16))
        owner = torch.repeat_interleave(torch.arange(len(doclens)), torch.tensor(doclens, dtype=torch.int64))
        sums = torch.zeros(len(doclens), self.dim).index_add_(0, owner, embs.float())
        return EncodedPassages(embs, doclens, self._dense(sums))

    def encode_query(self, query: str) -> tuple[torch.Tensor, torch.Tensor]:
        Q = self.encode_queries([query])
        return Q, self._dense(Q.sum(1)).float()

    def _dense(self, sums: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(sums @ self._lift, dim=-1).to(torch.float16)

    def encode_queries(self, queries: list[str]) -> torch.Tensor:
        """(len(queries), longest, dim) float32; zero vectors after each query's end."""
        with self._query_lock:
            rows = [e.ids for e in self._query_backend.encode_batch(list(queries))]
        width = max((len(r) for r in rows), default=1)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=bool)
        for n, row in enumerate(rows):
            ids[n, : len(row)] = row
            mask[n, : len(row)] = True
        positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), width)
        padding = ~mask.reshape(-1)
        owner[padding] = -1 - np.arange(int(padding.sum()))  # padding mixes with nothing
        Q = self._vectors(ids.reshape(-1), positions.reshape(-1), owner).float().view(len(rows), width, self.dim)
        return Q * torch.from_numpy(mask).unsqueeze(-1)

    def maxsim(self, query: str, texts: list[str]) -> list[float]:
        """Exact late-interaction scores of ``texts`` for ``query``."""
        if not texts:
            return []
        Q = self.encode_queries([query])[0]
        embs, doclens = self._encode(texts)
        return [float((Q @ D.float().T).max(dim=1).values.sum()) for D in embs.split(doclens)]

    def _record(self, passages: int, tokens: int) -> None:
        self._stats["calls"] += 1
        self._stats["passages"] += passages
        self._stats["tokens"] += tokens
        if self._stats_path is None:
            return
        tmp = self._stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._stats))
        tmp.replace(self._stats_path)

    @property
    def stats(self) -> dict:
        """Passages and token vectors produced by encode_documents in this process."""
        return dict(self._stats)


def read_stats(stats_dir: Path) -> dict:
    """The stand-in's document-encoding totals over every process that wrote to ``stats_dir``."""
    total = {"processes": 0, "calls": 0, "passages": 0, "tokens": 0}
    for path in sorted(Path(stats_dir).glob("standin-*.json")):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        total["processes"] += 1
        for key in ("calls", "passages", "tokens"):
            total[key] += int(stats.get(key, 0))
    return total
