"""Limits on client JSON (metadata, filters, names): refused with a clear
error before anything reaches SQLite, never a 500 from it later."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest

from app.errors import InvalidInput
from app.service import check_collection_name
from app.store.filters import MAX_CONDITIONS, MAX_VALUES, compile_filter
from app.validation import INT_MAX, INT_MIN, MAX_DEPTH, MAX_METADATA_BYTES, check_json_value, check_metadata


def nested(depth: int):
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, {"k": [1, {"x": math.nan}]}, INT_MAX + 1, INT_MIN - 1, {"\ud800": 1}, ["\udfff"]],
)
def test_values_sqlite_or_json_readers_cannot_take_are_refused(value):
    with pytest.raises(ValueError):
        check_json_value(value)


def test_the_edges_of_the_limits_are_accepted():
    check_json_value({"big": INT_MAX, "small": INT_MIN, "x": 1.5e308, "t": True, "n": None})
    check_json_value(nested(MAX_DEPTH - 1))
    with pytest.raises(ValueError, match="nested"):
        check_json_value(nested(MAX_DEPTH + 1))


def test_nesting_far_past_the_recursion_limit_is_refused_without_recursing():
    with pytest.raises(ValueError, match="nested"):
        check_json_value(nested(100_000))


def test_metadata_is_bounded_in_size():
    check_metadata({"note": "x" * (MAX_METADATA_BYTES - 100)})
    with pytest.raises(ValueError, match="bytes"):
        check_metadata({"note": "x" * MAX_METADATA_BYTES})


def run(where: dict) -> int:
    """Compile ``where`` and run it on SQLite, as a search's filter runs."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE documents (external_id TEXT, metadata TEXT)")
    conn.executemany(
        "INSERT INTO documents VALUES (?, ?)", [(f"d{i}", json.dumps({"n": i, "team": f"t{i % 3}"})) for i in range(10)]
    )
    sql, params = compile_filter(where)
    return conn.execute(f"SELECT count(*) FROM documents d WHERE {sql}", params).fetchone()[0]


def test_filters_within_the_caps_run_on_sqlite():
    assert run({"$or": [{"n": i} for i in range(MAX_CONDITIONS)]}) == 10
    assert run({f"k{i}": {"$ne": "x"} for i in range(MAX_CONDITIONS)}) == 0  # missing keys: json_extract is NULL
    assert run({"n": {"$in": list(range(MAX_VALUES))}}) == 10
    assert run({"n": {"$lte": INT_MAX}, "team": "t0"}) == 4


@pytest.mark.parametrize(
    "where",
    [
        {"$or": [{"n": i} for i in range(998)]},  # SQLite: "Expression tree is too large"
        {f"k{i}": 1 for i in range(1000)},
        {"a": {"$in": list(range(MAX_VALUES))}, "b": {"$in": [1, 2]}},  # too many bound values in all
        {"n": INT_MAX + 1},  # OverflowError binding it
        {"n": {"$gt": INT_MIN - 1}},
        {"n": math.nan},
        {"n": {"$in": [1, math.inf]}},
        {"team\n": "t0"},  # a key pattern ending in $ took the trailing newline
    ],
)
def test_filters_sqlite_would_refuse_are_invalid_input(where):
    with pytest.raises(InvalidInput):
        compile_filter(where)


@pytest.mark.parametrize("name", ["notes\n", "notes\n\n", "\nnotes", "no tes"])
def test_a_collection_name_is_matched_whole(name):
    with pytest.raises(InvalidInput):
        check_collection_name(name)
    assert check_collection_name("notes") == "notes"
