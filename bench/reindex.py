"""Tuning and re-indexing through the server, as a user runs them.

For each dataset (``../shared/bench``), on a real server process (uvicorn,
the default checkpoint, PLAID):

1. ingest the corpus; nDCG@10 of the judged queries (colbert mode) and
   search p50;
2. a tuning job (``POST .../tune`` with ``reindex: true``): its figures and
   wall time; the server goes on searching meanwhile;
3. the re-index with the tuned checkpoint, while a client searches in a loop
   and upserts a document every few seconds: re-index wall time and
   passages/s, search p50/p95 during it against before, the time each upsert
   took to become searchable, and every search checked to answer 200;
4. nDCG@10 with the tuned checkpoint, as served (PLAID over re-encoded
   vectors); then a re-index back to the configured checkpoint and nDCG@10
   again (the same vectors as step 1, a new codec).

The judged queries never reach the tuning (its pseudo-queries come from the
passages alone). business-reports is scored under its published and its
re-keyed judgments (bench/qrels/README.md).

    python -m bench.reindex [--datasets msmarco-mini business-reports] [--steps 200]

Writes ``bench/results/reindex-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.data import load, mean_ndcg
from bench.msmarco_mini import start_server, stop_server, wait_ready
from bench.quality import DATASETS, ingest, judgments_for, run_queries, settle, write_report


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Traffic(threading.Thread):
    """Searches in a loop, and an upsert every ``upsert_every_s`` whose
    visibility is timed, until stopped."""

    def __init__(self, base_url: str, name: str, queries: list[str], upsert_every_s: float = 3.0):
        super().__init__(daemon=True)
        self.base_url, self.name, self.queries = base_url, name, queries
        self.upsert_every_s = upsert_every_s
        self.latencies_ms: list[float] = []
        self.visible_s: list[float] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            i, last_upsert, probe = 0, time.monotonic(), 0
            while not self._halt.is_set():
                if time.monotonic() - last_upsert >= self.upsert_every_s:
                    last_upsert = time.monotonic()
                    probe += 1
                    self._upsert_and_wait(client, probe)
                    continue
                query = self.queries[i % len(self.queries)]
                i += 1
                started = time.perf_counter()
                r = client.post(f"/v1/collections/{self.name}/search", json={"query": query, "k": 10})
                if r.status_code != 200:
                    self.errors.append(f"search {r.status_code}: {r.text[:200]}")
                    continue
                self.latencies_ms.append((time.perf_counter() - started) * 1000)

    def _upsert_and_wait(self, client: httpx.Client, probe: int) -> None:
        word = f"reindexprobe{probe}x"
        text = f"A note written during the re-index, marked {word}, about nothing else."
        started = time.perf_counter()
        r = client.post(f"/v1/collections/{self.name}/documents", json={"documents": [{"id": word, "text": text}]})
        if r.status_code not in (200, 202):
            self.errors.append(f"upsert {r.status_code}: {r.text[:200]}")
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            body = {"query": word, "k": 3, "mode": "keyword"}
            hits = client.post(f"/v1/collections/{self.name}/search", json=body).json().get("results", [])
            # Keyword mode finds it once it is live; colbert mode then must too.
            if any(h["document_id"] == word for h in hits):
                colbert = client.post(f"/v1/collections/{self.name}/search", json={"query": word, "k": 3})
                if any(h["document_id"] == word for h in colbert.json()["results"]):
                    self.visible_s.append(time.perf_counter() - started)
                    return
            time.sleep(0.05)
        self.errors.append(f"upsert {word} not searchable within 60 s")


def ndcg(client: httpx.Client, name: str, queries: dict, judgments: list[tuple[str, dict]]) -> dict[str, float]:
    runs, _ = run_queries(client, name, queries, {"mode": "colbert"})
    return {label: round(mean_ndcg(runs, qrels), 4) for label, qrels in judgments}


def wait_for(client: httpx.Client, url: str, done, timeout: float = 7200.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting on {url}: {body}")
        time.sleep(1.0)


def reindex_live(base_url: str, client: httpx.Client, name: str, checkpoint: str | None, queries: list[str]) -> dict:
    """Re-index ``name`` with ``checkpoint`` under search and upsert traffic."""
    traffic = Traffic(base_url, name, queries)
    before = client.get(f"/v1/collections/{name}").json()
    started = time.perf_counter()
    client.post(f"/v1/collections/{name}/reindex", json={"checkpoint": checkpoint}).raise_for_status()
    traffic.start()
    try:
        after = wait_for(
            client,
            f"/v1/collections/{name}",
            lambda c: c["checkpoint"] == checkpoint and c["reindex"] is None,
        )
    finally:
        traffic.stop()
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 1),
        "passages": after["chunks"],
        "passages_per_s": round(after["chunks"] / seconds, 1),
        "generation_before": before["generation"],
        "generation_after": after["generation"],
        "searches": len(traffic.latencies_ms),
        "search_p50_ms": round(statistics.median(traffic.latencies_ms), 1) if traffic.latencies_ms else None,
        "search_p95_ms": round(percentile(traffic.latencies_ms, 0.95), 1),
        "upserts": len(traffic.visible_s),
        "upsert_visible_p50_s": round(statistics.median(traffic.visible_s), 2) if traffic.visible_s else None,
        "upsert_visible_max_s": round(max(traffic.visible_s), 2) if traffic.visible_s else None,
        "errors": traffic.errors[:20],
        "index": after["index"],
    }


def quiet_latencies(client: httpx.Client, name: str, queries: list[str], passes: int = 2) -> list[float]:
    out = []
    for _ in range(passes):
        for q in queries:
            started = time.perf_counter()
            client.post(f"/v1/collections/{name}/search", json={"query": q, "k": 10}).raise_for_status()
            out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="colbert-reindex-"))
    server = start_server(data_dir, args.port, answer_preload="false")
    base_url = f"http://127.0.0.1:{args.port}"
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": args.steps, "datasets": {}}
    try:
        with httpx.Client(base_url=base_url, timeout=600) as client:
            wait_ready(client)
            for dataset in args.datasets:
                corpus, queries, qrels = load(DATASETS[dataset])
                judgments = judgments_for(dataset, qrels)
                name = dataset.replace("-", "_")
                long_docs = max(len(d["text"]) for d in corpus) > 2000
                ingest_s = ingest(client, name, corpus, batch=50 if long_docs else 250)
                settle(client)
                texts = list(queries.values())
                result: dict = {"documents": len(corpus), "ingest_s": round(ingest_s, 1)}
                result["base"] = {
                    "ndcg@10": ndcg(client, name, queries, judgments),
                    "search_p50_ms": round(statistics.median(quiet_latencies(client, name, texts)), 1),
                }
                started = time.perf_counter()
                body = {"steps": args.steps, "seed": args.seed, "reindex": False}
                job = client.post(f"/v1/collections/{name}/tune", json=body).json()
                job = wait_for(client, f"/v1/collections/{name}/tune/{job['id']}", lambda j: j["state"] != "running")
                if job["state"] != "done":
                    raise SystemExit(f"tuning failed: {job}")
                result["tuning"] = {**job["result"], "wall_s": round(time.perf_counter() - started, 1)}
                result["reindex_tuned"] = reindex_live(base_url, client, name, job["checkpoint"], texts)
                settle(client)
                result["tuned"] = {
                    "ndcg@10": ndcg(client, name, queries, judgments),
                    "search_p50_ms": round(statistics.median(quiet_latencies(client, name, texts)), 1),
                }
                result["reindex_back"] = reindex_live(base_url, client, name, None, texts)
                settle(client)
                result["back"] = {"ndcg@10": ndcg(client, name, queries, judgments)}
                report["datasets"][dataset] = result
                print_dataset(dataset, result)
    finally:
        stop_server(server)
    write_report("reindex", report)


def print_dataset(dataset: str, r: dict) -> None:
    print(f"\n## {dataset}: {r['documents']} documents (ingest {r['ingest_s']} s)")
    t = r["tuning"]
    print(
        f"tuning: {t['steps']} steps on {t['passages']} passages, held-out loss {t['held_out_before']} -> "
        f"{t['held_out_after']} (step {t['kept_step']} kept), {t['wall_s']} s"
    )
    for label in r["base"]["ndcg@10"]:
        print(
            f"nDCG@10 {label}: base {r['base']['ndcg@10'][label]}, tuned {r['tuned']['ndcg@10'][label]}, "
            f"back to base {r['back']['ndcg@10'][label]}"
        )
    for key in ("reindex_tuned", "reindex_back"):
        x = r[key]
        print(
            f"{key}: {x['passages']} passages in {x['seconds']} s ({x['passages_per_s']}/s); during it "
            f"{x['searches']} searches p50 {x['search_p50_ms']} ms p95 {x['search_p95_ms']} ms "
            f"(quiet p50 {r['base']['search_p50_ms']} ms); {x['upserts']} upserts visible in "
            f"p50 {x['upsert_visible_p50_s']} s, max {x['upsert_visible_max_s']} s; errors {len(x['errors'])}"
        )


if __name__ == "__main__":
    main()
