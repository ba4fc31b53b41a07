"""How codecs sized at each retraining serve the passages that arrived first.

A collection that grows from nothing is compressed by a sequence of codecs:
the first trained when it leaves the exact tier (``EXACT_SEARCH_MAX_PASSAGES``
passages), the next each time it has grown ``REBUILD_GROWTH_FACTOR`` times.
Segments keep the codec they were written with, so each codec serves up to
``growth`` times the passages it was trained on. This replays that schedule
in memory on msmarco-mini (its judged passages are the first to arrive),
encoded by each document-encoder runtime, and measures nDCG@10 (k=10,
default PLAID parameters; the mean over ``--seeds`` k-means seeds, since
one codec's training noise on 43 queries is about 0.01) for codec sizing
policies:

- ``at training``: centroids for the tokens present when the codec is trained
  (``num_partitions_for(tokens)``);
- ``for its load``: centroids for the tokens it will hold by the next
  retraining (``growth`` x those tokens), trained on the same vectors;
- ``one codec``: a single codec trained on every vector (the reference);
- ``recompressed``: every passage on the last codec of the schedule, from
  its original vectors, or (what a server that kept no originals can do) the
  older segments' vectors decompressed with their codec and compressed again.

    python -m bench.codec_sizing [--runtimes torch,onnx-int8] [--growth 4] [--first 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import colbert_patches
from app.engine.backend import SearchRequest
from app.engine.encoder import ColBERTEncoder
from app.engine.index import SegmentEntry
from app.engine.plaid import PlaidSnapshot, _decompress, _Segment
from bench.data import encoded_corpus, load, mean_ndcg
from colbert_patches.codec import num_partitions_for, partitions_trainable, train_codec
from colbert_patches.model_loading import EncoderOptions
from colbert_patches.scorer import SnapshotScorer, segment_arrays
from models.build_default_checkpoint import ensure_default_checkpoint

MAX_CENTROIDS = 32768


def schedule(n: int, first: int, growth: float) -> list[int]:
    """Passage counts at which codecs are trained: first, first*g, ... below n."""
    points, at = [], first
    while at < n:
        points.append(at)
        at = int(at * growth)
    return points


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.codec_sizing", description=__doc__.splitlines()[0])
    p.add_argument("--runtimes", default="torch,onnx-int8")
    p.add_argument("--growth", type=float, default=4.0)
    p.add_argument("--first", type=int, default=1024)
    p.add_argument("--seeds", type=int, default=3, help="k-means seeds per policy (nDCG@10 is their mean)")
    args = p.parse_args(argv)
    colbert_patches.apply()
    tmp = Path(tempfile.gettempdir())
    checkpoint = str(ensure_default_checkpoint(tmp / "colbert-minilm-l6"))
    n = len(load()[0])
    points = schedule(n, args.first, args.growth)
    print(f"codecs trained at {points} passages of {n}, growth {args.growth:g}\n")
    print("| runtime | policy | codecs (centroids) | nDCG@10 |\n| --- | --- | --- | --- |")
    for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
        measure(runtime, args, checkpoint, points)


def measure(runtime: str, args, checkpoint: str, points: list[int]) -> None:
    """Every policy's rows for one document-encoder runtime."""
    tmp = Path(tempfile.gettempdir())
    corpus, queries, qrels = load()
    ids = [d["_id"] for d in corpus]
    n = len(ids)
    pids = torch.arange(n)
    encoder = ColBERTEncoder(
        checkpoint, EncoderOptions.for_checkpoint(checkpoint), runtime=runtime, models_dir=tmp / "codec-sizing"
    )
    embs, lens = encoded_corpus(encoder, corpus, tmp / f"msmarco-mini-token-vectors-{runtime}.pt")
    doclens = torch.tensor(lens)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), doclens.cumsum(0)])
    Qs = {q: encoder.encode_queries([t]) for q, t in queries.items() if q in qrels}

    def segment(codec, first: int, last: int, source: torch.Tensor | None = None) -> _Segment:
        vectors = embs[offsets[first] : offsets[last]] if source is None else source
        c = codec.compress(vectors.float())
        arrays = segment_arrays(c.codes, c.residuals, doclens[first:last], codec.centroids.size(0))
        entry = SegmentEntry("bench", "codec", last - first, int(doclens[first:last].sum()), first, last - 1)
        return _Segment(entry, pids[first:last], scorer=SnapshotScorer(codec, arrays))

    def ndcg(segments: list[_Segment]) -> float:
        snapshot = PlaidSnapshot(1, segments, "plaid")
        runs = {q: [ids[p] for p in snapshot.search(Q, SearchRequest(10)).passage_ids] for q, Q in Qs.items()}
        return mean_ndcg(runs, qrels)

    def report(policy: str, sizes: list[int], values: list[float]) -> None:
        each = ", ".join(f"{v:.4f}" for v in values)
        mean = sum(values) / len(values)
        print(f"| {runtime} | {policy} | {', '.join(map(str, sizes))} | {mean:.4f} ({each}) |", flush=True)

    def trained(at: int, load_factor: float, seed: int):
        tokens = int(offsets[at])
        wanted = num_partitions_for(int(tokens * load_factor), MAX_CENTROIDS)
        return train_codec(embs[:tokens], 128, 2, seed=seed, partitions=min(wanted, partitions_trainable(tokens)))

    started = time.perf_counter()
    seeds = [123 + s for s in range(args.seeds)]
    for policy, load_factor in (("at training", 1.0), ("for its load", args.growth)):
        kept, recompressed, from_decompressed = [], [], []
        for seed in seeds:
            codecs = [trained(at, load_factor, seed) for at in points]
            starts, bounds = [0, *points[1:]], [*points[1:], n]
            kept.append(ndcg([segment(c, a, b) for c, a, b in zip(codecs, starts, bounds)]))
            recompressed.append(ndcg([segment(codecs[-1], 0, n)]))
            # What the server can do: older segments' vectors are gone, only their codes are left.
            older = []
            for c, a, b in zip(codecs[:-1], starts, bounds):
                packed = c.compress(embs[offsets[a] : offsets[b]].float())
                older.append(segment(codecs[-1], a, b, _decompress(c, packed.codes, packed.residuals)))
            from_decompressed.append(ndcg([*older, segment(codecs[-1], starts[-1], n)]))
        sizes = [int(c.centroids.size(0)) for c in codecs]
        report(policy, sizes, kept)
        report(f"{policy}, recompressed from the originals", sizes[-1:], recompressed)
        report(f"{policy}, older segments recompressed from their codes", sizes[-1:], from_decompressed)
    partitions = num_partitions_for(embs.size(0), MAX_CENTROIDS)
    report(
        "one codec",
        [partitions],
        [ndcg([segment(train_codec(embs, 128, 2, seed=seed, partitions=partitions), 0, n)]) for seed in seeds],
    )
    print(f"<!-- {runtime}: {time.perf_counter() - started:.0f}s -->", flush=True)


if __name__ == "__main__":
    main()
