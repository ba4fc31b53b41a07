"""A deterministic corpus that grows around msmarco-mini: its 5,000 passages
(with the 43 judged queries and their qrels) first, then any number of
distractor passages.

Distractors are recombined sentences of text shipped with the benchmark data:
the business-reports chunks and the msmarco-mini passages that the qrels
judge relevant to no query (passages named in the qrels never feed a
distractor). Their lengths follow msmarco-mini's word counts. So quality at
scale is measured with the real qrels while the collection grows, and no
distractor repeats a judged passage.

Passage ``i`` of the stream is a pure function of ``(seed, i)``: distractors
are generated in fixed blocks of :data:`BLOCK` passages, each block from its
own seeded generator, so reading from any offset in any batch size yields the
same passages, and only one block is held at a time (a million passages never
sit in memory together).

    corpus = ScaleCorpus(seed=0)
    for batch in corpus.batches(1_000_000, batch_size=500):
        ...  # lists of {"id", "text"[, "title"]} dicts, the API's document shape
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.data import DATA as MSMARCO_DIR
from bench.data import load

REPORTS_DIR = MSMARCO_DIR.parent / "business-reports"

BLOCK = 1024  # distractors per seeded generator block
MAX_SENTENCES = 8  # sentences drawn per distractor (at most)
MIN_WORDS, MAX_WORDS = 20, 150  # a distractor's length; 150 words fit one 218-token passage
SENTENCE_WORDS = (3, 80)  # sentences outside this range stay out of the pool
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")

DISTRACTOR_PREFIX = "distractor-"


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def judged_ids(data_dir: Path = MSMARCO_DIR) -> set[str]:
    """Every passage the msmarco-mini qrels name, whatever its grade."""
    ids: set[str] = set()
    for line in (data_dir / "qrels" / "test.tsv").open():
        parts = line.strip().split("\t")
        if len(parts) == 3 and parts[2].lstrip("-").isdigit():
            ids.add(parts[1])
    return ids


def api_document(doc: dict) -> dict:
    """A BEIR passage as the API's document: id, text, title when it has one."""
    title = (doc.get("title") or "").strip()
    return {"id": doc["_id"], "text": doc["text"], **({"title": title} if title else {})}


class ScaleCorpus:
    """msmarco-mini plus seeded distractors; see the module docstring."""

    def __init__(self, seed: int = 0, msmarco_dir: Path = MSMARCO_DIR, reports_dir: Path = REPORTS_DIR):
        self.seed = seed
        corpus, self.queries, self.qrels = load(msmarco_dir)
        self.judged = [api_document(d) for d in corpus]
        excluded = judged_ids(msmarco_dir)
        sources: list[tuple[str, str]] = [
            (f"msmarco:{d['_id']}", d["text"]) for d in corpus if d["_id"] not in excluded
        ]
        for line in (reports_dir / "corpus.jsonl").open():
            doc = json.loads(line)
            sources.append((f"business-reports:{doc['_id']}", doc["text"]))
        self.sources = [source for source, _ in sources]
        pool: list[str] = []
        for _, text in sources:
            pool.extend(s for s in split_sentences(text) if SENTENCE_WORDS[0] <= len(s.split()) <= SENTENCE_WORDS[1])
        self.sentences = pool
        self._sentence_words = np.array([len(s.split()) for s in pool], dtype=np.int64)
        lengths = np.array([len(d["text"].split()) for d in corpus], dtype=np.int64)
        self._target_words = np.clip(lengths, MIN_WORDS, MAX_WORDS)
        self._block: tuple[int, list[dict]] | None = None

    @property
    def judged_count(self) -> int:
        return len(self.judged)

    def passage(self, index: int) -> dict:
        """Passage ``index`` of the stream (msmarco-mini first, then distractors)."""
        if index < len(self.judged):
            return self.judged[index]
        j = index - len(self.judged)
        return self._distractor_block(j // BLOCK)[j % BLOCK]

    def batches(self, stop: int, batch_size: int = 500, start: int = 0) -> Iterator[list[dict]]:
        """Passages ``start`` to ``stop - 1`` in lists of ``batch_size``."""
        for lo in range(start, stop, batch_size):
            yield [self.passage(i) for i in range(lo, min(stop, lo + batch_size))]

    def _distractor_block(self, block: int) -> list[dict]:
        if self._block is not None and self._block[0] == block:
            return self._block[1]
        rng = np.random.default_rng([self.seed, block])
        targets = rng.choice(self._target_words, size=BLOCK)
        picks = rng.integers(0, len(self.sentences), size=(BLOCK, MAX_SENTENCES))
        passages = []
        for row in range(BLOCK):
            chosen: list[str] = []
            words = 0
            for s in picks[row]:
                n = int(self._sentence_words[s])
                if chosen and words + n > MAX_WORDS:
                    break
                chosen.append(self.sentences[s])
                words += n
                if words >= targets[row]:
                    break
            passages.append({"id": f"{DISTRACTOR_PREFIX}{block * BLOCK + row:08d}", "text": " ".join(chosen)})
        self._block = (block, passages)
        return passages
