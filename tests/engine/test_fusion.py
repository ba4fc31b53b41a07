"""Fusion of two rankings (hybrid search)."""

from __future__ import annotations

import pytest

from app.engine.search import RRF_K, fuse
from app.errors import InvalidInput


def test_rrf_sums_reciprocal_ranks():
    fused = dict(fuse([(1, 9.0), (2, 8.0)], [(2, 0.3), (3, 0.2)], "rrf"))
    assert fused[2] == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 1))
    assert fused[1] == pytest.approx(1 / (RRF_K + 1))
    assert fused[3] == pytest.approx(1 / (RRF_K + 2))
    assert [pid for pid, _ in fuse([(1, 9.0), (2, 8.0)], [(2, 0.3), (3, 0.2)], "rrf")] == [2, 1, 3]


def test_normalized_averages_min_max_scores_and_missing_counts_zero():
    ranked = fuse([(1, 10.0), (2, 5.0), (3, 0.0)], [(3, 4.0), (1, 2.0)], "normalized")
    fused = dict(ranked)
    assert fused[1] == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)
    assert fused[2] == pytest.approx(0.5 * 0.5)
    assert fused[3] == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    assert [pid for pid, _ in ranked] == [1, 3, 2]  # ties broken by passage id


def test_equal_scores_and_empty_rankings():
    assert fuse([], [], "rrf") == []
    assert fuse([(4, 1.0), (5, 1.0)], [], "normalized") == [(4, 0.0), (5, 0.0)]


def test_unknown_fusion_is_refused():
    with pytest.raises(InvalidInput, match="unknown fusion"):
        fuse([(1, 1.0)], [], "borda")
