"""Split a document into passages that fit the model's document length.

The default is llama-index's SentenceSplitter, sized in the ColBERT
tokenizer's own word-pieces so that no passage is truncated by the model.
Every passage keeps its character offsets into the original text.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from app.validation import MAIN_FIELD

logger = logging.getLogger("app.ingest")


@dataclass(frozen=True)
class Passage:
    text: str
    char_start: int
    char_end: int
    page: int | None = None
    heading: str | None = None
    field: str = MAIN_FIELD  # the document's field the offsets point into


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
        self.overlap = budget // 8 if overlap is None else overlap
        self._splitter = SentenceSplitter(
            chunk_size=budget,
            chunk_overlap=self.overlap,
            tokenizer=self._count,
            include_metadata=False,
            include_prev_next_rel=False,
        )

    def _overlap_start(self, chunk: str) -> int:
        """Earliest offset in ``chunk`` where the next chunk can begin: the
        next one repeats at most ``overlap`` tokens of this one's tail."""
        offsets = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
            "offset_mapping"
        ]
        if len(offsets) <= self.overlap + 1:
            return 1
        return offsets[len(offsets) - self.overlap - 1][0]

    def split(self, text: str, tokens: int | None = None) -> list[Passage]:
        """``tokens``: the stripped text's token count, when the caller knows it."""
        stripped = text.strip()
        if (tokens if tokens is not None else len(self._count(stripped))) <= self.budget:
            start = text.find(stripped)
            return [Passage(stripped, start, start + len(stripped))]
        passages: list[Passage] = []
        search_from = 0
        for chunk in self._splitter.split_text(text):
            # Locate each chunk after the previous one's start (chunks overlap,
            # and repeated text must not map two chunks to one place).
            start = text.find(chunk, search_from)
            if start < 0:
                logger.warning("a chunk could not be located in its document; offsets approximate")
                start = search_from
            passages.append(Passage(chunk, start, start + len(chunk)))
            search_from = start + max(1, self._overlap_start(chunk))
        return [p for p in passages if p.text.strip()]
