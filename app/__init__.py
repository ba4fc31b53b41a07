"""A late-interaction ColBERT search server."""

from pathlib import Path

__version__ = (
    (Path(__file__).resolve().parent.parent / "VERSION").read_text().strip()
    if (Path(__file__).resolve().parent.parent / "VERSION").exists()
    else "0.0.0"
)
