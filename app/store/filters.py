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

A search's choice of document fields (:class:`FieldFilter`) compiles to a
condition on ``chunks`` (alias ``c``), applied on the same path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from app.errors import InvalidInput
from app.validation import check_json_value

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
    if isinstance(value, (int, float, str)):
        try:  # finite, within 64 bits, valid Unicode: what SQLite can bind and compare
            check_json_value(value, f"filter {where}")
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return value
    raise InvalidInput(f"filter {where}: values must be strings, numbers or booleans, not {type(value).__name__}")


def _field(key: str) -> str:
    if key == "$document_id":
        return "d.external_id"
    if not _KEY.fullmatch(key):
        raise InvalidInput(f"filter key {key!r} is not a metadata field or a known operator")
    return f"""json_extract(d.metadata, '$."{key}"')"""


class _Budget:
    """Conditions compiled so far, against MAX_CONDITIONS."""

    def __init__(self) -> None:
        self.conditions = 0

    def condition(self) -> None:
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise InvalidInput(f"filter has more than {MAX_CONDITIONS} conditions; use $in for many values")


def _condition(key: str, spec: Any, params: list, budget: _Budget) -> str:
    field = _field(key)
    if key == "$document_id" and isinstance(spec, list):
        spec = {"$in": spec}
    if not isinstance(spec, dict):
        params.append(_scalar(spec, key))
        budget.condition()
        return f"{field} = ?"
    if not spec:
        raise InvalidInput(f"filter on {key!r} has no operator")
    parts = []
    for op, value in spec.items():
        budget.condition()
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
    sql = _compile(where, params, 0, _Budget())
    if len(params) > MAX_VALUES:  # each list is capped too: at most MAX_CONDITIONS x MAX_LIST before this
        raise InvalidInput(f"filter has more than {MAX_VALUES:,} values in all")
    return sql, params


@dataclass(frozen=True)
class FieldFilter:
    """Which fields' chunks a search may return: those named in ``include``
    (None: every field) that are not in ``exclude``."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    @property
    def restricts(self) -> bool:
        return self.include is not None or bool(self.exclude)


def compile_field_filter(fields: FieldFilter | None) -> tuple[str, list]:
    """SQL condition on ``c`` (chunks) and its parameters ("1" when every field is allowed)."""
    if fields is None or not fields.restricts:
        return "1", []
    parts: list[str] = []
    params: list = []
    if fields.include is not None:
        parts.append(f"c.field IN ({','.join('?' * len(fields.include))})")
        params.extend(fields.include)
    if fields.exclude:
        parts.append(f"c.field NOT IN ({','.join('?' * len(fields.exclude))})")
        params.extend(fields.exclude)
    return " AND ".join(parts), params
