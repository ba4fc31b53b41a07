"""Split a document into passages that fit the model's document length.

A seam for richer splitters: anything that returns :class:`Passage` objects
with character offsets into the original text can replace
:func:`split_by_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Passage:
    text: str
    char_start: int
    char_end: int


def split_by_tokens(text: str, tokenizer, budget: int, overlap: int | None = None) -> list[Passage]:
    """Windows of at most ``budget`` word-pieces, overlapping by ``overlap``.

    A window ends at the last sentence end (``.!?`` followed by a space)
    inside it when there is one in its second half, so passages rarely cut a
    sentence in two.
    """
    if budget < 8:
        raise ValueError("passage budget must be at least 8 tokens")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoding["offset_mapping"]
    if len(offsets) <= budget:
        stripped = text.strip()
        start = text.find(stripped) if stripped else 0
        return [Passage(stripped, start, start + len(stripped))]
    overlap = budget // 8 if overlap is None else overlap
    passages: list[Passage] = []
    first = 0
    while first < len(offsets):
        last = min(first + budget, len(offsets))  # exclusive
        if last < len(offsets):
            for i in range(last - 1, first + budget // 2, -1):
                piece = text[offsets[i][0] : offsets[i][1]]
                if piece in {".", "!", "?"}:
                    last = i + 1
                    break
        start, end = offsets[first][0], offsets[last - 1][1]
        passages.append(Passage(text[start:end], start, end))
        if last >= len(offsets):
            break
        first = max(last - overlap, first + 1)
    return passages
