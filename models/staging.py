"""Build a model directory once, atomically, even with several processes starting at once.

A builder writes into a private directory beside the destination; on success
the directory gets a marker file, becomes readable by every user (the server
may run as another user than the builder) and replaces the destination with a
rename. A crash leaves either the old directory or the new one, never half of
one; a directory without its marker is rebuilt.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(dest: Path, marker: str, note: str = "ok\n") -> Iterator[Path]:
    """A fresh directory to build ``dest`` in; it replaces ``dest`` when the block ends without an error."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        (tmp / marker).write_text(note)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_once(dest: Path, marker: str, build: Callable[[], Path]) -> Path:
    """``dest`` when it holds ``marker``; else ``build()``, under a file lock beside ``dest`` so that one
    process builds and the others wait for it."""
    dest = Path(dest)
    if (dest / marker).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / marker).exists():
            return dest
        return build()
