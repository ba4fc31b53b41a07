"""PLAID-specific behaviour beyond the backend contract: segments carry a
sample of original vectors until the codec has its full size; a retrained
codec learns from those originals; segments of several codecs search as one."""

from __future__ import annotations

import pytest
import torch

import app.engine.plaid as plaid_module
from app.engine.backend import SearchRequest
from tests.engine.test_backend_contract import ENCODER, TEXTS, batch, plaid, search, settle

C = 1


def commit(backend, start, end, base, generation):
    name = backend.write(C, base, generation, batch(start, TEXTS[start:end]))
    backend.release(C, [name, base])
    return name


def test_originals_are_kept_for_the_next_codec_and_dropped_at_full_size(tmp_path, monkeypatch):
    monkeypatch.setattr(plaid_module, "RETRAIN_SAMPLE", 1500)  # sized for this small collection
    backend = plaid(tmp_path, exact_max=20)
    backend.config = type(backend.config)(**{**backend.config.__dict__, "max_centroids": 32})
    name = settle(backend, C, commit(backend, 0, 30, None, 1), 1)  # the first codec: a small one
    for g, start in enumerate(range(30, 150, 30), start=2):
        name = commit(backend, start, start + 30, name, g)
    files = backend.files(C)
    m = files.read_manifest(name)
    assert all(e.sample for e in m.segments)
    kept = torch.cat([files.load(e.sample)["embs"] for e in m.segments])
    originals = batch(0, TEXTS[:150]).embs
    assert bool(torch.isin(kept.float()[:, 0], originals.float()[:, 0]).all())  # originals, not reconstructions
    task = backend.plan(C, name, torch.empty(0, dtype=torch.int64))
    assert task is not None and task.kind == "retrain"
    assert torch.equal(backend._sample(files, m), kept.float())
    change = backend.prepare(task, torch.empty(0, dtype=torch.int64))
    retrained = backend.apply(C, name, 6, change)
    backend.release(C, [retrained])
    after = files.read_manifest(retrained)
    assert backend._codec_centroids(C, after.codec) == 32  # its full size: no later codec to train
    # Every original of this small collection was kept: each older segment
    # is recompressed from them, then they are dropped.
    assert all(plaid_module._has_all_originals(files, e) for e in after.segments)
    task = backend.plan(C, retrained, torch.empty(0, dtype=torch.int64))
    assert task is not None and task.kind == "recompress"
    retrained = settle(backend, C, retrained, 6)
    backend.release(C, [retrained])
    after = files.read_manifest(retrained)
    assert {e.codec for e in after.segments} == {after.codec}
    assert not any(e.sample for e in after.segments)
    assert not list(files.root.glob("sample-*"))  # released with the manifests that named them
    snapshot = backend.load(C, 6, retrained)
    assert search(snapshot, TEXTS[77], k=1) == [77]


def two_codecs(backend) -> str:
    """Passages 0-159 on a first codec, then a retraining, then passages
    160-199 ("the quokka is mauve and number N") on the new codec."""
    name = settle(backend, C, commit(backend, 0, 40, None, 1), 1)
    for g, start in enumerate(range(40, 160, 40), start=2):
        name = commit(backend, start, start + 40, name, g)
    task = backend.plan(C, name, torch.empty(0, dtype=torch.int64))
    assert task is not None and task.kind == "retrain"
    name = backend.apply(C, name, 5, backend.prepare(task, torch.empty(0, dtype=torch.int64)))
    return backend.write(C, name, 6, batch(160, [f"the quokka is mauve and number {i}" for i in range(160, 200)]))


def test_segments_of_two_codecs_search_as_one(tmp_path):
    backend = plaid(tmp_path, exact_max=20)
    later = two_codecs(backend)
    m = backend.files(C).read_manifest(later)
    assert len({e.codec for e in m.segments}) == 2
    snapshot = backend.load(C, 6, later)
    assert search(snapshot, "the quokka is mauve and number 170", k=1) == [170]
    assert search(snapshot, TEXTS[5], k=1) == [5]
    Q = ENCODER.encode_queries(["the quokka is mauve"])
    assert len(snapshot.search(Q, SearchRequest(60)).passage_ids) == 60  # k found across segments and codecs


def test_a_merge_recompresses_block_by_block_as_it_would_all_at_once(tmp_path, monkeypatch):
    """Segments of an older codec (exact-tier ones: the next test) are recompressed a
    block of vectors at a time, so a merge holds their compact form, never
    every vector as floats: the merged segment is the same either way."""
    monkeypatch.setattr(plaid_module, "RETRAIN_SAMPLE", 1000)  # a sample of the originals, not all
    backend = plaid(tmp_path, exact_max=20)
    name = two_codecs(backend)  # the last segment is on the new codec: taken as it is
    m = backend.files(C).read_manifest(name)
    task = backend.plan(C, name, torch.empty(0, dtype=torch.int64))
    assert task is not None and task.kind == "merge" and len({e.codec for e in m.segments}) == 2
    everything = type(task)(task.collection_id, task.manifest, "merge", tuple(e.name for e in m.segments), "all")
    dead = torch.tensor([3, 77, 170])
    merged = {}
    for block in (7, 1 << 16):  # 7: blocks that cut through passages
        monkeypatch.setattr(plaid_module, "RECOMPRESS_BLOCK", block)
        change = backend.prepare(everything, dead)
        assert change.segment is not None
        merged[block] = backend.files(C).load(change.segment.name)
        backend.abandon(change)
    assert merged[7].keys() == merged[1 << 16].keys()
    assert all(torch.equal(merged[7][key], merged[1 << 16][key]) for key in merged[7])
    assert not bool(torch.isin(merged[7]["pids"], dead).any()) and merged[7]["pids"].numel() == 197


def test_exact_tier_segments_are_compressed_block_by_block_as_all_at_once(tmp_path, monkeypatch):
    backend = plaid(tmp_path, exact_max=20)
    name = commit(backend, 0, 40, None, 1)
    change = backend.prepare(backend.plan(C, name, torch.empty(0, dtype=torch.int64)), torch.empty(0))
    name = commit(backend, 40, 80, name, 2)  # exact too: written while the first codec was trained
    name = backend.apply(C, name, 3, change)
    m = backend.files(C).read_manifest(name)
    assert m.codec is not None and [e.codec for e in m.segments] == [None, None]
    both = type(change.task)(C, name, "merge", tuple(e.name for e in m.segments), "all")
    merged = {}
    for block in (7, 1 << 16):
        monkeypatch.setattr(plaid_module, "RECOMPRESS_BLOCK", block)
        step = backend.prepare(both, torch.tensor([5, 50]))
        assert step.segment is not None
        merged[block] = backend.files(C).load(step.segment.name)
        backend.abandon(step)
    assert all(torch.equal(merged[7][key], merged[1 << 16][key]) for key in merged[7])
    assert merged[7]["pids"].numel() == 78 and "codes" in merged[7]


def test_the_backend_applies_the_codec_patches_without_an_encoder(tmp_path):
    """A service built around another encoder (the scale benchmark's stand-in)
    still compresses with the patched codec: upstream's assigns every vector
    against every centroid through 2 GiB score matrices."""
    import subprocess
    import sys

    script = f"""
from pathlib import Path
from colbert.indexing.codecs.residual import ResidualCodec
from app.engine.plaid import PlaidBackend, PlaidConfig
from colbert_patches import codec
assert ResidualCodec.compress_into_codes is not codec.compress_into_codes
PlaidBackend(PlaidConfig(Path({str(tmp_path)!r}), 128, 2, 1024, 4, 0.3, 4.0))
assert ResidualCodec.compress_into_codes is codec.compress_into_codes
assert ResidualCodec.binarize is codec.binarize
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_first_codec_is_trained_in_the_background_while_commits_go_on(tmp_path):
    """Past exact_search_max_passages a commit stays a cheap exact-tier write;
    the first codec is a background step, applied over the commits made
    meanwhile, and merges then compress the exact segments. Every state in
    between searches as one index."""
    backend = plaid(tmp_path, exact_max=20)
    name = commit(backend, 0, 40, None, 1)
    assert backend.files(C).read_manifest(name).codec is None  # no codec trained inside the commit
    task = backend.plan(C, name, torch.empty(0, dtype=torch.int64))
    assert task is not None and task.kind == "retrain" and "first codec" in task.reason
    change = backend.prepare(task, torch.empty(0, dtype=torch.int64))
    name = commit(backend, 40, 80, name, 2)  # a commit lands while the codec was being trained
    name = backend.apply(C, name, 3, change)
    m = backend.files(C).read_manifest(name)
    assert m.codec is not None and [e.codec for e in m.segments] == [None, None]
    assert m.codec_passages == 40  # sized for 40: the next retraining falls due at growth past that, not past 80
    assert search(backend.load(C, 3, name), TEXTS[55], k=1) == [55]
    task = backend.plan(C, name, torch.empty(0, dtype=torch.int64))
    assert task is not None and task.kind == "merge"  # the exact segments, compressed
    first_only = type(task)(task.collection_id, task.manifest, task.kind, task.segments[:1], task.reason)
    name = backend.apply(C, name, 4, backend.prepare(first_only, torch.empty(0, dtype=torch.int64)))
    mixed = backend.load(C, 4, name)
    assert [s.scorer is not None for s in mixed.segments] == [True, False]  # one compressed, one exact
    # TEXTS[i] and TEXTS[i + 40] differ only in their number: each query finds its twin in the other segment too.
    assert sorted(search(mixed, TEXTS[7], k=2)) == [7, 47] and sorted(search(mixed, TEXTS[66], k=2)) == [26, 66]
    name = settle(backend, C, name, 5)
    settled = backend.load(C, 5, name)
    assert settled.kind == "plaid" and all(s.scorer is not None for s in settled.segments)
    assert backend.files(C).read_manifest(name).segments[0].sample  # originals kept for the next codec
    assert search(settled, TEXTS[66], k=1) == [66]


def test_a_retraining_leaves_older_segments_on_their_codec(tmp_path, monkeypatch):
    """A new codec compresses new data only: merges join segments of one
    codec as they are (no centroid assignment), so a retraining never puts
    the whole collection behind a recompression; the originals the codec
    was trained on are dropped once it is applied."""
    monkeypatch.setattr(plaid_module, "RETRAIN_SAMPLE", 1000)  # a sample of the originals, not all
    backend = plaid(tmp_path, exact_max=20)
    name = two_codecs(backend)
    for g, start in enumerate(range(200, 320, 40), start=7):
        name = backend.write(
            C, name, g, batch(start, [f"the quokka is mauve and number {i}" for i in range(start, start + 40)])
        )
    m = backend.files(C).read_manifest(name)
    older = [e for e in m.segments if e.codec != m.codec]
    assert len(older) == 4 and len({e.codec for e in older}) == 1
    assert not any(e.sample for e in older)  # spent on the new codec
    assert all(e.sample for e in m.segments if e.codec == m.codec)  # kept for the next one
    none = torch.empty(0, dtype=torch.int64)
    merged = []
    while (task := backend.plan(C, name, none)) is not None:
        change = backend.prepare(task, none)
        sources = {e.name: e.codec for e in backend.files(C).read_manifest(name).segments}
        assert {sources[s] for s in task.segments} == {change.segment.codec}  # one codec in, the same out
        merged.append(change.segment.codec)
        name = backend.apply(C, name, 10 + len(merged), change)
    assert sorted(merged) == sorted([m.codec, older[0].codec])  # each codec's tier merged once
    after = backend.files(C).read_manifest(name)
    assert [e.codec for e in after.segments] == [older[0].codec, m.codec]
    snapshot = backend.load(C, 20, name)
    assert search(snapshot, "the quokka is mauve and number 250", k=1) == [250]
    assert search(snapshot, TEXTS[5], k=1) == [5]


def test_past_max_segments_a_pair_of_two_codecs_is_merged_only_when_no_pair_of_one_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(plaid_module, "RETRAIN_SAMPLE", 1000)  # a sample of the originals, not all
    backend = plaid(tmp_path, exact_max=20)
    name = two_codecs(backend)  # 4 + 1 segments on two codecs
    m = backend.files(C).read_manifest(name)
    monkeypatch.setattr(plaid_module, "MERGE_FACTOR", 8)  # no tier merge: only the segment bound acts
    monkeypatch.setattr(plaid_module, "MAX_SEGMENTS", 1)
    task = backend.plan(C, name, torch.empty(0, dtype=torch.int64))
    assert task is not None and "recompressed" not in task.reason
    assert {e.codec for e in m.segments if e.name in task.segments} != {m.codec}  # the older codec's pair
    name = settle(backend, C, name, 7)
    after = backend.files(C).read_manifest(name)
    assert len(after.segments) == 1 and after.segments[0].codec == after.codec  # the last pair: recompressed
    assert search(backend.load(C, 7, name), "the quokka is mauve and number 170", k=1) == [170]


def test_older_segments_with_every_original_are_recompressed_from_them(tmp_path):
    """A small collection's segments keep every original vector; when a new
    codec lands they are recompressed from those originals (their codes
    would give back only what the coarser codec kept), then the originals go."""
    backend = plaid(tmp_path, exact_max=20)
    name = two_codecs(backend)  # passages 0-159 on the first codec
    files = backend.files(C)
    m = files.read_manifest(name)
    older = [e for e in m.segments if e.codec != m.codec]
    assert older and all(plaid_module._has_all_originals(files, e) for e in older)
    name = settle(backend, C, name, 7)
    backend.release(C, [name])
    after = files.read_manifest(name)
    assert {e.codec for e in after.segments} == {m.codec}
    codec = plaid_module.codec_from_state(files.load(m.codec))
    originals = batch(0, TEXTS[:160])
    expected = codec.compress(originals.embs.float()).codes
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), originals.doclens.cumsum(0)])
    checked = 0
    for e in after.segments:
        state = files.load(e.name)
        first = state["pids"] < 160
        checked += int(first.sum())
        if not bool(first.any()):
            continue
        tokens = torch.repeat_interleave(first, state["doclens"].to(torch.int64))
        got = state["codes"][: int(state["doclens"].sum())][tokens].to(torch.int64)
        lens = state["doclens"][first].to(torch.int64)
        pids = state["pids"][first].to(torch.int64)
        want = torch.cat([expected[offsets[p] : offsets[p] + n] for p, n in zip(pids.tolist(), lens.tolist())])
        assert torch.equal(got, want.to(torch.int64))  # the originals' codes on the new codec
    assert checked == 160
    # The first codec's originals are gone; what is left is kept for the next codec.
    assert {p.name for p in files.root.glob("sample-*")} == {e.sample for e in after.segments if e.sample}
    assert not {e.sample for e in older} & {p.name for p in files.root.glob("sample-*")}
    assert search(backend.load(C, 7, name), TEXTS[5], k=1) == [5]


def _first_codec_and_growth(backend) -> str:
    """A first codec sized for 40 passages, then commits to 100: short of the
    growth factor (3x), past the size where the collection wants more centroids."""
    name = settle(backend, C, commit(backend, 0, 40, None, 1), 1)
    for g, start in enumerate(range(40, 100, 30), start=2):
        name = commit(backend, start, start + 30, name, g)
    m = backend.files(C).read_manifest(name)
    assert m.passages < backend.config.rebuild_growth_factor * m.codec_passages
    assert plaid_module.num_partitions_for(m.tokens, backend.config.max_centroids) > backend._codec_centroids(
        C, m.codec
    )
    return name


@pytest.mark.parametrize("retrain_sample", [200, None], ids=["a sample of the originals", "every original"])
def test_a_new_codec_waits_for_the_growth_factor(tmp_path, monkeypatch, retrain_sample):
    """More centroids wanted is not enough, even while every segment keeps
    all its originals: early codecs trained at each doubling measured worse
    past 5k passages (BENCHMARKS.md, "Early codecs")."""
    if retrain_sample is not None:
        monkeypatch.setattr(plaid_module, "RETRAIN_SAMPLE", retrain_sample)
    backend = plaid(tmp_path, exact_max=20)
    name = _first_codec_and_growth(backend)
    m = backend.files(C).read_manifest(name)
    complete = all(plaid_module._has_all_originals(backend.files(C), e) for e in m.segments)
    assert complete is (retrain_sample is None)
    task = backend.plan(C, name, torch.empty(0, dtype=torch.int64))
    assert task is None or task.kind != "retrain"
