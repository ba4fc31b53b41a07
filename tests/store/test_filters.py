"""The filter compiler against a Python reference evaluator, on random
documents and random filters (hypothesis), and its refusals."""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import InvalidInput
from app.store.filters import MAX_DEPTH, compile_filter

KEYS = ["team", "year", "lang", "public"]
scalars = st.one_of(st.integers(-2, 2), st.sampled_from(["a", "ab", "B", "é"]), st.booleans(), st.just(0.5))
metadata = st.dictionaries(st.sampled_from(KEYS), scalars, max_size=4)
documents = st.lists(metadata, min_size=1, max_size=12)


def _leaf() -> st.SearchStrategy:
    comparison = st.dictionaries(
        st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"]), scalars, min_size=1, max_size=2
    )
    membership = st.fixed_dictionaries({}, optional={"$in": st.lists(scalars, min_size=1, max_size=3)}).filter(bool)
    exclusion = st.fixed_dictionaries({"$nin": st.lists(scalars, min_size=1, max_size=3)})
    field = st.builds(lambda k, v: {k: v}, st.sampled_from(KEYS), st.one_of(scalars, comparison, membership, exclusion))
    doc_id = st.builds(lambda ids: {"$document_id": ids}, st.lists(st.sampled_from(["d0", "d1", "d5"]), min_size=1))
    return st.one_of(field, doc_id)


filters = st.recursive(
    _leaf(),
    lambda inner: (
        st.builds(
            lambda op, parts: {op: parts}, st.sampled_from(["$and", "$or"]), st.lists(inner, min_size=1, max_size=3)
        )
        | st.builds(lambda a, b: {**a, **b}, inner, inner)
    ),
    max_leaves=6,
)


# -- the reference: SQLite's semantics for json_extract values, by hand -------


def _sql_value(value):
    return int(value) if isinstance(value, bool) else value  # JSON true/false read back as 1/0


def _order(value):
    """SQLite orders numbers before text; text by code point (BINARY collation)."""
    return (0, value) if isinstance(value, int | float) else (1, value)


def _compare(op: str, field, value) -> bool:
    if field is None:
        return False  # NULL compares to nothing (even != is NULL, not true)
    a, b = _order(field), _order(_sql_value(value))
    return {"$eq": a == b, "$ne": a != b, "$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]


def _matches_condition(field, spec) -> bool:
    if not isinstance(spec, dict):
        return _compare("$eq", field, spec)
    for op, value in spec.items():
        if op == "$in":
            ok = field is not None and any(_compare("$eq", field, v) for v in value)
        elif op == "$nin":
            ok = field is None or not any(_compare("$eq", field, v) for v in value)
        else:
            ok = _compare(op, field, value)
        if not ok:
            return False
    return True


def reference(node: dict, doc_id: str, meta: dict) -> bool:
    for key, value in node.items():
        if key == "$and":
            ok = all(reference(v, doc_id, meta) for v in value)
        elif key == "$or":
            ok = any(reference(v, doc_id, meta) for v in value)
        elif key == "$document_id":
            ok = _matches_condition(doc_id, {"$in": value} if isinstance(value, list) else value)
        else:
            ok = _matches_condition(_sql_value(meta[key]) if key in meta else None, value)
        if not ok:
            return False
    return True


def _database(docs: list[dict]) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE documents (external_id TEXT, metadata TEXT)")
    conn.executemany(
        "INSERT INTO documents VALUES (?, ?)", [(f"d{i}", json.dumps(m, sort_keys=True)) for i, m in enumerate(docs)]
    )
    return conn


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=documents, where=filters)
def test_compiled_filter_matches_the_reference(docs, where):
    conn = _database(docs)
    condition, params = compile_filter(where)
    got = {r[0] for r in conn.execute(f"SELECT external_id FROM documents d WHERE {condition}", params)}
    expected = {f"d{i}" for i, m in enumerate(docs) if reference(where, f"d{i}", m)}
    assert got == expected, (where, docs)


def test_no_filter_is_true():
    assert compile_filter(None) == ("1", [])


@pytest.mark.parametrize(
    "where",
    [
        {},
        {"team": {}},
        {"team": {"$regex": "a"}},
        {"$not": {"team": "a"}},
        {"$and": []},
        {"$or": {"team": "a"}},
        {"team": {"$in": []}},
        {"team": {"$in": "a"}},
        {"team": {"$eq": [1]}},
        {"team": {"$eq": None}},
        {'te"am': "a"},
        {"$team": "a"},
        {"a\\b": 1},
    ],
)
def test_bad_filters_are_refused(where):
    with pytest.raises(InvalidInput):
        compile_filter(where)


def test_nesting_is_bounded():
    where: dict = {"team": "a"}
    for _ in range(MAX_DEPTH + 1):
        where = {"$and": [where]}
    with pytest.raises(InvalidInput, match="nested too deeply"):
        compile_filter(where)


@settings(max_examples=300, deadline=None)
@given(docs=documents, where=_leaf())
def test_single_conditions_match_the_reference(docs, where):
    test_compiled_filter_matches_the_reference.hypothesis.inner_test(docs, where)
