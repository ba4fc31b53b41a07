"""Metadata filters in the where-clause convention of Chroma-style stores,
compiled to SQL over ``documents`` (alias ``d``).

- ``{"team": "alpha"}``: equality;
- ``{"year": {"$gte": 2020, "$lt": 2024}}``: ``$eq $ne $gt $gte $lt $lte``;
- ``{"lang": {"$in": ["en", "de"]}}``, ``$nin``;
- ``{"$and": [...]}``, ``{"$or": [...]}``;
- ``{"$document_id": ...}``: the same operators on the document id (a list
  is shorthand for ``$in``).

Several keys in one object are joined with AND. A filter holds at most
``MAX_CONDITIONS`` conditions and ``MAX_VALUES`` values in all: SQLite
refuses deeper expression trees (a flat ``$or`` of about 1,000) and more
bound parameters than its build allows, which would otherwise surface as 500s.
"""

from __future__ import annotations

import math
import re
from typing import Any

from app.errors import InvalidInput
from app.validation import INT_MAX, INT_MIN

_COMPARISONS = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
# Metadata keys go into a JSON path literal: no quotes, backslashes or controls.
_KEY = re.compile(r"[^$\"'\\\x00-\x1f][^\"'\\\x00-\x1f]{0,255}")
MAX_DEPTH = 8
MAX_LIST = 10_000
MAX_CONDITIONS = 256
MAX_VALUES = 10_000


def _scalar(value: Any, where: str):
    if isinstance(value, bool):
        return int(value)  # JSON true/false come back from json_extract as 1/0
    if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
        raise InvalidInput(f"filter {where}: integers must fit in 64 bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"filter {where}: numbers must be finite")
    if isinstance(value, (int, float, str)):
        return value
    raise InvalidInput(f"filter {where}: values must be strings, numbers or booleans, not {type(value).__name__}")


def _field(key: str) -> str:
    if key == "$document_id":
        return "d.external_id"
    if not _KEY.fullmatch(key):
        raise InvalidInput(f"filter key {key!r} is not a metadata field or a known operator")
    return f"""json_extract(d.metadata, '$."{key}"')"""


class _Budget:
    """Conditions and values compiled so far, against the caps."""

    def __init__(self) -> None:
        self.conditions = 0

    def condition(self, params: list) -> None:
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise InvalidInput(f"filter has more than {MAX_CONDITIONS} conditions; use $in for many values")
        self.values(params)

    @staticmethod
    def values(params: list) -> None:
        if len(params) > MAX_VALUES:
            raise InvalidInput(f"filter has more than {MAX_VALUES:,} values in all")


def _condition(key: str, spec: Any, params: list, budget: _Budget) -> str:
    field = _field(key)
    if key == "$document_id" and isinstance(spec, list):
        spec = {"$in": spec}
    if not isinstance(spec, dict):
        params.append(_scalar(spec, key))
        budget.condition(params)
        return f"{field} = ?"
    if not spec:
        raise InvalidInput(f"filter on {key!r} has no operator")
    parts = []
    for op, value in spec.items():
        budget.condition(params)
        if op in _COMPARISONS:
            params.append(_scalar(value, f"{key}.{op}"))
            parts.append(f"{field} {_COMPARISONS[op]} ?")
        elif op in ("$in", "$nin"):
            if not isinstance(value, list) or not value or len(value) > MAX_LIST:
                raise InvalidInput(f"filter {key}.{op} needs a non-empty list (at most {MAX_LIST} values)")
            params.extend(_scalar(v, f"{key}.{op}") for v in value)
            marks = ",".join("?" * len(value))
            parts.append(f"{field} IN ({marks})" if op == "$in" else f"({field} IS NULL OR {field} NOT IN ({marks}))")
        else:
            raise InvalidInput(
                f"unknown filter operator {op!r} on {key!r}; use one of {', '.join([*_COMPARISONS, '$in', '$nin'])}"
            )
    return " AND ".join(parts)


def _compile(node: Any, params: list, depth: int, budget: _Budget) -> str:
    if depth > MAX_DEPTH:
        raise InvalidInput("filter is nested too deeply")
    if not isinstance(node, dict) or not node:
        raise InvalidInput("a filter must be a non-empty JSON object")
    parts = []
    for key, value in node.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise InvalidInput(f"filter {key} needs a non-empty list of filters")
            inner = [f"({_compile(v, params, depth + 1, budget)})" for v in value]
            parts.append(f" {key[1:].upper()} ".join(inner))
        elif key.startswith("$") and key != "$document_id":
            raise InvalidInput(f"unknown filter operator {key!r}; use $and, $or, $document_id or a metadata field")
        else:
            parts.append(_condition(key, value, params, budget))
    return " AND ".join(f"({p})" for p in parts)


def compile_filter(where: dict | None) -> tuple[str, list]:
    """SQL condition on ``d`` and its parameters ("1" when there is no filter)."""
    if where is None:
        return "1", []
    params: list = []
    budget = _Budget()
    sql = _compile(where, params, 0, budget)
    budget.values(params)
    return sql, params
