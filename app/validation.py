"""Limits on JSON values that clients send (document metadata, filters, the
multipart forms): what SQLite, the tokenizer and the JSON readers of the
answers can take. Every route checks with :func:`check_json_value`, so a
value that breaks one of these answers 4xx when it arrives, never 500 later
(a NaN stored in metadata made every filtered search of its collection fail).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# SQLite integers are signed 64-bit: a larger JSON integer cannot be bound
# as a parameter or compared by json_extract.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32  # nested objects and lists in one value
# Collection names. Matched whole (``fullmatch``): a plain ``match`` would let
# "$" take a trailing newline. The same string is declared in the OpenAPI page.
COLLECTION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
COLLECTION_NAME_RULE = "1-64 characters a-z, 0-9, '_' or '-', starting with a letter or digit"
# Text that must hold more than whitespace (document texts, queries,
# questions): at least one character that str.strip() keeps. Spelled out
# rather than "\S", whose meaning differs between Python, Rust (pydantic) and
# ECMAScript (JSON Schema) regular expressions; tests check it against strip.
NOT_BLANK_PATTERN = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
MAX_METADATA_BYTES = 64 * 1024  # one document's metadata as stored JSON; returned with every hit


def check_json_value(value: Any, where: str = "value", max_depth: int = MAX_DEPTH) -> None:
    """Raise ValueError unless ``value`` (parsed JSON) holds only valid
    Unicode, finite numbers, integers SQLite can store, and at most
    ``max_depth`` levels of nesting. Iterative: no input depth can make it
    recurse."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                raise ValueError(f"{where} holds an integer outside the signed 64-bit range")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{where} holds a non-finite number ({item}); JSON numbers must be finite")
        elif isinstance(item, (dict, list)):
            if depth >= max_depth:
                raise ValueError(f"{where} is nested more than {max_depth} levels deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, where)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str, where: str) -> None:
    # JSON allows lone surrogates ("\ud800"), which neither the tokenizer nor SQLite can take.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} holds a lone surrogate at position {exc.start}") from None


def check_metadata(metadata: dict | None, where: str = "metadata") -> None:
    """:func:`check_json_value`, and at most MAX_METADATA_BYTES as stored."""
    if metadata is None:
        return
    check_json_value(metadata, where)
    size = len(json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{where} is {size:,} bytes as JSON; at most {MAX_METADATA_BYTES:,} are allowed")


# Named text fields of a document (``fields: {name: text}`` beside ``text``).
# ``text`` is the main field: a document's own text, addressed as field
# "text" in searches; a ``fields`` object may not use that name. Lowercase
# identifiers, so "Title" and "title" cannot be two fields of one document.
MAIN_FIELD = "text"
TITLE_FIELD = "title"
FIELD_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
FIELD_NAME_RULE = "1-64 characters a-z, 0-9 or '_', starting with a letter"
MAX_FIELDS = 16  # named fields per document, ``text`` not counted
MAX_CHOSEN_FIELDS = 64  # names in one search's fields or field_weights (a collection's documents may differ)
MAX_FIELD_WEIGHT = 1000.0
_FIELD_NAME = re.compile(FIELD_NAME_PATTERN)


def check_field_name(name: Any, where: str = "field name") -> str:
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"{where} {name!r} is not a field name: use {FIELD_NAME_RULE}")
    return name


def check_fields(fields: dict | None, where: str = "fields") -> None:
    """A document's named fields: at most MAX_FIELDS, each a field name other
    than ``text`` with text that holds more than whitespace (the sizes are
    checked with the document's text, against its limit)."""
    if fields is None:
        return
    if not isinstance(fields, dict):
        raise ValueError(f"{where} must be an object of field name to text")
    if len(fields) > MAX_FIELDS:
        raise ValueError(f"{where} has {len(fields)} fields; at most {MAX_FIELDS} are allowed beside text")
    for name, text in fields.items():
        check_field_name(name, f"{where}: the name")
        if name == MAIN_FIELD:
            raise ValueError(f"{where}.{MAIN_FIELD}: the main field is the document's text; give it as text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}.{name} must be text holding more than whitespace")
        _check_text(text, f"{where}.{name}")
