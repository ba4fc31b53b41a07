"""A late-interaction ColBERT search server."""

from pathlib import Path

__version__ = (
    (Path(__file__).resolve().parent.parent / "VERSION").read_text().strip()
    if (Path(__file__).resolve().parent.parent / "VERSION").exists()
    else "0.0.0"
)

# LiteLLM (under DSPy) would fetch its model price list from the internet at
# import; the copy inside the package is enough and keeps start-up offline.
import os as _os

_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
