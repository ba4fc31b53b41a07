"""Fixes that colbert-ai needs before it can serve live traffic.

Each module holds one fix; :func:`apply` installs the in-place ones exactly
once, and the rest are classes and functions the engine calls instead of their
upstream counterparts. Nothing outside ``app.engine`` imports colbert directly.

The fixes reach into colbert-ai's internals (private methods, attributes set
in constructors, module-level names), so they are written for one release:
:func:`apply` refuses any other. ``tests/colbert_patches/test_upstream_names.py``
checks every upstream name they rely on, without loading a model.
"""

from __future__ import annotations

import importlib.metadata
import threading

# The colbert-ai release these patches were written and tested against
# (pyproject.toml pins it; a test keeps the two equal).
SUPPORTED_COLBERT_VERSION = "0.2.22"

_applied = False
_lock = threading.Lock()


def check_colbert_version() -> None:
    """Raise ``RuntimeError`` unless the installed colbert-ai is the supported release."""
    try:
        installed = importlib.metadata.version("colbert-ai")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == SUPPORTED_COLBERT_VERSION:
        return
    found = f"colbert-ai {installed} is installed" if installed else "colbert-ai is not installed"
    raise RuntimeError(
        f"{found}, but colbert_patches supports only colbert-ai=={SUPPORTED_COLBERT_VERSION}: "
        f"they patch its internals, which change between releases. Install the pinned release "
        f"(pip install colbert-ai=={SUPPORTED_COLBERT_VERSION}, or ./scripts/setup.sh). To move to "
        f"another release, check each module in colbert_patches/ against it, run "
        f"tests/colbert_patches/test_upstream_names.py, then update SUPPORTED_COLBERT_VERSION "
        f"and the pin in pyproject.toml."
    )


def apply() -> None:
    """Install the in-place patches (idempotent, thread-safe).

    Raises ``RuntimeError`` before patching anything when the installed
    colbert-ai is not :data:`SUPPORTED_COLBERT_VERSION`.
    """
    global _applied
    with _lock:
        if _applied:
            return
        check_colbert_version()
        from . import codec, model_loading, quiet

        quiet.apply()
        model_loading.apply()
        codec.apply()
        _applied = True


__all__ = ["SUPPORTED_COLBERT_VERSION", "apply", "check_colbert_version"]
