"""The encoders of the checkpoints collections are indexed with.

Every collection starts on the server's configured checkpoint (``None``
here). A re-index (:mod:`app.engine.reindex`) may move one to another
checkpoint: a directory under ``<data dir>/checkpoints/``, named by its
directory name (so a data directory moved elsewhere keeps working), such as
the ones ``python -m app.cli tune`` writes. Queries of a collection are
encoded with the checkpoint its served index was encoded with, which the
store names together with the index's generation.

Each checkpoint's encoder is loaded on first use in each process and kept;
they must give token vectors of the configured checkpoint's dimension (the
index backend is built for it).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.errors import CheckpointNotFound, InvalidInput

CHECKPOINT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CHECKPOINT_NAME = re.compile(CHECKPOINT_NAME_PATTERN)
CHECKPOINTS_DIR = "checkpoints"


def checkpoint_root(data_dir: Path) -> Path:
    return Path(data_dir) / CHECKPOINTS_DIR


def check_checkpoint_name(name: str) -> str:
    if not CHECKPOINT_NAME.fullmatch(name or "") or name in {".", ".."}:
        raise InvalidInput(
            f"invalid checkpoint name {name!r}: a directory name under the data directory's {CHECKPOINTS_DIR}/ "
            "(letters, digits, '.', '_' and '-'; 128 characters at most)"
        )
    return name


class Encoders:
    """``default``: the configured checkpoint's encoder; ``load``: a
    checkpoint directory's path -> its encoder (None: only the default is
    served, as in tests of something else)."""

    def __init__(self, default: Any, root: Path, load: Callable[[str], Any] | None = None):
        self.default = default
        self.root = Path(root)
        self._load = load
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        """Where checkpoint ``name`` lies (404 when it is not there)."""
        path = self.root / check_checkpoint_name(name)
        if not path.is_dir():
            raise CheckpointNotFound(f"checkpoint {name!r} does not exist under {self.root}")
        return path

    def get(self, name: str | None) -> Any:
        """The encoder of checkpoint ``name`` (None: the configured one),
        loaded once per process."""
        if name is None:
            return self.default
        with self._lock:
            encoder = self._loaded.get(name)
            if encoder is None:
                if self._load is None:
                    raise CheckpointNotFound(f"checkpoint {name!r} cannot be loaded by this server")
                encoder = self._load(str(self.path(name)))
                mine, theirs = (self.default.dim, self.default.nbits), (encoder.dim, encoder.nbits)
                if mine != theirs:
                    raise InvalidInput(
                        f"checkpoint {name!r} gives {theirs[0]}-dimensional vectors at {theirs[1]} bits; "
                        f"the index is built for {mine[0]} at {mine[1]}"
                    )
                self._loaded[name] = encoder
            return encoder
