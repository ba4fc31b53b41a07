"""The PLAID backend against the Qdrant backend, on both datasets, in one run.

Four servers in turn, each on a fresh data directory (default settings
otherwise), over HTTP: PLAID; Qdrant in qdrant-client's local mode
(``INDEX_BACKEND=qdrant``, ``QDRANT_PATH``), its MaxSim rescoring the union
of the dense and the BM25 sparse first stage (``QDRANT_PREFETCH`` each); and
the same Qdrant data served again with no first stage (``QDRANT_PREFETCH=0``:
MaxSim scans every passage, the exact late-interaction ranking); and the
stateless tier (``STATELESS=true``: documents in Qdrant too, keyword search
by Qdrant's BM25 sparse vectors instead of SQLite's FTS5). For each:
nDCG@10 of colbert (the default), dense and keyword search, the search p50 (k=10,
warm), and the index's bytes per token vector: measured for PLAID's files,
computed from Qdrant's storage format for each storage choice (local mode
keeps points in its own format, not the server's).

Local mode computes what a server computes but runs it in Python in the
server's process: its latencies say nothing of a Qdrant server's.

Usage: python -m bench.qdrant [--port 8767] [--datasets msmarco-mini business-reports]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from bench.data import load, mean_ndcg
from bench.msmarco_mini import start_server, stop_server, wait_ready
from bench.quality import DATASETS, ingest, judgments_for, run_queries, settle, timed_p50, write_report

MODES = {"colbert": {"mode": "colbert"}, "dense": {"mode": "dense"}, "keyword": {"mode": "keyword"}}


def storage_bytes_per_token(dim: int) -> dict[str, dict[str, int]]:
    """Bytes per token vector in Qdrant, by storage choice: what RAM holds
    when vectors are on disk (``QDRANT_ON_DISK``), and the total."""
    return {
        "float32": {"ram_if_on_disk": 0, "total": 4 * dim},
        "float16": {"ram_if_on_disk": 0, "total": 2 * dim},
        # int8 scalar quantization kept in RAM, the float16 originals for rescoring on disk.
        "int8": {"ram_if_on_disk": dim, "total": dim + 2 * dim},
    }


def measure(client: httpx.Client, datasets: list[str], ingest_first: bool, passes: int) -> dict:
    out: dict = {}
    for dataset in datasets:
        corpus, queries, qrels = load(DATASETS[dataset])
        name = dataset.replace("-", "_")
        result: dict = {}
        if ingest_first:
            long_docs = max(len(d["text"]) for d in corpus) > 2000
            result["ingest_s"] = round(ingest(client, name, corpus, batch=50 if long_docs else 250), 1)
            settle(client)
        info = client.get(f"/v1/collections/{name}").json()
        result.update(passages=info["chunks"], index=info["index"], ndcg={}, p50_ms={})
        for mode, body in MODES.items():
            runs, _ = run_queries(client, name, queries, body)  # also warms it
            for label, judged in judgments_for(dataset, qrels):
                result["ndcg"].setdefault(label, {})[mode] = round(mean_ndcg(runs, judged), 4)
            result["p50_ms"][mode] = round(timed_p50(client, name, queries, body, passes), 1)
        out[dataset] = result
        print(dataset, result["ndcg"], result["p50_ms"], flush=True)
    return out


def serve(data_dir: Path, port: int, datasets: list[str], ingest_first: bool, passes: int, **settings: str) -> dict:
    server = start_server(data_dir, port, answer_preload="false", **settings)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            wait_ready(client)
            return measure(client, datasets, ingest_first, passes)
    finally:
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--latency-passes", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128, help="token vector size (the default checkpoint's)")
    args = parser.parse_args()
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "backends": {}}
    plaid_dir = Path(tempfile.mkdtemp(prefix="colbert-plaid-"))
    qdrant_dir = Path(tempfile.mkdtemp(prefix="colbert-qdrant-"))
    stateless_dir = Path(tempfile.mkdtemp(prefix="colbert-stateless-"))
    try:
        run = (args.port, args.datasets)
        print("# PLAID", flush=True)
        report["backends"]["plaid"] = serve(plaid_dir, *run, True, args.latency_passes)
        qdrant = {"index_backend": "qdrant", "qdrant_path": str(qdrant_dir / "qdrant")}
        print("# Qdrant, dense and sparse first stages, MaxSim rescoring", flush=True)
        report["backends"]["qdrant"] = serve(qdrant_dir, *run, True, args.latency_passes, **qdrant)
        print("# Qdrant, MaxSim scanning every passage", flush=True)
        report["backends"]["qdrant scan"] = serve(
            qdrant_dir, *run, False, args.latency_passes, **qdrant, qdrant_prefetch="0"
        )
        print("# the stateless tier over Qdrant (its keyword mode: Qdrant's BM25)", flush=True)
        stateless = {**qdrant, "qdrant_path": str(stateless_dir / "qdrant"), "stateless": "true"}
        report["backends"]["qdrant stateless"] = serve(stateless_dir, *run, True, args.latency_passes, **stateless)
    finally:
        shutil.rmtree(plaid_dir, ignore_errors=True)
        shutil.rmtree(qdrant_dir, ignore_errors=True)
        shutil.rmtree(stateless_dir, ignore_errors=True)
    report["plaid_bytes_per_token"] = {
        dataset: round(r["index"]["bytes"] / max(r["index"]["tokens"], 1), 1)
        for dataset, r in report["backends"]["plaid"].items()
    }
    report["qdrant_bytes_per_token"] = storage_bytes_per_token(args.dim)
    write_report("qdrant", report)


if __name__ == "__main__":
    main()
