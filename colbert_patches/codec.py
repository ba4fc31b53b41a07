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

import math
import os
from types import SimpleNamespace

import torch

# Scores materialised per centroid-assignment batch: 2^24 fp32 = 64 MiB.
ASSIGN_BATCH_SCORES = 1 << 24


# Codecs up to this many centroids assign exactly (one blocked matrix product).
EXACT_ASSIGN_MAX_CENTROIDS = 1024
# Larger ones search a coarse inverted file over their own centroids: lists
# of about this many centroids, this many lists probed per vector. Measured on
# msmarco-mini's 352k token vectors against 4,096 centroids
# (bench/codec_training.py): 3.5x faster than exact, the exact nearest
# centroid for 96% of vectors, the rest within 0.005 cosine of it, nDCG@10
# 0.7209 against 0.7208 exact.
CENTROIDS_PER_LIST = 32
ASSIGN_NPROBE = 8


def centroid_index(centroids: torch.Tensor):
    """A faiss inner-product index over ``centroids`` for nearest-centroid
    assignment: exact (flat) for small codecs, else a coarse inverted file
    trained on the centroids themselves (deterministic: faiss's seeded k-means)."""
    import faiss
    import numpy as np

    points = np.ascontiguousarray(centroids.float().numpy())
    dim = points.shape[1]
    if points.shape[0] <= EXACT_ASSIGN_MAX_CENTROIDS:
        flat = faiss.IndexFlatIP(dim)
        flat.add(points)
        return flat
    nlist = points.shape[0] // CENTROIDS_PER_LIST
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 1  # the centroids are all there is to train on
    ivf.cp.seed = 1234
    ivf.train(points)
    ivf.add(points)
    ivf.nprobe = min(ASSIGN_NPROBE, nlist)
    return ivf


def compress_into_codes(self, embs, out_device):
    """Nearest centroid per vector.

    Upstream materialises 2^29 scores per batch (2 GiB in fp32 on CPU, the
    server's peak memory during every commit) and scores every vector
    against every centroid. On CPU this asks faiss (:func:`centroid_index`:
    exact for small codecs, a coarse inverted file over the centroids for
    large ones, every core); on GPU, torch in batches, exactly.
    """
    if not self.use_gpu:
        import numpy as np

        if embs.size(0) == 0:
            return torch.empty(0, dtype=torch.int64)
        index = getattr(self, "_faiss_index", None)
        if index is None:
            index = self._faiss_index = centroid_index(self.centroids)
        _, codes = index.search(np.ascontiguousarray(embs.float().numpy()), 1)
        return torch.from_numpy(codes[:, 0]).to(torch.int64)
    codes = []
    bsize = max(1, ASSIGN_BATCH_SCORES // self.centroids.size(0))
    for batch in embs.split(bsize):
        scores = self.centroids @ batch.T.cuda().half()
        codes.append(scores.max(dim=0).indices.to(device=out_device))
    return torch.cat(codes) if codes else torch.empty(0, dtype=torch.int64)


_upstream_binarize = None


def binarize(self, residuals):
    """Upstream's packed residual buckets, 2x faster on CPU: a bucket is the
    count of cutoffs below the value (``torch.bucketize``'s answer), its
    bits laid out and packed as upstream does."""
    if self.use_gpu:
        assert _upstream_binarize is not None  # set by apply()
        return _upstream_binarize(self, residuals)
    import numpy as np

    values = residuals.float()
    buckets = torch.zeros(values.shape, dtype=torch.uint8)
    for cutoff in self.bucket_cutoffs.tolist():
        buckets += values > cutoff
    b = buckets.numpy()
    bits = np.empty((*b.shape, self.nbits), dtype=np.uint8)
    for j in range(self.nbits):
        bits[..., j] = (b >> j) & 1
    return torch.from_numpy(np.packbits(bits.reshape(b.shape[0], b.shape[1] * self.nbits), axis=1))


def apply() -> None:
    global _upstream_binarize
    from colbert.indexing.codecs.residual import ResidualCodec

    if _upstream_binarize is None:
        _upstream_binarize = ResidualCodec.binarize
    ResidualCodec.compress_into_codes = compress_into_codes
    ResidualCodec.binarize = binarize


# k-means trains on at most this many vectors per centroid (faiss's own
# default is 256): the cost is points x centroids x dim per iteration.
POINTS_PER_CENTROID = 64


def num_partitions_for(num_embeddings: int, max_partitions: int | None = None) -> int:
    """Upstream's rule (2^floor(log2(16 sqrt(n)))), capped for small n and at
    ``max_partitions`` (every compressed vector is scored against every
    centroid: on a CPU, tens of thousands of centroids cost more than the
    encoder)."""
    n = max(int(num_embeddings), 1)
    upstream = 2 ** int(math.floor(math.log2(16 * math.sqrt(n))))
    # k-means wants tens of points per centroid (upstream's rule gives ~17 at
    # 70k vectors, the first PLAID build of a small collection); keep >= 32.
    cap = 2 ** int(math.floor(math.log2(max(n // 32, 1))))
    partitions = max(1, min(upstream, cap))
    if max_partitions:
        partitions = min(partitions, 2 ** int(math.floor(math.log2(max(max_partitions, 1)))))
    return partitions


def train_codec(
    embeddings: torch.Tensor,
    dim: int,
    nbits: int,
    kmeans_niters: int = 4,
    seed: int = 123,
    partitions: int | None = None,
):
    """Return a ``ResidualCodec`` trained on ``embeddings`` (n x dim, any
    float): a sample of at most ``POINTS_PER_CENTROID`` vectors per centroid
    for k-means (faiss, every core), a held-out part for the residual buckets.
    ``partitions`` defaults to :func:`num_partitions_for` of ``n``."""
    import faiss
    from colbert.indexing.codecs.residual import ResidualCodec
    from colbert.indexing.collection_indexer import CollectionIndexer
    from colbert.infra import ColBERTConfig

    partitions = partitions or num_partitions_for(embeddings.size(0))
    gen = torch.Generator().manual_seed(seed)
    heldout_size = int(min(0.05 * embeddings.size(0), 50_000))
    wanted = partitions * POINTS_PER_CENTROID + heldout_size
    if embeddings.size(0) > wanted:
        embeddings = embeddings[torch.randperm(embeddings.size(0), generator=gen)[:wanted]]
    sample = embeddings[torch.randperm(embeddings.size(0), generator=gen)].to(torch.float16)
    if heldout_size < 16:
        heldout = sample  # too few to hold out: estimate residuals on the training set
    else:
        sample, heldout = sample.split([sample.size(0) - heldout_size, heldout_size])
    partitions = min(partitions, max(1, sample.size(0)))

    config = ColBERTConfig(dim=dim, nbits=nbits, kmeans_niters=kmeans_niters, gpus=0)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    # Upstream's compute_faiss_kmeans, minus verbose=True (faiss prints from C++).
    kmeans = faiss.Kmeans(
        dim,
        partitions,
        niter=kmeans_niters,
        gpu=False,
        verbose=False,
        seed=seed,
        max_points_per_centroid=POINTS_PER_CENTROID,
    )
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
