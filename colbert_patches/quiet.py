"""Route colbert-ai's console output to logging.

Upstream prints every step with ``print`` and opens tqdm bars in library code
(index loading, encoding); under a server that floods stdout and leaves stray
bars at shutdown.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("colbert")


def _print_message(*parts, condition=True, pad=False):
    if condition:
        logger.debug(" ".join(str(p) for p in parts))


class _SilentTqdm:
    """A do-nothing progress bar: iterates its iterable and ignores the rest."""

    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else [])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _print(*parts, **_kwargs):
    logger.debug(" ".join(str(p) for p in parts))


def apply() -> None:
    import colbert.indexing.collection_indexer as collection_indexer
    import colbert.utils.utils as utils

    utils.print_message = _print_message
    # A bare print() in the residual statistics of codec training: shadowed in
    # that module alone (redirecting sys.stdout would swallow every thread's).
    collection_indexer.print = _print
    import colbert.indexing.codecs.residual  # noqa: F401
    import colbert.modeling.checkpoint  # noqa: F401  (load before walking modules)
    import colbert.search.index_loader  # noqa: F401
    import colbert.search.index_storage  # noqa: F401

    # Any: the attributes looked for below are set by each module's own imports.
    modules: list[tuple[str, Any]] = list(sys.modules.items())
    for name, module in modules:
        if not name.startswith("colbert.") or module is None:
            continue
        if getattr(module, "print_message", None) is not None:
            module.print_message = _print_message
        if getattr(module, "tqdm", None) is not None:
            tq = module.tqdm
            # Some modules import the tqdm module, others the class.
            if hasattr(tq, "tqdm"):
                module.tqdm = type("tqdm_module", (), {"tqdm": _SilentTqdm})
            else:
                module.tqdm = _SilentTqdm
