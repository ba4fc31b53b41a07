"""What a PLAID codec's training data and size cost in retrieval.

Encodes msmarco-mini once (cached in the temp directory), then for each
variant builds the index in memory and measures nDCG@10 (k=10, default
PLAID parameters, and ncells=4/ndocs=4096 to separate candidate generation
from representation):

- one codec of 2048 / 4096 / 8192 centroids trained on every original vector;
- the server's path: a first codec trained on the first 1,024 passages (the
  switch from the exact tier), a second one of 4,096 centroids for the rest,
  trained on originals, or on vectors decompressed with the first codec
  (centroids and residual buckets), or centroids from decompressed vectors
  and buckets from originals; with the first segment left on its codec or
  recompressed with the second.

Usage: python -m bench.codec_training
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import colbert_patches
from app.engine.backend import SearchRequest
from app.engine.encoder import ColBERTEncoder
from app.engine.index import SegmentEntry
from app.engine.plaid import PlaidSnapshot, _decompress, _Segment
from bench.data import encoded_corpus, load, mean_ndcg
from colbert_patches.codec import num_partitions_for, train_codec
from colbert_patches.model_loading import EncoderOptions
from colbert_patches.scorer import SnapshotScorer, segment_arrays
from models.build_default_checkpoint import ensure_default_checkpoint

FIRST_BUILD = 1024


def main() -> None:
    colbert_patches.apply()
    checkpoint = str(ensure_default_checkpoint(Path(tempfile.gettempdir()) / "colbert-minilm-l6"))
    encoder = ColBERTEncoder(checkpoint, EncoderOptions.for_checkpoint(checkpoint))
    corpus, queries, qrels = load()
    embs, lens = encoded_corpus(encoder, corpus, Path(tempfile.gettempdir()) / "msmarco-mini-token-vectors.pt")
    doclens = torch.tensor(lens)
    ids = [d["_id"] for d in corpus]
    Qs = {q: encoder.encode_queries([t]) for q, t in queries.items() if q in qrels}
    split = int(doclens[:FIRST_BUILD].sum())
    pids = torch.arange(len(ids))

    def segment(codec, first: int, last: int, vectors: torch.Tensor) -> _Segment:
        c = codec.compress(vectors.float())
        arrays = segment_arrays(c.codes, c.residuals, doclens[first:last], codec.centroids.size(0))
        entry = SegmentEntry("bench", "codec", last - first, int(doclens[first:last].sum()), first, last - 1)
        return _Segment(entry, pids[first:last], scorer=SnapshotScorer(codec, arrays))

    def evaluate(name: str, segments: list[_Segment]) -> None:
        snapshot = PlaidSnapshot(1, segments, "plaid")
        cells = []
        for request in (SearchRequest(10), SearchRequest(10, ncells=4, ndocs=4096)):
            runs = {q: [ids[p] for p in snapshot.search(Q, request).passage_ids] for q, Q in Qs.items()}
            cells.append(f"{mean_ndcg(runs, qrels):.4f}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)

    print("| variant | nDCG@10 | nDCG@10, ncells=4, ndocs=4096 |\n| --- | --- | --- |")
    n = len(ids)
    for partitions in (2048, 4096, 8192):
        started = time.perf_counter()
        codec = train_codec(embs, 128, 2, partitions=partitions)
        name = f"one codec of {partitions} on every original (trained in {time.perf_counter() - started:.0f}s)"
        evaluate(name, [segment(codec, 0, n, embs)])
    first = train_codec(embs[:split], 128, 2, partitions=num_partitions_for(split, 4096))
    compressed = first.compress(embs.float())
    decompressed = _decompress(first, compressed.codes, compressed.residuals)
    head = segment(first, 0, FIRST_BUILD, embs[:split])
    label = f"first {first.centroids.size(0)} on {FIRST_BUILD}, then 4096"
    on_originals = train_codec(embs, 128, 2, partitions=4096)  # the originals segments keep
    evaluate(f"{label} trained on originals", [head, segment(on_originals, FIRST_BUILD, n, embs[split:])])
    evaluate(
        f"{label} trained on originals, first segment recompressed",
        [
            segment(on_originals, 0, FIRST_BUILD, decompressed[:split]),
            segment(on_originals, FIRST_BUILD, n, embs[split:]),
        ],
    )
    on_decompressed = train_codec(decompressed, 128, 2, partitions=4096)
    evaluate(f"{label} trained on decompressed", [head, segment(on_decompressed, FIRST_BUILD, n, embs[split:])])
    from colbert.indexing.codecs.residual import ResidualCodec
    from colbert.indexing.collection_indexer import CollectionIndexer
    from colbert.infra import ColBERTConfig

    config = ColBERTConfig(dim=128, nbits=2, gpus=0)
    heldout = embs[split:][torch.randperm(embs.size(0) - split, generator=torch.Generator().manual_seed(0))[:50_000]]
    helper = SimpleNamespace(config=config, use_gpu=False, verbose=0)
    cutoffs, weights, avg = CollectionIndexer._compute_avg_residual(helper, on_decompressed.centroids, heldout)
    mixed = ResidualCodec(
        config=config,
        centroids=on_decompressed.centroids,
        avg_residual=avg,
        bucket_cutoffs=cutoffs,
        bucket_weights=weights,
    )
    evaluate(
        f"{label}: centroids from decompressed, buckets from originals",
        [head, segment(mixed, FIRST_BUILD, n, embs[split:])],
    )


if __name__ == "__main__":
    main()
