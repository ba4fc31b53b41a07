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

    def encode_documents(self, texts: list[str], batch_size: int = 32) -> tuple[torch.Tensor, list[int]]:
        """Packed token vectors (sum(doclens), dim) float16 and per-text lengths."""
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float16), []
        with self._doc_lock, torch.inference_mode():
            embs, doclens = self.checkpoint.docFromText(list(texts), bsize=batch_size, keep_dims="flatten", to_cpu=True)
        return embs.to(torch.float16), [int(n) for n in doclens]

    def maxsim(self, query: str, texts: list[str]) -> list[float]:
        """Exact ColBERT scores of ``texts`` for ``query`` (no index)."""
        from colbert.modeling.colbert import colbert_score_packed

        Q = self.encode_queries([query])
        embs, doclens = self.encode_documents(texts)
        scores = colbert_score_packed(Q, embs.float(), torch.tensor(doclens, dtype=torch.int64))
        return scores.tolist()
