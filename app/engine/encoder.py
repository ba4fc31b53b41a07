"""The ColBERT encoder shared by indexing and search in one process."""

from __future__ import annotations

import copy
import logging
import threading
import time

import torch

import colbert_patches
from colbert_patches.model_loading import EncoderOptions, load_checkpoint

logger = logging.getLogger("app.engine")

# Token positions per document-encoding batch (padding included): large
# enough for efficient matrix products, small enough to bound activations.
BATCH_TOKENS = 4096


def length_batches(token_ids: list[list[int]], batch_tokens: int) -> list[list[int]]:
    """Indices of ``token_ids`` grouped into length-sorted batches whose
    padded size (rows x longest row) stays within ``batch_tokens``."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(token_ids[i])  # the longest so far: the order is ascending
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), right-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[n, : len(row)] = 1
    return ids, mask


class ColBERTEncoder:
    """One checkpoint (model + tokenizers), loaded once, used by every thread."""

    def __init__(self, checkpoint: str, options: EncoderOptions):
        colbert_patches.apply()
        started = time.perf_counter()
        self.checkpoint_name = checkpoint
        self.options = options
        self.checkpoint = load_checkpoint(checkpoint, options)
        config = self.checkpoint.colbert_config
        self.dim = int(config.dim)
        self.nbits = int(config.nbits) if config.nbits in (1, 2, 4, 8) else 2
        self.doc_maxlen = int(config.doc_maxlen)
        self.query_maxlen = int(config.query_maxlen)
        # Fast tokenizers refuse concurrent use of one instance ("Already
        # borrowed"); queries and documents have their own instance and lock.
        self._query_lock = threading.Lock()
        self._doc_lock = threading.Lock()
        self.chunk_lock = threading.Lock()
        self._chunk_tokenizer = copy.deepcopy(self.checkpoint.doc_tokenizer.tok)
        self._pad_id = int(self.checkpoint.doc_tokenizer.tok.pad_token_id or 0)
        logger.info(
            "loaded checkpoint %s (dim=%d, doc_maxlen=%d, augmentation=%s, markers=%s) in %.1fs",
            checkpoint,
            self.dim,
            self.doc_maxlen,
            options.query_augmentation,
            options.marker_tokens,
            time.perf_counter() - started,
        )

    @property
    def tokenizer(self):
        """A tokenizer for splitting text into passages; hold ``chunk_lock``
        while using it (the encoding threads use their own instances)."""
        return self._chunk_tokenizer

    @property
    def passage_token_budget(self) -> int:
        return self.checkpoint.doc_tokenizer.content_token_budget()

    def encode_queries(self, queries: list[str]) -> torch.Tensor:
        """(len(queries), query_maxlen, dim) float32, L2-normalised rows."""
        with self._query_lock, torch.inference_mode():
            return self.checkpoint.queryFromText(list(queries), bsize=128, to_cpu=True).float()

    def encode_documents(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Packed token vectors (sum(doclens), dim) float16 and per-text lengths.

        Texts are tokenized once without padding, sorted by length and
        encoded in batches of about ``BATCH_TOKENS`` positions, each padded
        only to its own longest text: upstream's ``docFromText`` pads every
        batch to the longest text of the whole call, so most of what it
        computes is padding when lengths vary.
        """
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float16), []
        with self._doc_lock:
            token_ids = self.checkpoint.doc_tokenizer.token_ids(texts)
        vectors: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        with torch.inference_mode():
            for batch in length_batches(token_ids, BATCH_TOKENS):
                ids, mask = pad_batch([token_ids[i] for i in batch], self._pad_id)
                D, kept = self.checkpoint.doc(ids, mask, keep_dims="return_mask", to_cpu=True)
                D = D.to(torch.float16)
                for row, i in enumerate(batch):
                    vectors[i] = D[row][kept[row, :, 0]]
        return torch.cat(vectors), [int(v.size(0)) for v in vectors]

    def maxsim(self, query: str, texts: list[str]) -> list[float]:
        """Exact ColBERT scores of ``texts`` for ``query`` (no index)."""
        from colbert.modeling.colbert import colbert_score_packed

        Q = self.encode_queries([query])
        embs, doclens = self.encode_documents(texts)
        scores = colbert_score_packed(Q, embs.float(), torch.tensor(doclens, dtype=torch.int64))
        return scores.tolist()
