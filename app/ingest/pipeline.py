"""Documents to chunk rows: the step between a request (or an extracted file)
and the store's pending rows.

Each document is split into passages that fit the encoder's document length
(minus its title, which is prefixed to every passage at encoding time), per
page/heading section when the extractor found any, so each chunk has exactly
one page and one heading.

A document's named fields (``fields: {name: text}`` beside ``text``) are
split the same way, each on its own: every chunk records the field it was cut
from (``text`` for the main text), its offsets pointing into that field. The
title rules:

- the document's title (shown in hits, prefixed to its chunks) is its
  ``title``, or else its ``title`` field;
- the ``title`` attribute alone is not indexed on its own (as before fields:
  only as every chunk's prefix); a ``title`` field is, as chunks of field
  ``title``, so a search can find documents by title alone (``fields:
  ["title"]``). A title field's chunks are encoded without the prefix (it
  would repeat them).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Protocol

from app.ingest.chunking import Passage, SentenceChunker
from app.store.store import NewDocument
from app.validation import MAIN_FIELD, TITLE_FIELD

MIN_BUDGET = 32  # tokens per passage, whatever the title length


@dataclass
class DocumentInput:
    id: str | None
    text: str
    title: str | None = None
    metadata: dict | None = None
    sections: list | None = None  # app.ingest.extract.Section spans (pages, headings)
    fields: dict[str, str] | None = None  # named text fields beside text: name -> text


def document_title(title: str | None, fields: dict[str, str] | None = None) -> str | None:
    """A document's title: its ``title``, else its ``title`` field (stripped; None when blank)."""
    for candidate in (title, (fields or {}).get(TITLE_FIELD)):
        if candidate and candidate.strip():
            return candidate.strip()
    return None


def passage_text(title: str | None, text: str, field: str = MAIN_FIELD) -> str:
    """What the encoder sees for one chunk: its document's title, then the
    chunk; a chunk of the title field alone."""
    return f"{title}\n{text}" if title and field != TITLE_FIELD else text


def content_digest(text: str, fields: dict[str, str] | None = None) -> str:
    """The hash an upsert compares to tell unchanged content: of the text
    alone when there are no fields (as before fields), else of the text and
    the fields, in any order."""
    content = text if not fields else text + "\0" + json.dumps(fields, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


class Splitter(Protocol):
    def split(self, text: str, tokens: int | None = None) -> list[Passage]: ...


class ChunkingEncoder(Protocol):
    """What the pipeline needs of an encoder: its tokenizer and passage budget."""

    chunk_lock: threading.Lock

    @property
    def tokenizer(self): ...

    @property
    def passage_token_budget(self) -> int: ...


class DocumentPreparer:
    """Splits documents with one chunker per token budget (budgets differ
    only by title length; building llama-index's splitter for every document
    is wasted work). Thread-safe: the encoder's ``chunk_lock`` guards its
    tokenizer."""

    def __init__(self, encoder: ChunkingEncoder, chunker: str = "sentence"):
        self.encoder = encoder
        self.chunker = chunker
        self._chunkers: dict[int, Splitter] = {}
        self._backend = _counting_backend(encoder.tokenizer)

    def prepare(self, docs: list[DocumentInput]) -> list[NewDocument]:
        with self.encoder.chunk_lock:
            # One batched tokenizer call for every title, whole text and
            # field (most fit one passage: they are not tokenized again).
            titles = [document_title(d.title, d.fields) for d in docs]
            bodies = [[d.text.strip(), *(v.strip() for v in (d.fields or {}).values())] for d in docs]
            counts = self._counts([t or "" for t in titles] + [b for texts in bodies for b in texts])
            title_tokens, rest = counts[: len(docs)], iter(counts[len(docs) :])
            body_tokens = [[next(rest) for _ in texts] for texts in bodies]
            return [
                self._prepare_one(doc, title, n_title, n_bodies)
                for doc, title, n_title, n_bodies in zip(docs, titles, title_tokens, body_tokens)
            ]

    def _counts(self, texts: list[str]) -> list[int]:
        """Tokens per text, no special tokens (under ``chunk_lock``)."""
        if not texts:
            return []
        backend = self._backend
        if backend is None:
            return [len(row) for row in self.encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        # The Rust tokenizer directly, without offsets: the same counts, 35%
        # faster than the HF call that also builds masks and type ids.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [len(e.ids) for e in encode(texts, add_special_tokens=False)]

    def _prepare_one(
        self, doc: DocumentInput, title: str | None, title_tokens: int, body_tokens: list[int]
    ) -> NewDocument:
        """``body_tokens``: the token counts of the stripped text, then of each field."""
        assert doc.id is not None, "document ids are assigned before chunking"
        text_tokens, *field_tokens = body_tokens
        budget = self.encoder.passage_token_budget
        if title:
            budget -= title_tokens + 1
        chunker = self._splitter(max(budget, MIN_BUDGET))
        if doc.sections:
            passages = [
                dataclasses.replace(
                    p,
                    char_start=p.char_start + sec.char_start,
                    char_end=p.char_end + sec.char_start,
                    page=sec.page,
                    heading=sec.heading,
                )
                for sec in doc.sections
                if doc.text[sec.char_start : sec.char_end].strip()
                for p in chunker.split(doc.text[sec.char_start : sec.char_end])
            ]
        else:
            passages = chunker.split(doc.text, tokens=text_tokens)
        for (name, text), tokens in zip((doc.fields or {}).items(), field_tokens, strict=True):
            # A title field's chunks carry no prefix: the whole budget is theirs.
            splitter = self._splitter(self.encoder.passage_token_budget) if name == TITLE_FIELD else chunker
            passages.extend(dataclasses.replace(p, field=name) for p in splitter.split(text, tokens=tokens))
        fields = dict(doc.fields) if doc.fields else None
        return NewDocument(doc.id, title, doc.metadata or {}, content_digest(doc.text, fields), passages, fields)

    def _splitter(self, budget: int) -> Splitter:
        splitter = self._chunkers.get(budget)
        if splitter is None:
            if self.chunker == "semantic":
                from app.ingest.semantic import SemanticChunker

                splitter = SemanticChunker(self.encoder.tokenizer, budget)
            else:
                splitter = SentenceChunker(self.encoder.tokenizer, budget)
            self._chunkers[budget] = splitter
        return splitter


def _counting_backend(tokenizer):
    """A private copy of a fast tokenizer's Rust tokenizer with no truncation
    or padding (the shared one keeps whatever the last HF call set); None
    for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    backend = copy.deepcopy(backend)
    backend.no_truncation()
    backend.no_padding()
    return backend
