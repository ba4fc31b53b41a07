"""Answer benchmark on msmarco-mini with the default offline LM.

A collection of each judged query's best-graded passages plus a seeded
sample of unjudged ones; each judged query is asked through ``POST .../answer`` (k=5,
in-process ASGI, so the figures are the server's own work). Reports the
latency p50/p95 (total, generation, check), how often the citations include
a passage judged relevant (grade 2 or 3), and the hallucination scores.

    python -m bench.answer [--per-query 10] [--extra 300] [--k 5] [--stream]

``--stream`` times the answer service's server-sent event stream (the
events the route writes) for the time to the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from app.factory import create_app
from app.settings import Settings
from bench.data import load, passage_text


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(args) -> dict:
    corpus, queries, qrels = load()
    # Each query's best-graded judged passages (TREC DL grades 1-3) and a
    # seeded sample of unjudged ones.
    rng = random.Random(args.seed)
    judged_ids = {d for q in qrels.values() for d in q}
    picked = {d for q in qrels.values() for d, _ in sorted(q.items(), key=lambda x: -x[1])[: args.per_query]}
    others = [d for d in corpus if d["_id"] not in judged_ids]
    chosen = [d for d in corpus if d["_id"] in picked] + rng.sample(others, min(args.extra, len(others)))
    data_dir = Path(tempfile.mkdtemp(prefix="answer-bench-"))
    settings = Settings(
        _env_file=None,
        data_dir=data_dir,
        models_dir=args.models_dir or data_dir / "models",
        log_level="WARNING",
        answer_preload=True,
    )
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=900, shutdown_timeout=120) as manager:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://localhost", timeout=600
        )
        while (await client.get("/ready")).status_code != 200:
            await asyncio.sleep(0.2)
        await client.post("/v1/collections", json={"name": "msmarco"})
        started = time.perf_counter()
        for i in range(0, len(chosen), 256):
            batch = [{"id": d["_id"], "text": passage_text(d)} for d in chosen[i : i + 256]]
            r = await client.post("/v1/collections/msmarco/documents", json={"documents": batch})
            r.raise_for_status()
        indexed_s = time.perf_counter() - started
        # Wait for the LM and scorer to load, so the first answer is not a cold start.
        answers = app.state.answers
        await answers.ensure_loaded()

        rows = []
        for qid, judged in qrels.items():
            relevant = {d for d, g in judged.items() if g >= 2}
            body = {"question": queries[qid], "k": args.k}
            t0 = time.perf_counter()
            if args.stream:
                # The service's event stream itself: httpx's ASGI transport
                # buffers a whole response, so it cannot show a first token.
                first_token = None
                async for event, data in answers.stream("msmarco", queries[qid], args.k):
                    if event == "token" and first_token is None:
                        first_token = time.perf_counter() - t0
                    if event == "done":
                        out = data
            else:
                r = await client.post("/v1/collections/msmarco/answer", json=body)
                r.raise_for_status()
                out = r.json()
                first_token = None
            wall = time.perf_counter() - t0
            cited = [c["document_id"] for c in out["citations"]]
            retrieved = [c["document_id"] for c in out["context"]]
            rows.append(
                {
                    "qid": qid,
                    "question": queries[qid],
                    "answer": out["answer"],
                    "cited": cited,
                    "citation_sources": [c["source"] for c in out["citations"]],
                    "cited_relevant": bool(relevant & set(cited)),
                    "retrieved_relevant": bool(relevant & set(retrieved)),
                    "support": out["hallucination"]["score"] if out["hallucination"] else None,
                    "label": out["hallucination"]["label"] if out["hallucination"] else None,
                    "wall_s": wall,
                    "first_token_s": first_token,
                    "took_ms": out["took_ms"],
                }
            )
            print(f"{qid}: {wall:5.2f}s cited_relevant={rows[-1]['cited_relevant']} {out['answer'][:90]!r}")
        await client.aclose()

    n = len(rows)
    result = {
        "passages": len(chosen),
        "index_s": round(indexed_s, 1),
        "queries": n,
        "k": args.k,
        "lm": answers.lm.name,
        "answer_p50_s": round(statistics.median(r["wall_s"] for r in rows), 3),
        "answer_p95_s": round(percentile([r["wall_s"] for r in rows], 95), 3),
        "generate_p50_ms": statistics.median(r["took_ms"]["generate"] for r in rows),
        "check_p50_ms": statistics.median(r["took_ms"]["check"] for r in rows),
        "retrieve_p50_ms": statistics.median(r["took_ms"]["retrieve"] for r in rows),
        "cited_relevant_rate": round(sum(r["cited_relevant"] for r in rows) / n, 3),
        "retrieved_relevant_rate": round(sum(r["retrieved_relevant"] for r in rows) / n, 3),
        "model_marked_citation_rate": round(sum("model" in r["citation_sources"] for r in rows) / n, 3),
        "support_median": statistics.median(r["support"] for r in rows if r["support"] is not None),
        "supported_rate": round(sum(r["label"] == "supported" for r in rows) / n, 3),
    }
    if args.stream:
        result["first_token_p50_s"] = round(statistics.median(r["first_token_s"] for r in rows), 3)
    out_dir = Path("bench/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "answer.json").write_text(json.dumps({"summary": result, "rows": rows}, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-query", type=int, default=10, help="judged passages per query, best grades first")
    parser.add_argument("--extra", type=int, default=300, help="unjudged passages added to the collection")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--stream", action="store_true", help="measure through server-sent events (time to first token)"
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="reuse converted/exported models")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=1))


if __name__ == "__main__":
    main()
