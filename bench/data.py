"""msmarco-mini loading and nDCG@10 (graded gain 2^g - 1, log2(rank + 1) discount)."""

from __future__ import annotations

import json
import math
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "msmarco-mini"


# business-reports' published judgments are keyed to the wrong query ids; the
# same judgments under the queries they belong to (bench/qrels/README.md).
BUSINESS_REPORTS_REKEYED = Path(__file__).resolve().parent / "qrels" / "business-reports-rekeyed.tsv"


def load(data_dir: Path = DATA):
    corpus = [json.loads(line) for line in (data_dir / "corpus.jsonl").open()]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (data_dir / "queries.jsonl").open())}
    return corpus, queries, read_qrels(data_dir / "qrels" / "test.tsv")


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> {corpus id: grade}; a header line is skipped."""
    qrels: dict[str, dict[str, int]] = {}
    for line in path.open():
        qid, did, grade = line.strip().split("\t")
        if grade.isdigit():
            qrels.setdefault(qid, {})[did] = int(grade)
    return qrels


def passage_text(doc: dict) -> str:
    title = (doc.get("title") or "").strip()
    return f"{title} {doc['text']}".strip() if title else doc["text"]


def ndcg_at_10(ranked: list[str], judged: dict[str, int]) -> float:
    dcg = sum((2 ** judged.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(judged.values(), reverse=True)[:10]
    idcg = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def mean_ndcg(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> float:
    judged = [q for q in qrels if q in runs]
    return sum(ndcg_at_10(runs[q], qrels[q]) for q in judged) / len(judged)


def encoded_corpus(encoder, corpus: list[dict], cache: Path):
    """(packed token vectors, doclens) of ``corpus`` by ``encoder``, kept in ``cache`` between runs."""
    import torch

    if cache.exists():
        return torch.load(cache)
    embs, lens = encoder.encode_documents([passage_text(d) for d in corpus])
    torch.save((embs, lens), cache)
    return embs, lens
