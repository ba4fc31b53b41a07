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


def quiet_faiss_interrupts() -> None:
    """Remove faiss's Python interrupt callback (idempotent).

    faiss's Python module installs a callback that its searches and k-means
    call every few thousand vectors to look for Ctrl-C; each call takes the
    GIL. In a server some other thread (a request, the encoder) nearly
    always holds the GIL, so every check waits up to the interpreter's
    switch interval with faiss's threads stalled behind it: centroid
    assignment of 70k vectors beside one busy Python thread took 1.2 s
    instead of 0.47 s, or hung for seconds with one faiss thread
    (``tests/colbert_patches/test_patches.py`` keeps it out). A search here
    is milliseconds to seconds; nothing needs to interrupt it."""
    import faiss

    faiss.InterruptCallback.clear_instance()  # type: ignore[attr-defined]


def apply() -> None:
    global _upstream_binarize
    from colbert.indexing.codecs.residual import ResidualCodec

    quiet_faiss_interrupts()

    if _upstream_binarize is None:
        _upstream_binarize = ResidualCodec.binarize
    ResidualCodec.compress_into_codes = compress_into_codes
    ResidualCodec.binarize = binarize


# k-means trains on at most this many vectors per centroid (faiss's own
# default is 256): the cost is points x centroids x dim per iteration.
POINTS_PER_CENTROID = 64


# Centroids per square root of the token count. Upstream's rule is 16; on
# msmarco-mini (352k vectors) 4,096 centroids measured better than 8,192 and
# on the 10k-passage scale corpus (700k) no worse (BENCHMARKS.md), so half of
# upstream's count: the same codecs as before up to ~500k vectors, and past
# that cells that stay small as the collection grows (PLAID's candidate set,
# hence its search cost, is the probed cells' passages).
PARTITIONS_PER_SQRT = 8
# A codec never has fewer training vectors per centroid than this.
MIN_POINTS_PER_CENTROID = 16


def _pow2_floor(x: float) -> int:
    return 2 ** int(math.floor(math.log2(max(x, 1))))


def num_partitions_for(num_embeddings: int, max_partitions: int | None = None) -> int:
    """2^floor(log2(PARTITIONS_PER_SQRT sqrt(n))), capped for small n (k-means
    wants tens of points per centroid: >= 32) and at ``max_partitions``."""
    n = max(int(num_embeddings), 1)
    partitions = min(_pow2_floor(PARTITIONS_PER_SQRT * math.sqrt(n)), _pow2_floor(n // 32))
    if max_partitions:
        partitions = min(partitions, _pow2_floor(max_partitions))
    return max(1, partitions)


def partitions_trainable(num_points: int) -> int:
    """The most centroids ``num_points`` training vectors support."""
    return max(1, _pow2_floor(num_points // MIN_POINTS_PER_CENTROID))


# Larger codecs train in two levels (see :func:`two_level_kmeans`).
TWO_LEVEL_MIN_CENTROIDS = 4096
COARSE_POINTS_PER_CENTROID = 2048  # the coarse level sees most of the sample


def _kmeans(points, k: int, niter: int, seed: int, points_per_centroid: int = POINTS_PER_CENTROID):
    """A trained ``faiss.Kmeans`` (every core): upstream's compute_faiss_kmeans,
    minus verbose=True (faiss prints from C++)."""
    import faiss

    kmeans = faiss.Kmeans(
        points.shape[1],
        k,
        niter=niter,
        gpu=False,
        verbose=False,
        seed=seed,
        max_points_per_centroid=points_per_centroid,
        min_points_per_centroid=1,  # callers size k to their points; no warning on stderr
    )
    kmeans.train(points)
    return kmeans


def two_level_kmeans(points, k: int, niter: int, seed: int):
    """``k`` centroids from about sqrt(k) coarse clusters, each split by its
    own k-means into a share of ``k`` proportional to its points (as
    ``faiss.contrib.clustering.two_level_clustering`` does, with every share
    kept within the points it has). Each vector meets sqrt(k)-ish centroids
    per iteration instead of k. On 600k MiniLM token vectors, 2 cores: 16,384
    centroids in 2.4 s against 6.8 s for a flat 4,096; at equal k the nearest
    centroid of a held-out vector is about 0.02 cosine further than with
    flat k-means, so codecs up to TWO_LEVEL_MIN_CENTROIDS stay flat."""
    import numpy as np

    n = points.shape[0]
    k = min(k, n)
    coarse_k = max(2, int(math.sqrt(k)))
    _, assign = _kmeans(points, coarse_k, niter, seed, points_per_centroid=COARSE_POINTS_PER_CENTROID).assign(points)
    sizes = np.bincount(assign, minlength=coarse_k)
    shares = np.minimum(np.maximum((sizes * k) // max(n, 1), (sizes > 0).astype(np.int64)), sizes)
    for c in np.argsort(-sizes):  # the rounding's difference to k, from or to the largest clusters
        gap = k - int(shares.sum())
        if gap == 0:
            break
        shares[c] += min(gap, sizes[c] - shares[c]) if gap > 0 else max(gap, 1 - shares[c])
    order = np.argsort(assign, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    found = []
    for c in range(coarse_k):
        if shares[c] == 0:
            continue
        members = points[order[bounds[c] : bounds[c + 1]]]
        found.append(
            members if shares[c] >= members.shape[0] else _kmeans(members, int(shares[c]), niter, seed + c).centroids
        )
    return np.ascontiguousarray(np.concatenate(found).astype(np.float32))


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
    import numpy as np
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
    points = np.ascontiguousarray(sample.float().numpy())
    if partitions > TWO_LEVEL_MIN_CENTROIDS:
        found = two_level_kmeans(points, partitions, kmeans_niters, seed)
    else:
        found = _kmeans(points, partitions, kmeans_niters, seed).centroids
    centroids = torch.nn.functional.normalize(torch.from_numpy(found), dim=-1).float()
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
