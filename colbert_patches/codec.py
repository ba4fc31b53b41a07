"""Train a PLAID residual codec in the server process.

Upstream ``Indexer.index`` launches worker processes through a
``multiprocessing.Manager`` (needs a ``__main__`` guard, breaks under
uvicorn's reloader and workers, leaks semaphores), encodes the k-means sample
and then the whole collection a second time, and asks faiss for more
centroids than there are vectors on tiny collections. Here the caller passes
embeddings it already has; k-means, the residual statistics and compression
reuse upstream's own functions in the calling thread.
"""

from __future__ import annotations

import contextlib
import io
import math
from types import SimpleNamespace

import torch

# Scores materialised per centroid-assignment batch: 2^24 fp32 = 64 MiB.
ASSIGN_BATCH_SCORES = 1 << 24


def compress_into_codes(self, embs, out_device):
    """Nearest centroid per vector, in batches sized for CPU memory.

    Upstream materialises 2^29 scores per batch (2 GiB in fp32 on CPU, the
    server's peak memory during every commit).
    """
    codes = []
    bsize = max(1, ASSIGN_BATCH_SCORES // self.centroids.size(0))
    for batch in embs.split(bsize):
        if self.use_gpu:
            scores = self.centroids @ batch.T.cuda().half()
        else:
            scores = self.centroids @ batch.T.cpu().float()
        codes.append(scores.max(dim=0).indices.to(device=out_device))
    return torch.cat(codes) if codes else torch.empty(0, dtype=torch.int64)


def apply() -> None:
    from colbert.indexing.codecs.residual import ResidualCodec

    ResidualCodec.compress_into_codes = compress_into_codes


def num_partitions_for(num_embeddings: int) -> int:
    """Upstream's rule (2^floor(log2(16 sqrt(n)))), capped for small n."""
    n = max(int(num_embeddings), 1)
    upstream = 2 ** int(math.floor(math.log2(16 * math.sqrt(n))))
    # faiss needs at least one training point per centroid; keep a few per centroid.
    cap = 2 ** int(math.floor(math.log2(max(n // 4, 1))))
    return max(1, min(upstream, cap))


def train_codec(
    embeddings: torch.Tensor, dim: int, nbits: int, kmeans_niters: int = 4, seed: int = 123, sample_limit: int = 1 << 20
):
    """Return a ``ResidualCodec`` trained on ``embeddings`` (n x dim, any float)."""
    import faiss
    from colbert.indexing.codecs.residual import ResidualCodec
    from colbert.indexing.collection_indexer import CollectionIndexer
    from colbert.infra import ColBERTConfig

    embeddings = embeddings.to(torch.float16)
    gen = torch.Generator().manual_seed(seed)
    if embeddings.size(0) > sample_limit:
        embeddings = embeddings[torch.randperm(embeddings.size(0), generator=gen)[:sample_limit]]
    order = torch.randperm(embeddings.size(0), generator=gen)
    sample = embeddings[order]
    heldout_size = int(min(0.05 * sample.size(0), 50_000))
    if heldout_size < 16:
        heldout = sample  # too few to hold out: estimate residuals on the training set
    else:
        sample, heldout = sample.split([sample.size(0) - heldout_size, heldout_size])

    partitions = num_partitions_for(sample.size(0))
    config = ColBERTConfig(dim=dim, nbits=nbits, kmeans_niters=kmeans_niters, gpus=0)
    with contextlib.redirect_stdout(io.StringIO()):
        # Upstream's compute_faiss_kmeans, minus verbose=True (faiss prints from C++).
        kmeans = faiss.Kmeans(dim, partitions, niter=kmeans_niters, gpu=False, verbose=False, seed=seed)
        kmeans.train(sample.float().numpy())
        centroids = torch.nn.functional.normalize(torch.from_numpy(kmeans.centroids), dim=-1).float()
        helper = SimpleNamespace(config=config, use_gpu=False, verbose=0)
        cutoffs, weights, avg_residual = CollectionIndexer._compute_avg_residual(helper, centroids, heldout)
    return ResidualCodec(
        config=config, centroids=centroids, avg_residual=avg_residual, bucket_cutoffs=cutoffs, bucket_weights=weights
    )


def codec_state(codec) -> dict:
    return {
        "centroids": codec.centroids.half(),
        "avg_residual": torch.as_tensor(codec.avg_residual),
        "bucket_cutoffs": codec.bucket_cutoffs,
        "bucket_weights": codec.bucket_weights,
        "dim": codec.dim,
        "nbits": codec.nbits,
    }


def codec_from_state(state: dict):
    from colbert.indexing.codecs.residual import ResidualCodec
    from colbert.infra import ColBERTConfig

    config = ColBERTConfig(dim=state["dim"], nbits=state["nbits"], gpus=0)
    avg = state["avg_residual"]
    return ResidualCodec(
        config=config,
        centroids=state["centroids"].float(),
        avg_residual=avg.item() if avg.dim() == 0 else avg,
        bucket_cutoffs=state["bucket_cutoffs"],
        bucket_weights=state["bucket_weights"],
    )
