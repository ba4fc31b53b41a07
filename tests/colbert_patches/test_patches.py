"""Each colbert_patches fix, tested on its own."""

from __future__ import annotations

import json
import os

import pytest
import torch

import colbert_patches
from colbert_patches.codec import (
    codec_from_state,
    codec_state,
    num_partitions_for,
    partitions_trainable,
    train_codec,
    two_level_kmeans,
)
from colbert_patches.model_loading import EncoderOptions, load_checkpoint
from colbert_patches.persistence import atomic_torch_save, atomic_write_json
from colbert_patches.scorer import SnapshotScorer, search_params, segment_arrays
from models.build_default_checkpoint import bundled_minilm_dir, orthogonal_projection


def test_projection_is_orthogonal_and_reproducible():
    a = orthogonal_projection(384, 128, seed=7)
    b = orthogonal_projection(384, 128, seed=7)
    assert torch.equal(a, b)
    assert torch.allclose(a @ a.T, torch.eye(128), atol=1e-5)
    assert not torch.equal(a, orthogonal_projection(384, 128, seed=8))


@pytest.mark.slow
def test_checkpoint_loads_bundled_weights_with_current_transformers(checkpoint_dir, capsys):
    from safetensors.torch import load_file

    checkpoint = load_checkpoint(str(checkpoint_dir), EncoderOptions.for_checkpoint(str(checkpoint_dir)))
    assert capsys.readouterr().out == ""  # upstream prints on load; the patch routes it to logging
    saved = load_file(str(checkpoint_dir / "model.safetensors"))
    assert torch.equal(checkpoint.model.linear.weight.detach(), saved["linear.weight"])
    minilm = load_file(str(bundled_minilm_dir() / "model.safetensors"))
    key = next(k for k in minilm if k.endswith("word_embeddings.weight"))
    assert torch.equal(checkpoint.bert.embeddings.word_embeddings.weight.detach(), minilm[key])
    assert not checkpoint.amp_manager.activated  # no CUDA autocast on a CPU machine


@pytest.mark.slow
def test_tokenizer_options(checkpoint_dir):
    from colbert_patches.tokenization import ServerDocTokenizer, ServerQueryTokenizer

    checkpoint = load_checkpoint(str(checkpoint_dir), EncoderOptions(query_augmentation=False, marker_tokens=False))
    config = checkpoint.colbert_config
    tok = checkpoint.raw_tokenizer
    mask_id, q_marker = tok.mask_token_id, tok.convert_tokens_to_ids("[unused0]")

    plain = ServerQueryTokenizer(config, EncoderOptions(query_augmentation=False, marker_tokens=False))
    ids, _ = plain.tensorize(["short query", "a somewhat longer query than the other"])
    assert ids.shape[1] < config.query_maxlen  # padded to the longest, not to query_maxlen
    assert (ids == mask_id).sum() == 0 and (ids == q_marker).sum() == 0
    assert (ids[0] == tok.pad_token_id).sum() > 0  # [PAD], whose vectors ColBERT zeroes

    upstream_like = ServerQueryTokenizer(config, EncoderOptions(query_augmentation=True, marker_tokens=True))
    ids, _ = upstream_like.tensorize(["short query"])
    assert ids[0, 1] == q_marker and (ids == mask_id).sum() > 20

    doc = ServerDocTokenizer(config, EncoderOptions(marker_tokens=False))
    ids, _ = doc.tensorize(["word " * 1000])
    assert ids.shape[1] == config.doc_maxlen
    assert doc.content_token_budget() == config.doc_maxlen - 2


@pytest.mark.parametrize("n", [1, 3, 10, 100, 10_000, 1_000_000])
def test_partitions_never_exceed_training_points(n):
    p = num_partitions_for(n)
    assert 1 <= p <= max(n, 1) and p & (p - 1) == 0


def test_partitions_grow_with_the_square_root_and_stop_at_the_cap():
    assert num_partitions_for(352_000) == 4096  # msmarco-mini: the codec measured best there
    assert num_partitions_for(4 * 352_000) == 8192  # 4x the vectors: 2x the centroids
    assert num_partitions_for(86_000_000) == 65536
    assert num_partitions_for(86_000_000, 32768) == 32768
    assert partitions_trainable(1 << 19) == 32768  # 16 training vectors per centroid


def test_two_level_kmeans_gives_exactly_k_centroids_near_the_data():
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(600, 32, generator=gen), dim=-1)
    skew = torch.randint(0, 600, (20_000,), generator=gen) ** 2 // 600  # uneven cluster sizes
    points = torch.nn.functional.normalize(centers[skew] + 0.02 * torch.randn(20_000, 32, generator=gen), dim=-1)
    x = np.ascontiguousarray(points.numpy())
    found = two_level_kmeans(x, 1000, niter=4, seed=1)
    assert found.shape == (1000, 32) and np.isfinite(found).all()
    assert np.array_equal(found, two_level_kmeans(x, 1000, niter=4, seed=1))  # deterministic
    unit = found / np.linalg.norm(found, axis=1, keepdims=True)
    assert (x @ unit.T).max(axis=1).mean() > 0.95  # every point has a centroid close by
    assert two_level_kmeans(x[:50], 64, niter=4, seed=1).shape[0] == 50  # never more centroids than points


def _clustered(num_docs: int, tokens: int, dim: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(num_docs, dim, generator=gen), dim=-1)
    embs = centers.repeat_interleave(tokens, 0) + 0.05 * torch.randn(num_docs * tokens, dim, generator=gen)
    return torch.nn.functional.normalize(embs, dim=-1), torch.full((num_docs,), tokens, dtype=torch.int64)


def test_codec_on_a_single_tiny_document_and_round_trip(tmp_path):
    colbert_patches.apply()
    embs, _ = _clustered(1, 5)
    codec = train_codec(embs, dim=128, nbits=2)
    atomic_torch_save(codec_state(codec), tmp_path / "codec.pt")
    loaded = codec_from_state(torch.load(tmp_path / "codec.pt", weights_only=True))
    assert torch.equal(loaded.centroids, codec.centroids.half().float())
    restored = loaded.decompress(loaded.compress(embs))
    assert (restored * embs).sum(-1).min() > 0.8


@pytest.mark.slow
def test_snapshot_scorer_finds_documents_and_skips_dead_ones():
    colbert_patches.apply()
    embs, doclens = _clustered(300, 12)
    codec = train_codec(embs, dim=128, nbits=2)
    compressed = codec.compress(embs)
    arrays = segment_arrays(compressed.codes, compressed.residuals, doclens, codec.centroids.size(0))
    scorer = SnapshotScorer(codec, arrays)
    # Padded at write time as upstream's StridedTensor would pad at load: no copy of a mapped file.
    assert scorer.embeddings.codes.data_ptr() == arrays["codes"].data_ptr()
    assert scorer.embeddings.residuals.data_ptr() == arrays["residuals"].data_ptr()
    assert scorer.ivf.tensor.data_ptr() == arrays["ivf"].data_ptr()
    assert arrays["codes"].dtype == torch.int16  # a codec of at most 32,768 centroids: 2 bytes per code
    assert torch.equal(arrays["codes"][: int(doclens.sum())].long(), compressed.codes.long())
    params = search_params(10, query_maxlen=12)
    for target in (0, 17, 299):
        Q = embs[target * 12 : (target + 1) * 12].unsqueeze(0)
        slots, scores = scorer.search(Q, params)
        assert slots[0] == target
        alive = torch.ones(300, dtype=torch.bool)
        alive[target] = False
        slots, _ = scorer.search(Q, params, alive, k=10)
        assert target not in slots and len(slots) > 0
    # A configured ncells past the codec's centroids probes them all (it was a 500).
    every_cell = search_params(10, query_maxlen=12, ncells=codec.centroids.size(0) * 8)
    slots, _ = scorer.search(embs[17 * 12 : 18 * 12].unsqueeze(0), every_cell)
    assert slots[0] == 17


def test_search_params_are_per_call():
    small, large = search_params(5, 32), search_params(500, 32)
    assert (small.ncells, small.ndocs) == (1, 256)
    assert large.ncells == 4 and large.ndocs >= 2000
    again = search_params(5, 32)
    assert again == small  # the k=500 call changed nothing shared
    assert search_params(5, 32, ncells=8).ncells == 8


def test_atomic_writes_keep_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    atomic_write_json({"generation": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_json({"generation": 2}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"generation": 1}


def test_no_multiprocessing_or_stray_bars_in_indexing(monkeypatch, capsys):
    """Training a codec must not spawn processes nor print progress bars."""
    import multiprocessing

    def forbidden(*args, **kwargs):
        raise AssertionError("indexing must stay in-process")

    monkeypatch.setattr(multiprocessing, "Manager", forbidden)
    monkeypatch.setattr(multiprocessing.Process, "start", forbidden)
    colbert_patches.apply()
    embs, _ = _clustered(50, 8)
    train_codec(embs, dim=128, nbits=2)
    captured = capsys.readouterr()
    assert captured.out == "" and "it/s" not in captured.err


def test_centroid_assignment_is_the_exact_nearest_centroid():
    colbert_patches.apply()

    embs, _ = _clustered(40, 10)
    codec = train_codec(embs, dim=128, nbits=2)
    expected = (codec.centroids @ embs.T).max(dim=0).indices
    assert torch.equal(codec.compress_into_codes(embs, out_device="cpu"), expected)
    assert codec.compress_into_codes(embs[:0], out_device="cpu").numel() == 0


@pytest.mark.slow
def test_query_cells_are_shared_by_segments_and_never_reused_for_another_query():
    """Segments on one codec share a query's centroid cells; a later query,
    even one the allocator puts where a freed one was, gets its own."""
    import gc
    import weakref

    colbert_patches.apply()
    embs, doclens = _clustered(300, 12)
    codec = train_codec(embs, dim=128, nbits=2)
    compressed = codec.compress(embs)
    arrays = segment_arrays(compressed.codes, compressed.residuals, doclens, codec.centroids.size(0))
    one, other = SnapshotScorer(codec, arrays), SnapshotScorer(codec, arrays)
    Q = embs[:12].clone()  # (tokens, dim), as candidate generation passes it
    first = one.get_cells(Q[:12], 2)
    assert other.get_cells(Q[:12], 2) is first  # another view of the same query: computed once
    memory = weakref.ref(Q)
    del Q
    gc.collect()
    assert memory() is not None  # held while its cells are cached: no new query can take its address
    Q2 = embs[12 * 17 : 12 * 18].clone()
    cells, _ = one.get_cells(Q2, 2)
    expected, _ = super(SnapshotScorer, one).get_cells(Q2, 2)
    assert torch.equal(cells, expected) and not torch.equal(cells, first[0])


def test_binarize_packs_the_same_bytes_as_upstream():
    from colbert_patches import codec as codec_patch

    colbert_patches.apply()
    embs, _ = _clustered(40, 10)
    codec = train_codec(embs, dim=128, nbits=2)
    residuals = embs - codec.lookup_centroids(codec.compress_into_codes(embs, out_device="cpu"), out_device="cpu")
    residuals[0, :3] = codec.bucket_cutoffs  # values on a cutoff fall in the lower bucket, as upstream's
    assert torch.equal(codec.binarize(residuals), codec_patch._upstream_binarize(codec, residuals))
    assert torch.equal(codec.binarize(residuals[:0]), codec_patch._upstream_binarize(codec, residuals[:0]))


def test_large_codecs_assign_through_a_coarse_index_close_to_exact():
    """Above EXACT_ASSIGN_MAX_CENTROIDS the nearest centroid is searched in a
    coarse inverted file over the centroids: nearly always the exact one,
    otherwise one almost as near, and the same on every build."""
    import faiss

    from colbert_patches.codec import EXACT_ASSIGN_MAX_CENTROIDS, centroid_index

    gen = torch.Generator().manual_seed(3)
    # Centroids in groups, as k-means over token vectors leaves them.
    groups = torch.nn.functional.normalize(torch.randn(64, 128, generator=gen), dim=-1)
    centroids = groups.repeat_interleave(32, 0) + 0.3 * torch.randn(2048, 128, generator=gen) / 128**0.5
    centroids = torch.nn.functional.normalize(centroids, dim=-1)
    assert centroids.size(0) > EXACT_ASSIGN_MAX_CENTROIDS
    picks = torch.randint(0, 2048, (5000,), generator=gen)
    vectors = torch.nn.functional.normalize(
        centroids[picks] + 0.2 * torch.randn(5000, 128, generator=gen) / 128**0.5, dim=-1
    )
    scores = vectors @ centroids.T
    exact = scores.max(dim=1)
    index = centroid_index(centroids)
    assert isinstance(index, faiss.IndexIVFFlat)
    _, found = index.search(vectors.numpy(), 1)
    found = torch.from_numpy(found[:, 0]).long()
    assert (found == exact.indices).float().mean() > 0.9
    assert (exact.values - scores.gather(1, found[:, None])[:, 0]).max() < 0.1
    _, again = centroid_index(centroids).search(vectors.numpy(), 1)
    assert torch.equal(torch.from_numpy(again[:, 0]).long(), found)
    small = centroid_index(centroids[:EXACT_ASSIGN_MAX_CENTROIDS])
    assert isinstance(small, faiss.IndexFlatIP)


def test_a_build_lock_left_by_a_killed_compile_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """Upstream waits forever for a kernel's build lock to go."""
    from colbert_patches.scorer import STALE_LOCK_S, clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for name in ("stale_cpp", "live_cpp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lock").touch()
    old = os.path.getmtime(tmp_path / "stale_cpp" / "lock") - STALE_LOCK_S - 60
    os.utime(tmp_path / "stale_cpp" / "lock", (old, old))
    assert clear_stale_build_locks(["stale_cpp", "live_cpp", "never_built_cpp"]) == [tmp_path / "stale_cpp" / "lock"]
    assert not (tmp_path / "stale_cpp" / "lock").exists()
    assert (tmp_path / "live_cpp" / "lock").exists()


@pytest.mark.slow
def test_shortlist_kernel_keeps_what_upstreams_filter_pids_keeps_and_returns_its_scores():
    """The shortlist kernel against upstream's ``filter_pids`` on the same
    inputs: the same passages kept (scores are distinct here, so ties cannot
    reorder them), and each kept passage's score is the centroid-only one:
    per query token, its best centroid among the passage's codes, summed."""
    from colbert.search.index_storage import IndexScorer

    from colbert_patches.scorer import kernels, load_extensions

    load_extensions()
    generator = torch.Generator().manual_seed(7)
    num_centroids, nq, num_passages = 300, 8, 2000
    doclens = torch.randint(1, 40, (num_passages,), generator=generator, dtype=torch.int64)
    codes = torch.randint(0, num_centroids, (int(doclens.sum()),), generator=generator, dtype=torch.int32)
    codes = torch.cat([codes, torch.zeros(int(doclens.max()), dtype=torch.int32)])  # padded as segments are
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), doclens.cumsum(0)])
    centroid_scores = torch.rand(num_centroids, nq, generator=generator)
    pruned = centroid_scores.max(-1).values >= 0.9  # the first pass sees some centroids only
    slots = torch.randperm(num_passages, generator=generator)[:1500].to(torch.int32)

    for ndocs in (16, 256, 4000):
        kept, scores = kernels().shortlist(slots, centroid_scores, codes, doclens, offsets, pruned, ndocs, ndocs // 4)
        upstream = IndexScorer.filter_pids(slots, centroid_scores, codes, doclens, offsets, pruned, ndocs)
        assert sorted(kept.tolist()) == sorted(upstream.tolist())
        assert len(kept) == min(ndocs // 4, len(slots))
        expected = torch.stack(
            [centroid_scores[codes[offsets[s] : offsets[s + 1]].long()].max(0).values.sum() for s in kept.long()]
        )
        assert torch.allclose(scores, expected)
    empty = kernels().shortlist(slots[:0], centroid_scores, codes, doclens, offsets, pruned, 256, 64)
    assert [t.numel() for t in empty] == [0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int16])
def test_decompress_kernel_gives_upstreams_unit_vectors(code_dtype):
    """The decompression kernel against upstream's ``decompress_residuals``
    followed by the normalisation upstream's scorer applies, for passages
    in any order, with int32 or int16 codes."""
    from colbert.search.index_storage import IndexScorer

    from colbert_patches.scorer import byte_values, kernels, load_extensions

    colbert_patches.apply()
    load_extensions()
    embs, doclens = _clustered(60, 9)
    codec = train_codec(embs, dim=128, nbits=2)
    compressed = codec.compress(embs)
    arrays = segment_arrays(compressed.codes, compressed.residuals, doclens, codec.centroids.size(0))
    scorer = SnapshotScorer(codec, arrays)
    slots = torch.tensor([5, 0, 59, 17, 17, 3], dtype=torch.int32)
    upstream = IndexScorer.decompress_residuals(
        slots,
        scorer.doclens,
        scorer.offsets,
        codec.bucket_weights,
        codec.reversed_bit_map,
        codec.decompression_lookup_table,
        scorer.embeddings.residuals,
        scorer.embeddings.codes.to(torch.int32),  # upstream's kernel reads int32 only
        codec.centroids,
        codec.dim,
        codec.nbits,
    )
    expected = torch.nn.functional.normalize(upstream.float(), p=2, dim=-1)
    codes = scorer.embeddings.codes.to(code_dtype)
    ours = kernels().decompress(
        slots, scorer.doclens, scorer.offsets, codes, scorer.embeddings.residuals, codec.centroids, byte_values(codec)
    )
    assert ours.shape == expected.shape and torch.allclose(ours, expected, atol=1e-6)
    assert kernels().decompress(
        slots[:0],
        scorer.doclens,
        scorer.offsets,
        codes,
        scorer.embeddings.residuals,
        codec.centroids,
        byte_values(codec),
    ).shape == (0, 128)


def test_centroid_assignment_never_waits_for_the_gil():
    """faiss's Python interrupt callback takes the GIL every few thousand
    vectors of a search; patched, a search finishes while another thread
    keeps the GIL (here: this one, spinning with a long switch interval)."""
    import sys
    import threading
    import time

    import numpy as np

    from colbert_patches.codec import centroid_index

    colbert_patches.apply()
    gen = torch.Generator().manual_seed(5)
    centroids = torch.nn.functional.normalize(torch.randn(4096, 128, generator=gen), dim=-1)
    vectors = torch.nn.functional.normalize(torch.randn(50_000, 128, generator=gen), dim=-1).numpy()
    index = centroid_index(centroids)
    distances = np.empty((vectors.shape[0], 1), dtype=np.float32)
    labels = np.full((vectors.shape[0], 1), -2, dtype=np.int64)
    search = threading.Thread(target=lambda: index.search(vectors, 1, D=distances, I=labels))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)  # this thread keeps the GIL while it spins
    try:
        search.start()
        deadline = time.monotonic() + 10.0
        while labels[-1, 0] == -2 and time.monotonic() < deadline:
            pass
        finished = labels[-1, 0] != -2
    finally:
        sys.setswitchinterval(interval)
        search.join()
    assert finished, "the search stopped for the GIL"
    assert (labels >= 0).all()


@pytest.mark.parametrize("drop_share", [0.0, 0.3])
def test_merged_ivfs_equal_the_ivf_built_from_the_concatenated_codes(drop_share):
    from colbert_patches.scorer import IvfPart, build_ivf, merge_ivfs

    gen = torch.Generator().manual_seed(5)
    centroids = 64
    parts, kept_codes, kept_lens = [], [], []
    for slots in (40, 1, 77):
        doclens = torch.randint(1, 12, (slots,), generator=gen)
        codes = torch.randint(0, centroids, (int(doclens.sum()),), generator=gen)
        ivf, lengths = build_ivf(codes, doclens, centroids)
        padded = torch.cat([ivf, torch.zeros(int(lengths.max()), dtype=torch.int32)])  # as segments store it
        kept = torch.rand(slots, generator=gen) >= drop_share
        parts.append(IvfPart(padded, lengths, slots, None if bool(kept.all()) else kept))
        kept_codes.append(codes[torch.repeat_interleave(kept, doclens)])
        kept_lens.append(doclens[kept])
    merged, lengths = merge_ivfs(parts, centroids)
    expected, expected_lengths = build_ivf(torch.cat(kept_codes), torch.cat(kept_lens), centroids)
    assert torch.equal(lengths, expected_lengths)
    assert torch.equal(merged, expected)


def test_index_files_are_saved_without_the_zip_crc_that_no_load_checks(tmp_path):
    """``torch.load`` never verifies the records' CRC32, and computing it
    made saves 15x slower; the files still load as saved."""
    import zipfile

    state = {"codes": torch.arange(5000, dtype=torch.int16), "residuals": torch.ones(5000, 32, dtype=torch.uint8)}
    atomic_torch_save(state, tmp_path / "seg.pt")
    with zipfile.ZipFile(tmp_path / "seg.pt") as archive:
        data = [i for i in archive.infolist() if "/data/" in i.filename]
    assert data and all(i.CRC == 0 for i in data)
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "seg.pt", weights_only=True, mmap=mmap)
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save(state, tmp_path / "default.pt")  # elsewhere (other threads, other code) torch's default stays
    with zipfile.ZipFile(tmp_path / "default.pt") as archive:
        assert any(i.CRC != 0 for i in archive.infolist() if "/data/" in i.filename)
