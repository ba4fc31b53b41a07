"""Fusion of the signals' scored lists (hybrid search)."""

from __future__ import annotations

import pytest

from app.engine.search import RRF_K, fuse
from app.errors import InvalidInput

EQUAL = {"colbert": 1.0, "keyword": 1.0}


def test_rrf_sums_weighted_reciprocal_ranks():
    signals = {"colbert": [(1, 9.0), (2, 8.0)], "keyword": [(2, 0.3), (3, 0.2)]}
    fused = dict(fuse(signals, EQUAL, "rrf"))
    assert fused[2] == pytest.approx(0.5 / (RRF_K + 2) + 0.5 / (RRF_K + 1))
    assert fused[1] == pytest.approx(0.5 / (RRF_K + 1))
    assert fused[3] == pytest.approx(0.5 / (RRF_K + 2))
    assert [pid for pid, _ in fuse(signals, EQUAL, "rrf")] == [2, 1, 3]
    weighted = dict(fuse(signals, {"colbert": 3.0, "keyword": 1.0}, "rrf"))
    assert weighted[1] == pytest.approx(0.75 / (RRF_K + 1))


def test_normalized_is_the_weighted_mean_of_min_max_scores_and_missing_counts_zero():
    signals = {"colbert": [(1, 10.0), (2, 5.0), (3, 0.0)], "keyword": [(3, 4.0), (1, 2.0)]}
    ranked = fuse(signals, EQUAL, "normalized")
    fused = dict(ranked)
    assert fused[1] == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)
    assert fused[2] == pytest.approx(0.5 * 0.5)
    assert fused[3] == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    assert [pid for pid, _ in ranked] == [1, 3, 2]  # ties broken by passage id
    heavy = dict(fuse(signals, {"colbert": 1.0, "keyword": 3.0}, "normalized"))
    assert heavy[3] == pytest.approx(0.75) and heavy[1] == pytest.approx(0.25)


def test_three_signals_and_a_signal_without_weight_only_adds_candidates():
    signals = {"colbert": [(1, 2.0), (2, 1.0)], "dense": [(2, 0.9), (1, 0.1)], "keyword": [(7, 5.0)]}
    fused = dict(fuse(signals, {"colbert": 1.0, "dense": 1.0}, "normalized"))
    assert fused == {1: pytest.approx(0.5), 2: pytest.approx(0.5), 7: 0.0}


def test_equal_scores_and_empty_rankings():
    assert fuse({"colbert": [], "keyword": []}, EQUAL, "rrf") == []
    assert fuse({"colbert": [(4, 1.0), (5, 1.0)], "keyword": []}, EQUAL, "normalized") == [(4, 0.0), (5, 0.0)]


def test_unknown_fusion_is_refused():
    with pytest.raises(InvalidInput, match="unknown fusion"):
        fuse({"colbert": [(1, 1.0)]}, EQUAL, "borda")


def _searcher(tmp_path, encoder, **settings):
    from app.engine.encoders import Encoders
    from app.engine.search import Searcher
    from tests.conftest import make_settings

    return Searcher(make_settings(tmp_path, tmp_path, **settings), None, None, Encoders(encoder, tmp_path), None, None)


def test_a_request_plan_takes_the_settings_defaults_and_its_own_choices(tmp_path):
    from tests.fakes import FakeEncoder

    assert _searcher(tmp_path, FakeEncoder()).plan(10, None, None, None).mode == "colbert"
    searcher = _searcher(tmp_path, FakeEncoder(), search_mode="hybrid", hybrid_weight_keyword=0.5, hybrid_depth=30)
    plan = searcher.plan(10, None, None, None)
    assert plan.mode == "hybrid" and plan.fusion == "rrf" and plan.depth == 30
    assert plan.weights == {"colbert": 1.0, "dense": 1.0, "keyword": 0.5}
    assert _searcher(tmp_path, FakeEncoder()).plan(10, "hybrid", None, None).weights == {"colbert": 1.0, "dense": 1.0}
    assert searcher.plan(20, "hybrid", "rrf", {"dense": 2.0}).weights == {"dense": 2.0}
    assert searcher.plan(20, "hybrid", None, None).depth == 40  # at least 2 k
    assert searcher.plan(5, "dense", None, None).weights == {"dense": 1.0}
    with pytest.raises(InvalidInput, match="at least one"):
        searcher.plan(5, "hybrid", None, {"colbert": 0.0})
    with pytest.raises(InvalidInput, match="unknown search mode"):
        searcher.plan(5, "sparse", None, None)


def test_without_a_pooled_head_dense_is_refused_and_hybrid_goes_on_without_it(tmp_path):
    from tests.fakes import FakeEncoder

    class FakeEncoderWithoutDense(FakeEncoder):
        dense_dim = None

    searcher = _searcher(tmp_path, FakeEncoderWithoutDense(), hybrid_weight_keyword=1.0)
    with pytest.raises(InvalidInput, match="pooled"):
        searcher.plan(5, "dense", None, None)
    assert searcher.plan(5, "hybrid", None, None).weights == {"colbert": 1.0, "keyword": 1.0}
    with pytest.raises(InvalidInput, match="at least one"):
        searcher.plan(5, "hybrid", None, {"dense": 1.0})


def test_sum_adds_the_weighted_scores_as_they_are():
    signals = {"colbert": [(1, 0.8), (2, 0.6)], "dense": [(2, 0.9), (1, 0.5)], "keyword": [(2, 1.0)]}
    fused = dict(fuse(signals, {"colbert": 1.0, "dense": 1.0, "keyword": 0.5}, "sum"))
    assert fused[1] == pytest.approx((0.8 + 0.5) / 2.5)
    assert fused[2] == pytest.approx((0.6 + 0.9 + 0.5 * 1.0) / 2.5)
