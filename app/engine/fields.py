"""A search's choice of document fields: which fields' chunks it may return,
and how much each field weighs.

- ``fields``: only chunks of these fields are candidates (``text`` names the
  main text). Applied before ranking, on the metadata filter's path (the
  allowed passage ids, a condition of the keyword query), so k hits still
  come back when the chosen fields hold k chunks.
- ``field_weights`` ``{field: weight}``: a field left out weighs 1. Each
  hit's final score (its mode's score, after fusion) is multiplied by its
  field's weight, and the hits are ranked again by that product (equal
  products keep retrieval's order). A weight of 0 excludes the field before
  ranking, as if it were left out of ``fields``. Retrieval goes deeper when
  the weights can change the order, so a boosted field's chunk can climb into
  the top k: the best ``max(4k, 100)`` candidates (at most ``max(k, 1000)``)
  are weighted, then cut to k.

Every mode's scores are positive except dense cosines, which can fall below
0: there a weight above 1 pushes a negative score further down.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import InvalidInput
from app.store.filters import FieldFilter
from app.validation import MAX_CHOSEN_FIELDS, MAX_FIELD_WEIGHT, check_field_name

if TYPE_CHECKING:
    from app.engine.search import SearchHit

WEIGHTED_DEPTH_FACTOR = 4
WEIGHTED_DEPTH_MIN = 100
WEIGHTED_DEPTH_MAX = 1000


@dataclass(frozen=True)
class FieldChoice:
    filter: FieldFilter
    weights: dict[str, float]  # positive weights only; a field left out weighs 1

    @classmethod
    def of(cls, fields: Collection[str] | None = None, weights: Mapping[str, float] | None = None) -> FieldChoice:
        """The request's choice, checked (every way in: HTTP, the CLI, the answer service)."""
        try:
            if fields is not None:
                if not fields or len(fields) > MAX_CHOSEN_FIELDS:
                    raise ValueError(f"fields must name 1 to {MAX_CHOSEN_FIELDS} fields")
                for name in fields:
                    check_field_name(name, "fields:")
            if weights is not None and len(weights) > MAX_CHOSEN_FIELDS:
                raise ValueError(f"field_weights may weigh at most {MAX_CHOSEN_FIELDS} fields")
            for name, weight in (weights or {}).items():
                check_field_name(name, "field_weights:")
                if (
                    isinstance(weight, bool)
                    or not isinstance(weight, (int, float))
                    or not (math.isfinite(weight) and 0 <= weight <= MAX_FIELD_WEIGHT)
                ):
                    raise ValueError(f"field_weights.{name} must be a number from 0 to {MAX_FIELD_WEIGHT:g}")
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        chosen = {name: float(weight) for name, weight in (weights or {}).items()}
        exclude = tuple(sorted(name for name, weight in chosen.items() if weight == 0))
        include = None if fields is None else tuple(sorted(set(fields) - set(exclude)))
        if include == ():
            raise InvalidInput("every field chosen weighs 0: the search could find nothing")
        return cls(FieldFilter(include, exclude), {name: w for name, w in chosen.items() if w > 0})

    def weight(self, field: str) -> float:
        return self.weights.get(field, 1.0)

    @property
    def reorders(self) -> bool:
        """Whether the weights can change the order of the hits (fields
        allowed weigh differently)."""
        if self.filter.include is not None:
            return len({self.weight(name) for name in self.filter.include}) > 1
        return any(w != 1.0 for w in self.weights.values())

    def depth(self, k: int) -> int:
        """Candidates to retrieve for ``k`` hits."""
        if not self.reorders:
            return k
        return max(k, min(WEIGHTED_DEPTH_MAX, max(WEIGHTED_DEPTH_FACTOR * k, WEIGHTED_DEPTH_MIN)))

    def weigh(self, hits: list[SearchHit], k: int) -> list[SearchHit]:
        """The top ``k`` of ``hits`` by score times field weight, ranked again."""
        if all(w == 1.0 for w in self.weights.values()):
            return hits[:k]
        scored = sorted(
            ((h.score * self.weight(h.hit.field), i, h) for i, h in enumerate(hits)), key=lambda t: (-t[0], t[1])
        )
        return [dataclasses.replace(h, score=score, rank=rank) for rank, (score, _, h) in enumerate(scored[:k], 1)]
