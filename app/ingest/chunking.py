"""Split a document into passages that fit the model's document length.

The default is llama-index's SentenceSplitter, sized in the ColBERT
tokenizer's own word-pieces so that no passage is truncated by the model.
Every passage keeps its character offsets into the original text.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("app.ingest")


@dataclass(frozen=True)
class Passage:
    text: str
    char_start: int
    char_end: int
    page: int | None = None
    heading: str | None = None


class SentenceChunker:
    """Sentence-aware windows of at most ``budget`` tokens of ``tokenizer``."""

    def __init__(self, tokenizer, budget: int, overlap: int | None = None):
        if budget < 8:
            raise ValueError("passage budget must be at least 8 tokens")
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")  # never fetch tiktoken files: we pass our tokenizer
        from llama_index.core.node_parser import SentenceSplitter

        self.tokenizer = tokenizer
        self.budget = budget
        self._count = lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        self._splitter = SentenceSplitter(
            chunk_size=budget,
            chunk_overlap=budget // 8 if overlap is None else overlap,
            tokenizer=self._count,
            include_metadata=False,
            include_prev_next_rel=False,
        )

    def split(self, text: str) -> list[Passage]:
        from llama_index.core import Document

        stripped = text.strip()
        if len(self._count(stripped)) <= self.budget:
            start = text.find(stripped)
            return [Passage(stripped, start, start + len(stripped))]
        nodes = self._splitter.get_nodes_from_documents([Document(text=text)])
        passages = []
        for node in nodes:
            start, end = node.start_char_idx, node.end_char_idx
            if start is None or end is None or text[start:end] != node.text:
                # The splitter normalised whitespace: locate the text ourselves.
                start = text.find(node.text, passages[-1].char_start if passages else 0)
                end = start + len(node.text) if start >= 0 else -1
            if start < 0:
                logger.warning("a chunk could not be located in its document; offsets left empty")
                start = end = 0
            passages.append(Passage(node.text, start, end))
        return [p for p in passages if p.text.strip()]
