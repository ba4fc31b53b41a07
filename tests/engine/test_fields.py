"""A search's choice of document fields: checks, the filter it makes, how
deep it retrieves, and how its weights re-rank hits."""

from __future__ import annotations

import math

import pytest

from app.engine.fields import FieldChoice
from app.engine.search import SearchHit
from app.errors import InvalidInput
from app.store.filters import FieldFilter, compile_field_filter
from app.store.store import Hit


def hit(field: str, score: float, rank: int) -> SearchHit:
    h = Hit(rank, rank, 0, f"{field} chunk", 0, 1, None, None, f"doc-{rank}", None, {}, field)
    return SearchHit(h, score, rank)


def test_no_choice_restricts_nothing_and_keeps_k():
    choice = FieldChoice.of()
    assert choice.filter == FieldFilter() and not choice.filter.restricts
    assert compile_field_filter(choice.filter) == ("1", [])
    assert choice.depth(10) == 10
    hits = [hit("text", 3.0, 1), hit("title", 2.0, 2)]
    assert choice.weigh(hits, 1) == hits[:1]


def test_fields_and_zero_weights_make_the_filter():
    choice = FieldChoice.of(["summary", "text", "title"], {"title": 0, "summary": 2})
    assert choice.filter == FieldFilter(("summary", "text"), ("title",))
    assert compile_field_filter(choice.filter) == (
        "c.field IN (?,?) AND c.field NOT IN (?)",
        ["summary", "text", "title"],
    )
    excluded = FieldChoice.of(None, {"text": 0})
    assert excluded.filter == FieldFilter(None, ("text",)) and excluded.weights == {}
    assert not excluded.reorders and excluded.depth(10) == 10
    with pytest.raises(InvalidInput, match="weighs 0"):
        FieldChoice.of(["title"], {"title": 0})


def test_weights_that_can_reorder_retrieve_deeper():
    assert FieldChoice.of(None, {"title": 2}).depth(10) == 100
    assert FieldChoice.of(None, {"title": 2}).depth(50) == 200
    assert FieldChoice.of(None, {"title": 2}).depth(400) == 1000
    assert FieldChoice.of(None, {"title": 2}).depth(1000) == 1000
    # One field allowed, or all allowed fields weighed alike: the order cannot change.
    assert FieldChoice.of(["title"], {"title": 2}).depth(10) == 10
    assert FieldChoice.of(["title", "text"], {"title": 2, "text": 2}).depth(10) == 10
    assert FieldChoice.of(["title", "text"], {"title": 2}).depth(10) == 100


def test_weights_multiply_scores_and_rank_again():
    hits = [hit("text", 10.0, 1), hit("summary", 6.0, 2), hit("title", 5.0, 3), hit("text", 4.0, 4)]
    out = FieldChoice.of(None, {"title": 2.5, "summary": 0.5}).weigh(hits, 3)
    assert [(h.hit.field, h.score, h.rank) for h in out] == [("title", 12.5, 1), ("text", 10.0, 2), ("text", 4.0, 3)]
    # Equal products keep retrieval's order.
    tied = FieldChoice.of(None, {"title": 2}).weigh([hit("text", 10.0, 1), hit("title", 5.0, 2)], 2)
    assert [h.hit.field for h in tied] == ["text", "title"]


@pytest.mark.parametrize(
    "fields, weights",
    [
        ([], None),
        (["Title"], None),
        (["has-dash"], None),
        (["x" * 65], None),
        ([f"f{i}" for i in range(65)], None),
        (None, {"title": -1}),
        (None, {"title": math.nan}),
        (None, {"title": math.inf}),
        (None, {"title": 1001}),
        (None, {"title": "2"}),
        (None, {"title": True}),
        (None, {"Title": 1}),
    ],
)
def test_bad_choices_are_refused(fields, weights):
    with pytest.raises(InvalidInput):
        FieldChoice.of(fields, weights)
