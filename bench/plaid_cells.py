"""How PLAID's candidate set grows with the collection, per encoder and codec size.

In process, no server: passages 0..N of the scale corpus (msmarco-mini, then
its distractors) encoded by the real checkpoint or by the stand-in, one codec
trained as the server would (``num_partitions_for`` capped at each
``--max-centroids``), one segment, the 43 judged queries searched at k=10 with
the server's parameters. Reports per query: the candidate passages PLAID's
first stage yields (the probed cells' passages, as a share of the
collection), the search time, and nDCG@10 (meaningful for the real encoder
only). It is how the stand-in's vector distribution was checked against the
real encoder's (BENCHMARKS.md): a PLAID engine's search cost follows its cell
sizes, so a stand-in whose cells are unlike the real model's would measure
a different engine.

    python -m bench.plaid_cells --passages 10000 --encoders real,standin,standin-context
    python -m bench.plaid_cells --passages 100000 --encoders standin-context --max-centroids 4096 --segments 1,16

With ``--segments``, the same compressed collection is also split into N
equal segments on its one codec and searched through the server's
``PlaidSnapshot`` (how search cost grows with the segment count).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from app.ingest.pipeline import passage_text
from bench.corpus import ScaleCorpus
from bench.data import mean_ndcg

ROOT = Path(__file__).resolve().parent.parent


def make_encoder(name: str):
    if name == "real":
        from app.service import load_encoder
        from app.settings import Settings

        return load_encoder(Settings())
    from bench.standin import CONTEXT_WEIGHT, StandInEncoder

    if name == "standin":
        return StandInEncoder(context=0.0)
    if name.startswith("standin-context"):
        weight = float(name.split("=", 1)[1]) if "=" in name else CONTEXT_WEIGHT
        return StandInEncoder(context=weight)
    raise SystemExit(f"unknown encoder {name!r}")


def encode(encoder, texts: list[str], cache: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    if cache is not None and cache.exists():
        state = torch.load(cache)
        return state["embs"], state["doclens"]
    parts, lens = [], []
    for lo in range(0, len(texts), 512):
        embs, doclens = encoder.encode_documents(texts[lo : lo + 512])
        parts.append(embs.to(torch.float16))
        lens.extend(doclens)
    embs, doclens = torch.cat(parts), torch.tensor(lens, dtype=torch.int64)
    if cache is not None:
        torch.save({"embs": embs, "doclens": doclens}, cache)
    return embs, doclens


def measure(
    encoder, embs, doclens, max_centroids: int, corpus: ScaleCorpus, ids: list[str], segments: list[int] = ()
) -> dict:
    from colbert_patches.codec import num_partitions_for, train_codec
    from colbert_patches.scorer import SnapshotScorer, search_params, segment_arrays

    tokens = int(embs.size(0))
    partitions = num_partitions_for(tokens, max_centroids)
    started = time.perf_counter()
    codec = train_codec(embs, dim=encoder.dim, nbits=encoder.nbits, partitions=partitions)
    train_s = time.perf_counter() - started
    codes, residuals = [], []
    for block in embs.split(1 << 16):
        packed = codec.compress(block.float())
        c, r = packed.codes, packed.residuals
        codes.append(c)
        residuals.append(r)
    codes_all, residuals_all = torch.cat(codes), torch.cat(residuals)
    scorer = SnapshotScorer(codec, segment_arrays(codes_all, residuals_all, doclens, partitions))
    qids = [q for q in corpus.qrels if q in corpus.queries]
    shares, times, runs = [], [], {}
    for qid in qids:
        q = encoder.encode_queries([corpus.queries[qid]]).float()  # one at a time, as the server does: no padding
        params = search_params(10, q.size(1))
        with torch.inference_mode():
            pids, _ = scorer.retrieve(params, q)
        shares.append(pids.numel() / doclens.numel())
        started = time.perf_counter()
        slots, _ = scorer.rank(params, q)
        times.append((time.perf_counter() - started) * 1000)
        runs[qid] = [ids[s] for s in slots[:10]]
    lengths = scorer.ivf.lengths.float()
    by_segments = {
        n: search_in_segments(codec, codes_all, residuals_all, doclens, n, encoder, corpus, ids) for n in segments
    }
    return {
        "segments": by_segments,
        "centroids": partitions,
        "train_s": train_s,
        "candidates_p50": statistics.median(shares),
        "candidates_max": max(shares),
        "largest_cell": float(lengths.max() / doclens.numel()),
        "search_p50_ms": statistics.median(times),
        "ndcg10": mean_ndcg(runs, corpus.qrels),
    }


def search_in_segments(codec, codes, residuals, doclens, n: int, encoder, corpus: ScaleCorpus, ids) -> dict:
    """The same compressed collection split into ``n`` equal segments on one
    codec and searched the server's way (:class:`PlaidSnapshot`): p50 ms, nDCG@10."""
    from app.engine.backend import SearchRequest
    from app.engine.index import SegmentEntry
    from app.engine.plaid import PlaidSnapshot, _Segment
    from colbert_patches.scorer import SnapshotScorer, segment_arrays

    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), doclens.cumsum(0)])
    bounds = [round(i * doclens.numel() / n) for i in range(n + 1)]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        lo, hi = int(offsets[a]), int(offsets[b])
        arrays = segment_arrays(codes[lo:hi], residuals[lo:hi], doclens[a:b], int(codec.centroids.size(0)))
        entry = SegmentEntry(f"segment-{a}", "codec", b - a, hi - lo, a, b - 1)
        parts.append(_Segment(entry, torch.arange(a, b), scorer=SnapshotScorer(codec, arrays)))
    snapshot = PlaidSnapshot(1, parts, "plaid")
    times, runs = [], {}
    for qid in [q for q in corpus.qrels if q in corpus.queries]:
        q = encoder.encode_queries([corpus.queries[qid]]).float()
        started = time.perf_counter()
        result = snapshot.search(q, SearchRequest(10))
        times.append((time.perf_counter() - started) * 1000)
        runs[qid] = [ids[p] for p in result.passage_ids]
    return {"search_p50_ms": statistics.median(times), "ndcg10": mean_ndcg(runs, corpus.qrels)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.plaid_cells", description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=10_000)
    p.add_argument("--encoders", default="real,standin,standin-context")
    p.add_argument("--max-centroids", default="4096,32768")
    p.add_argument("--cache", type=Path, default=None, help="a folder to keep encoded vectors in")
    p.add_argument(
        "--segments", default="", help="also search the collection split into N equal segments, e.g. 1,16 (1 thread)"
    )
    args = p.parse_args(argv)
    torch.manual_seed(0)
    segments = [int(n) for n in args.segments.split(",") if n]
    if segments:
        torch.set_num_threads(1)
    import colbert_patches

    colbert_patches.apply()  # the server's codec patches (faiss centroid assignment)
    corpus = ScaleCorpus()
    docs = [corpus.passage(i) for i in range(args.passages)]
    texts = [passage_text(d.get("title"), d["text"]) for d in docs]  # as the server encodes them
    ids = [d["id"] for d in docs]
    print(
        "| encoder | passages | centroids | codec trained s | candidates p50 / max (share) | largest cell (share) | search p50 ms | nDCG@10 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.encoders.split(","):
        encoder = make_encoder(name)
        cache = None
        if args.cache is not None:
            args.cache.mkdir(parents=True, exist_ok=True)
            cache = args.cache / f"{name}-{args.passages}.pt"
        embs, doclens = encode(encoder, texts, cache)
        for cap in (int(c) for c in args.max_centroids.split(",")):
            r = measure(encoder, embs, doclens, cap, corpus, ids, segments)
            print(
                f"| {name} | {args.passages:,} | {r['centroids']:,} | {r['train_s']:.1f} | "
                f"{r['candidates_p50']:.3f} / {r['candidates_max']:.3f} | {r['largest_cell']:.3f} | "
                f"{r['search_p50_ms']:.1f} | {r['ndcg10']:.4f} |",
                flush=True,
            )
            for n, figures in r["segments"].items():
                print(
                    f"|   in {n} segments | | | | | | {figures['search_p50_ms']:.1f} | {figures['ndcg10']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
