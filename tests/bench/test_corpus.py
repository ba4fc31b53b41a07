"""The scale benchmark's corpus: msmarco-mini first, then seeded distractors."""

from __future__ import annotations

import types

import pytest

from bench.corpus import BLOCK, DISTRACTOR_PREFIX, MAX_WORDS, ScaleCorpus, judged_ids, split_sentences
from bench.data import DATA, load

pytestmark = pytest.mark.skipif(not (DATA / "corpus.jsonl").exists(), reason="benchmark data not present")


@pytest.fixture(scope="module")
def corpus() -> ScaleCorpus:
    return ScaleCorpus(seed=0)


def test_msmarco_passages_come_first_with_their_queries_and_qrels(corpus):
    msmarco, queries, qrels = load()
    assert corpus.judged_count == len(msmarco) == 5000
    first = [corpus.passage(i)["id"] for i in range(corpus.judged_count)]
    assert first == [d["_id"] for d in msmarco]
    assert corpus.passage(0)["text"] == msmarco[0]["text"]
    assert len(corpus.qrels) == 43 and corpus.queries == queries
    judged = {doc for docs in qrels.values() for doc in docs}
    assert judged <= set(first)
    assert corpus.passage(corpus.judged_count)["id"].startswith(DISTRACTOR_PREFIX)


def test_same_seed_same_passages_other_seed_others():
    a, b, c = ScaleCorpus(seed=0), ScaleCorpus(seed=0), ScaleCorpus(seed=1)
    span = range(5000, 5000 + 300)
    assert [a.passage(i) for i in span] == [b.passage(i) for i in span]
    assert [a.passage(i)["text"] for i in span] != [c.passage(i)["text"] for i in span]


def test_any_offset_and_batch_size_read_the_same_stream(corpus):
    start, stop = 4990, 5000 + 2 * BLOCK + 17
    whole = [p for batch in corpus.batches(stop, batch_size=997, start=start) for p in batch]
    again = ScaleCorpus(seed=0)
    pieces = [p for batch in again.batches(stop, batch_size=64, start=start) for p in batch]
    backwards = [again.passage(i) for i in reversed(range(start, stop))][::-1]
    assert whole == pieces == backwards
    assert len(whole) == stop - start


def test_batches_stream_one_block_at_a_time(corpus):
    batches = corpus.batches(5000 + 3 * BLOCK, batch_size=500, start=5000)
    assert isinstance(batches, types.GeneratorType)  # nothing generated before it is read
    sizes = []
    for batch in batches:
        sizes.append(len(batch))
        assert corpus._block is not None and len(corpus._block[1]) == BLOCK  # one block held, never more
    assert sum(sizes) == 3 * BLOCK and max(sizes) == 500


def test_distractors_are_unique_bounded_and_not_empty(corpus):
    passages = [corpus.passage(i) for i in range(5000, 5000 + 2000)]
    ids = [p["id"] for p in passages]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {corpus.passage(i)["id"] for i in range(corpus.judged_count)}
    assert all(0 < len(p["text"].split()) <= MAX_WORDS for p in passages)
    assert len({p["text"] for p in passages}) > 0.99 * len(passages)


def test_no_judged_passage_feeds_a_distractor(corpus):
    judged = judged_ids()
    assert judged and len(judged) == 4102
    msmarco_sources = {s.split(":", 1)[1] for s in corpus.sources if s.startswith("msmarco:")}
    assert msmarco_sources and not msmarco_sources & judged
    assert any(s.startswith("business-reports:") for s in corpus.sources)
    msmarco, _, _ = load()
    allowed = {s for d in msmarco if d["_id"] not in judged for s in split_sentences(d["text"])}
    allowed |= {s for text in _reports_texts() for s in split_sentences(text)}
    only_judged = {s for d in msmarco if d["_id"] in judged for s in split_sentences(d["text"])} - allowed
    assert set(corpus.sentences) <= allowed
    assert not set(corpus.sentences) & only_judged
    # and every distractor is made of pool sentences only
    pool = set(corpus.sentences)
    for i in range(5000, 5200):
        text = corpus.passage(i)["text"]
        assert any(text.startswith(s) for s in pool)


def _reports_texts() -> list[str]:
    import json

    from bench.corpus import REPORTS_DIR

    return [json.loads(line)["text"] for line in (REPORTS_DIR / "corpus.jsonl").open()]
