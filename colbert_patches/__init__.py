"""Fixes that colbert-ai needs before it can serve live traffic.

Each module holds one fix; :func:`apply` installs the in-place ones exactly
once, and the rest are classes and functions the engine calls instead of their
upstream counterparts. Nothing outside ``app.engine`` imports colbert directly.
"""

from __future__ import annotations

import threading

_applied = False
_lock = threading.Lock()


def apply() -> None:
    """Install the in-place patches (idempotent, thread-safe)."""
    global _applied
    with _lock:
        if _applied:
            return
        from . import codec, model_loading, quiet

        quiet.apply()
        model_loading.apply()
        codec.apply()
        _applied = True


__all__ = ["apply"]
