"""End-to-end benchmark on msmarco-mini, through the real server over HTTP.

Starts the server (uvicorn, fresh data directory), then in one run measures:
raw encoder throughput of the same model; ingest throughput through
``POST /documents``; nDCG@10 of the server's search; BM25 and dense MiniLM
nDCG@10 on the same data; warm search latency p50/p95 over HTTP at k=10;
index bytes per token; the server's peak memory (VmHWM).

Usage: python -m bench.msmarco_mini [--batch 250] [--port 8765]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.data import load, mean_ndcg, passage_text

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    idx = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[idx]


def raw_encoder_throughput(texts: list[str], checkpoint: str) -> float:
    from app.engine.encoder import ColBERTEncoder
    from colbert_patches.model_loading import EncoderOptions

    encoder = ColBERTEncoder(checkpoint, EncoderOptions.for_checkpoint(checkpoint))
    encoder.encode_documents(texts[:32])  # warm
    started = time.perf_counter()
    encoder.encode_documents(texts)
    return len(texts) / (time.perf_counter() - started)


def bm25_runs(corpus, queries) -> dict[str, list[str]]:
    import bm25s

    ids = [d["_id"] for d in corpus]
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([passage_text(d) for d in corpus], stopwords="en", show_progress=False), show_progress=False
    )
    qids = list(queries)
    results, _ = retriever.retrieve(
        bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False), k=10, show_progress=False
    )
    return {q: [ids[i] for i in row] for q, row in zip(qids, results.tolist())}


def dense_runs(corpus, queries) -> dict[str, list[str]]:
    from transformers import AutoModel, AutoTokenizer

    from models.build_default_checkpoint import bundled_minilm_dir

    path = bundled_minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()

    def embed(texts):
        out = []
        for i in range(0, len(texts), 64):
            batch = tok(texts[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    ids = [d["_id"] for d in corpus]
    D = embed([passage_text(d) for d in corpus])
    qids = list(queries)
    Q = embed([queries[q] for q in qids])
    top = (Q @ D.T).topk(10).indices.tolist()
    return {q: [ids[i] for i in row] for q, row in zip(qids, top)}


def start_server(data_dir: Path, port: int, **settings: str) -> subprocess.Popen:
    """The server (uvicorn) on a fresh data directory; ``settings``: more
    COLBERT_SERVER_* variables, by their lower-case names."""
    env = {**os.environ, "COLBERT_SERVER_DATA_DIR": str(data_dir), "COLBERT_SERVER_LOG_LEVEL": "WARNING"}
    env.update({f"COLBERT_SERVER_{name.upper()}": value for name, value in settings.items()})
    command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, cwd=ROOT, env=env)


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()


def wait_ready(client: httpx.Client, seconds: int = 900) -> None:
    """Until the server's /ready answers 200 (its models loaded)."""
    for _ in range(seconds):
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit("server did not become ready")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=250, help="documents per upsert request")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--raw-sample", type=int, default=1000, help="passages for the raw encoder figure")
    parser.add_argument("--latency-passes", type=int, default=3)
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args()

    corpus, queries, qrels = load()
    texts = [passage_text(d) for d in corpus]
    data_dir = Path(tempfile.mkdtemp(prefix="colbert-bench-"))
    server = start_server(data_dir, args.port)
    results: dict = {}
    base = f"http://127.0.0.1:{args.port}"
    try:
        with httpx.Client(base_url=base, timeout=600) as client:
            wait_ready(client)

            checkpoint = str(data_dir / "models" / "colbert-minilm-l6")
            results["raw_encoder_passages_per_s"] = raw_encoder_throughput(texts[: args.raw_sample], checkpoint)

            client.post("/v1/collections", json={"name": "msmarco"}).raise_for_status()
            started = time.perf_counter()
            for i in range(0, len(corpus), args.batch):
                docs = [
                    {"id": d["_id"], "text": d["text"], **({"title": d["title"]} if d.get("title") else {})}
                    for d in corpus[i : i + args.batch]
                ]
                r = client.post("/v1/collections/msmarco/documents", json={"documents": docs, "wait": True})
                r.raise_for_status()
            ingest_s = time.perf_counter() - started
            info = client.get("/v1/collections/msmarco").json()
            results["passages"] = info["chunks"]
            results["ingest_s"] = ingest_s
            results["ingest_passages_per_s"] = info["chunks"] / ingest_s
            results["ingest_vs_raw_encoder"] = results["ingest_passages_per_s"] / results["raw_encoder_passages_per_s"]
            # Let a background rebuild (if any) finish before timing searches.
            while client.get("/ready").json().get("writer", {}).get("busy"):
                time.sleep(1)

            def run_search(q):
                r = client.post("/v1/collections/msmarco/search", json={"query": q, "k": 10})
                r.raise_for_status()
                return [h["document_id"] for h in r.json()["results"]]

            runs = {qid: run_search(text) for qid, text in queries.items()}  # also the warm-up
            results["ndcg@10_server"] = mean_ndcg(runs, qrels)
            for mode, fusion in (("keyword", None), ("hybrid", "rescore"), ("hybrid", "rrf"), ("hybrid", "normalized")):
                body = {"k": 10, "mode": mode, **({"fusion": fusion} if fusion else {})}
                mode_runs = {}
                for qid, text in queries.items():
                    r = client.post("/v1/collections/msmarco/search", json={"query": text, **body})
                    r.raise_for_status()
                    mode_runs[qid] = [h["document_id"] for h in r.json()["results"]]
                results[f"ndcg@10_{mode}{'_' + fusion if fusion else ''}"] = mean_ndcg(mode_runs, qrels)
            latencies = []
            for _ in range(args.latency_passes):
                for text in queries.values():
                    t0 = time.perf_counter()
                    run_search(text)
                    latencies.append((time.perf_counter() - t0) * 1000)
            results["search_p50_ms"] = statistics.median(latencies)
            results["search_p95_ms"] = percentile(latencies, 95)
            results["search_requests"] = len(latencies)
            index = client.get("/v1/collections/msmarco").json()["index"]  # what the server reports of its index
            results["index_tokens"] = index["tokens"]
            results["index_bytes_per_token"] = index["bytes"] / index["tokens"]
            results["index_kind"] = index["kind"]
            results["index_segments"] = index["segments"]
        results["server_peak_rss_mib"] = peak_rss_mib(server.pid)
    finally:
        stop_server(server)
    if not args.skip_baselines:
        results["ndcg@10_bm25"] = mean_ndcg(bm25_runs(corpus, queries), qrels)
        results["ndcg@10_dense_minilm"] = mean_ndcg(dense_runs(corpus, queries), qrels)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"msmarco-mini-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
